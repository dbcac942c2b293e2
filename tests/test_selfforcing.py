"""Self-forcing rollout: cache == cache-free reference, one differentiable step per chunk, flat graph."""
import pytest
import torch

from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.models import build_model
from megatron_rcm.network import Condition, Denoiser
from megatron_rcm.selfforcing.rollout import RolloutConfig, denoise_levels, self_forcing_rollout

SHAPE = (2, 3, 4, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


def _rollout(model, ctx, shape, *args, actions=None, **kwargs):
    """The rollout of a model's denoiser for a text context (and actions)."""
    return self_forcing_rollout(Denoiser(model), Condition(ctx, actions=actions), shape, *args, **kwargs)


def _model(chunk_frames, window=0, sink=0, seed=0):
    torch.manual_seed(seed)
    return build_model(model_preset("tiny", num_layers=1), CausalConfig(chunk_frames=chunk_frames,
                                                                       window_chunks=window, sink_chunks=sink))


def _ctx(seed=1):
    return torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(seed))


def _gen(seed=5):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("chunk_frames,window,sink", [(1, 0, 0), (2, 0, 0), (1, 2, 1)])
def test_cache_rollout_equals_full_sequence_reference(chunk_frames, window, sink):
    model, ctx = _model(chunk_frames, window, sink), _ctx()
    n_chunks = SHAPE[2] // chunk_frames
    exits = [3, 1, 2, 0][:n_chunks]
    a = _rollout(model, ctx, SHAPE, generator=_gen(), exit_steps=exits, use_cache=True)
    b = _rollout(model, ctx, SHAPE, generator=_gen(), exit_steps=exits, use_cache=False)
    assert a.video.shape == SHAPE
    torch.testing.assert_close(a.video, b.video, atol=2e-5, rtol=1e-4)
    assert a.exit_steps == exits


def test_only_the_exit_step_is_differentiable():
    model, ctx = _model(2), _ctx()
    levels = denoise_levels([1000, 750, 500, 250])
    grads_enabled = []
    orig = model.forward_chunk

    def spy(*a, **k):
        grads_enabled.append((torch.is_grad_enabled(), k.get("write_cache", False)))
        return orig(*a, **k)

    model.forward_chunk = spy
    res = _rollout(model, ctx, SHAPE, generator=_gen(), exit_steps=[2, 3])
    model.forward_chunk = orig
    # chunk 0: 3 steps (grad only on the last) + cache write; chunk 1: 4 steps (grad only on the last)
    assert grads_enabled == [(False, False), (False, False), (True, False), (False, True),
                             (False, False), (False, False), (False, False), (True, False)]
    assert len(levels) == 4
    # gradient equals a hand-written version where only the exit step is differentiable
    res.video[:, :, :2].pow(2).sum().backward()
    g_rollout = [_g(p) for p in model.parameters()]
    assert sum(float(g.abs().sum()) for g in g_rollout) > 0
    model.zero_grad()
    g = _gen()
    cache = model.new_kv_cache(8, 8)
    noise = torch.randn((2, 3, 2, 8, 8), generator=g)
    fn = lambda x, t: model.forward_chunk(x, t, ctx, cache, 0)[0]
    with torch.no_grad():
        x = noise
        for k in range(2):
            x0 = x - levels[k] * fn(x, torch.full((2, 2), 1000 * levels[k]))
            x = (1 - levels[k + 1]) * x0 + levels[k + 1] * torch.randn(noise.shape, generator=g)
    x0 = x - levels[2] * fn(x, torch.full((2, 2), 1000 * levels[2]))
    x0.pow(2).sum().backward()
    for a, b in zip(g_rollout, model.parameters()):
        torch.testing.assert_close(a, _g(b), atol=1e-5, rtol=1e-4)


def _g(p):
    return torch.zeros_like(p) if p.grad is None else p.grad.clone()


def _graph_size(t):
    seen, stack = set(), [t.grad_fn]
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        stack.extend(f for f, _ in n.next_functions)
    return len(seen)


def test_graph_does_not_grow_with_steps():
    model, ctx = _model(1), _ctx()
    sizes = []
    for steps in ([1000, 500], [1000, 750, 500, 250]):
        cfg = RolloutConfig(denoising_steps=steps)
        res = _rollout(model, ctx, SHAPE, cfg, generator=_gen(), exit_steps=[len(steps) - 1] * 4)
        sizes.append(_graph_size(res.video.sum()))
    assert sizes[0] == sizes[1]


def test_random_exit_sync_and_per_chunk():
    import random
    model, ctx = _model(1), _ctx()
    res = _rollout(model, ctx, SHAPE, RolloutConfig(), generator=_gen(), rng=random.Random(0), grad=False)
    assert len(set(res.exit_steps)) == 1 and not res.video.requires_grad
    res = _rollout(model, ctx, SHAPE, RolloutConfig(sync_exit_across_chunks=False), generator=_gen(),
                               rng=random.Random(3), grad=False)
    assert len(res.exit_steps) == 4 and all(0 <= e < 4 for e in res.exit_steps)


