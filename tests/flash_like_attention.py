"""A memory-lean attention backend for CPU tests (``"flash_like"``): autograd keeps q, k, v, O and the
log-sum-exp only, and every pass works in query blocks, as the fused CUDA kernel does. Built from the
reference formulas; registered by the tests that measure memory (``test_memory_plan.py``)."""
from __future__ import annotations

import torch

from megatron_rcm.ops.attention import AttentionBackend, _BACKENDS, register_backend
from megatron_rcm.ops.attention_reference import attention_reference, attention_reference_jvp

BLOCK = 64  # query rows per block: BLOCK x Sk scores live at a time


def _rows_mask(mask, rows: slice, sk: int):
    return None if mask is None else mask.dense(rows)


class _FlashLike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        with torch.no_grad():
            o, lse = attention_reference(q, k, v, mask=mask, scale=scale, block_q=BLOCK, return_lse=True)
            lse = lse.float()  # fp32, as the fused kernel keeps it
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mask, ctx.scale = mask, scale
        return o

    @staticmethod
    def backward(ctx, go):
        q, k, v, _, lse = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for start in range(0, q.shape[1], BLOCK):
            rows = slice(start, min(start + BLOCK, q.shape[1]))
            with torch.enable_grad():
                qb = q[:, rows].detach().requires_grad_()
                kk, vv = k.detach().requires_grad_(), v.detach().requires_grad_()
                s = torch.einsum("bqhd,bkhd->bhqk", qb, kk) * ctx.scale
                if ctx.mask is not None:
                    s = s.masked_fill(~ctx.mask.dense(rows).to(s.device), float("-inf"))
                # the saved normaliser, as flash attention does
                p = torch.exp(s.float() - lse[:, :, rows, None]).nan_to_num(0.0).to(vv.dtype)
                ob = torch.einsum("bhqk,bkhd->bqhd", p, vv)
                g = torch.autograd.grad(ob, (qb, kk, vv), go[:, rows])
            dq[:, rows] += g[0]
            dk += g[1]
            dv += g[2]
        return dq, dk, dv, None, None


def _forward(q, k, v, mask, scale):
    return _FlashLike.apply(q, k, v, mask, scale)


def _jvp(q, k, v, tq, tk, tv, mask, scale):
    return attention_reference_jvp(q, k, v, tq, tk, tv, mask=mask, scale=scale, block_q=BLOCK)


def register() -> str:
    if "flash_like" not in _BACKENDS:
        register_backend(AttentionBackend("flash_like", _forward, _jvp, lambda t: True, jvp_differentiable=False))
    return "flash_like"
