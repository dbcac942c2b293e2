"""Attention dispatch: one call site in the model, several interchangeable implementations.

A backend provides ``forward(q, k, v, mask, scale) -> O`` (differentiable w.r.t. q, k, v) and
``forward_jvp(q, k, v, tq, tk, tv, mask, scale) -> (O, dO)``.

The JVP rule, the same for every backend: ``forward_jvp`` never hands autograd detached outputs.
Either its (O, dO) are differentiable w.r.t. all inputs (``jvp_differentiable``: the reference and
SDPA backends, whose JVP is plain PyTorch), or :func:`attention_jvp` refuses to run it while autograd
is recording (grad mode on and an input requiring grad) and says what to do: the fused kernel has
no backward for its tangent. The objectives need no more: sCM and MeanFlow take the JVP of a
stop-gradient copy of the network, under ``torch.no_grad()``; gradients come from the plain forward. ``"reference"`` is plain PyTorch
and defines correctness; ``"sdpa"`` uses ``F.scaled_dot_product_attention`` for the forward
(fast on GPU, no forward-mode AD, so its JVP falls back to the reference formulas);
``"fused"`` is the CUDA extension in ``csrc/`` (registered by :mod:`megatron_rcm.ops.fused_attention`
when it is built). ``"auto"`` picks the fused kernel on CUDA when available, else SDPA (also on CPU,
where its fused kernel is ~9x faster than the reference on the tiny model's training step); full-mask forwards
that autograd does not record take cuDNN's SDPA on Hopper instead, and on request the recorded ones with cuDNN's
backward (``INFERENCE_SDPA`` and ``TRAINING_SDPA`` below).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config.errors import ConfigError
from . import kept_attention
from .attention_reference import attention_reference, attention_reference_backward, attention_reference_jvp
from .masks import GroupMask


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    forward: Callable
    forward_jvp: Callable
    available: Callable[[torch.Tensor], bool]
    jvp_differentiable: bool = True  # False: forward_jvp builds no graph (refused while autograd records)
    # the forward and backward apart (ops/kept_attention.py): forward_lse(q, k, v, mask, scale) -> (O, LSE) and
    # backward(q, k, v, o, do, lse, mask, scale) -> (dq, dk, dv); a backend with both can keep a checkpointed
    # block's self-attention outputs for its recompute (train.checkpoint_keep_attention)
    forward_lse: Callable | None = None
    backward: Callable | None = None


_BACKENDS: dict[str, AttentionBackend] = {}


def register_backend(backend: AttentionBackend) -> None:
    _BACKENDS[backend.name] = backend


def available_backends() -> list[str]:
    return ["auto", *sorted(_BACKENDS)]


def _sdpa_forward(q, k, v, mask: GroupMask | None, scale):
    attn_mask = None
    if mask is not None and not mask.is_full():
        attn_mask = mask.dense().to(q.device)
    try:
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=attn_mask, scale=scale)
    except NotImplementedError:  # forward-mode AD (torch.func.jvp) has no SDPA rule: use the reference math
        return attention_reference(q, k, v, mask=mask, scale=scale)
    return o.transpose(1, 2)


def _reference_forward(q, k, v, mask, scale):
    return attention_reference(q, k, v, mask=mask, scale=scale)


def _reference_jvp(q, k, v, tq, tk, tv, mask, scale):
    return attention_reference_jvp(q, k, v, tq, tk, tv, mask=mask, scale=scale)


def _reference_forward_lse(q, k, v, mask, scale):
    return attention_reference(q, k, v, mask=mask, scale=scale, return_lse=True)


def _reference_backward(q, k, v, o, do, lse, mask, scale):
    return attention_reference_backward(q, k, v, o, do, lse, mask=mask, scale=scale)


register_backend(AttentionBackend("reference", _reference_forward, _reference_jvp, lambda t: True,
                                  forward_lse=_reference_forward_lse, backward=_reference_backward))
register_backend(AttentionBackend("sdpa", _sdpa_forward, _reference_jvp, lambda t: True))


def _ensure_fused_registered() -> None:
    if "fused" not in _BACKENDS:
        try:  # registers itself on import when the extension is importable
            from . import fused_attention  # noqa: F401
        except ImportError:
            pass


def resolve_backend(name: str, like: torch.Tensor) -> AttentionBackend:
    _ensure_fused_registered()
    if name == "auto":
        fused = _BACKENDS.get("fused")
        if like.is_cuda and fused is not None and fused.available(like):
            return fused
        return _BACKENDS["sdpa"]
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {available_backends()}")
    backend = _BACKENDS[name]
    if not backend.available(like):
        raise RuntimeError(f"attention backend {name!r} is not available for {like.device}/{like.dtype} inputs")
    return backend


def _parse_fused_from(text: str) -> tuple[int, int]:
    """(queries, keys) from MEGATRON_RCM_INFERENCE_FUSED_FROM's "Q,K"."""
    try:
        queries, keys = (int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError("MEGATRON_RCM_INFERENCE_FUSED_FROM", text, "'QUERIES,KEYS', e.g. '4096,12288'") from None
    return queries, keys


# "auto" sends full-mask forwards that autograd does not record (streaming, the teacher's sampling) to cuDNN's
# attention on Hopper, except those with at least INFERENCE_FUSED_FROM = (queries, keys): since the fused forward is
# warp-specialised it is the faster one there (0.91-0.96x cuDNN's time for a 4,680-query chunk against 3-7 chunks,
# 0.92x at 32,760 x 32,760), and cuDNN below (1.06x at 4,680 x 4,680, 2.3-2.5x on 512 text keys); RESULTS.md,
# fourteenth session. Frame-wise chunks (1,560 queries: about one wave of the fused kernel's 128-query tiles) and
# 9,360 keys were not measured and stay on cuDNN. MEGATRON_RCM_INFERENCE_FUSED_FROM="Q,K" moves the limits;
# MEGATRON_RCM_INFERENCE_SDPA=fused keeps every call on the fused kernel.
# MEGATRON_RCM_TRAINING_SDPA=cudnn sends the full-mask calls autograd records there too, forward and backward (a
# self-forcing exit chunk against its KV cache, every text cross-attention): on the H200 cuDNN's backward is
# 1.2-1.5x the fused one at the rollout's 4,680-query shapes, its forward 1.15x, and 1.7-2.6x on the 512-key text
# cross-attention. Opt-in: in the SF-DMD step it cut the kernels' time by 4.6%, but the step's time moved by less
# than the runs of one device call differ (its exit chunks wait on the host, and a cuDNN call costs the host ~80 us
# more than a fused one); RESULTS.md, thirteenth session.
INFERENCE_SDPA = os.environ.get("MEGATRON_RCM_INFERENCE_SDPA", "cudnn")
INFERENCE_FUSED_FROM = _parse_fused_from(os.environ.get("MEGATRON_RCM_INFERENCE_FUSED_FROM", "4096,12288"))
TRAINING_SDPA = os.environ.get("MEGATRON_RCM_TRAINING_SDPA", "fused")
_cudnn_refused: set = set()  # shapes cuDNN declined once (no kernel): they stay on the fused kernel


def _cudnn_key(path: str, q, k) -> tuple:
    return path, tuple(q.shape), tuple(k.shape), q.dtype


def _cudnn_applies(path: str, q, k, mask) -> bool:
    """A full-mask half-precision call on a Hopper GPU whose shape cuDNN has not declined on this path."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if mask is not None and not mask.is_full():
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    return _cudnn_key(path, q, k) not in _cudnn_refused


def _cudnn_inference(q, k, v, mask, scale):
    """O from cuDNN's SDPA for a full-mask forward without autograd below ``INFERENCE_FUSED_FROM``, or None where it
    does not apply."""
    fused_faster = q.shape[1] >= INFERENCE_FUSED_FROM[0] and k.shape[1] >= INFERENCE_FUSED_FROM[1]
    if (INFERENCE_SDPA != "cudnn" or fused_faster or records_graph(q, k, v)
            or not _cudnn_applies("inference", q, k, mask)):
        return None
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    except RuntimeError:  # no cuDNN kernel for this shape/dtype
        _cudnn_refused.add(_cudnn_key("inference", q, k))
        return None
    return o.transpose(1, 2)


_NO_DROPOUT_RNG: dict = {}  # per device: the (seed, offset) pair cuDNN's backward takes, unused without dropout


class CudnnDeclined(RuntimeError):
    """cuDNN has no kernel for this call's shape or dtype (told apart from every other error on the way)."""


def cudnn_forward_lse(q, k, v, mask, scale):
    """(O [B, S, H, D], cuDNN's LSE) of contiguous [B, S, H, D] q, k, v: cuDNN's forward with its softmax
    statistics, what :func:`cudnn_backward` takes back (opaque to everything else)."""
    try:
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, False, False, scale=scale)
    except RuntimeError as e:
        raise CudnnDeclined(str(e)) from e
    return out[0].transpose(1, 2), out[1]


