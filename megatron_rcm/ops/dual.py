"""Forward-mode (tangent) rules for the few primitives of a Wan-style DiT.

How the project gets a JVP through the whole network (docs/design.md, "The dual-number JVP through the network"):
every module runs one code path that carries an optional tangent next to the primal value,
``f(x, tx) -> (y, ty)`` with ``tx=None`` meaning "no tangent" (the tangent arithmetic is skipped).
Why not ``torch.func.jvp`` over the model: custom autograd Functions (our fused attention kernel,
megatron-core's tensor-parallel collectives) have no forward-AD rule, the fused kernel produces
O and dO in *one* pass (a jvp rule would recompute O), and distributed collectives can ship
primal and tangent together. ``torch.func.jvp`` of the plain reference model remains the ground
truth the tests compare against.

All rules are exact derivatives; none builds anything larger than its primal intermediate.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .fusion import fusable

Tangent = torch.Tensor | None


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64): norms and modulation run in high precision like diffusers' FP32 norms."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def linear(x, tx: Tangent, weight, bias=None):
    """y = x W^T + b;  dy = dx W^T."""
    y = F.linear(x, weight, bias)
    return y, (None if tx is None else F.linear(tx, weight))


@fusable
def layer_norm(x, tx: Tangent, weight=None, bias=None, eps: float = 1e-6):
    """LayerNorm over the last dim (computed in >= fp32, returned in x's dtype).

    d xhat = (dx_c - xhat * mean(xhat * dx_c)) / sigma with dx_c = dx - mean(dx).
    Without a tangent it is torch's own LayerNorm: one kernel (and one in backward) instead of eight, on the
    host's side of every eager call as much as on the GPU's.
    """
    xf = upcast(x)
    if tx is None:
        w, b = (None if t is None else upcast(t) for t in (weight, bias))
        return F.layer_norm(xf, xf.shape[-1:], w, b, eps).to(x.dtype), None
    mu = xf.mean(-1, keepdim=True)
    xc = xf - mu
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xc * rstd
    y = xhat if weight is None else xhat * upcast(weight)
    if bias is not None:
        y = y + upcast(bias)
    ty = None
    if tx is not None:
        tf = upcast(tx)
        tc = tf - tf.mean(-1, keepdim=True)
        txhat = (tc - xhat * (xhat * tc).mean(-1, keepdim=True)) * rstd
        ty = (txhat if weight is None else txhat * upcast(weight)).to(x.dtype)
    return y.to(x.dtype), ty


@fusable(eager_if=lambda *a, **k: k.get("reduce") is not None or (len(a) > 4 and a[4] is not None))
def rms_norm(x, tx: Tangent, weight=None, eps: float = 1e-6, reduce=None):
    """RMSNorm over the last dim: y = x / rms(x) * w;  dy = (dx - x mean(x dx) / rms^2) / rms * w.

    ``reduce`` (tensor parallel, where the last dim is a shard of the normalised dim): a callable
    mapping the local statistics ``(mean(x^2), mean(x dx) or None)`` to the global ones, so the
    primal and the tangent statistic can travel in one collective. None = single process.
    """
    xf = upcast(x)
    if tx is None and reduce is None:  # torch's own: one kernel on a GPU (and in backward) instead of seven
        w = None if weight is None else upcast(weight)
        return F.rms_norm(xf, xf.shape[-1:], w, eps).to(x.dtype), None
    tf = None if tx is None else upcast(tx)
    ms = xf.pow(2).mean(-1, keepdim=True)
    mxd = None if tf is None else (xf * tf).mean(-1, keepdim=True)
    if reduce is not None:
        ms, mxd = reduce(ms, mxd)
    rstd = torch.rsqrt(ms + eps)
    y = xf * rstd
    if weight is not None:
        y = y * upcast(weight)
    ty = None
    if tx is not None:
        ty = (tf - xf * mxd * rstd.pow(2)) * rstd
        if weight is not None:
            ty = ty * upcast(weight)
        ty = ty.to(x.dtype)
    return y.to(x.dtype), ty


_GELU_C = math.sqrt(2.0 / math.pi)


@fusable
def gelu_tanh(x, tx: Tangent):
    """GELU, tanh approximation (Wan's FFN and text projection)."""
    y = F.gelu(x, approximate="tanh")
    if tx is None:
        return y, None
    u = _GELU_C * (x + 0.044715 * x.pow(3))
    th = torch.tanh(u)
    dydx = 0.5 * (1 + th) + 0.5 * x * (1 - th.pow(2)) * _GELU_C * (1 + 3 * 0.044715 * x.pow(2))
    return y, tx * dydx


@fusable
def silu(x, tx: Tangent):
    y = F.silu(x)
    if tx is None:
        return y, None
    s = torch.sigmoid(x)
    return y, tx * s * (1 + x * (1 - s))


@fusable
def modulate(x, tx: Tangent, shift, tshift: Tangent, scale, tscale: Tangent):
    """AdaLN modulation y = x (1 + scale) + shift, with tangents on all three."""
    if tx is None and tshift is None and tscale is None:
        return torch.addcmul(shift, x, 1 + scale), None  # two kernels instead of three (eager calls)
    y = x * (1 + scale) + shift
    ty = 0
    if tx is not None:
        ty = ty + tx * (1 + scale)
    if tscale is not None:
        ty = ty + x * tscale
    if tshift is not None:
        ty = ty + tshift
    return y, ty


@fusable
def gated_residual(x, tx: Tangent, branch, tbranch: Tangent, gate, tgate: Tangent):
    """x + branch * gate (computed in >= fp32 like diffusers), with tangents."""
    out_dtype = x.dtype
    if tx is None and tbranch is None and tgate is None:  # one kernel instead of three or four (eager calls):
        return torch.addcmul(x, branch, upcast(gate)).to(out_dtype), None  # the >= fp32 gate promotes x, branch
    y = (upcast(x) + upcast(branch) * gate).to(out_dtype)
    ty = torch.zeros((), dtype=upcast(x).dtype, device=x.device)
    if tx is not None:
        ty = ty + upcast(tx)
    if tbranch is not None:
        ty = ty + upcast(tbranch) * gate
    if tgate is not None:
        ty = ty + upcast(branch) * tgate
    return y, ty.to(out_dtype)


def add(x, tx: Tangent, y, ty: Tangent):
    if tx is None and ty is None:
        return x + y, None
    if tx is None:
        return x + y, ty
    if ty is None:
        return x + y, tx
    return x + y, tx + ty


def sinusoidal_embedding(t, tt: Tangent, dim: int, max_period: float = 10000.0):
    """Diffusers' ``Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)``: [cos(t f), sin(t f)].

    Frequencies are made in float32 like diffusers; the product runs in t's dtype (>= fp32).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    tf = upcast(t)
    arg = tf[..., None] * freqs.to(tf.dtype)
    cos, sin = torch.cos(arg), torch.sin(arg)
    y = torch.cat([cos, sin], dim=-1)
    if tt is None:
        return y, None
    dt = upcast(tt)[..., None] * freqs.to(tf.dtype)
    return y, torch.cat([-sin * dt, cos * dt], dim=-1)
