"""Chunk patterns with a first chunk of its own size (Causal-rCM's c1-4 / c3-3 / c1-1) everywhere: masks and
their tile summaries, the teacher-forcing sequence, the KV cache with window/sink eviction, streaming vs one
full block-causal pass, the cache-free rollout, world-model actions and the config checks."""
import math

import pytest
import torch

from megatron_rcm.config.errors import ConfigError
from megatron_rcm.config.model import CausalConfig, model_preset, validate_causal
from megatron_rcm.inference.streaming import StreamConfig, stdin_action_reader, stream_video
from megatron_rcm.models import build_model
from megatron_rcm.models.kv_cache import KVCache
from megatron_rcm.network import Condition, Denoiser
from megatron_rcm.ops.chunks import ChunkLayout
from megatron_rcm.ops.masks import (TILE_FULL, TILE_PARTIAL, TILE_SKIP, ChunkVisibility, block_causal_mask,
                                    kv_cache_mask, teacher_forcing_mask)
from megatron_rcm.selfforcing.rollout import RolloutConfig, self_forcing_rollout

pytestmark = pytest.mark.usefixtures("one_thread")

PATTERNS = [(1, 4, 9), (3, 3, 9), (1, 1, 5), (2, 3, 8)]  # (first, chunk, frames)
VISIBILITY = [ChunkVisibility(), ChunkVisibility(window=2), ChunkVisibility(window=2, sink=1)]


def _chunk_of_tokens(first, chunk, frames, tpf):
    """Brute force: the chunk of every token, from the frame index alone."""
    f = torch.arange(frames).repeat_interleave(tpf)
    return torch.where(f < first, 0, 1 + (f - first).div(chunk, rounding_mode="floor"))


def _visible(ci, cj, vis):
    return (cj <= ci) & ((vis.window == 0) | (ci - cj < vis.window) | (cj < vis.sink))