def test_actions_flow_into_rollout():
    torch.manual_seed(0)
    model = build_model(model_preset("tiny", num_layers=1, action_dim=3), CausalConfig(chunk_frames=2))
    torch.nn.init.normal_(model.action_embedder.linear_2.weight)
    ctx = _ctx()
    a0 = torch.zeros(2, 4, 3); a0[..., 0] = 1
    a1 = torch.zeros(2, 4, 3); a1[..., 1] = 1
    r0 = _rollout(model, ctx, SHAPE, generator=_gen(), exit_steps=[1, 1], actions=a0, grad=False)
    r1 = _rollout(model, ctx, SHAPE, generator=_gen(), exit_steps=[1, 1], actions=a1, grad=False)
    r0b = _rollout(model, ctx, SHAPE, generator=_gen(), exit_steps=[1, 1], actions=a0, grad=False,
                               use_cache=False)
    assert not torch.allclose(r0.video, r1.video)
    torch.testing.assert_close(r0.video, r0b.video, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk_frames,window,sink,exits", [(1, 0, 0, [0, 1, 1, 0]), (1, 2, 1, [1, 0, 1, 1]),
                                                             (2, 0, 0, [0, 1])])
def test_checkpointed_rollout_gives_identical_gradients(chunk_frames, window, sink, exits):
    """Cached exit steps run activation-checkpointed against a frozen cache snapshot: the recomputation in
    backward happens after later chunks were appended (and old ones evicted) and must see the forward's cache."""
    torch.manual_seed(0)
    model = build_model(model_preset("tiny", num_layers=2, param_dtype="float64"),
                        CausalConfig(chunk_frames=chunk_frames, window_chunks=window, sink_chunks=sink))
    ctx = _ctx().double()
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads, calls = [], []
    for ckpt in (False, True):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = ckpt
        res = _rollout(model, ctx, SHAPE, cfg=RolloutConfig(denoising_steps=[1000.0, 500.0]),
                                   generator=_gen(), exit_steps=exits)
        (res.video * w).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-12, atol=1e-14, msg=f"gradient of {n}")


def test_frozen_cache_keeps_the_forward_view():
    from megatron_rcm.models.kv_cache import KVCache, LayerCache

    cache = KVCache(1)
    k = torch.randn(1, 2, 1, 4)
    cache.append(0, 0, k, k)
    cache.commit(0)
    snap = cache.frozen()
    cache.append(0, 1, k, k)
    cache.commit(1)
    cache.layers[0].cross_k = torch.ones(1)
    assert snap.keys_values(0)[0].shape[1] == 2 and cache.keys_values(0)[0].shape[1] == 4
    assert snap.chunks == [0] and snap.layers[0].cross_k is None
    snap.layers[0].cross_k = torch.zeros(1)  # ignored: recomputation must build the forward's graph again
    assert snap.layers[0].cross_k is None and isinstance(cache.layers[0], LayerCache)


def test_a_reserved_cache_appends_in_place_and_its_snapshots_share_the_buffer():
    """``reserve_tokens`` (the rollout's): chunks are written into one buffer after the cached prefix, so the
    snapshots of a checkpointed rollout are prefixes of it (one copy of the cache, not one per chunk); a
    snapshot never sees later chunks, and a snapshot's own (recomputed) write never reaches the live buffer."""
    from megatron_rcm.models.kv_cache import KVCache

    chunks = [torch.randn(1, 2, 1, 4, dtype=torch.float64) for _ in range(4)]
    reserved, plain, snaps = KVCache(1, reserve_tokens=6), KVCache(1), []
    for i, k in enumerate(chunks[:3]):
        for cache in (reserved, plain):
            cache.append(0, i, k, -k)
            cache.commit(i)
        snaps.append(reserved.frozen())
    room = reserved.layers[0].k_room
    assert room is not None and room.shape[1] == 6
    for n, snap in enumerate(snaps, start=1):
        k, v = snap.keys_values(0)
        assert k.data_ptr() == room.data_ptr() and k.shape[1] == 2 * n  # a prefix view: no copy
        torch.testing.assert_close(k, torch.cat(chunks[:n], dim=1), rtol=0, atol=0)
        torch.testing.assert_close(v, -torch.cat(chunks[:n], dim=1), rtol=0, atol=0)
    for a, b in zip(reserved.keys_values(0), plain.keys_values(0)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    snaps[0].append(0, 1, chunks[3], chunks[3])  # a recomputed write on the first snapshot
    torch.testing.assert_close(reserved.keys_values(0)[0], torch.cat(chunks[:3], dim=1), rtol=0, atol=0)
    assert reserved.nbytes == 2 * room.numel() * room.element_size()  # the room is what the cache holds
    reserved.append(0, 3, chunks[3], chunks[3])  # past the reserve: a new tensor, the snapshots untouched
    assert reserved.layers[0].k_room is None and reserved.layers[0].k.shape[1] == 8
    torch.testing.assert_close(snaps[-1].keys_values(0)[0], torch.cat(chunks[:3], dim=1), rtol=0, atol=0)
