"""GPU: the compiled (fused) elementwise path equals the eager definition, primal, tangent and gradients."""
import pytest
import torch

from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.models import build_model
from megatron_rcm.ops import fusion
from megatron_rcm.ops.masks import teacher_forcing_mask

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(params=["dynamo", "own"])
def fused(request):
    """Both ways a compiled call finds its graph (ops/fusion.py ``_guards``)."""
    fusion.set_enabled(True, guards=request.param)
    yield request.param
    fusion.set_enabled(False, guards="dynamo")


def _run(model, clean, x, t, ctx, mask, tx, tt):
    model.zero_grad(set_to_none=True)
    y, ty = model.forward_teacher_forcing(clean, x, t, ctx, mask, tx, tt)
    (y * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
    return y.detach(), ty.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float64])
def test_compiled_block_chains_match_eager(fused, dtype):
    torch.manual_seed(0)
    cfg = model_preset("tiny", param_dtype="float32", num_layers=2)
    model = build_model(cfg, CausalConfig(chunk_frames=1, attention_backend="reference")).cuda().to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "scale_shift" in name:
                p.add_(0.3 * torch.randn_like(p))
    b, f, h, w = 2, 3, 8, 8
    mask = teacher_forcing_mask(f, model.tokens_per_frame(h, w), 1)
    x, clean = (torch.randn(b, 3, f, h, w, device="cuda", dtype=dtype) for _ in range(2))
    t = torch.rand(b, f, device="cuda", dtype=dtype) * 1000
    ctx = torch.randn(b, 8, cfg.text_dim, device="cuda", dtype=dtype)
    tx, tt = torch.randn_like(x), torch.randn_like(t)
    fusion.set_enabled(False)
    ref = _run(model, clean, x, t, ctx, mask, tx, tt)
    fusion.set_enabled(True)
    out = _run(model, clean, x, t, ctx, mask, tx, tt)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel(out[0], ref[0]) < tol
    assert rel(out[1], ref[1]) < tol
    assert ref[2].keys() == out[2].keys()
    for name in ref[2]:
        assert rel(out[2][name], ref[2][name]) < 10 * tol, name
    if fused == "own":  # every call signature traced and compiled by inductor (none left to dynamo)
        traced = [e for w in fusion._registry for e in w.graphs.values()]
        assert traced and all(e is not None for e in traced)
