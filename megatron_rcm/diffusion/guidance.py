"""Classifier-free guidance with cond and uncond in one batched forward (one pass, half the launches)."""
from __future__ import annotations

import torch


def cfg_combine(v_cond, v_uncond, scale: float):
    """v = v_u + w (v_c - v_u); scale 1 is plain conditional."""
    return v_uncond + scale * (v_cond - v_uncond)


def cfg_denoise_fn(model_fn, context, uncond_context, scale: float):
    """Wrap ``model_fn(x, t, ctx) -> v`` into ``denoise_fn(x, t) -> guided v``, batching [cond ; uncond]."""
    if scale == 1.0 or uncond_context is None:
        return lambda x, t: model_fn(x, t, context)
    ctx2 = torch.cat([context, uncond_context])

    def fn(x, t):
        t = torch.as_tensor(t, device=x.device)
        t2 = torch.cat([t, t]) if t.dim() > 0 else t
        vc, vu = model_fn(torch.cat([x, x]), t2, ctx2).chunk(2)
        return cfg_combine(vc, vu, scale)

    return fn


def cfg_jvp_fn(model_jvp_fn, context, uncond_context, scale: float):
    """Guided (v, dv) from ``model_jvp_fn(x, t, ctx, dx, dt) -> (v, dv)``; CFG is linear so it maps tangents too."""
    if scale == 1.0 or uncond_context is None:
        return lambda x, t, dx, dt: model_jvp_fn(x, t, context, dx, dt)
    ctx2 = torch.cat([context, uncond_context])

    def fn(x, t, dx, dt):
        cat = lambda a: torch.cat([a, a])
        v, dv = model_jvp_fn(cat(x), cat(t), ctx2, cat(dx), cat(dt))
        (vc, vu), (dvc, dvu) = v.chunk(2), dv.chunk(2)
        return cfg_combine(vc, vu, scale), cfg_combine(dvc, dvu, scale)

    return fn
