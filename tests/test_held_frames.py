"""Known frames in a stream (image-to-video) and prompt switches with KV re-cache, against full-sequence references.

Untrained tiny models, float32, one step per chunk: the mechanisms, not the quality (``test_image_to_video.py``
checks a trained model's motion)."""
import pytest
import torch

from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.inference.prompt_switch import ConditionSchedule
from megatron_rcm.inference.streaming import StreamConfig, few_step_sampler, generate_video, stream_chunks
from megatron_rcm.models import build_model
from megatron_rcm.network import Condition, Denoiser, NoisyContext
from megatron_rcm.network.clean_frames import HeldFrames, free_frames, hold_first_frames
from megatron_rcm.ops.masks import block_causal_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(chunk_frames=1, window=0, sink=0, seed=0):
    torch.manual_seed(seed)
    return build_model(model_preset("tiny", num_layers=2),
                       CausalConfig(chunk_frames=chunk_frames, window_chunks=window, sink_chunks=sink)).eval()


def _ctx(seed):
    return torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(seed))


def _noise(n, frames, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, frames, 8, 8, generator=g) for _ in range(n)]


def _stream(net, cond, frames, noise, prefix=None, condition_at=None, recache=True, offset=0):
    """One-step stream with given start noise per chunk (index relative to the first generated chunk + offset)."""
    sampler = few_step_sampler(StreamConfig(steps=1).schedule(), NoisyContext())
    return [o.frames for o in stream_chunks(net, cond, frames, 8, 8, sampler, lambda i, _s: noise[i + offset],
                                            prefix=prefix, condition_at=condition_at, recache=recache)]


def test_held_frames_inputs_and_training_helpers():
    x, clean = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 1, 2, 2)
    held = HeldFrames(clean)
    xi, s = held.inputs(x, 0.7)
    assert torch.equal(xi[:, :, :1], clean) and torch.equal(xi[:, :, 1:], x[:, :, 1:])
    assert s.shape == (2, 4) and (s[:, 0] == 0).all() and (s[:, 1:] == 0.7).all()
    assert torch.equal(held.output(x)[:, :, :1], clean)
    x0 = torch.randn(2, 3, 4, 2, 2)
    xs, ss = hold_first_frames(x, torch.full((2, 4), 0.3), x0, 2)
    assert torch.equal(xs[:, :, :2], x0[:, :, :2]) and (ss[:, :2] == 0).all() and (ss[:, 2:] == 0.3).all()
    assert free_frames(x, 2).shape[2] == 2 and hold_first_frames(x, ss, x0, 0)[0] is x


def test_image_held_in_first_chunk_equals_block_causal_forward():
    """Chunks of 2, one known frame: chunk 0 is denoised with the frame clean at t = 0 and keeps it; chunk 1 sees
    the cache of [image ; generated frame] -- both equal one block-causal forward with those per-frame times."""
    model = _model(chunk_frames=2)
    net, ctx = Denoiser(model), _ctx(1)
    image = torch.randn(1, 3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    noise = _noise(2, 2)
    out = _stream(net, Condition(ctx), 3, noise, prefix=image)
    assert [o.shape[2] for o in out] == [2, 2]
    assert torch.equal(out[0][:, :, :1], image)  # the first output frame IS the image
    mask = block_causal_mask(4, 4, 2)
    with torch.no_grad():
        v = model(torch.cat([image, noise[0][:, :, 1:], noise[1]], 2), torch.tensor([[0.0, 1000, 1000, 1000]]), ctx,
                  mask)
        torch.testing.assert_close(out[0][:, :, 1:], noise[0][:, :, 1:] - v[:, :, 1:2], atol=2e-5, rtol=1e-4)
        v = model(torch.cat([out[0], noise[1]], 2), torch.tensor([[0.0, 0, 1000, 1000]]), ctx, mask)
        torch.testing.assert_close(out[1], noise[1] - v[:, :, 2:], atol=2e-5, rtol=1e-4)
    ignored = _stream(net, Condition(ctx), 4, noise)  # the same noise without the image: another video
    assert (ignored[1] - out[1]).abs().max() > 1e-3


def test_whole_chunk_image_prefills_and_generate_video_shows_it():
    """Frame-wise chunks: the image is chunk 0 (cached, not generated); show_prefix puts it in front."""
    model = _model(chunk_frames=1)
    image = torch.randn(1, 3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(steps=1, seed=2, log=None, prefix=image)
    shown = generate_video(model, _ctx(1), 3, 8, 8, show_prefix=True, **kw)
    plain = generate_video(model, _ctx(1), 3, 8, 8, **kw)
    assert shown.shape[2] == 4 and torch.equal(shown[:, :, :1], image) and torch.equal(shown[:, :, 1:], plain)


@pytest.mark.parametrize("window", [0, 2])
def test_prompt_switch_recaches_the_kept_chunks(window):
    """Switch a -> b at chunk 2 of 4: with re-cache the chunks after the switch equal a stream that cached the same
    clean chunks (those still in the window) under b from the start, as a prefix (attention sees relative RoPE
    positions only, so a rolling window may start the prefix at chunk 0); without re-cache they differ."""
    model = _model(chunk_frames=1, window=window)
    net, a, b = Denoiser(model), Condition(_ctx(1)), Condition(_ctx(2))
    noise = _noise(4, 1)
    schedule = ConditionSchedule((0, 2), (a, b))
    switched = _stream(net, a, 4, noise, condition_at=schedule)
    plain = _stream(net, a, 4, noise)
    torch.testing.assert_close(switched[:2], plain[:2], rtol=0, atol=0)  # before the switch: prompt a only
    kept = switched[:2] if window == 0 else switched[2 - (window - 1):2]
    under_b = _stream(net, b, 2, noise, prefix=torch.cat(kept, 2), offset=2)
    torch.testing.assert_close(switched[2:], under_b, atol=2e-5, rtol=1e-4)
    stale = _stream(net, a, 4, noise, condition_at=schedule, recache=False)
    assert (stale[2] - switched[2]).abs().max() > 1e-3  # the cache really was rewritten
    assert (stale[2] - plain[2]).abs().max() > 1e-3  # ... and even without it the new prompt's text is attended
    same = _stream(net, a, 4, noise, condition_at=ConditionSchedule((0,), (a,)))
    torch.testing.assert_close(same, plain, rtol=0, atol=0)


def test_latents_are_kept_only_for_a_re_cache():
    """Without a prompt schedule (or without re-cache) the stream keeps no latents of its cached chunks."""
    from megatron_rcm.inference import streaming

    kept = []
    orig = streaming.CachedChunks.__init__
    streaming.CachedChunks.__init__ = lambda self, keep: (kept.append(keep), orig(self, keep))[1]
    try:
        net, a = Denoiser(_model()), Condition(_ctx(1))
        _stream(net, a, 2, _noise(2, 1))
        _stream(net, a, 2, _noise(2, 1), condition_at=ConditionSchedule((0,), (a,)), recache=False)
        _stream(net, a, 2, _noise(2, 1), condition_at=ConditionSchedule((0,), (a,)))
    finally:
        streaming.CachedChunks.__init__ = orig
    assert kept == [False, False, True]