def _tiles(dense, bq, bk):
    tq, tk = math.ceil(dense.shape[0] / bq), math.ceil(dense.shape[1] / bk)
    out = torch.empty(tq, tk, dtype=torch.int8)
    for i in range(tq):
        for j in range(tk):
            t = dense[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            out[i, j] = TILE_FULL if t.all() else (TILE_SKIP if not t.any() else TILE_PARTIAL)
    return out


def test_layout_of_a_first_chunk_of_its_own_size():
    lay = ChunkLayout(9, 4, 1)
    assert lay.sizes == (1, 4, 4) and lay.chunk_starts() == [0, 1, 5, 9]
    assert ChunkLayout.covering(5, 4, 1).sizes == (1, 4, 4, 4, 4) and ChunkLayout.covering(5, 4, 1).start(4) == 13
    assert lay.to_frames(torch.tensor([[1.0, 2.0, 3.0]])).tolist() == [[1, 2, 2, 2, 2, 3, 3, 3, 3]]
    with pytest.raises(ValueError, match="1 \\+ k x 4"):
        ChunkLayout(8, 4, 1)


@pytest.mark.parametrize("first,chunk,frames", PATTERNS)
@pytest.mark.parametrize("vis", VISIBILITY)
def test_block_causal_and_teacher_forcing_masks_with_a_first_chunk(first, chunk, frames, vis):
    tpf = 3
    c = _chunk_of_tokens(first, chunk, frames, tpf)
    bc = block_causal_mask(frames, tpf, chunk, vis, first_chunk_frames=first).dense()
    assert torch.equal(bc, _visible(c[:, None], c[None, :], vis))
    tf = teacher_forcing_mask(frames, tpf, chunk, vis, first_chunk_frames=first).dense()
    n = frames * tpf
    seen = _visible(c[:, None], c[None, :], vis)
    assert torch.equal(tf[:n, :n], seen)  # clean chunk i: clean chunks <= i (window/sink)
    assert not tf[:n, n:].any()  # clean never sees noisy
    assert torch.equal(tf[n:, :n], seen & (c[:, None] != c[None, :]))  # noisy i: clean chunks < i
    assert torch.equal(tf[n:, n:], c[:, None] == c[None, :])  # noisy i: itself only
    for m in (block_causal_mask(frames, tpf, chunk, vis, first_chunk_frames=first),
              teacher_forcing_mask(frames, tpf, chunk, vis, first_chunk_frames=first)):
        for bq, bk in ((4, 4), (7, 5), (16, 3)):  # tiles straddling the first chunk's boundary
            assert torch.equal(m.tile_summary(bq, bk), _tiles(m.dense(), bq, bk))


@pytest.mark.parametrize("vis", VISIBILITY)
def test_kv_cache_mask_with_per_chunk_token_counts_equals_block_causal_rows(vis):
    first, chunk, frames, tpf = 1, 4, 13, 2
    lay = ChunkLayout(frames, chunk, first)
    full = block_causal_mask(frames, tpf, chunk, vis, first_chunk_frames=first).dense()
    for cur in range(lay.n_chunks):
        rows = slice(lay.start(cur) * tpf, (lay.start(cur) + lay.size(cur)) * tpf)
        cached = list(range(cur))
        m = kv_cache_mask(cached, [lay.size(j) * tpf for j in cached], cur, lay.size(cur) * tpf, vis).dense()
        assert torch.equal(m, full[rows, : rows.stop])


def test_kv_cache_evicts_chunks_of_different_sizes_by_window_and_sink():
    cache = KVCache(1, ChunkVisibility(window=2, sink=1))
    sizes = [1, 4, 4, 4, 4]
    for i, n in enumerate(sizes):
        kv = torch.full((1, n, 1, 2), float(i))
        cache.append(0, i, kv, kv)
        cache.commit(i)
        kept = [j for j in range(i + 1) if j < 1 or (i + 1) - j < 2]  # what chunk i + 1 can see
        assert cache.chunks == kept and cache.chunk_tokens == [sizes[j] for j in kept]
        k, _ = cache.keys_values(0)
        assert k[0, :, 0, 0].tolist() == [float(j) for j in kept for _ in range(sizes[j])]
    keep_all = KVCache(1, ChunkVisibility(window=2, sink=1), evict=False)
    for i, n in enumerate(sizes):
        keep_all.append(0, i, torch.full((1, n, 1, 2), float(i)), torch.zeros(1, n, 1, 2))
        keep_all.commit(i)
    view = keep_all.before(3)
    assert view.chunks == [0, 1, 2] and view.keys_values(0)[0].shape[1] == 9 and keep_all.num_tokens == 17
    with pytest.raises(ValueError, match="layers appended"):
        keep_all.append(0, 5, torch.zeros(1, 4, 1, 2), torch.zeros(1, 4, 1, 2))
        keep_all.append(0, 5, torch.zeros(1, 3, 1, 2), torch.zeros(1, 3, 1, 2))


def _model(first, chunk, window=0, sink=0, action_dim=0, dtype="float64"):
    torch.manual_seed(0)
    m = build_model(model_preset("tiny", num_layers=2, action_dim=action_dim, param_dtype=dtype),
                    CausalConfig(chunk_frames=chunk, first_chunk_frames=first, window_chunks=window, sink_chunks=sink))
    if action_dim:
        torch.nn.init.normal_(m.action_embedder.linear_2.weight)
    return m.eval()


CTX = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("first,chunk,window,sink", [(1, 4, 0, 0), (3, 3, 0, 0), (1, 4, 2, 1), (1, 1, 3, 1)])
def test_streamed_chunks_equal_one_full_block_causal_pass(first, chunk, window, sink):
    """Every chunk run against the cache (then written) gives the full block-causal pass's output for it,
    window/sink eviction included; and a noisy query of chunk i against the cache equals the teacher-forcing
    sequence's noisy chunk i (clean context < i)."""
    net = Denoiser(_model(first, chunk, window, sink))
    frames = first + 2 * chunk if chunk > 1 else 5
    lay = net.layout(frames)
    g = torch.Generator().manual_seed(3)
    video = torch.randn(2, 3, frames, 8, 8, generator=g, dtype=torch.float64)
    noisy = torch.randn(2, 3, frames, 8, 8, generator=g, dtype=torch.float64)
    s = lay.to_frames(torch.rand(2, lay.n_chunks, generator=g, dtype=torch.float64))
    cond = Condition(CTX)
    with torch.no_grad():
        full, _ = net.velocity(video, 0.0, cond, attend="block_causal")
        tf, _ = net.teacher_forcing(video, noisy, s, cond)
        cache = net.new_cache(8, 8)
        for i in range(lay.n_chunks):
            sl = lay.frame_slice(i)
            q, _ = net.chunk(noisy[:, :, sl], s[:, sl], cond, cache, i)
            torch.testing.assert_close(q, tf[:, :, sl], rtol=1e-10, atol=1e-12)
            w, _ = net.chunk(video[:, :, sl], 0.0, cond, cache, i, write=True)
            torch.testing.assert_close(w, full[:, :, sl], rtol=1e-10, atol=1e-12)
        if window:
            assert len(cache) <= window - 1 + sink


@pytest.mark.parametrize("first,chunk", [(1, 4), (3, 3)])
def test_rollout_with_cache_equals_cache_free_rollout_and_stream(first, chunk):
    model = _model(first, chunk, dtype="float32")
    net, frames = Denoiser(model), first + 2 * chunk
    cond = Condition(CTX.float())
    cfg = RolloutConfig(denoising_steps=[1000, 500])
    kw = dict(exit_steps=[1, 1, 1], grad=False)
    cached = self_forcing_rollout(net, cond, (2, 3, frames, 8, 8), cfg, torch.Generator().manual_seed(5), **kw)
    free = self_forcing_rollout(net, cond, (2, 3, frames, 8, 8), cfg, torch.Generator().manual_seed(5),
                                use_cache=False, **kw)
    torch.testing.assert_close(cached.video, free.video, rtol=1e-4, atol=2e-5)
    outs = list(stream_video(model, CTX.float(), frames, 8, 8, StreamConfig(steps=2),
                             generator=torch.Generator().manual_seed(5)))
    assert [o.frames.shape[2] for o in outs] == [first, chunk, chunk]
    torch.testing.assert_close(torch.cat([o.frames for o in outs], dim=2), cached.video, rtol=1e-4, atol=2e-5)


def test_world_model_actions_follow_the_chunk_sizes():
    model = _model(1, 4, action_dim=3, dtype="float32")
    seen = []
    reader = stdin_action_reader(3, model.chunk_layout(9).size, batch=2, stream=__import__("io").StringIO("1\n2\n"),
                                 prompt=False)

    def act(chunk, frames_so_far):
        a = reader(chunk, frames_so_far)
        seen.append(tuple(a.shape))
        return a

    outs = list(stream_video(model, CTX.float(), 9, 8, 8, StreamConfig(steps=1), action_fn=act,
                             generator=torch.Generator().manual_seed(0)))
    assert seen == [(2, 1, 3), (2, 4, 3), (2, 4, 3)] and [o.frames.shape[2] for o in outs] == [1, 4, 4]


def test_config_checks_name_the_first_chunk_key():
    validate_causal(CausalConfig(chunk_frames=4, first_chunk_frames=1), num_frames=9)
    with pytest.raises(ConfigError, match="causal.first_chunk_frames") as e:
        validate_causal(CausalConfig(chunk_frames=4, first_chunk_frames=2), num_frames=9)
    assert "[1, 5, 9]" in str(e.value)
    with pytest.raises(ConfigError, match="causal.first_chunk_frames"):
        validate_causal(CausalConfig(chunk_frames=4, first_chunk_frames=-1))
    from megatron_rcm.config.run import load_config

    args = ["data.num_frames=10", "causal.chunk_frames=4", "causal.first_chunk_frames=2", "parallel.cp=2",
            "phases=[{name: t, kind: teacher, objective: flow_matching}, "
            "{name: d, kind: sf_dmd, objective: dmd, teacher_from: t}]"]
    load_config(None, args)  # cp | frames and cp | chunk_frames: every chunk splits over the cp ranks
    with pytest.raises(ConfigError, match="parallel.cp"):
        load_config(None, args[:1] + ["causal.chunk_frames=3", "causal.first_chunk_frames=1"] + args[3:])
