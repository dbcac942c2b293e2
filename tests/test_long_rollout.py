"""Long streams: the RoPE position policies, the stream's own window/sink, the fp8 KV cache."""
import pytest
import torch

from megatron_rcm.config.errors import ConfigError
from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.inference.streaming import StreamConfig, stream_video
from megatron_rcm.models import build_model
from megatron_rcm.models.causal_wan import Segment
from megatron_rcm.models.kv_cache import KVCache, StreamCacheOptions, sink_position_shift
from megatron_rcm.models.kv_quant import FP8_MAX, dequantize, quantize_per_head
from megatron_rcm.ops.chunks import ChunkLayout
from megatron_rcm.ops.masks import ChunkVisibility, GroupMask

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_FRAMES = 4  # the "training length" of these tiny random models


def _model(layers=1, chunk=1, first=0, window=0, sink=0, dtype="float32"):
    torch.manual_seed(0)
    cfg = model_preset("tiny", num_layers=layers, param_dtype=dtype)
    return build_model(cfg, CausalConfig(chunk_frames=chunk, first_chunk_frames=first, window_chunks=window,
                                         sink_chunks=sink)).eval()


def _context(model, batch=2):
    return torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(1)).to(model.dtype)


def _stream(model, frames, **options):
    g = torch.Generator().manual_seed(7)
    caches = []
    new = model.new_kv_cache
    model.new_kv_cache = lambda *a, **k: caches.append(new(*a, **k)) or caches[-1]
    try:
        outs = list(stream_video(model, _context(model), frames, 8, 8, StreamConfig(steps=2, **options), generator=g))
    finally:
        model.new_kv_cache = new
    return outs, caches[0]


def test_sink_position_shift_places_the_window_after_the_sinks():
    layout = ChunkLayout.covering(12, 2, 1)  # a first chunk of 1 frame, then 2 each: starts 0, 1, 3, 5, ...
    vis = ChunkVisibility(window=3, sink=1)
    shifts = [sink_position_shift(vis, layout, c) for c in range(8)]
    # chunk c sees sink 0 and chunks c-2..c; the window's first chunk c-2 moves to chunk 1's start (frame 1)
    assert shifts == [0, 0, 0, 0, layout.start(2) - 1, layout.start(3) - 1, layout.start(4) - 1, layout.start(5) - 1]
    assert shifts[4:] == [2, 4, 6, 8]
    assert all(sink_position_shift(ChunkVisibility(3, 0), layout, c) == 0 for c in range(8))  # no sink: nothing
    # trained on 7 frames (chunks 0-3): inside them nothing moves; past them the chunk ends at frame 7
    capped = [sink_position_shift(vis, layout, c, trained_frames=7) for c in range(8)]
    assert capped == [0, 0, 0, 0, 2, 4, 6, 8] and layout.start(4) + layout.size(4) - 7 == 2
    assert [sink_position_shift(vis, layout, c, trained_frames=9) for c in range(8)] == [0, 0, 0, 0, 0, 2, 4, 6]
    assert all(sink_position_shift(ChunkVisibility(0, 1), layout, c) == 0 for c in range(8))  # unlimited window


def test_rebase_equals_absolute_where_it_should():
    """float64: before any eviction, inside the trained range, and for a plain sliding window at 4x the
    training length (RoPE scores depend only on position differences) rebase is absolute."""
    model = _model(layers=2, window=TRAIN_FRAMES + 1, sink=1, dtype="float64")
    a, _ = _stream(model, TRAIN_FRAMES, rope_policy="absolute")
    b, _ = _stream(model, TRAIN_FRAMES, rope_policy="rebase")
    for x, y in zip(a, b):
        torch.testing.assert_close(x.frames, y.frames, atol=1e-12, rtol=0)
    # a window + sink shorter than the training videos evicts inside them: with the training length given,
    # rebase still leaves that range as trained, and only moves positions past it
    a, _ = _stream(model, 2 * TRAIN_FRAMES, window_chunks=2, sink_chunks=1, rope_policy="absolute")
    b, _ = _stream(model, 2 * TRAIN_FRAMES, window_chunks=2, sink_chunks=1, rope_policy="rebase",
                   trained_frames=TRAIN_FRAMES)
    for i, (x, y) in enumerate(zip(a, b)):
        if i < TRAIN_FRAMES:
            torch.testing.assert_close(x.frames, y.frames, atol=1e-12, rtol=0)
        else:
            assert (x.frames - y.frames).abs().max() > 1e-6
    a, _ = _stream(model, 4 * TRAIN_FRAMES, window_chunks=3, sink_chunks=0, rope_policy="absolute")
    b, _ = _stream(model, 4 * TRAIN_FRAMES, window_chunks=3, sink_chunks=0, rope_policy="rebase")
    torch.testing.assert_close(torch.cat([o.frames for o in b], 2), torch.cat([o.frames for o in a], 2),
                               atol=1e-10, rtol=0)


