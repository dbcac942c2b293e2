"""Causal Wan DiT: tangent pass == torch.func.jvp, KV-cache streaming == full block-causal pass."""
import pytest
import torch

from conftest import rel_err
from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.models import build_model
from megatron_rcm.ops.masks import ChunkVisibility, block_causal_mask, full_mask, teacher_forcing_mask

B, F, H, W = 2, 4, 8, 8


def _model(chunk=1, window=0, sink=0, **kw):
    cfg = model_preset("tiny", param_dtype="float64", num_layers=2, **kw)
    model = build_model(cfg, CausalConfig(chunk_frames=chunk, window_chunks=window, sink_chunks=sink,
                                          attention_backend="reference"))
    with torch.no_grad():  # non-trivial modulation tables and norm weights
        for name, p in model.named_parameters():
            if "norm" in name or "scale_shift" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _inputs(frames=F):
    x = torch.randn(B, 3, frames, H, W, dtype=torch.float64)
    t = torch.rand(B, frames, dtype=torch.float64) * 1000
    ctx = torch.randn(B, 8, 32, dtype=torch.float64)
    return x, t, ctx


def _mask(kind, model):
    tpf = model.tokens_per_frame(H, W)
    return {"full": full_mask(F * tpf), "frame": block_causal_mask(F, tpf, 1),
            "chunk": block_causal_mask(F, tpf, 2), "none": None}[kind]


@pytest.mark.parametrize("kind", ["full", "frame", "chunk"])
def test_tangent_pass_equals_torch_func_jvp(kind):
    model = _model()
    mask = _mask(kind, model)
    x, t, ctx = _inputs()
    tx, tt = torch.randn_like(x), torch.randn_like(t)
    y, ty = model.forward_with_tangent(x, t, ctx, tx, tt, mask)
    ry, rty = torch.func.jvp(lambda a, b: model(a, b, ctx, mask), (x, t), (tx, tt))
    assert rel_err(y, ry) < 1e-12
    assert rel_err(ty, rty) < 1e-9
    # latents-only and timestep-only tangents
    _, ty_x = model.forward_with_tangent(x, t, ctx, tx, None, mask)
    _, ty_t = model.forward_with_tangent(x, t, ctx, None, tt, mask)
    assert rel_err(ty_x + ty_t, rty) < 1e-9


@pytest.mark.parametrize("chunk", [1, 2])
def test_teacher_forcing_tangent_equals_torch_func_jvp(chunk):
    model = _model(chunk=chunk)
    mask = teacher_forcing_mask(F, model.tokens_per_frame(H, W), chunk)
    x, t, ctx = _inputs()
    clean = torch.randn_like(x)
    tx, tt = torch.randn_like(x), torch.randn_like(t)
    y, ty = model.forward_teacher_forcing(clean, x, t, ctx, mask, tx, tt)
    fn = lambda a, b: model.forward_teacher_forcing(clean, a, b, ctx, mask)[0]  # noqa: E731
    ry, rty = torch.func.jvp(fn, (x, t), (tx, tt))
    assert rel_err(y, ry) < 1e-12
    assert rel_err(ty, rty) < 1e-9


def test_teacher_forcing_noisy_chunk_sees_only_earlier_clean_chunks():
    """Changing clean frame j may only change noisy outputs of chunks > chunk(j)."""
    model = _model(chunk=2)
    mask = teacher_forcing_mask(F, model.tokens_per_frame(H, W), 2)
    x, t, ctx = _inputs()
    clean = torch.randn_like(x)
    y0, _ = model.forward_teacher_forcing(clean, x, t, ctx, mask)
    clean2 = clean.clone()
    clean2[:, :, 2] += 1.0  # frame 2 = chunk 1
    y1, _ = model.forward_teacher_forcing(clean2, x, t, ctx, mask)
    assert torch.equal(y0[:, :, :4], y1[:, :, :4])  # chunks 0 and 1 (noisy) unaffected
    # a 6-frame video: chunk 2 must change
    x6, t6, _ = _inputs(frames=6)
    mask6 = teacher_forcing_mask(6, model.tokens_per_frame(H, W), 2)
    c6 = torch.randn_like(x6)
    a, _ = model.forward_teacher_forcing(c6, x6, t6, ctx, mask6)
    c6[:, :, 2] += 1.0
    b, _ = model.forward_teacher_forcing(c6, x6, t6, ctx, mask6)
    assert torch.equal(a[:, :, :4], b[:, :, :4]) and not torch.allclose(a[:, :, 4:], b[:, :, 4:])


