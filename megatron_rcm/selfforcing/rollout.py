"""Self-forcing rollout (Huang et al. 2025, "Self Forcing"; CausVid's few-step causal sampler).

The student generates the whole video chunk by chunk with its few-step sampler and its own KV cache,
exactly as at inference: for each chunk, start from noise at the first level, predict x0
(x0 = x_s - s v), re-noise x0 to the next level with *fresh* noise, and so on. The levels may differ per
chunk (:mod:`megatron_rcm.diffusion.step_schedule`: more steps for the first chunk). After a chunk is done
its output is cached for later chunks: re-run at s = 0 (no grad), or, with noisy context
(:mod:`megatron_rcm.network.context`), the exit step's own input when it ran at the context level, else
the output re-noised to that level.

Gradient: one denoising step per chunk is "the exit step". Steps before it run under
``torch.no_grad``; the exit step runs with grad and its x0 prediction *is* the chunk's output (the
remaining steps are skipped), as in Self-Forcing's training pipeline. So the output carries exactly
one network graph per chunk, whatever the number of steps, and the generated sample is a 1..N-step
sample of the same sampler. By default one exit index is drawn per rollout and shared by all chunks
(Self-Forcing's ``same_step_across_blocks=True``; a chunk with fewer steps exits at its last one, as
Causal-rCM's per-chunk schedules do); ``sync_exit_across_chunks=False`` draws one per chunk.
Cache writes detach (KVCache.append), so no gradient flows from a chunk into earlier chunks.

Replayed backprop (Causal-rCM ``replayed_training``; ``RolloutConfig.replayed_backprop``): the whole rollout
runs without gradients; each chunk's exit step is recomputed with gradients during backward, one chunk at a
time, against the cache as that chunk saw it. Peak memory is one chunk's graph instead of all of them;
the gradients are those of the direct rollout.

Noise order (shared with inference.streaming so both reproduce each other from one seed): per chunk,
the chunk's start noise, then one fresh noise draw per re-noising step, then (noisy context, when the
context must be re-noised) one draw for the cached copy, all from ``generator``, drawn for the global
batch (:class:`~megatron_rcm.network.BatchNoise`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from ..diffusion.flow_matching import time_shift
from ..diffusion.step_schedule import StepSchedule, StepScheduleConfig, build_schedule
from ..network import BatchNoise, Condition, Denoiser, wan_timesteps_to_levels
from .replay import replayed


@dataclass
class RolloutConfig(StepScheduleConfig):
    """The student's few-step sampler (its levels per chunk: :class:`StepScheduleConfig`) and how self forcing
    cuts the graph."""

    sync_exit_across_chunks: bool = True  # one exit step for all chunks (Self-Forcing default)
    last_step_only: bool = False  # always exit at the last step (no random exit)
    replayed_backprop: bool = False  # recompute each chunk's exit step in backward (Causal-rCM replayed_training)


@dataclass
class RolloutResult:
    video: torch.Tensor  # x0 [B, C, F, H, W]; grad flows through each chunk's exit step
    exit_steps: list[int]  # exit step index per chunk
    schedule: StepSchedule  # the sampler's levels per chunk


@dataclass
class ChunkSample:
    """One chunk of the few-step sampler: its output and the exit step's input (what a replay recomputes)."""

    x0: torch.Tensor  # the exit step's x0 prediction (the chunk's output)
    x_in: torch.Tensor  # the exit step's input (no graph)
    s_in: float  # its level
    wrote: bool = False  # the exit step's forward also wrote the chunk's K/V (noisy context)


def denoise_levels(denoising_steps, shift: float = 1.0) -> list[float]:
    """Wan timesteps (1000 = pure noise) -> FM noise levels s, optionally shifted."""
    levels = wan_timesteps_to_levels(denoising_steps)
    return [float(time_shift(s, shift)) for s in levels] if shift != 1.0 else levels


def same_level(a: float, b: float) -> bool:
    return abs(float(a) - float(b)) < 1e-9


def sample_chunk(denoise, noise, levels, exit_step: int, grad: bool, generator=None,
                 draw: BatchNoise = BatchNoise(), write_at: float | None = None) -> ChunkSample:
    """Few-step x0-prediction sampler on one chunk, up to step ``exit_step``.

    ``denoise(x, s) -> v`` at FM level ``s`` (a float). Only the exit step builds a graph (when ``grad``).
    ``write_at``: when the exit step runs at this level without grad, it is called as
    ``denoise(x, s, write=True)`` and writes the chunk's K/V (noisy context: no extra forward).
    """
    x = noise
    x0 = None
    wrote = False
    for k in range(exit_step + 1):
        s = levels[k]
        last = k == exit_step
        write = last and not grad and write_at is not None and same_level(s, write_at)
        with torch.set_grad_enabled(grad and last):
            v = denoise(x, s, write=True) if write else denoise(x, s)
            x0 = x - s * v
        wrote = wrote or write
        if not last:
            sn = levels[k + 1]
            eps = draw.randn(noise.shape, device=noise.device, dtype=noise.dtype, generator=generator)
            x = (1.0 - sn) * x0 + sn * eps
    return ChunkSample(x0, x, float(levels[exit_step]), wrote)