def cudnn_backward(q, k, v, o, do, lse, mask, scale):
    """(dq, dk, dv) [B, S, H, D] from cuDNN's backward, given O and the LSE of :func:`cudnn_forward_lse`."""
    rng = _NO_DROPOUT_RNG.get(q.device)
    if rng is None:
        rng = _NO_DROPOUT_RNG[q.device] = (torch.zeros(1, dtype=torch.int64, device=q.device),) * 2
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        t(do), t(q), t(k), t(v), t(o), lse, rng[0], rng[1], None, None, None, q.shape[1], k.shape[1], 0.0, False,
        scale=scale)
    return t(dq), t(dk), t(dv)


def _cudnn_training(q, k, v, mask, scale, keep: bool):
    """O (autograd records it) from cuDNN's forward and backward for a full-mask call, kept across a checkpointed
    block's recompute like the fused kernels' (``keep``), or None where cuDNN does not apply.

    A kept call takes this path whatever the grad mode, so that a block's first run and its recompute pick the
    same backend: torch's reentrant checkpoint runs the first one under no_grad, and the recompute's backward must
    be handed the LSE of the kernel that made it."""
    if TRAINING_SDPA != "cudnn" or not (keep or records_graph(q, k, v)) or not _cudnn_applies("split", q, k, mask):
        return None
    try:
        return kept_attention.split_attention(cudnn_forward_lse, cudnn_backward, q, k, v, mask, scale, keep=keep)
    except CudnnDeclined:  # no cuDNN kernel for this shape/dtype (raised before anything is kept)
        _cudnn_refused.add(_cudnn_key("split", q, k))
        return None


