"""Selective recompute: a checkpointed block's self-attention outputs survive to its recompute.

Why: with every block checkpointed, backward re-runs each block's forward to rebuild what autograd needs.
The projections, norms and gates are cheap to redo; the attention kernel is not (on the 1.3B TF-sCM and
SF-DMD steps it is the largest single cost of a forward). So the first run of a checkpointed block keeps
each self-attention's (O, LSE), and the recompute hands them to autograd instead of running the kernel
again: the attention backward needs q, k, v (recomputed by their GEMMs as before), O and LSE. torchtitan's
selective checkpointing keeps SDPA outputs for the same reason. Cost: O (the size of the block's input, in
the compute dtype) and LSE (fp32, one per token and head) per checkpointed block until its backward
(``training/memory_plan.kept_attention``). Switch: ``train.checkpoint_keep_attention``.

Backends that can take part provide their forward and backward separately (``AttentionBackend.forward_lse``
and ``.backward``): the fused CUDA kernels, and the float64 reference formulas the tests run on the CPU.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

_state = threading.local()


class AttentionStash:
    """One checkpointed block call's kept (O, LSE) pairs, in call order.

    The first run of the block records; a later run (the recompute) replays from the start. Each pair is handed
    over once: from then on the recompute's saved tensors hold it, and the stash lets go, so the pairs of blocks
    already through their backward are freed even where the recompute closure outlives them (torch's reentrant
    checkpoint keeps it until the whole graph is released). A second backward through a retained graph finds
    them gone and recomputes attention. The stash itself lives as long as that closure.
    """

    __slots__ = ("kept", "runs", "position")

    def __init__(self):
        self.kept: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self.runs = 0
        self.position = 0

    @property
    def replaying(self) -> bool:
        return self.runs > 0

    def record(self, o: torch.Tensor, lse: torch.Tensor) -> None:
        self.kept.append((o.detach(), lse.detach()))

    def take(self, out_shape: torch.Size, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The next kept pair, or None where it was handed over before (then the caller recomputes it)."""
        if self.position >= len(self.kept):
            raise RuntimeError("kept attention: the recompute ran more attention calls than the first run of the "
                               "block (a block whose calls depend on state that changed between its forward and its "
                               "backward); set train.checkpoint_keep_attention=false")
        entry = self.kept[self.position]
        if entry is not None and (entry[0].shape != out_shape or entry[0].dtype != dtype):
            raise RuntimeError(f"kept attention: the recompute's attention call {self.position} makes "
                               f"{tuple(out_shape)} {dtype}, the first run made {tuple(entry[0].shape)} "
                               f"{entry[0].dtype}; set train.checkpoint_keep_attention=false")
        self.kept[self.position] = None
        self.position += 1
        return entry


def active() -> AttentionStash | None:
    """The stash of the checkpointed block running on this thread, or None."""
    return getattr(_state, "stash", None)


def keeping(fn: Callable) -> Callable:
    """``fn`` (a block, for ``torch.utils.checkpoint``) with a stash of its own: its first run keeps the
    self-attention outputs, its recompute takes them instead of running the kernels."""
    stash = AttentionStash()

    def run(*args, **kwargs):
        previous = active()
        stash.position = 0
        _state.stash = stash
        try:
            return fn(*args, **kwargs)
        finally:
            _state.stash = previous
            stash.runs += 1

    return run


class _SplitAttention(torch.autograd.Function):
    """O = attention(q, k, v) from a backend's separate forward (O, LSE) and backward; the forward is skipped
    when the running block's stash replays."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, forward_lse, backward, keep):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        stash = active() if keep else None
        kept = stash.take(q.shape[:-1] + v.shape[-1:], q.dtype) if stash is not None and stash.replaying else None
        if kept is not None:
            o, lse = kept
        else:
            o, lse = forward_lse(q, k, v, mask, scale)
            if stash is not None and not stash.replaying:
                stash.record(o, lse)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mask, ctx.scale, ctx.backward = mask, scale, backward
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = ctx.backward(q, k, v, o, do.contiguous(), lse, ctx.mask, ctx.scale)
        return dq, dk, dv, None, None, None, None, None


def split_attention(forward_lse: Callable, backward: Callable, q, k, v, mask, scale: float, keep: bool = False):
    """O [B, Sq, H, D], differentiable w.r.t. q, k, v, through ``backward(q, k, v, o, do, lse, mask, scale)``.
    ``keep`` (self-attention): inside a :func:`keeping` block the recompute reuses the first run's (O, LSE)."""
    return _SplitAttention.apply(q, k, v, mask, scale, forward_lse, backward, keep)
