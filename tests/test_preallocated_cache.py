"""The preallocated stream cache equals the growing one, and the CUDA-graph runner's protocol (on CPU, with a
capture that bakes in the cache's host state as a real graph does)."""
import copy

import pytest
import torch

from megatron_rcm.config.errors import ConfigError
from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.inference.streaming import StreamConfig, stream_video
from megatron_rcm.models import build_model
from megatron_rcm.models.preallocated_cache import PreallocatedKVCache, capacity_chunks
from megatron_rcm.network import Condition, NoisyContext
from megatron_rcm.network.chunk_graphs import ChunkGraphs
from megatron_rcm.ops.chunks import ChunkLayout
from megatron_rcm.ops.masks import ChunkVisibility

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(chunk=1, first=0, window=0, sink=0, action_dim=0, layers=2):
    torch.manual_seed(0)
    cfg = model_preset("tiny", num_layers=layers, param_dtype="float64", action_dim=action_dim)
    model = build_model(cfg, CausalConfig(chunk_frames=chunk, first_chunk_frames=first, window_chunks=window,
                                          sink_chunks=sink, attention_backend="reference")).eval()
    if action_dim:
        torch.nn.init.normal_(model.action_embedder.linear_2.weight)
    return model


def _ctx(seed=1, batch=2):
    return torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _video(model, frames, growing=False, ctx=None, uncond=None, seed=7, actions=False, condition_at=None,
           recache=True, **options):
    """A streamed video and the cache classes it used (``growing``: the concatenating KVCache, as before)."""
    caches = []
    new = model.new_kv_cache

    def tracked(*a, **k):
        if growing:
            k["stream_frames"] = None
        caches.append(new(*a, **k))
        return caches[-1]

    model.new_kv_cache = tracked
    act = None
    if actions:
        def act(chunk, _frames):
            c = model.causal
            size = ChunkLayout.covering(chunk + 1, c.chunk_frames, c.first_chunk_frames or None).size(chunk)
            return torch.nn.functional.one_hot(torch.tensor([chunk % 3] * size), 3).double()
    try:
        out = list(stream_video(model, _ctx() if ctx is None else ctx, frames, 8, 8, StreamConfig(steps=2, **options),
                                uncond_context=uncond, action_fn=act, generator=torch.Generator().manual_seed(seed),
                                condition_at=condition_at, recache=recache))
    finally:
        model.new_kv_cache = new
    return torch.cat([o.frames for o in out], dim=2), [type(c).__name__ for c in caches], out


