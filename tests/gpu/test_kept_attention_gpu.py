"""GPU: checkpointed blocks that keep their self-attention outputs (fused kernels) give the gradients of the
plain recompute, and the recompute runs no attention forward."""
import pytest
import torch

from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.models import build_model
from megatron_rcm.ops import fused_attention
from megatron_rcm.ops.masks import block_causal_mask, teacher_forcing_mask

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or fused_attention._C is None,
                                                  reason="needs a CUDA GPU and the fused extension")]


def _grads(model, x, t, ctx, mask, clean=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = model(x, t, ctx, mask) if clean is None else model.forward_teacher_forcing(clean, x, t, ctx, mask)[0]
    (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("layout", ["block_causal", "teacher_forcing"])
def test_kept_attention_gives_the_recompute_gradients(reentrant, layout, monkeypatch):
    torch.manual_seed(0)
    cfg = model_preset("tiny", num_layers=3, num_attention_heads=2, attention_head_dim=128, ffn_dim=512)
    model = build_model(cfg, CausalConfig(chunk_frames=1, attention_backend="fused")).cuda()
    model.gradient_checkpointing, model.reentrant_recompute = True, reentrant
    b, f, h, w = 2, 4, 32, 32
    tpf = model.tokens_per_frame(h, w)
    x, clean = (torch.randn(b, 3, f, h, w, device="cuda") for _ in range(2))
    t = torch.rand(b, f, device="cuda") * 1000
    ctx = torch.randn(b, 8, cfg.text_dim, device="cuda")
    if layout == "teacher_forcing":
        mask, args = teacher_forcing_mask(f, tpf, 1), (clean,)
    else:
        mask, args = block_causal_mask(f, tpf, 1), ()
    forwards = []

    class Counting:  # the extension, counting its forward launches
        def __getattr__(self, name):
            return getattr(real, name)

        def fwd(self, *a):
            forwards.append(a[0].shape)
            return real.fwd(*a)

    real = fused_attention._C
    monkeypatch.setattr(fused_attention, "_C", Counting())
    ref = _grads(model, x, t, ctx, mask, *args)
    plain_forwards = len(forwards)
    forwards.clear()
    model.keep_attention = True
    kept = _grads(model, x, t, ctx, mask, *args)
    # self-attention: one forward per block instead of two; the text cross-attention recomputes as before
    assert plain_forwards - len(forwards) == cfg.num_layers
    assert ref.keys() == kept.keys()
    for name in ref:  # the same kernels on the same recomputed q, k, v: equal up to the order of atomics
        torch.testing.assert_close(kept[name], ref[name], rtol=1e-3, atol=1e-6, msg=name)
