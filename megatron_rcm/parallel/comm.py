"""Collectives that are correct for autograd AND carry the tangent of the dual (primal, tangent) path.

The model propagates tangents explicitly (``ops/dual.py``), so a collective just has to be applied
to the tangent exactly like to the primal (all collectives here are linear maps). To pay one
latency instead of two, primal and tangent are stacked and sent in ONE call (``pack``/``unpack``).
The autograd rules (the tangent path is differentiable too, through the same stacked tensor):

- ``copy_to``   (Megatron's "f"): identity forward, all-reduce(sum) backward - input of a
  column-parallel layer whose input is replicated over the group.
- ``reduce_from`` ("g"): all-reduce(sum) forward, identity backward - output of a row-parallel
  layer; everything after it is replicated, so each rank already holds the full gradient.
- ``all_reduce_sum``: all-reduce forward AND backward - for statistics (RMSNorm over a sharded
  dim) whose consumers are themselves sharded, so the true gradient sums over the ranks.
- ``all_to_all``: equal-split all-to-all along dim 0; it is its own adjoint (block transpose).
- ``gather``: all-gather along ``dim`` forward, keep own slice backward (consumers replicated).

Megatron-core's mapping Functions implement the first two for the primal only and have no JVP rule
(docs/design.md, "The dual-number JVP through the network"), hence these small replacements.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def pack(*ts):
    """Stack the non-None tensors (same shape) along a new leading dim; returns (packed, mask).

    A lone tensor (no tangent) is a view, not a copy: a column-parallel input or the text context
    would otherwise be copied (and kept for backward) once per block."""
    present = [t is not None for t in ts]
    kept = [t for t in ts if t is not None]
    return (kept[0].unsqueeze(0) if len(kept) == 1 else torch.stack(kept)), present


def unpack(packed, present):
    it = iter(packed.unbind(0))
    return [next(it) if p else None for p in present]


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = torch.empty_like(x.contiguous())
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out = torch.empty_like(g.contiguous())
        dist.all_to_all_single(out, g.contiguous(), group=ctx.group)
        return out, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.rank, ctx.n, ctx.dim = dist.get_rank(group), x.shape[dim], dim
        parts = [torch.empty_like(x.contiguous()) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, g):
        return g.narrow(ctx.dim, ctx.rank * ctx.n, ctx.n).contiguous(), None, None


def copy_to(x, group):
    return _CopyTo.apply(x, group)


def reduce_from(x, group):
    return _ReduceFrom.apply(x, group)


def all_reduce_sum(x, group):
    return _AllReduceSum.apply(x, group)


def all_to_all(x, group):
    return _AllToAll.apply(x, group)


def gather(x, group, dim):
    return _Gather.apply(x, group, dim)
