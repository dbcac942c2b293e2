"""Samplers over a ``denoise_fn(x, s) -> v`` callable (FM velocity at FM noise level ``s``, a float).

The callable is usually a :class:`~megatron_rcm.network.Denoiser` call (a full-video forward, one
chunk against a KV cache, a TF sequence), so every sampler here is independent of how the model
attends; chunk-by-chunk use goes through :func:`megatron_rcm.inference.streaming.stream_chunks`.
"""
from __future__ import annotations

import torch

from .flow_matching import fm_sigmas, fm_x0_eps
from .trigflow import fm_from_trig, trig_F_from_v, trig_x0


@torch.no_grad()
def euler_fm(denoise_fn, noise, steps: int, shift: float = 1.0, sigmas=None, record=None):
    """First-order FM ODE: x <- x + (s_next - s) v. ``sigmas``: an explicit grid (s_0 > ... > 0) instead of
    ``steps`` shifted uniform steps; ``record(s, x)`` sees the state at every grid level before its step."""
    sig = fm_sigmas(steps, shift) if sigmas is None else sigmas
    x = noise
    for i in range(len(sig) - 1):
        if record is not None:
            record(float(sig[i]), x)
        x = x + float(sig[i + 1] - sig[i]) * denoise_fn(x, float(sig[i]))
    return x


@torch.no_grad()
def multistep2_fm(denoise_fn, noise, steps: int, shift: float = 1.0, sigmas=None, record=None):
    """DPM-Solver++(2M) in FM time: alpha = 1 - s, sigma = s, lambda = log((1-s)/s), data prediction.

    Step: x_n = (s_n/s) x + (1 - s_n)(1 - e^{-h}) D with D = x0 (1st order) or the 2M extrapolation
    (1 + 1/2r) x0 - (1/2r) x0_prev, r = h_prev / h. Falls back to 1st order when h_prev is infinite
    (step out of s = 1) and on the last step (s_n = 0 returns the data prediction). ``sigmas`` and ``record``
    as in :func:`euler_fm`.
    """
    sig = fm_sigmas(steps, shift) if sigmas is None else sigmas
    lam = lambda s: torch.log((1 - s) / s)
    x, prev_x0, prev_h = noise, None, None
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        if record is not None:
            record(float(s), x)
        x0, _ = fm_x0_eps(x, denoise_fn(x, float(s)), float(s))
        if float(sn) == 0.0:
            return x0
        h = lam(sn) - lam(s)
        d = x0
        if prev_x0 is not None and torch.isfinite(prev_h):
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        x = float(sn / s) * x + float((1 - sn) * -torch.expm1(-h)) * d
        prev_x0, prev_h = x0, h
    return x


def trajectory_grid(steps: int, shift: float, keep_levels) -> torch.Tensor:
    """The ODE grid of ``steps`` shifted uniform steps with the ``keep_levels`` inserted (float64, s_0 -> 0)."""
    grid = fm_sigmas(steps, shift).tolist()
    for level in keep_levels:
        if not any(abs(level - g) < 1e-9 for g in grid):
            grid.append(float(level))
    return torch.tensor(sorted(grid, reverse=True), dtype=torch.float64)


@torch.no_grad()
def ode_trajectory(solver, denoise_fn, noise, steps: int, shift: float, keep_levels):
    """(x0, [state at each of ``keep_levels``]) of an ODE ``solver`` (:func:`euler_fm` / :func:`multistep2_fm`) on
    :func:`trajectory_grid`: the teacher's states at a student's sampling levels (ODE-regression data)."""
    grid = trajectory_grid(steps, shift, keep_levels)
    seen = {}

    def record(s, x):
        for level in keep_levels:
            if abs(s - level) < 1e-9:
                seen[level] = x
    x0 = solver(denoise_fn, noise, steps, shift, sigmas=grid, record=record)
    missing = [lv for lv in keep_levels if lv not in seen]
    if missing:
        raise ValueError(f"trajectory levels {missing} are not in (0, {float(grid[0])}]")
    return x0, [seen[level] for level in keep_levels]


@torch.no_grad()
def cm_sample(denoise_fn, z, sigma_d: float, times=(torch.pi / 2,), generator=None):
    """1-4 step TrigFlow CM sampler: x0 = cos t x_t - sin t sigma_d F, then re-noise at the next time.

    ``z`` ~ N(0, sigma_d^2) so x_{pi/2} = z. ``denoise_fn`` is the FM-parameterized student; F is
    recovered exactly from v (trigflow.trig_F_from_v), fed x_s = x_t / (cos t + sigma_d sin t).
    """
    x_t, x0 = z, None
    for k, t in enumerate(times):
        t_ = torch.tensor(float(t), dtype=z.dtype)
        s = fm_from_trig(t_, sigma_d)
        D = torch.cos(t_) + sigma_d * torch.sin(t_)
        v = denoise_fn(x_t / D, float(s))
        x0 = trig_x0(x_t, trig_F_from_v(x_t, v, t_, sigma_d), t_, sigma_d)
        if k + 1 < len(times):
            tn = torch.tensor(float(times[k + 1]), dtype=z.dtype)
            noise = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device) * sigma_d
            x_t = torch.cos(tn) * x0 + torch.sin(tn) * noise
    return x0