def test_rebase_attends_as_if_the_window_followed_the_sinks():
    """float64, one layer (a chunk's cached K/V then depend on that chunk alone): a chunk against the rebased
    cache equals one forward over [sink ; kept window ; chunk] placed at the rebased positions."""
    model = _model(layers=1, chunk=2, first=1, dtype="float64")
    layout = ChunkLayout.covering(8, 2, 1)
    cache = model.new_kv_cache(8, 8, options=StreamCacheOptions(window_chunks=2, sink_chunks=1, rope_policy="rebase"))
    ctx = _context(model, 1)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(1, 3, layout.size(c), 8, 8, generator=g, dtype=torch.float64) for c in range(6)]
    for c in range(5):
        model.forward_chunk(xs[c], 0.0, ctx, cache, c, write_cache=True)
    assert cache.chunks == [0, 4]
    out = model.forward_chunk(xs[5], 600.0, ctx, cache, 5)[0]
    # rebased: sink chunk 0 at frame 0, window chunk 4 where chunk 1 starts, chunk 5 where chunk 2 starts
    segs = [Segment(xs[0], 0.0, 0), Segment(xs[4], 0.0, layout.start(1)), Segment(xs[5], 600.0, layout.start(2))]
    ids = torch.cat([torch.full((layout.size(c) * 4,), i) for i, c in enumerate((0, 4, 5))])
    mask = GroupMask(ids, ids, torch.ones(3, 3, dtype=torch.bool).tril())
    ref = model.forward_segments(segs, ctx, mask)[2][0]
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    absolute = model.new_kv_cache(8, 8, options=StreamCacheOptions(window_chunks=2, sink_chunks=1))
    for c in range(5):
        model.forward_chunk(xs[c], 0.0, ctx, absolute, c, write_cache=True)
    assert (model.forward_chunk(xs[5], 600.0, ctx, absolute, 5)[0] - ref).abs().max() > 1e-3  # it does move


