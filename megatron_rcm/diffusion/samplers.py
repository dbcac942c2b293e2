"""Samplers over a ``denoise_fn(x, t_wan[B, F]) -> v`` callable (FM velocity, Wan timestep units).

The same callable can wrap a full-video forward, one chunk against a KV cache, or a TF sequence,
so every sampler here is independent of how the model attends.
"""
from __future__ import annotations

import torch

from .guidance import cfg_combine

from .flow_matching import WAN_T_SCALE, fm_sigmas, fm_x0_eps
from .trigflow import fm_from_trig, trig_F_from_v, trig_x0


def _tw(s, x):
    """FM level (python float or 0-d) -> per-frame Wan timestep [B, F]."""
    return torch.full((x.shape[0], x.shape[2]), float(s) * WAN_T_SCALE, dtype=x.dtype, device=x.device)


@torch.no_grad()
def euler_fm(denoise_fn, noise, steps: int, shift: float = 1.0):
    """First-order FM ODE: x <- x + (s_next - s) v."""
    sig = fm_sigmas(steps, shift)
    x = noise
    for i in range(steps):
        x = x + float(sig[i + 1] - sig[i]) * denoise_fn(x, _tw(sig[i], x))
    return x


@torch.no_grad()
def multistep2_fm(denoise_fn, noise, steps: int, shift: float = 1.0):
    """DPM-Solver++(2M) in FM time: alpha = 1 - s, sigma = s, lambda = log((1-s)/s), data prediction.

    Step: x_n = (s_n/s) x + (1 - s_n)(1 - e^{-h}) D with D = x0 (1st order) or the 2M extrapolation
    (1 + 1/2r) x0 - (1/2r) x0_prev, r = h_prev / h. Falls back to 1st order when h_prev is infinite
    (step out of s = 1) and on the last step (s_n = 0 returns the data prediction).
    """
    sig = fm_sigmas(steps, shift)
    lam = lambda s: torch.log((1 - s) / s)
    x, prev_x0, prev_h = noise, None, None
    for i in range(steps):
        s, sn = sig[i], sig[i + 1]
        x0, _ = fm_x0_eps(x, denoise_fn(x, _tw(s, x)), float(s))
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
        v = denoise_fn(x_t / D, _tw(s, x_t))
        x0 = trig_x0(x_t, trig_F_from_v(x_t, v, t_, sigma_d), t_, sigma_d)
        if k + 1 < len(times):
            tn = torch.tensor(float(times[k + 1]), dtype=z.dtype)
            noise = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device) * sigma_d
            x_t = torch.cos(tn) * x0 + torch.sin(tn) * noise
    return x0


@torch.no_grad()
def causal_chunk_sample(model, noise, context, chunk_sampler, actions=None, uncond_context=None,
                        guidance_scale: float = 1.0):
    """Generate chunk by chunk with a KV cache, as at streaming inference.

    ``chunk_sampler(denoise_fn, noise_chunk) -> x0_chunk`` is any sampler above (partial-applied).
    After a chunk is denoised it is re-run at t = 0 with ``write_cache=True`` so later chunks see it.
    With guidance, cond and uncond run as one doubled batch with one doubled-batch cache: every call,
    the cache write included, sees [context ; uncond_context], so each half keeps its own history.
    """
    b, _, frames, h, w = noise.shape
    cf = model.causal.chunk_frames * model.patch[0]
    guided = guidance_scale != 1.0 and uncond_context is not None
    ctx = torch.cat([context, uncond_context]) if guided else context
    dup = (lambda a: None if a is None else torch.cat([a, a])) if guided else (lambda a: a)
    cache = model.new_kv_cache(h, w)
    out = []
    for chunk in range(frames // cf):
        sl = slice(chunk * cf, (chunk + 1) * cf)
        act = dup(None if actions is None else actions[:, sl])

        def fn(x, t, chunk=chunk, act=act):
            t = torch.as_tensor(t, device=x.device)
            v = model.forward_chunk(dup(x), dup(t) if t.dim() else t, ctx, cache, chunk, actions=act)[0]
            return cfg_combine(*v.chunk(2), guidance_scale) if guided else v

        x0 = chunk_sampler(fn, noise[:, :, sl])
        zeros = torch.zeros(b, cf // model.patch[0], dtype=noise.dtype, device=noise.device)
        model.forward_chunk(dup(x0), dup(zeros), ctx, cache, chunk, write_cache=True, actions=act)
        out.append(x0)
    return torch.cat(out, dim=2)