def attention(q, k, v, mask: GroupMask | None = None, scale: float | None = None, backend: str = "auto",
              keep: bool = False):
    """O = softmax(scale q k^T + mask) v over [B, S, H, D] tensors.

    ``keep`` (self-attention): inside a checkpointed block that keeps its attention outputs
    (``ops/kept_attention.keeping``), a backend with a separate forward and backward records (O, LSE) in the first
    run and skips its kernel in the recompute."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    keep = keep and kept_attention.active() is not None
    if backend == "auto":
        o = _cudnn_training(q, k, v, mask, scale, keep)
        if o is not None:
            return o
    if keep:
        impl = resolve_backend(backend, q)
        if impl.forward_lse is not None and impl.backward is not None:
            return kept_attention.split_attention(impl.forward_lse, impl.backward, q, k, v, mask, scale, keep=True)
    if backend == "auto":
        o = _cudnn_inference(q, k, v, mask, scale)
        if o is not None:
            return o
    return resolve_backend(backend, q).forward(q, k, v, mask, scale)


def attention_jvp(q, k, v, tq, tk, tv, mask: GroupMask | None = None, scale: float | None = None,
                  backend: str = "auto", keep: bool = False):
    """(O, dO) in one call; tangents may be None (zero). ``keep``: see :func:`attention` (no effect with a tangent)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if tq is None and tk is None and tv is None:
        return attention(q, k, v, mask, scale, backend, keep=keep), None
    impl = resolve_backend(backend, q)
    if not impl.jvp_differentiable and records_graph(q, k, v, tq, tk, tv):
        raise RuntimeError(f"attention backend {impl.name!r} computes the JVP (a forward with tangents) without an "
                           "autograd graph: run it under torch.no_grad() (a stop-gradient JVP, as sCM and MeanFlow "
                           "use), or set causal.attention_backend=reference or sdpa to differentiate through it")
    return impl.forward_jvp(q, k, v, tq, tk, tv, mask, scale)


def records_graph(*tensors) -> bool:
    """Whether autograd would record an op on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
