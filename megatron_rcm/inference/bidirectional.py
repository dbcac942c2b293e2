"""Sampling the bidirectional (full-attention) teacher, as diffusers' WanPipeline runs Wan2.1.

The whole video is denoised at once with a full mask: Wan's flow-matching ODE with the resolution
shift, classifier-free guidance against the negative prompt's context, and the 2nd-order multistep
solver (:func:`megatron_rcm.diffusion.samplers.multistep2_fm`) or Euler. This is how teacher data is
generated from a diffusers teacher and how a diffusers teacher's reference samples are made.
"""
from __future__ import annotations

import torch

from ..diffusion.samplers import euler_fm, multistep2_fm
from ..network import Condition, Denoiser

SOLVERS = {"multistep2": multistep2_fm, "euler": euler_fm}


@torch.no_grad()
def bidirectional_sample(model, noise, context, uncond_context=None, steps: int = 50, guidance: float = 5.0,
                         shift: float = 3.0, solver: str = "multistep2") -> torch.Tensor:
    """x0 [B, C, F, H, W] from ``noise`` (kept in float32 between steps; the model casts to its dtype)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    net = Denoiser.of(model)
    was_training = net.model.training
    net.model.eval()
    dtype = context.dtype if context.dtype == torch.float64 else torch.float32
    cond = Condition(context, uncond_context)

    def denoise(x, s):
        return net.velocity(x, s, cond, attend="full", guidance=guidance)[0].to(dtype)

    x0 = SOLVERS[solver](denoise, noise.to(context.device, dtype), steps, shift)
    net.model.train(was_training)
    return x0
