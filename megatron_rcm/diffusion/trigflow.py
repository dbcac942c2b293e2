"""TrigFlow (sCM): x_t = cos t x0 + sin t z, z ~ N(0, sigma_d^2), t in [0, pi/2].

Exact bridge to a flow-matching model whose data x0 has std ~sigma_d and whose noise is unit
(eps = z / sigma_d, x_s = (1-s) x0 + s eps). Derivation, with c = cos t, n = sin t, D = c + sigma_d n:
    x_t = c x0 + sigma_d n eps = D * [ (c/D) x0 + (sigma_d n / D) eps ]
so  s = sigma_d n / D,  x_s = x_t / D  (sigma_d = 1 gives s = sin/(sin+cos), x_s = x_t/(cos+sin)).
TrigFlow's target F = (dx_t/dt) / sigma_d = (c sigma_d eps - n x0) / sigma_d. With x0 = x_s - s v and
eps = x_s + (1-s) v:
    sigma_d F = (sigma_d c - n) x_s + sigma_d v / D  =>  F = ((sigma_d c - n) x_t + sigma_d v) / (sigma_d D)
and inversely v = (sigma_d D F - (sigma_d c - n) x_t) / sigma_d.
The consistency function is f(x_t, t) = c x_t - n sigma_d F = x0 for the exact F.
Derivatives for the JVP: dD/dt = sigma_d c - n, ds/dt = sigma_d / D^2.
"""
from __future__ import annotations

import torch

from .flow_matching import bcast


def fm_from_trig(t, sigma_d: float):
    """TrigFlow time t -> FM noise level s (same tensor shape as t)."""
    c, n = torch.cos(t), torch.sin(t)
    return sigma_d * n / (c + sigma_d * n)


def trig_from_fm(s, sigma_d: float):
    """FM noise level s -> TrigFlow time: tan t = s / (sigma_d (1 - s))."""
    return torch.atan2(s, sigma_d * (1 - s))


def _cnD(t, like, sigma_d):
    tb = bcast(t, like)
    c, n = torch.cos(tb), torch.sin(tb)
    return c, n, c + sigma_d * n


def trig_F_from_v(x_t, v, t, sigma_d: float):
    c, n, D = _cnD(t, x_t, sigma_d)
    return ((sigma_d * c - n) * x_t + sigma_d * v) / (sigma_d * D)


def v_from_trig_F(x_t, F, t, sigma_d: float):
    c, n, D = _cnD(t, x_t, sigma_d)
    return (sigma_d * D * F - (sigma_d * c - n) * x_t) / sigma_d


def trig_x0(x_t, F, t, sigma_d: float):
    """Consistency map f = cos t x_t - sin t sigma_d F."""
    tb = bcast(t, x_t)
    return torch.cos(tb) * x_t - torch.sin(tb) * sigma_d * F


def sample_trig_times(shape, sigma_d: float, p_mean: float, p_std: float, generator=None, device="cpu",
                      dtype=torch.float32):
    """sCM proposal t = arctan(exp(tau) / sigma_d), tau ~ N(P_mean, P_std^2)."""
    tau = p_mean + p_std * torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return torch.atan(torch.exp(tau) / sigma_d)


def trig_F_and_dFdt(fm_jvp, x_t, t, dxdt, sigma_d: float):
    """F(x_t, t) and its total derivative d/dt along (dx_t/dt, 1), from an FM velocity model.

    ``fm_jvp(x_s, s, dx_s, ds) -> (v, dv)`` is the model's forward-with-tangent at FM level s (e.g. a
    :class:`~megatron_rcm.network.Denoiser` call). Chain rule: x_s = x_t / D, s = sigma_d sin t / D.
    """
    c, n, D = _cnD(t, x_t, sigma_d)
    dD = sigma_d * c - n
    x_s = x_t / D
    dx_s = dxdt / D - x_t * dD / D**2
    s = fm_from_trig(t, sigma_d)
    dsdt = sigma_d / (torch.cos(t) + sigma_d * torch.sin(t)) ** 2
    v, dv = fm_jvp(x_s, s, dx_s, dsdt)
    num = dD * x_t + sigma_d * v  # note (sigma_d c - n) == dD
    F = num / (sigma_d * D)
    dnum = (-sigma_d * n - c) * x_t + dD * dxdt + sigma_d * dv
    dF = dnum / (sigma_d * D) - F * dD / D
    return F, dF

