"""Flow matching (Wan's native form): x_s = (1-s) x0 + s eps, v = eps - x0 (the model's timestep is
1000 s: that scale is applied in one place, :mod:`megatron_rcm.network.denoiser`).

Every time argument may be a scalar, [B] or per-frame [B, F]; ``bcast`` lifts it to [B, 1, F, 1, 1]
so that one chunk/frame can carry its own noise level (diffusion forcing, teacher forcing).
"""
from __future__ import annotations

import torch


def bcast(t, like: torch.Tensor) -> torch.Tensor:
    """Lift a time of shape [], [B] or [B, F] to broadcast against latents [B, C, F, H, W]."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        return t
    if t.dim() == 1:
        return t.view(-1, 1, 1, 1, 1)
    if t.dim() == 2:
        return t[:, None, :, None, None]
    raise ValueError(f"time must be [], [B] or [B, F]; got {tuple(t.shape)}")


def time_shift(s, shift: float):
    """Wan/SD3 resolution shift s' = shift s / (1 + (shift - 1) s); shift > 1 spends more time at high noise."""
    return shift * s / (1 + (shift - 1) * s)


def fm_noise(x0, eps, s):
    return (1 - bcast(s, x0)) * x0 + bcast(s, x0) * eps


def fm_target(x0, eps):
    return eps - x0


def fm_x0_eps(x_s, v, s):
    """Invert (x_s, v) -> (x0, eps): x0 = x_s - s v, eps = x_s + (1 - s) v."""
    sb = bcast(s, x_s)
    return x_s - sb * v, x_s + (1 - sb) * v


def sample_fm_times(shape, mode: str = "logit_normal", shift: float = 1.0, mean: float = 0.0, std: float = 1.0,
                    generator=None, device="cpu", dtype=torch.float32):
    """Training noise levels s in (0, 1): 'uniform' or 'logit_normal' (sigmoid of N(mean, std^2)), then shifted."""
    if mode == "uniform":
        s = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    elif mode == "logit_normal":
        s = torch.sigmoid(mean + std * torch.randn(shape, generator=generator, device=device, dtype=dtype))
    else:
        raise ValueError(f"time sampling mode must be 'uniform' or 'logit_normal', got {mode!r}")
    return time_shift(s, shift) if shift != 1.0 else s


def fm_sigmas(steps: int, shift: float = 1.0, s_max: float = 1.0, dtype=torch.float64):
    """Inference grid s_max -> 0 (steps + 1 points), uniform in the unshifted time, then shifted."""
    s = torch.linspace(s_max, 0.0, steps + 1, dtype=dtype)
    return time_shift(s, shift) if shift != 1.0 else s