def context_copy(sample: ChunkSample, level: float, fresh):
    """(latents, level) a finished chunk is cached as: clean x0; the exit step's input when it ran at the
    noisy-context level; else x0 re-noised to that level with ``fresh(shape)`` noise."""
    x0 = sample.x0.detach()
    if level == 0.0:
        return x0, 0.0
    if same_level(sample.s_in, level):
        return sample.x_in, level
    return (1.0 - level) * x0 + level * fresh(tuple(x0.shape)), level


def draw_exit_steps(steps: list[int], cfg: RolloutConfig, rng: random.Random) -> list[int]:
    """Exit step per chunk for chunks of ``steps`` steps each (a shared draw is capped at a chunk's last step)."""
    if cfg.last_step_only:
        return [k - 1 for k in steps]
    if cfg.sync_exit_across_chunks:
        e = rng.randrange(steps[0])
        return [min(e, k - 1) for k in steps]
    return [rng.randrange(k) for k in steps]


def self_forcing_rollout(net: Denoiser, cond: Condition, shape, cfg: RolloutConfig | None = None, generator=None,
                         exit_steps: list[int] | None = None, use_cache: bool = True, grad: bool = True,
                         rng: random.Random | None = None, noise: BatchNoise = BatchNoise(),
                         key: str = "rollout", held=None) -> RolloutResult:
    """Generate a [B, C, F, H, W] video chunk by chunk with the student (see module docstring).

    ``exit_steps`` forces the exit index per chunk (tests, inference = last step); otherwise drawn
    from ``rng`` (python Random, so it does not disturb the torch noise stream). ``use_cache=False``
    is the cache-free reference: each step runs a full forward over [previous chunks as cached ;
    current chunk] with the block-causal mask -- the same function, only slower.
    ``cond.actions`` (world models) cover the whole video's frames. ``key`` names the config in errors.
    ``held``: known first frames (a :class:`~megatron_rcm.network.clean_frames.HeldFrames`, image-to-video
    training) held clean in chunk 0 at every step, as streaming holds an image; the output keeps them.
    """
    cfg = cfg or RolloutConfig()
    schedule = build_schedule(cfg, key)
    b, c, f, h, w = shape
    pt = net.patch_frames
    layout = net.layout(f // pt)
    n_chunks = layout.n_chunks
    steps = [schedule.steps(i) for i in range(n_chunks)]
    if exit_steps is None:
        exit_steps = draw_exit_steps(steps, cfg, rng or random)
    if len(exit_steps) != n_chunks or any(not 0 <= e < k for e, k in zip(exit_steps, steps)):
        raise ValueError(f"exit_steps must list {n_chunks} indices, each below its chunk's step count {steps}; "
                         f"got {exit_steps}")
    replay = grad and cfg.replayed_backprop and use_cache
    dtype, device = net.dtype, cond.context.device
    noisy = net.noisy_context
    # room for every chunk but the last (never written) at once: checkpointed chunks' snapshots share it
    cache = (net.new_cache(h, w, evict=not replay, reserve_frames=layout.start(n_chunks - 1) or None)
             if use_cache else None)
    fresh = lambda shp: noise.randn(shp, device=device, dtype=dtype, generator=generator)  # noqa: E731
    out: list[torch.Tensor] = []
    copies: list[tuple] = []  # (latents, level) of each finished chunk as later chunks see it
    exits_in: list[tuple] = []  # (exit input, level) per chunk, for the replay
    for chunk in range(n_chunks):
        frames = layout.frame_slice(chunk)
        chunk_cond = cond.frames(frames)
        if use_cache:
            def denoise(x, s, cc=chunk_cond, i=chunk):
                return net.chunk(x, s, cc, cache, i)[0]
        else:
            denoise = _full_sequence_denoiser(net, cond, copies, frames.stop)
        start = fresh((b, c, layout.size(chunk) * pt, h, w))
        hold = held if chunk == 0 else None
        res = sample_chunk(hold.denoiser(denoise) if hold else denoise, start, schedule.levels(chunk),
                           exit_steps[chunk], grad and not replay, generator, noise)
        if hold:
            res = replace(res, x0=hold.output(res.x0))
        out.append(res.x0)
        exits_in.append((res.x_in, res.s_in))
        if chunk + 1 < n_chunks:  # the last chunk's K/V would never be read
            x_ctx, s_ctx = context_copy(res, noisy.level_of(chunk), fresh)
            copies.append((x_ctx, s_ctx))
            if use_cache:
                net.write_chunk(x_ctx, chunk_cond, cache, chunk, s=s_ctx)
    video = torch.cat(out, dim=2)
    if replay:
        video = replayed(video, net, cond, layout, cache, exits_in, held)
    return RolloutResult(video, list(exit_steps), schedule)


def _full_sequence_denoiser(net: Denoiser, cond: Condition, done: list, frames_stop: int):
    """Cache-free reference: [finished chunks as cached (clean at s = 0, or noisy) ; current chunk at s],
    block-causal over them all."""
    prefix = [x.detach() for x, _ in done]
    prefix_s = [level for _, level in done]

    def denoise(x, s):
        xs = torch.cat(prefix + [x], dim=2)
        level = torch.zeros(x.shape[0], net.frames(xs), dtype=x.dtype, device=x.device)
        start = 0
        for p, ps in zip(prefix, prefix_s):
            level[:, start:start + net.frames(p)] = ps
            start += net.frames(p)
        level[:, start:] = s
        v, _ = net.velocity(xs, level, cond.frames(slice(0, frames_stop)), attend="block_causal")
        return v[:, :, -x.shape[2]:]

    return denoise
