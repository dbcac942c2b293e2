"""Streaming inference: progressive chunks, equality with a non-streamed rollout, flat cache, actions, CFG."""
import gc
import io
import sys
import warnings

import pytest
import torch

from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.inference.streaming import (StreamConfig, default_timesteps, generate_video, one_hot_actions,
                                              stdin_action_reader, stream_video)
from megatron_rcm.models import build_model
from megatron_rcm.network import Condition, Denoiser
from megatron_rcm.selfforcing.rollout import RolloutConfig, self_forcing_rollout


pytestmark = pytest.mark.usefixtures("one_thread")


def _rollout(model, ctx, shape, *args, actions=None, **kwargs):
    """The rollout of a model's denoiser for a text context (and actions)."""
    return self_forcing_rollout(Denoiser(model), Condition(ctx, actions=actions), shape, *args, **kwargs)


def _model(chunk_frames=1, window=0, sink=0, action_dim=0):
    torch.manual_seed(0)
    m = build_model(model_preset("tiny", num_layers=1, action_dim=action_dim),
                    CausalConfig(chunk_frames=chunk_frames, window_chunks=window, sink_chunks=sink))
    if action_dim:
        torch.nn.init.normal_(m.action_embedder.linear_2.weight)
    return m.eval()


CTX = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))


def _g(seed=7):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("chunk_frames,steps", [(1, 2), (2, 4), (2, 1)])
def test_stream_is_progressive_and_equals_rollout(chunk_frames, steps):
    model = _model(chunk_frames)
    calls = []
    orig = model.forward_chunk
    model.forward_chunk = lambda *a, **k: (calls.append(a[4]), orig(*a, **k))[1]
    it = stream_video(model, CTX, 4, 8, 8, StreamConfig(steps=steps), generator=_g())
    first = next(it)
    assert first.index == 0 and set(calls) == {0}  # nothing of chunk 1 computed before chunk 0 was yielded
    assert first.latency_s > 0
    rest = list(it)
    model.forward_chunk = orig
    video = torch.cat([first.frames] + [c.frames for c in rest], dim=2)
    n_chunks = 4 // chunk_frames
    ref = _rollout(model, CTX, (2, 3, 4, 8, 8), RolloutConfig(denoising_steps=default_timesteps(steps)),
                               generator=_g(), exit_steps=[steps - 1] * n_chunks, use_cache=False, grad=False)
    torch.testing.assert_close(video, ref.video, atol=2e-5, rtol=1e-4)
    written, logs = [], []
    out = generate_video(model, CTX, 4, 8, 8, steps=steps, generator=_g(), writer=written.append, log=logs.append)
    torch.testing.assert_close(out, video)
    assert len(written) == n_chunks and len(logs) == n_chunks and "ms" in logs[0]
    torch.testing.assert_close(torch.cat(written, dim=1), video[0])


def test_long_rollout_keeps_cache_flat_and_matches_windowed_mask():
    model = _model(chunk_frames=1, window=2, sink=1)  # absolute positions: those of the training mask
    outs = list(stream_video(model, CTX, 16, 8, 8, StreamConfig(steps=2, rope_policy="absolute"),
                             generator=_g()))  # 4x training length
    tpc = model.tokens_per_frame(8, 8)
    bound = (1 + 2 - 1) * tpc  # sink + (window - 1) chunks kept for the next chunk
    sizes = [o.cache_tokens for o in outs]
    assert max(sizes) == bound and sizes[-1] == bound
    video = torch.cat([o.frames for o in outs], dim=2)
    ref = _rollout(model, CTX, (2, 3, 16, 8, 8), RolloutConfig(denoising_steps=[1000, 500]),
                               generator=_g(), exit_steps=[1] * 16, use_cache=False, grad=False)
    torch.testing.assert_close(video, ref.video, atol=2e-5, rtol=1e-4)
    assert torch.isfinite(video).all()


