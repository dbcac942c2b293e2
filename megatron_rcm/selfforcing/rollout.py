"""Self-forcing rollout (Huang et al. 2025, "Self Forcing"; CausVid's few-step causal sampler).

The student generates the whole video chunk by chunk with its few-step sampler and its own KV cache,
exactly as at inference: for each chunk, start from noise at the first level, predict x0
(x0 = x_s - s v), re-noise x0 to the next level with *fresh* noise, and so on. After a chunk is done
its clean output is re-run at s = 0 (no grad, the cache write) so later chunks attend to it.

Gradient: one denoising step per chunk is "the exit step". Steps before it run under
``torch.no_grad``; the exit step runs with grad and its x0 prediction *is* the chunk's output (the
remaining steps are skipped), as in Self-Forcing's training pipeline. So the output carries exactly
one network graph per chunk, whatever the number of steps, and the generated sample is a 1..N-step
sample of the same sampler. By default one exit index is drawn per rollout and shared by all chunks
(Self-Forcing's ``same_step_across_blocks=True``: every chunk sees the same sampler depth, which
keeps chunk statistics consistent); ``sync_exit_across_chunks=False`` draws one per chunk.
Cache writes detach (KVCache.append), so no gradient flows from a chunk into earlier chunks.

Noise order (shared with inference.streaming so both reproduce each other from one seed): per chunk,
the chunk's start noise, then one fresh noise draw per re-noising step, all from ``generator``,
drawn for the global batch (:class:`~megatron_rcm.network.BatchNoise`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from ..diffusion.flow_matching import time_shift
from ..network import BatchNoise, Condition, Denoiser, wan_timesteps_to_levels


@dataclass
class RolloutConfig:
    """The student's few-step sampler and how self forcing cuts the graph."""

    denoising_steps: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])  # Wan units
    shift: float = 1.0  # time shift applied to the listed levels (Self-Forcing's "warp_denoising_step")
    sync_exit_across_chunks: bool = True  # one exit step for all chunks (Self-Forcing default)
    last_step_only: bool = False  # always exit at the last step (no random exit)


@dataclass
class RolloutResult:
    video: torch.Tensor  # x0 [B, C, F, H, W]; grad flows through each chunk's exit step
    exit_steps: list[int]  # exit step index per chunk
    levels: list[float]  # FM noise levels s of the sampler


def denoise_levels(denoising_steps, shift: float = 1.0) -> list[float]:
    """Wan timesteps (1000 = pure noise) -> FM noise levels s, optionally shifted."""
    levels = wan_timesteps_to_levels(denoising_steps)
    return [float(time_shift(s, shift)) for s in levels] if shift != 1.0 else levels


def sample_chunk(denoise, noise, levels, exit_step: int, grad: bool, generator=None,
                 draw: BatchNoise = BatchNoise()):
    """Few-step x0-prediction sampler on one chunk; returns x0 of step ``exit_step``.

    ``denoise(x, s) -> v`` at FM level ``s`` (a float). Only the exit step builds a graph (when ``grad``).
    """
    x = noise
    x0 = None
    for k in range(exit_step + 1):
        s = levels[k]
        with torch.set_grad_enabled(grad and k == exit_step):
            x0 = x - s * denoise(x, s)
        if k < exit_step:
            sn = levels[k + 1]
            eps = draw.randn(noise.shape, device=noise.device, dtype=noise.dtype, generator=generator)
            x = (1.0 - sn) * x0 + sn * eps
    return x0


def _draw_exits(num_chunks: int, num_steps: int, cfg: RolloutConfig, rng: random.Random) -> list[int]:
    if cfg.last_step_only:
        return [num_steps - 1] * num_chunks
    if cfg.sync_exit_across_chunks:
        return [rng.randrange(num_steps)] * num_chunks
    return [rng.randrange(num_steps) for _ in range(num_chunks)]


def self_forcing_rollout(net: Denoiser, cond: Condition, shape, cfg: RolloutConfig | None = None, generator=None,
                         exit_steps: list[int] | None = None, use_cache: bool = True, grad: bool = True,
                         rng: random.Random | None = None, noise: BatchNoise = BatchNoise()) -> RolloutResult:
    """Generate a [B, C, F, H, W] video chunk by chunk with the student (see module docstring).

    ``exit_steps`` forces the exit index per chunk (tests, inference = last step); otherwise drawn
    from ``rng`` (python Random, so it does not disturb the torch noise stream). ``use_cache=False``
    is the cache-free reference: each step runs a full forward over [previous clean chunks (s = 0) ;
    current chunk] with the block-causal mask -- the same function, only slower.
    ``cond.actions`` (world models) cover the whole video's frames.
    """
    cfg = cfg or RolloutConfig()
    levels = denoise_levels(cfg.denoising_steps, cfg.shift)
    b, c, f, h, w = shape
    pt = net.patch_frames
    layout = net.layout(f // pt)
    n_chunks = layout.n_chunks
    if exit_steps is None:
        exit_steps = _draw_exits(n_chunks, len(levels), cfg, rng or random)
    if len(exit_steps) != n_chunks or any(not 0 <= e < len(levels) for e in exit_steps):
        raise ValueError(f"exit_steps must list {n_chunks} indices in [0, {len(levels)}), got {exit_steps}")
    dtype, device = net.dtype, cond.context.device
    cache = net.new_cache(h, w) if use_cache else None
    out: list[torch.Tensor] = []
    for chunk in range(n_chunks):
        frames = layout.frame_slice(chunk)
        chunk_cond = cond.frames(frames)
        if use_cache:
            def denoise(x, s, cc=chunk_cond, i=chunk):
                return net.chunk(x, s, cc, cache, i)[0]
        else:
            denoise = _full_sequence_denoiser(net, cond, out, frames.stop)
        start = noise.randn((b, c, layout.size(chunk) * pt, h, w), device=device, dtype=dtype, generator=generator)
        x0 = sample_chunk(denoise, start, levels, exit_steps[chunk], grad, generator, noise)
        out.append(x0)
        if use_cache and chunk + 1 < n_chunks:  # the last chunk's K/V would never be read
            net.write_chunk(x0.detach(), chunk_cond, cache, chunk)
    return RolloutResult(torch.cat(out, dim=2), list(exit_steps), levels)


def _full_sequence_denoiser(net: Denoiser, cond: Condition, done: list, frames_stop: int):
    """Cache-free reference: [finished chunks at s = 0 ; current chunk at s], block-causal over them all."""
    prefix = [x.detach() for x in done]

    def denoise(x, s):
        xs = torch.cat(prefix + [x], dim=2)
        level = torch.zeros(x.shape[0], net.frames(xs), dtype=x.dtype, device=x.device)
        level[:, net.frames(xs) - net.frames(x):] = s
        v, _ = net.velocity(xs, level, cond.frames(slice(0, frames_stop)), attend="block_causal")
        return v[:, :, -x.shape[2]:]

    return denoise
