"""Masked attention in plain PyTorch: the definition every fast path is tested against.

Layout is flash-attn's: q [B, Sq, H, D], k/v [B, Sk, H, D]. Rows are processed in query blocks so
that no more than ``block x Sk`` scores live at once (the JVP holds a few of those, never S x S
per tangent). Fully masked query rows return zeros (flash-attn's convention).

Three entry points:

* :func:`attention_reference` -- O = softmax(scale QK^T + mask) V, plain differentiable ops, so
  autograd gives the backward and ``torch.func.jvp`` gives the ground-truth tangent.
* :func:`attention_reference_jvp` -- (O, dO) from explicit tangent formulas (docs/design.md, "Attention JVP"):
  dS = scale (dQ K^T + Q dK^T),  dP = P * (dS - rowsum(P * dS)),  dO = dP V + P dV.
  This is the arithmetic the fused kernel implements; the model's tangent pass calls it.
* :func:`attention_reference_backward` -- (dQ, dK, dV) from the saved O and log-sum-exp, the fused backward's
  formulas: what the reference backend's separate backward runs (``ops/kept_attention.py``).
"""
from __future__ import annotations

import math

import torch

from .masks import GroupMask

_DEFAULT_SCORE_BUDGET = 1 << 26  # elements of one score block (B*H*bq*Sk)


def _check_qkv(q, k, v, mask: GroupMask | None):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects [B, S, H, D] tensors, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention shape mismatch: q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if mask is not None and mask.shape != (q.shape[1], k.shape[1]):
        raise ValueError(f"mask covers {mask.shape} (queries, keys) but q has {q.shape[1]} and k has {k.shape[1]} tokens")


def _query_block(q, k, block_q: int | None) -> int:
    if block_q:
        return block_q
    b, _, h, _ = q.shape
    return max(1, min(q.shape[1], _DEFAULT_SCORE_BUDGET // max(1, b * h * k.shape[1])))


def _masked_scores(q, k, scale, mask: GroupMask | None, rows: slice):
    s = torch.einsum("bqhd,bkhd->bhqk", q[:, rows], k) * scale
    if mask is None:
        return s, None
    allowed = mask.dense(rows).to(s.device)
    return s.masked_fill(~allowed, float("-inf")), allowed


def _softmax_rows(s):
    """softmax over keys that tolerates rows with no allowed key (returns P = 0 there)."""
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    return p / torch.where(l > 0, l, torch.ones_like(l)), m, l


def attention_reference(q, k, v, mask: GroupMask | None = None, scale: float | None = None,
                        block_q: int | None = None, return_lse: bool = False):
    """O [B, Sq, H, D] (and the log-sum-exp [B, H, Sq] if asked); differentiable by autograd and forward AD."""
    _check_qkv(q, k, v, mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    bq = _query_block(q, k, block_q)
    outs, lses = [], []
    for start in range(0, q.shape[1], bq):
        rows = slice(start, min(start + bq, q.shape[1]))
        s, _ = _masked_scores(q, k, scale, mask, rows)
        p, m, l = _softmax_rows(s)
        outs.append(torch.einsum("bhqk,bkhd->bqhd", p, v))
        if return_lse:
            lses.append((m + torch.log(l)).squeeze(-1))
    o = torch.cat(outs, dim=1)
    return (o, torch.cat(lses, dim=-1)) if return_lse else o


def attention_reference_jvp(q, k, v, tq, tk, tv, mask: GroupMask | None = None, scale: float | None = None,
                            block_q: int | None = None):
    """(O, dO): attention and its directional derivative along (tq, tk, tv).

    Any tangent may be None (treated as zero, and its products are skipped: cross-attention to a
    fixed text context has tk = tv = None).
    """
    _check_qkv(q, k, v, mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    bq = _query_block(q, k, block_q)
    outs, touts = [], []
    for start in range(0, q.shape[1], bq):
        rows = slice(start, min(start + bq, q.shape[1]))
        s, allowed = _masked_scores(q, k, scale, mask, rows)
        p, _, _ = _softmax_rows(s)
        o = torch.einsum("bhqk,bkhd->bqhd", p, v)
        ds = None
        if tq is not None:
            ds = torch.einsum("bqhd,bkhd->bhqk", tq[:, rows], k)
        if tk is not None:
            term = torch.einsum("bqhd,bkhd->bhqk", q[:, rows], tk)
            ds = term if ds is None else ds + term
        to = torch.zeros_like(o)
        if ds is not None:
            ds = ds * scale
            if allowed is not None:
                ds = ds.masked_fill(~allowed, 0.0)
            pds = p * ds
            # dP V = (P*dS) V - rowsum(P*dS) * O
            to = torch.einsum("bhqk,bkhd->bqhd", pds, v) - pds.sum(-1).transpose(1, 2).unsqueeze(-1) * o
        if tv is not None:
            to = to + torch.einsum("bhqk,bkhd->bqhd", p, tv)
        outs.append(o)
        touts.append(to)
    return torch.cat(outs, dim=1), torch.cat(touts, dim=1)


def attention_reference_backward(q, k, v, o, do, lse, mask: GroupMask | None = None, scale: float | None = None,
                                 block_q: int | None = None):
    """(dQ, dK, dV) of O = attention(q, k, v) from the saved O and log-sum-exp, the formulas a flash backward runs:
    P = exp(scale q k^T - LSE), dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q.

    Computed in >= fp32 and returned in the inputs' dtypes; rows without an allowed key (LSE = -inf) get zero.
    """
    _check_qkv(q, k, v, mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf, of, dof = (t.to(acc) for t in (q, k, v, o, do))
    lse = lse.to(acc)
    lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))  # masked rows: P = 0
    bq = _query_block(q, k, block_q)
    dq, dk, dv = torch.empty_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
    for start in range(0, q.shape[1], bq):
        rows = slice(start, min(start + bq, q.shape[1]))
        s, _ = _masked_scores(qf, kf, scale, mask, rows)
        p = torch.exp(s - lse[:, :, rows, None])
        dv += torch.einsum("bhqk,bqhd->bkhd", p, dof[:, rows])
        delta = (dof[:, rows] * of[:, rows]).sum(-1).transpose(1, 2).unsqueeze(-1)  # [B, H, rows, 1]
        ds = p * (torch.einsum("bqhd,bkhd->bhqk", dof[:, rows], vf) - delta)
        dq[:, rows] = scale * torch.einsum("bhqk,bkhd->bqhd", ds, kf)
        dk += scale * torch.einsum("bhqk,bqhd->bkhd", ds, qf[:, rows])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
