"""Sampling the bidirectional (full-attention) teacher, as diffusers' WanPipeline runs Wan2.1.

The whole video is denoised at once with a full mask: Wan's flow-matching ODE with the resolution
shift, classifier-free guidance against the negative prompt's context, and the 2nd-order multistep
solver (:func:`megatron_rcm.diffusion.samplers.multistep2_fm`) or Euler. This is how teacher data is
generated from a diffusers teacher and how a diffusers teacher's reference samples are made.
"""
from __future__ import annotations

import torch

from ..diffusion.guidance import cfg_denoise_fn
from ..diffusion.samplers import euler_fm, multistep2_fm

SOLVERS = {"multistep2": multistep2_fm, "euler": euler_fm}


def full_attention_velocity(model, x, t, context):
    """The teacher's velocity for latents ``x`` at per-frame Wan timesteps ``t`` [B, F], attending everywhere."""
    return model(x, t, context, mask=None)


@torch.no_grad()
def bidirectional_sample(model, noise, context, uncond_context=None, steps: int = 50, guidance: float = 5.0,
                         shift: float = 3.0, solver: str = "multistep2") -> torch.Tensor:
    """x0 [B, C, F, H, W] from ``noise`` (kept in float32 between steps; the model casts to its dtype)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    was_training = model.training
    model.eval()
    dtype = context.dtype if context.dtype == torch.float64 else torch.float32
    fn = cfg_denoise_fn(lambda x, t, ctx: full_attention_velocity(model, x, t, ctx).to(dtype), context,
                        uncond_context, guidance)
    x0 = SOLVERS[solver](fn, noise.to(context.device, dtype), steps, shift)
    model.train(was_training)
    return x0
