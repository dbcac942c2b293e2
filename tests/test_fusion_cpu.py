"""CPU: the fusion switch never changes CPU results, which calls take the compiled path, and how many
graphs dynamo makes for a multi-layer model (no recompile-limit fallbacks to eager)."""
import gc

import pytest
import torch

from megatron_rcm.ops import dual, fusion


@pytest.fixture
def recorder(monkeypatch):
    """torch.compile replaced by a recorder that returns the plain function (no compiler needed)."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(fn.__name__) or fn)
    fusion.reset()
    yield seen
    fusion.set_enabled(False)
    fusion.reset()


def test_fusable_stays_eager_off_cuda_or_when_disabled(recorder):
    x, tx = torch.randn(4, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    ref = dual.layer_norm.eager(x, tx)
    for flag in (False, True):
        fusion.set_enabled(flag)
        y, ty = dual.layer_norm(x, tx)
        assert torch.equal(y, ref[0]) and torch.equal(ty, ref[1])
    assert recorder == []  # by default only CUDA tensors reach torch.compile
    fusion.set_enabled(False, devices=("cpu",))
    dual.layer_norm(x, None)
    assert recorder == []  # disabled: never compiled


def test_calls_below_the_size_threshold_stay_eager(recorder):
    small, big = torch.randn(4, 8, dtype=torch.float64), torch.randn(64, 8, dtype=torch.float64)
    fusion.set_enabled(True, devices=("cpu",), min_elements=100)
    try:
        dual.layer_norm(small, None)
        assert recorder == []  # 32 elements: eager
        dual.layer_norm(big, None)
        assert recorder == ["layer_norm"]  # 512 elements: compiled
        with pytest.raises(ValueError, match="min_elements"):
            fusion.set_enabled(True, min_elements=-1)
    finally:
        fusion.set_enabled(False, min_elements=0)


def test_enabled_calls_compile_once_except_collective_ones(recorder):
    fusion.set_enabled(True, devices=("cpu",))
    x = torch.randn(3, 8, dtype=torch.float64)
    tx = torch.randn(3, 8, dtype=torch.float64)
    dual.rms_norm(x, tx, None, 1e-6)
    dual.rms_norm(x, tx, None, 1e-6)  # cached: compiled once
    calls = []
    y, ty = dual.rms_norm(x, tx, None, 1e-6, reduce=lambda ms, mxd: calls.append(1) or (ms, mxd))
    assert recorder == ["rms_norm"]  # the collective-carrying call stayed eager
    assert calls == [1]
    y2, ty2 = dual.rms_norm.eager(x, tx, None, 1e-6)
    assert torch.allclose(y, y2) and torch.allclose(ty, ty2)


def _graphs_per_function(num_layers: int) -> dict:
    """Compiled variants (dynamo cache entries) of every fusable function after a TF-sCM-like step and a
    KV-cached rollout chunk of a ``num_layers``-block model, traced with dynamo's plain backend on the CPU."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from megatron_rcm.config.model import CausalConfig, model_preset
    from megatron_rcm.models import build_model
    from megatron_rcm.network import Condition, Denoiser

    torch._dynamo.reset()
    fusion.set_enabled(True, devices=("cpu",), backend="eager")
    try:
        torch.manual_seed(0)
        net = Denoiser(build_model(model_preset("tiny", num_layers=num_layers), CausalConfig(chunk_frames=2)))
        for frames in (4, 8):  # two sequence lengths, a batch doubled by CFG, tangents, grad and no grad
            x0 = torch.randn(2, 3, frames, 16, 16)
            cond, s = Condition(torch.randn(2, 8, 32), torch.randn(2, 8, 32)), torch.rand(2, frames)
            with torch.no_grad():
                net.teacher_forcing(x0, x0, s, cond, guidance=2.0)
                net.teacher_forcing(x0, x0, s, cond, tangent=torch.randn_like(x0), s_tangent=torch.ones_like(s))
                cache = net.new_cache(16, 16)
                net.write_chunk(x0[:, :, :2], cond, cache, 0)
            net.teacher_forcing(x0, x0, s, cond)[0].sum().backward()
            net.chunk(x0[:, :, 2:4], 0.5, cond, cache, 1)[0].sum().backward()
        return {w.__name__: len(_debug_get_cache_entry_list(w.eager.__code__)) for w in fusion._registry
                if _debug_get_cache_entry_list(w.eager.__code__)}
    finally:
        fusion.set_enabled(False)
        torch._dynamo.reset()
        gc.collect()  # dynamo's fake tensors must not outlive the test (memory tests walk the live tensors)


def test_compiled_graphs_do_not_grow_with_layers_or_hit_the_recompile_limit():
    """At most one graph per (grad mode, tangent or not) and array rank, whatever the number of blocks, the
    sequence lengths and batch sizes, inside the recompile limit (past it dynamo runs eager). Before the fix
    (views of differently laid out bases, aliased modulation vectors) the block's norm/modulation and gated
    residual recompiled for every call site and fell back to eager."""
    two, four = _graphs_per_function(2), _graphs_per_function(4)
    assert two == four, (two, four)
    assert {"_norm_modulate", "gated_residual", "apply_rope", "rms_norm"} <= set(four)
    # (grad mode, tangent or not) x rank + the first static graph; gelu_tanh has rank-3 (text) and rank-4 callers
    assert max(four.values()) <= 8, four
    assert four["_norm_modulate"] <= 5 and four["gated_residual"] <= 5, four
    assert torch._dynamo.config.recompile_limit >= fusion.RECOMPILE_LIMIT