def test_fp8_round_trip_error_per_head():
    """Heads (and batch rows) 10^4 apart in scale: each keeps fp8's relative precision against its own peak,
    which a scale shared across heads (a wrong axis) would lose for the quiet ones."""
    g = torch.Generator().manual_seed(0)
    head_scale = 10.0 ** torch.arange(-2, 3, dtype=torch.float64)  # 5 heads
    row_scale = torch.tensor([1.0, 1e-3], dtype=torch.float64)
    x = torch.randn(2, 24, 5, 16, generator=g, dtype=torch.float64) * head_scale[None, None, :, None] \
        * row_scale[:, None, None, None]
    q, scale = quantize_per_head(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (2, 1, 5)
    assert q.float().abs().amax() == FP8_MAX  # the peak of each (row, head) uses the full range
    back = dequantize(q, scale, [24], torch.float64)
    peak = x.abs().amax(dim=(1, 3))
    err = (back - x).abs().amax(dim=(1, 3)) / peak
    assert err.max() <= 2.0 ** -4 and err.min() > 0  # e4m3: 3 mantissa bits, round to nearest
    rel = ((back - x).abs() / x.abs().clamp_min(peak[:, None, :, None] * 2.0 ** -6)).mean()
    assert rel < 0.03
    shared = x.abs().amax() / FP8_MAX  # one scale for everything: the quiet heads collapse
    coarse = (x / shared).to(torch.float8_e4m3fn).double() * shared
    assert ((coarse - x).abs().amax(dim=(1, 3)) / peak).max() > 0.5


def _fill(cache, chunks, tokens=6, heads=3, dim=16, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = {}
    for c in chunks:
        k = (torch.randn(2, tokens, heads, dim, generator=g) * (c + 1)).to(dtype)
        v = (torch.randn(2, tokens, heads, dim, generator=g) * 10.0 ** -c).to(dtype)
        cache.append(0, c, k, v)
        cache.commit(c)
        values[c] = (k, v)
    return values


def test_fp8_cache_halves_bf16_memory_and_evicts_the_same_chunks():
    vis = ChunkVisibility(window=3, sink=1)
    plain, fp8 = KVCache(1, vis), KVCache(1, vis, kv_cache_dtype="fp8_e4m3")
    for c in range(10):
        _fill(plain, [c], seed=c)
        _fill(fp8, [c], seed=c)
        assert fp8.chunks == plain.chunks and fp8.chunk_tokens == plain.chunk_tokens
    assert plain.chunks == [0, 8, 9]
    k, v = fp8.keys_values(0)
    pk, pv = plain.keys_values(0)
    assert k.dtype == torch.bfloat16 and k.shape == pk.shape
    scales = 2 * 2 * 3 * 3 * 4  # (k, v) x batch 2 x 3 chunks x 3 heads, float32
    assert fp8.nbytes == plain.nbytes // 2 + scales
    # each kept chunk still carries its own scales (chunk c's values are 10^-c): per chunk-head relative error
    for ours, ref in ((k, pk), (v, pv)):
        for i in range(3):
            a, b = ours[:, 6 * i:6 * (i + 1)].double(), ref[:, 6 * i:6 * (i + 1)].double()
            assert ((a - b).abs().amax(dim=(1, 3)) / b.abs().amax(dim=(1, 3))).max() < 2.0 ** -4 + 2.0 ** -7
    view = fp8.before(9)
    assert view.chunks == [0, 8] and view.keys_values(0)[0].shape[1] == 12


def test_fp8_stream_is_close_to_the_unquantised_one():
    model = _model(layers=2, chunk=1, window=3, sink=1)
    a, ca = _stream(model, 2 * TRAIN_FRAMES)
    b, cb = _stream(model, 2 * TRAIN_FRAMES, kv_cache_dtype="fp8_e4m3")
    va, vb = torch.cat([o.frames for o in a], 2), torch.cat([o.frames for o in b], 2)
    rel = (vb - va).norm() / va.norm()
    assert 0 < rel < 0.01, rel  # ~8e-4 here
    assert ca.chunks == cb.chunks and cb.layers[0].k.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("options", [
    dict(window_chunks=3, sink_chunks=0),  # sliding_window
    dict(window_chunks=3, sink_chunks=1),  # frame sink, absolute positions
    dict(window_chunks=3, sink_chunks=1, rope_policy="rebase"),
    dict(window_chunks=3, sink_chunks=1, rope_policy="rebase", kv_cache_dtype="fp8_e4m3"),
], ids=["sliding_window", "frame_sink", "frame_sink_rebase", "frame_sink_rebase_fp8"])
def test_each_policy_streams_4x_the_training_length_with_a_flat_cache(options):
    model = _model(layers=1, chunk=1)  # trained (here: built) without a window; the stream sets its own
    sizes, nbytes = [], []
    caches = []
    new = model.new_kv_cache
    model.new_kv_cache = lambda *a, **k: caches.append(new(*a, **k)) or caches[-1]
    g = torch.Generator().manual_seed(7)
    for out in stream_video(model, _context(model), 4 * TRAIN_FRAMES, 8, 8, StreamConfig(steps=1, **options),
                            generator=g):
        assert torch.isfinite(out.frames).all()
        sizes.append(out.cache_tokens)
        nbytes.append(caches[0].nbytes)
    model.new_kv_cache = new
    kept = options["sink_chunks"] + options["window_chunks"] - 1
    assert max(sizes) == sizes[-1] == kept * model.tokens_per_frame(8, 8)
    assert max(nbytes) == nbytes[kept] == nbytes[-1]


def test_bad_stream_cache_options_name_the_flag():
    for field, value, flag in (("rope_policy", "relative", "--rope-policy"), ("kv_cache_dtype", "int8",
                               "--kv-cache-dtype"), ("window_chunks", -1, "--window-chunks")):
        with pytest.raises(ConfigError, match=flag):
            StreamConfig(**{field: value}).cache_options()
