"""Self-forcing rollout (Huang et al. 2025, "Self Forcing"; CausVid's few-step causal sampler).

The student generates the whole video chunk by chunk with its few-step sampler and its own KV cache,
exactly as at inference: for each chunk, start from noise at the first level, predict x0
(x0 = x_s - s v), re-noise x0 to the next level with *fresh* noise, and so on. After a chunk is done
its clean output is re-run at t = 0 (no grad, ``write_cache=True``) so later chunks attend to it.

Gradient: one denoising step per chunk is "the exit step". Steps before it run under
``torch.no_grad``; the exit step runs with grad and its x0 prediction *is* the chunk's output (the
remaining steps are skipped), as in Self-Forcing's training pipeline. So the output carries exactly
one network graph per chunk, whatever the number of steps, and the generated sample is a 1..N-step
sample of the same sampler. By default one exit index is drawn per rollout and shared by all chunks
(Self-Forcing's ``same_step_across_blocks=True``: every chunk sees the same sampler depth, which
keeps chunk statistics consistent); ``sync_exit_across_chunks=False`` draws one per chunk.
Cache writes detach (KVCache.append), so no gradient flows from a chunk into earlier chunks.

Noise order (shared with inference.streaming so both reproduce each other from one seed): per chunk,
the chunk's start noise, then one fresh noise draw per re-noising step, all from ``generator``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from ..diffusion.flow_matching import time_shift
from ..ops.masks import block_causal_mask
from ..parallel.noise import dp_draw
from ..parallel.pipeline import outputs_on_every_stage

WAN_T = 1000.0


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
    out = []
    for t in denoising_steps:
        s = float(t) / WAN_T
        if not 0.0 < s <= 1.0:
            raise ValueError(f"denoising steps must be in (0, 1000], got {t}")
        out.append(float(time_shift(s, shift)) if shift != 1.0 else s)
    return out


def _randn(shape, like_device, dtype, generator):
    return dp_draw(lambda s: torch.randn(s, generator=generator, device=like_device, dtype=dtype), shape)


def sample_chunk(denoise, noise, levels, exit_step: int, grad: bool, generator=None):
    """Few-step x0-prediction sampler on one chunk; returns x0 of step ``exit_step``.

    ``denoise(x, t_wan_per_frame) -> v``. Only the exit step builds a graph (when ``grad``).
    """
    b, frames = noise.shape[0], noise.shape[2]
    x = noise
    x0 = None
    for k in range(exit_step + 1):
        s = levels[k]
        t = torch.full((b, frames), s * WAN_T, dtype=noise.dtype, device=noise.device)
        with torch.set_grad_enabled(grad and k == exit_step):
            v = denoise(x, t)
            x0 = x - s * v
        if k < exit_step:
            sn = levels[k + 1]
            eps = _randn(noise.shape, noise.device, noise.dtype, generator)
            x = (1.0 - sn) * x0 + sn * eps
    return x0


def _draw_exits(num_chunks: int, num_steps: int, cfg: RolloutConfig, rng: random.Random) -> list[int]:
    if cfg.last_step_only:
        return [num_steps - 1] * num_chunks
    if cfg.sync_exit_across_chunks:
        return [rng.randrange(num_steps)] * num_chunks
    return [rng.randrange(num_steps) for _ in range(num_chunks)]


def self_forcing_rollout(model, context, shape, cfg: RolloutConfig | None = None, generator=None, actions=None,
                         exit_steps: list[int] | None = None, use_cache: bool = True, grad: bool = True,
                         rng: random.Random | None = None) -> RolloutResult:
    """Generate a [B, C, F, H, W] video chunk by chunk with the student (see module docstring).

    ``exit_steps`` forces the exit index per chunk (tests, inference = last step); otherwise drawn
    from ``rng`` (python Random, so it does not disturb the torch noise stream). ``use_cache=False``
    is the cache-free reference: each step runs a full forward over [previous clean chunks (t = 0) ;
    current chunk] with the block-causal mask -- the same function, only slower.
    """
    cfg = cfg or RolloutConfig()
    levels = denoise_levels(cfg.denoising_steps, cfg.shift)
    b, c, f, h, w = shape
    pt = model.patch[0]
    cf = model.causal.chunk_frames * pt  # latent frames per chunk
    if f % cf:
        raise ValueError(f"{f} latent frames are not a whole number of {cf}-frame chunks")
    n_chunks = f // cf
    if exit_steps is None:
        exit_steps = _draw_exits(n_chunks, len(levels), cfg, rng or random)
    if len(exit_steps) != n_chunks or any(not 0 <= e < len(levels) for e in exit_steps):
        raise ValueError(f"exit_steps must list {n_chunks} indices in [0, {len(levels)}), got {exit_steps}")
    dtype, device = model.dtype, context.device
    cache = model.new_kv_cache(h, w) if use_cache else None
    tpf = model.tokens_per_frame(h, w)
    clean: list[torch.Tensor] = []
    out = []
    for chunk in range(n_chunks):
        sl = slice(chunk * cf, (chunk + 1) * cf)
        act = None if actions is None else actions[:, chunk * model.causal.chunk_frames:(chunk + 1) * model.causal.chunk_frames]
        if use_cache:
            def denoise(x, t, a=act, i=chunk):
                return outputs_on_every_stage(model, (model.forward_chunk(x, t, context, cache, i, actions=a)[0],),
                                              (x,))[0]
        else:
            denoise = _full_sequence_denoiser(model, context, clean, actions, chunk, tpf)
        noise = _randn((b, c, cf, h, w), device, dtype, generator)
        x0 = sample_chunk(denoise, noise, levels, exit_steps[chunk], grad, generator)
        out.append(x0)
        if chunk + 1 < n_chunks:  # the last chunk's K/V would never be read
            with torch.no_grad():
                if use_cache:
                    zeros = torch.zeros(b, model.causal.chunk_frames, dtype=dtype, device=device)
                    model.forward_chunk(x0.detach(), zeros, context, cache, chunk, write_cache=True, actions=act)
                else:
                    clean.append(x0.detach())
    return RolloutResult(torch.cat(out, dim=2), list(exit_steps), levels)


def _full_sequence_denoiser(model, context, clean, actions, chunk, tpf):
    """Cache-free reference: [clean chunks < chunk at t = 0 ; current chunk at t] with a block-causal mask."""
    cfr = model.causal.chunk_frames

    def denoise(x, t):
        frames = (chunk + 1) * cfr
        xs = torch.cat(clean[:chunk] + [x], dim=2)
        ts = torch.cat([torch.zeros(t.shape[0], chunk * cfr, dtype=t.dtype, device=t.device), t], dim=1)
        mask = block_causal_mask(frames, tpf, cfr, model.visibility())
        act = None if actions is None else actions[:, :frames]
        v = outputs_on_every_stage(model, (model(xs, ts, context, mask, actions=act),), (xs,))[0]
        return v[:, :, -x.shape[2]:]

    return denoise