@pytest.mark.parametrize("chunk,window,sink", [(1, 0, 0), (2, 0, 0), (1, 2, 1), (1, 3, 0)])
def test_kv_cache_streaming_equals_full_block_causal_pass(chunk, window, sink):
    model = _model(chunk=chunk, window=window, sink=sink)
    x, t, ctx = _inputs()
    vis = ChunkVisibility(window, sink)
    full = model(x, t, ctx, block_causal_mask(F, model.tokens_per_frame(H, W), chunk, vis))
    cache = model.new_kv_cache(H, W)
    outs = []
    for c in range(F // chunk):
        sl = slice(c * chunk, (c + 1) * chunk)
        out, _ = model.forward_chunk(x[:, :, sl], t[:, sl], ctx, cache, c, write_cache=True)
        outs.append(out)
    assert rel_err(torch.cat(outs, dim=2), full) < 1e-12
    if window:
        assert len(cache) <= window - 1 + sink


def test_kv_cache_memory_is_bounded_by_the_window():
    model = _model(chunk=1, window=2, sink=1)
    x, t, ctx = _inputs(frames=1)
    cache = model.new_kv_cache(H, W)
    for c in range(12):
        model.forward_chunk(x, t, ctx, cache, c, write_cache=True)
        assert cache.num_tokens <= 2 * model.tokens_per_frame(H, W)
    assert cache.chunks == [0, 11]


@pytest.mark.parametrize("reentrant", [True, False])  # one recompute node per block, or saved-tensor hooks
def test_gradient_checkpointing_gives_identical_gradients(monkeypatch, reentrant):
    from megatron_rcm.models import causal_wan

    model = _model()
    model.reentrant_recompute = reentrant
    x, t, ctx = _inputs()
    mask = _mask("frame", model)
    calls = []
    real = causal_wan.checkpoint
    monkeypatch.setattr(causal_wan, "checkpoint", lambda *a, **k: calls.append(a[7]) or real(*a, **k))
    grads = []
    for ckpt, first_n, expect in ((False, 0, []), (True, 0, [0, 1]), (True, 1, [0]), (True, 5, [0, 1])):
        model.zero_grad()
        model.gradient_checkpointing, model.checkpoint_layers = ckpt, first_n
        calls.clear()
        model(x, t, ctx, mask).square().mean().backward()
        assert calls == expect  # which blocks were checkpointed
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for other in grads[1:]:
        for name, a in grads[0].items():
            if reentrant and name.startswith("condition_embedder."):  # text and time embeddings feed every block:
                torch.testing.assert_close(other[name], a, rtol=1e-12, atol=0)  # their gradient sums in another order
            else:
                assert torch.equal(a, other[name]), name


def test_action_conditioning_changes_output_and_checks_shapes():
    model = _model(action_dim=3)
    torch.nn.init.normal_(model.action_embedder.linear_2.weight)
    x, t, ctx = _inputs()
    a = torch.randn(B, F, 3, dtype=torch.float64)
    y1 = model(x, t, ctx, actions=a)
    y2 = model(x, t, ctx, actions=a.flip(1))
    assert not torch.allclose(y1, y2)
    with pytest.raises(ValueError, match="action-conditioned"):
        model(x, t, ctx)
    with pytest.raises(ValueError, match=r"actions must be \[B, frames, 3\]"):
        model(x, t, ctx, actions=a[:, :2])


def test_zero_initialised_action_embedder_leaves_the_model_unchanged():
    model = _model(action_dim=2)
    x, t, ctx = _inputs()
    plain = model(x, t, ctx, actions=torch.zeros(B, F, 2, dtype=torch.float64))
    assert torch.equal(plain, model(x, t, ctx, actions=torch.randn(B, F, 2, dtype=torch.float64)))


def test_wan_1_3b_builds_on_meta_without_allocating():
    cfg = model_preset("wan2.1-1.3b", param_dtype="bfloat16")
    model = build_model(cfg, device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    assert 1.25e9 < n < 1.5e9, n  # Wan2.1-T2V-1.3B has ~1.42e9 parameters
    assert model.tokens_per_frame(60, 104) == 1560  # 480x832 video -> 60x104 latents


def test_bad_shapes_have_clear_errors():
    model = _model()
    x, t, ctx = _inputs()
    with pytest.raises(ValueError, match="timestep must be"):
        model(x, t[:, :2], ctx)
    with pytest.raises(ValueError, match=r"latents must be \[B, 3, F, H, W\]"):
        model(x[:, :2], t, ctx)
    with pytest.raises(ValueError, match="not divisible by the patch"):
        model(x[..., :6], t, ctx)
    with pytest.raises(ValueError, match="mask covers"):
        model(x, t, ctx, block_causal_mask(2, model.tokens_per_frame(H, W)))