def _live_tensor_bytes() -> int:
    """Bytes of every tensor storage reachable from Python objects (the cache, generator locals, ...)."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on some deprecated torch objects warns
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.layout == torch.strided and obj.device.type != "meta":
                try:
                    st = obj.untyped_storage()
                    storages[st.data_ptr()] = st.nbytes()
                except RuntimeError:  # tracing leftovers (dynamo's fake tensors) hold no memory
                    continue
    return sum(storages.values())


def _cache_bytes(cache) -> int:
    """Self-attention K/V held (a preallocated cache's whole buffers) + the cross-attention K/V."""
    return cache.nbytes + sum(t.numel() * t.element_size() for c in cache.layers for t in (c.cross_k, c.cross_v)
                              if t is not None)


def test_long_interactive_rollout_holds_flat_memory():
    """4x the training length (4 frames) with a rolling cache (1 sink + window 2) and per-chunk actions:
    the K/V tensors held, the frames kept for ``action_fn`` and all live tensor bytes stop growing
    once the window is full (measured at 2x and 4x the training length)."""
    model = _model(chunk_frames=1, window=2, sink=1, action_dim=3)
    caches, seen = [], []
    new_cache = model.new_kv_cache
    model.new_kv_cache = lambda *a, **k: caches.append(new_cache(*a, **k)) or caches[-1]
    reader = stdin_action_reader(3, 1, batch=2, stream=io.StringIO("0\n1\n2\n" * 6), prompt=False)

    def act(chunk, frames_so_far):
        seen.append(len(frames_so_far))
        return reader(chunk, frames_so_far)

    cache_bytes, live, tokens = {}, {}, {}
    before = _live_tensor_bytes()
    for out in stream_video(model, CTX, 16, 8, 8, StreamConfig(steps=2), action_fn=act, generator=_g()):
        n = out.index + 1
        cache_bytes[n], tokens[n] = _cache_bytes(caches[0]), out.cache_tokens
        if n in (8, 12, 16):
            live[n] = _live_tensor_bytes() - before
        del out  # a consumer that writes chunks out keeps nothing
    tpc = model.tokens_per_frame(8, 8)
    d, layers = model.cfg.hidden_size, model.cfg.num_layers
    kept_chunks = 1 + 2 - 1  # sink + (window - 1): what the next chunk can see
    held_chunks = kept_chunks + 1  # the stream's preallocated buffers also hold the chunk being denoised
    bound = layers * 2 * (2 * held_chunks * tpc * d + 2 * model.cfg.text_len * d) * 4  # (self + cross) K and V, fp32
    bound += layers * 2 * 1 * tpc * d * 4  # rope_policy='rebase' (the default): an unrotated copy of the sink's keys
    assert max(tokens.values()) == kept_chunks * tpc
    assert max(cache_bytes.values()) == bound and cache_bytes[8] == cache_bytes[16] == bound
    assert max(seen) == 2 and seen[-1] == 2  # frames_so_far: the model's window, not the whole video
    frame_bytes = 2 * 3 * 8 * 8 * 4  # one generated chunk: what unbounded history would add per chunk
    assert abs(live[16] - live[8]) < frame_bytes and abs(live[12] - live[8]) < frame_bytes, live
    assert live[16] < 2 * bound + 4 * frame_bytes, live


def test_history_chunks_bounds_frames_so_far():
    model = _model(chunk_frames=1, action_dim=3)  # unlimited window: all chunks by default
    for history, expected in ((None, [0, 1, 2, 3]), (1, [0, 1, 1, 1])):
        seen = []
        act = lambda chunk, frames: seen.append(len(frames)) or one_hot_actions([0], 3, 1, batch=2)  # noqa: E731
        list(stream_video(model, CTX, 4, 8, 8, StreamConfig(steps=1), action_fn=act, history_chunks=history))
        assert seen == expected
    with pytest.raises(ValueError, match="history_chunks"):
        next(stream_video(model, CTX, 4, 8, 8, action_fn=act, history_chunks=-1))


def test_action_callback_changes_output_and_stdin_reader():
    model = _model(chunk_frames=2, action_dim=3)
    seen = []

    def act(k):
        def fn(chunk, frames_so_far):
            seen.append((chunk, len(frames_so_far)))
            return one_hot_actions([k], 3, 2, batch=2)
        return fn

    a = generate_video(model, CTX, 4, 8, 8, steps=2, action_fn=act(0), log=None)
    b = generate_video(model, CTX, 4, 8, 8, steps=2, action_fn=act(2), log=None)
    assert seen[:2] == [(0, 0), (1, 1)]
    assert not torch.allclose(a[:, :, :2], b[:, :, :2])
    reader = stdin_action_reader(3, 2, batch=2, stream=io.StringIO("2\n\n"), prompt=False)
    c = generate_video(model, CTX, 4, 8, 8, steps=2, action_fn=reader, log=None)
    torch.testing.assert_close(c, b)  # "2" then empty line (= repeat) gives the same actions as act(2)
    assert reader(5, [])[0, :, 2].eq(1).all()  # EOF repeats the last action
    bad = stdin_action_reader(3, 2, stream=io.StringIO("7\n"), prompt=False)
    assert bad(0, [])[0, :, 0].eq(1).all()  # invalid id ignored -> default action


def test_cfg_stream():
    model = _model(chunk_frames=2)
    unc = torch.zeros_like(CTX)
    plain = generate_video(model, CTX, 4, 8, 8, steps=2, log=None)
    same = generate_video(model, CTX, 4, 8, 8, steps=2, guidance_scale=1.0, uncond_context=unc, log=None)
    torch.testing.assert_close(plain, same)
    guided = generate_video(model, CTX, 4, 8, 8, steps=2, guidance_scale=3.0, uncond_context=unc, log=None)
    assert guided.shape == plain.shape and torch.isfinite(guided).all() and not torch.allclose(guided, plain)


def test_cfg_stream_equals_cache_free_guided_reference():
    """CFG keeps a cond and an uncond cache; equals full-sequence cond/uncond forwards (2 layers)."""
    from megatron_rcm.ops.masks import block_causal_mask

    torch.manual_seed(0)
    model = build_model(model_preset("tiny", num_layers=2), CausalConfig(chunk_frames=2)).eval()
    unc, w, levels = torch.zeros_like(CTX), 2.5, [1.0, 0.5]
    video = generate_video(model, CTX, 4, 8, 8, steps=2, guidance_scale=w, uncond_context=unc, generator=_g(), log=None)
    g, clean = _g(), []
    with torch.no_grad():
        for chunk in range(2):
            x = torch.randn((2, 3, 2, 8, 8), generator=g)
            for k, s in enumerate(levels):
                xs = torch.cat(clean + [x], dim=2)
                ts = torch.cat([torch.zeros(2, 2 * chunk), torch.full((2, 2), 1000 * s)], dim=1)
                mask = block_causal_mask(xs.shape[2], 4, 2)
                vc, vu = (model(xs, ts, c, mask)[:, :, -2:] for c in (CTX, unc))
                x0 = x - s * (vu + w * (vc - vu))
                if k + 1 < len(levels):
                    x = (1 - levels[k + 1]) * x0 + levels[k + 1] * torch.randn(x.shape, generator=g)
            clean.append(x0)
    torch.testing.assert_close(video, torch.cat(clean, dim=2), atol=2e-5, rtol=1e-4)


def test_prefix_frames_condition_the_stream():
    """World-model start: given clean frames prefill the cache; the first new chunk equals a full forward."""
    from megatron_rcm.ops.masks import block_causal_mask

    model = _model(chunk_frames=1)
    prefix = torch.randn(2, 3, 1, 8, 8, generator=_g(3))
    out = generate_video(model, CTX, 3, 8, 8, steps=1, generator=_g(), prefix=prefix, log=None)
    assert out.shape == (2, 3, 3, 8, 8)
    noise = torch.randn((2, 3, 1, 8, 8), generator=_g())
    with torch.no_grad():
        v = model(torch.cat([prefix, noise], 2), torch.tensor([[0.0, 1000.0]] * 2), CTX, block_causal_mask(2, 4, 1))
    torch.testing.assert_close(out[:, :, :1], noise - v[:, :, 1:], atol=2e-5, rtol=1e-4)


def test_streaming_video_writer_receives_chunks(tmp_path):
    from megatron_rcm.utils.video import StreamingVideoWriter

    model = _model(chunk_frames=2)
    with StreamingVideoWriter(str(tmp_path / "s.gif"), fps=4, scale=1) as w:
        generate_video(model, CTX, 4, 8, 8, steps=1, writer=w, log=None)
        assert w.frames_written == 4


def test_interactive_mode_reads_sys_stdin_once_per_chunk(monkeypatch, capsys):
    """The default reader takes one line from sys.stdin per chunk, only when that chunk is due (prompt on
    stderr); the stream equals one driven by the same actions from a callback."""
    model = _model(chunk_frames=1, action_dim=3)
    monkeypatch.setattr("sys.stdin", io.StringIO("1\n2\n\n"))
    it = stream_video(model, CTX, 3, 8, 8, StreamConfig(steps=1), generator=_g(),
                      action_fn=stdin_action_reader(3, 1, batch=2))
    chunks = [next(it).frames]
    assert sys.stdin.tell() == 2  # only chunk 0's line "1\n" was read before chunk 0 was yielded
    chunks += [o.frames for o in it]
    assert capsys.readouterr().err.count("action ids") == 3
    ids = [1, 2, 2]  # the empty line repeats the previous action
    ref = generate_video(model, CTX, 3, 8, 8, steps=1, generator=_g(), log=None,
                         action_fn=lambda chunk, _f: one_hot_actions([ids[chunk]], 3, 1, batch=2))
    torch.testing.assert_close(torch.cat(chunks, dim=2), ref)
