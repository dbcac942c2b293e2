"""GPU: with ``MEGATRON_RCM_TRAINING_SDPA=cudnn`` full-mask calls autograd records go to cuDNN's forward and backward
on Hopper (``ops/attention.py`` ``_cudnn_training``): its split forward (O, LSE) and backward equal the float64
reference, "auto" routes only full-mask recorded calls there, and checkpointed blocks keep cuDNN's outputs across
the recompute with the gradients of the plain recompute."""
import os

import pytest
import torch

from conftest import rel_err
from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.models import build_model
from megatron_rcm.ops import attention as A
from megatron_rcm.ops.attention_reference import attention_reference
from megatron_rcm.ops.masks import block_causal_mask

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                 reason="needs a Hopper GPU (cuDNN's attention is routed there only)")]


def _qkv(b, sq, sk, h, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, s, h, d, device="cuda", dtype=dtype, generator=g) for s in (sq, sk, sk)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("b,sq,sk", [(1, 96, 300), (2, 257, 257), (1, 1000, 512)])
def test_cudnn_split_forward_and_backward_equal_the_reference(dtype, d, b, sq, sk):
    q, k, v = _qkv(b, sq, sk, 3, d, dtype)
    do = torch.randn_like(q)
    scale = d ** -0.5
    o, lse = A.cudnn_forward_lse(q, k, v, None, scale)
    assert o.shape == q.shape and o.is_contiguous()  # [B, S, H, D] without a copy: what the model flattens
    dq, dk, dv = A.cudnn_backward(q, k, v, o, do, lse, None, scale)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ro = attention_reference(*ref, scale=scale)
    rgrads = torch.autograd.grad(ro, ref, do.double())
    assert rel_err(o, ro) < 1e-2
    for name, got, want in zip("qkv", (dq, dk, dv), rgrads):
        assert got.shape == want.shape and got.dtype == dtype
        assert rel_err(got, want) < 2e-2, f"d{name}"


@pytest.fixture
def training_cudnn(monkeypatch):
    monkeypatch.setattr(A, "TRAINING_SDPA", "cudnn")


def test_training_calls_stay_fused_by_default(monkeypatch):
    if "MEGATRON_RCM_TRAINING_SDPA" not in os.environ:
        assert A.TRAINING_SDPA == "fused"  # opt-in (the module comment says why)
    monkeypatch.setattr(A, "TRAINING_SDPA", "fused")
    q, k, v = (t.requires_grad_() for t in _qkv(1, 96, 288, 2, 128, torch.bfloat16))
    monkeypatch.setattr(A, "cudnn_forward_lse", lambda *a: pytest.fail("cuDNN's split forward ran"))
    A.attention(q, k, v).sum().backward()


def test_auto_sends_recorded_full_mask_calls_to_cudnn_and_masked_ones_to_the_fused_kernel(training_cudnn,
                                                                                          monkeypatch):
    calls = []
    real = A.cudnn_forward_lse
    monkeypatch.setattr(A, "cudnn_forward_lse", lambda *a: calls.append(a[0].shape) or real(*a))
    q, k, v = (t.requires_grad_() for t in _qkv(1, 96, 288, 2, 128, torch.bfloat16))
    o = A.attention(q, k, v)
    assert len(calls) == 1
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v), do)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(attention_reference(*ref), ref, do.double())
    assert all(rel_err(a, b) < 2e-2 for a, b in zip(got, want))
    mask = block_causal_mask(6, 48, 2)
    A.attention(k, k, v, mask)  # masked: the fused kernel
    with torch.no_grad():
        A.attention(q, k, v)  # not recorded: cuDNN's inference path, not the split one
    assert len(calls) == 1
    monkeypatch.setattr(A, "TRAINING_SDPA", "fused")
    A.attention(q, k, v)
    assert len(calls) == 1


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_exit_chunk_keeps_cudnn_outputs_with_the_recompute_gradients(reentrant, training_cudnn,
                                                                                  monkeypatch):
    """A self-forcing exit step (one chunk with grad against a cache written without grad): its self- and
    cross-attention are full-mask calls, so cuDNN; kept outputs skip the self-attention forward of the recompute."""
    torch.manual_seed(0)
    cfg = model_preset("tiny", num_layers=3, num_attention_heads=2, attention_head_dim=128, ffn_dim=512)
    model = build_model(cfg, CausalConfig(chunk_frames=1)).cuda()
    model.gradient_checkpointing, model.reentrant_recompute = True, reentrant
    b, f, h, w = 2, 3, 32, 32
    x = torch.randn(b, 3, f, h, w, device="cuda")
    t = torch.rand(b, f, device="cuda") * 1000
    ctx = torch.randn(b, 8, cfg.text_dim, device="cuda")
    cache = model.new_kv_cache(h, w)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for c in range(2):
            model.forward_chunk(x[:, :, c:c + 1], t[:, c:c + 1], ctx, cache, c, write_cache=True)
    calls = []
    real = A.cudnn_forward_lse
    monkeypatch.setattr(A, "cudnn_forward_lse", lambda *a: calls.append(a[0].shape) or real(*a))

    def grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model.forward_chunk(x[:, :, 2:3], t[:, 2:3], ctx, cache, 2)[0]
        (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    layers = cfg.num_layers
    # recorded calls: self- and cross-attention of the first run and of the recompute; the reentrant checkpoint's
    # first run is not recorded (no_grad), so its calls take cuDNN's inference path
    assert len(calls) == (2 if reentrant else 4) * layers
    calls.clear()
    model.keep_attention = True
    kept = grads()
    # the recompute's self-attention forwards are gone; a kept first run takes the split path in either mode (the
    # recompute's backward needs that kernel's LSE)
    assert len(calls) == (2 if reentrant else 3) * layers
    assert ref.keys() == kept.keys()
    for name in ref:  # the same kernels on the same recomputed q, k, v
        torch.testing.assert_close(kept[name], ref[name], rtol=1e-3, atol=1e-6, msg=name)
