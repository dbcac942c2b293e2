"""A memory-lean attention backend for CPU tests (``"flash_like"``): autograd keeps q, k, v, O and the
log-sum-exp only, and every pass works in query blocks, as the fused CUDA kernel does; like it, its forward and
backward come apart, so checkpointed blocks can keep their attention outputs (``ops/kept_attention.py``). Built from
the reference formulas; registered by the tests that measure memory (``test_memory_plan.py``)."""
from __future__ import annotations

from megatron_rcm.ops.attention import AttentionBackend, _BACKENDS, register_backend
from megatron_rcm.ops.attention_reference import (attention_reference, attention_reference_backward,
                                                  attention_reference_jvp)
from megatron_rcm.ops.kept_attention import split_attention

BLOCK = 64  # query rows per block: BLOCK x Sk scores live at a time


def _forward_lse(q, k, v, mask, scale):
    o, lse = attention_reference(q, k, v, mask=mask, scale=scale, block_q=BLOCK, return_lse=True)
    return o, lse.float()  # fp32, as the fused kernel keeps it


def _backward(q, k, v, o, do, lse, mask, scale):  # from the saved normaliser, as flash attention does
    return attention_reference_backward(q, k, v, o, do, lse, mask=mask, scale=scale, block_q=BLOCK)


def _forward(q, k, v, mask, scale):
    return split_attention(_forward_lse, _backward, q, k, v, mask, scale)


def _jvp(q, k, v, tq, tk, tv, mask, scale):
    return attention_reference_jvp(q, k, v, tq, tk, tv, mask=mask, scale=scale, block_q=BLOCK)


def register() -> str:
    if "flash_like" not in _BACKENDS:
        register_backend(AttentionBackend("flash_like", _forward, _jvp, lambda t: True, jvp_differentiable=False,
                                          forward_lse=_forward_lse, backward=_backward))
    return "flash_like"