CASES = {
    "unlimited": (dict(chunk=1), {}),
    "window_sink_rebase_past_training": (dict(chunk=1, window=2, sink=1),
                                         dict(rope_policy="rebase", trained_frames=3)),
    "window_sink_absolute": (dict(chunk=2, window=2, sink=1), dict(rope_policy="absolute")),
    "sliding_window_no_sink": (dict(chunk=1), dict(window_chunks=2, sink_chunks=0)),
    "first_chunk_of_its_own_size": (dict(chunk=2, first=1, window=2, sink=1), dict(rope_policy="rebase")),
    "two_sinks_rebase": (dict(chunk=1), dict(window_chunks=2, sink_chunks=2, rope_policy="rebase")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_preallocated_stream_equals_the_growing_cache(case):
    """Same keys in the same order: the streams are bitwise equal (float64), past the window and the training
    length (evictions, rebased sinks), with CFG and with per-chunk actions."""
    kw, options = CASES[case]
    model = _model(**kw, action_dim=3)
    frames = 9 if kw.get("first") else 8
    ref, kinds, _ = _video(model, frames, growing=True, actions=True, **options)
    got, kinds_new, outs = _video(model, frames, actions=True, **options)
    assert kinds == ["KVCache"] and kinds_new == ["PreallocatedKVCache"]
    assert torch.equal(got, ref)
    guided = dict(uncond=_ctx(5), guidance_scale=3.0)
    ref, _, _ = _video(model, frames, growing=True, actions=True, **guided, **options)
    got, _, _ = _video(model, frames, actions=True, **guided, **options)
    assert torch.equal(got, ref)


def test_preallocated_stream_with_a_prompt_switch_and_noisy_context():
    model = _model(chunk=1, window=3, sink=1)
    other = Condition(_ctx(9))
    for recache in (True, False):
        def at(chunk):
            return other if chunk >= 4 else Condition(_ctx())
        opts = dict(rope_policy="rebase", trained_frames=4, noisy_context=NoisyContext(0.3, 1))
        ref, _, _ = _video(model, 8, growing=True, condition_at=at, recache=recache, **opts)
        got, _, _ = _video(model, 8, condition_at=at, recache=recache, **opts)
        assert torch.equal(got, ref), recache


def test_capacity_is_the_largest_visible_set():
    """Brute force over every chunk of long layouts: what a chunk sees (cached + itself) never exceeds it."""
    for first in (None, 1, 3):
        for w in range(0, 5):
            for s in range(0, 3):
                layout = ChunkLayout.covering(12, 2, first)
                vis = ChunkVisibility(w, s)
                cap = sum(layout.size(c) for c in capacity_chunks(layout, vis))
                seen = max(sum(layout.size(j) for j in vis.visible_chunks(c)) for c in range(12))
                assert cap == seen, (first, w, s)


def test_preallocated_cache_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="fp8"):
        PreallocatedKVCache(1, kv_cache_dtype="fp8_e4m3", capacity_tokens=8)
    cache = PreallocatedKVCache(1, capacity_tokens=4)
    k = torch.zeros(1, 3, 2, 4)
    cache.attended(0, k, k)
    cache.append(0, 0, k, k)
    cache.commit(0)
    with pytest.raises(ValueError, match="exceed its capacity"):
        cache.attended(0, k, k)
    with pytest.raises(NotImplementedError):
        cache.frozen()


# ---------------------------------------------------------------- the CUDA-graph runner, on CPU
class BakedHostState:
    """Stands in for ``torch.cuda.CUDAGraph`` on CPU. A graph runs at replay the kernels its capture issued: every
    Python decision of the captured call (how many tokens are cached, which sink keys exist, what the chunk index
    was) is frozen, while tensors (inputs, cache buffers, the prepared offset/rotation) are read as they are then.
    So a replay here re-runs the captured call with the cache's host state restored to what it was at capture."""

    def __init__(self):
        self.kv = None

    def __call__(self, fn, inputs):
        kv = self.kv
        frozen = {k: copy.copy(v) for k, v in vars(kv).items()}
        out = fn(**inputs)  # (a real capture runs nothing; this call's result is the eager one anyway)

        def replay():
            now = {k: copy.copy(v) for k, v in vars(kv).items()}
            vars(kv).update(frozen)
            try:
                out.copy_(fn(**inputs))
            finally:
                vars(kv).update(now)

        return replay, out


@pytest.fixture
def cpu_graphs(monkeypatch):
    """Streams with cuda_graphs=True on CPU, captured by BakedHostState."""
    capture = BakedHostState()
    graphs = ChunkGraphs(capture)
    monkeypatch.setattr(ChunkGraphs, "refusal", staticmethod(lambda *a: None))
    monkeypatch.setattr(ChunkGraphs, "of", classmethod(lambda cls, model: graphs))
    stream_cache = graphs.stream_cache

    def tracked(*a, **k):
        cache = stream_cache(*a, **k)
        if cache.graphs is graphs:  # (a stream refused the graphs while another held them: not that one)
            capture.kv = cache.kv
        return cache

    graphs.stream_cache = tracked
    return graphs


@pytest.mark.parametrize("case", ["window_sink_rebase_past_training", "unlimited", "first_chunk_of_its_own_size"])
def test_graph_replays_equal_eager_streams(cpu_graphs, case):
    """Two videos (different prompts) through the graphs: each equals its eager stream; the second video
    captures nothing new; a rolling window needs one graph per fill level and then one for the rest."""
    kw, options = CASES[case]
    model = _model(**kw, action_dim=3)
    frames = 9 if kw.get("first") else 8
    for i, seed in enumerate((1, 2)):
        ref, _, _ = _video(model, frames, growing=True, ctx=_ctx(seed), actions=True, **options)
        captured = cpu_graphs.captured
        got, _, _ = _video(model, frames, ctx=_ctx(seed), actions=True, cuda_graphs=True, **options)
        assert torch.equal(got, ref), i
        if i == 1:
            assert cpu_graphs.captured == captured  # every chunk of the second video replays
    n_chunks = model.chunk_layout(frames).n_chunks
    if case == "window_sink_rebase_past_training":
        # fill levels 0, 1 and 2 chunks cached; the sinks rotate from chunk 3 on (another key): 4 graphs for 8 chunks
        assert cpu_graphs.captured == 4
    elif case == "unlimited":
        assert cpu_graphs.captured == n_chunks
    assert cpu_graphs.replayed == 2 * 3 * n_chunks - cpu_graphs.captured  # 2 steps + the cache write a chunk


def test_graph_replays_follow_a_prompt_switch(cpu_graphs):
    model = _model(chunk=1, window=3, sink=1)
    other = Condition(_ctx(9))

    def at(chunk):
        return other if chunk >= 4 else Condition(_ctx())

    for recache in (True, False):
        ref, _, _ = _video(model, 8, growing=True, condition_at=at, recache=recache)
        got, _, _ = _video(model, 8, condition_at=at, recache=recache, cuda_graphs=True)
        assert torch.equal(got, ref), recache


def test_the_baked_capture_catches_a_frame_offset_frozen_into_the_graph(cpu_graphs, monkeypatch):
    """The runner test can fail: a cache handing the model its chunk offset as a Python int (frozen into each graph)
    streams wrong positions once one graph serves several chunks."""
    model = _model(chunk=1, window=2, sink=1)
    options = dict(rope_policy="absolute")
    ref, _, _ = _video(model, 8, growing=True, **options)
    monkeypatch.setattr(PreallocatedKVCache, "frame_offset", lambda self, start, device: start)
    got, _, _ = _video(model, 8, cuda_graphs=True, **options)
    assert not torch.equal(got, ref)
    assert torch.equal(got[:, :, :3], ref[:, :, :3])  # the chunks each captured by their own graph agree


def test_cuda_graphs_refusal_names_the_flag():
    model = _model(chunk=1)
    with pytest.raises(ConfigError, match="--cuda-graphs.*CUDA device"):
        _video(model, 2, cuda_graphs=True)
    assert "kv_cache_dtype=fp8_e4m3" in ChunkGraphs.refusal(model, torch.device("cuda"), "fp8_e4m3")
    assert ChunkGraphs.refusal(model, torch.device("cuda"), "auto") is None


def test_a_second_concurrent_stream_runs_without_the_graphs(cpu_graphs):
    """Two clients of one model: the graphs serve one stream at a time; the other runs eagerly on its own cache,
    and once the first ends (or is dropped) the next stream gets the graphs again."""
    model = _model(chunk=1, window=2, sink=1)
    refs = [_video(model, 6, growing=True, ctx=_ctx(seed))[0] for seed in (1, 2)]
    first = stream_video(model, _ctx(1), 6, 8, 8, StreamConfig(steps=2, cuda_graphs=True),
                         generator=torch.Generator().manual_seed(7))
    head = [next(first).frames]
    with pytest.warns(UserWarning, match="another stream"):
        second, _, _ = _video(model, 6, ctx=_ctx(2), cuda_graphs=True)
    assert torch.equal(second, refs[1])
    video = torch.cat(head + [o.frames for o in first], dim=2)
    assert torch.equal(video, refs[0]) and not cpu_graphs.busy
    captured = cpu_graphs.captured
    dropped = stream_video(model, _ctx(2), 6, 8, 8, StreamConfig(steps=2, cuda_graphs=True),
                           generator=torch.Generator().manual_seed(7))
    next(dropped)
    del dropped  # a consumer that stops early hands the graphs back
    assert not cpu_graphs.busy
    again, _, _ = _video(model, 6, ctx=_ctx(2), cuda_graphs=True)
    assert torch.equal(again, refs[1]) and cpu_graphs.captured == captured
