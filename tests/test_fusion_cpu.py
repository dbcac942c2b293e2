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


def _aot_without_inductor(graph, example):
    """The fusion layer's own graphs through AOTAutograd with the traced graph as the kernel (no C++ build)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    return aot_module_simplified(graph, example, fw_compiler=lambda g, _: make_boxed_func(g.forward))


def _own_graph_step(num_layers: int, guards: str | None):
    """Outputs, parameter gradients and graphs per function (None: fusion off) of a float64 TF-sCM-like step and a
    KV-cached rollout chunk, with ``guards='own'`` graphs run through AOTAutograd (``_aot_without_inductor``)."""
    from megatron_rcm.config.model import CausalConfig, model_preset
    from megatron_rcm.models import build_model
    from megatron_rcm.network import Condition, Denoiser

    torch.manual_seed(0)
    model = build_model(model_preset("tiny", num_layers=num_layers), CausalConfig(chunk_frames=2)).double()
    net = Denoiser(model)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, 4, 16, 16, generator=g, dtype=torch.float64)
    cond = Condition(torch.randn(2, 8, 32, generator=g, dtype=torch.float64))
    s = torch.rand(2, 4, generator=g, dtype=torch.float64)
    outs = []
    if guards is not None:
        fusion.set_enabled(True, devices=("cpu",), backend="eager", guards=guards)
    try:
        with torch.no_grad():
            outs += net.teacher_forcing(x0, x0, s, cond, tangent=torch.ones_like(x0), s_tangent=torch.ones_like(s))
        out = net.teacher_forcing(x0, x0, s, cond)[0]
        out.square().sum().backward()
        cache = net.new_cache(16, 16)
        with torch.no_grad():
            net.write_chunk(x0[:, :, :2], cond, cache, 0)
        v = net.chunk(x0[:, :, 2:4], 0.5, cond, cache, 1)[0]
        v.sum().backward()
        outs += [out.detach(), v.detach()] + [p.grad for p in model.parameters() if p.grad is not None]
        graphs = {w.__name__: (len(w.graphs), sum(e is None for e in w.graphs.values()))
                  for w in fusion._registry if w.graphs}
        return outs, graphs
    finally:
        fusion.set_enabled(False, guards="dynamo")
        torch._dynamo.reset()
        gc.collect()


def test_own_graphs_equal_eager_and_are_found_again(monkeypatch):
    """guards='own': every fusable call of a TF-sCM-like step (primal and tangent, grad and no grad) and a cached
    rollout chunk is traced once per signature, gives eager's values and gradients (float64), and the graphs per
    function do not grow with the number of blocks."""
    monkeypatch.setattr(fusion, "_graph_compiler", _aot_without_inductor)
    ref, none = _own_graph_step(2, None)
    got, two = _own_graph_step(2, "own")
    assert none == {} and len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a is not None and b is not None and (a - b).abs().max() <= 1e-12 * b.abs().max()
    _, four = _own_graph_step(4, "own")
    assert two == four, (two, four)
    assert {"_norm_modulate", "gated_residual", "apply_rope", "rms_norm"} <= set(four)
    # a handful of signatures each (grad mode x tangents x shapes: text, frames, chunk), every one traced (no
    # fallback to dynamo)
    assert all(n <= 12 and fallbacks == 0 for n, fallbacks in four.values()), four
    with pytest.raises(ValueError, match="guards"):
        fusion.set_enabled(True, guards="none")
