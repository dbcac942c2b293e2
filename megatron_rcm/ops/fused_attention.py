"""The "fused" attention backend: CUDA kernels from csrc/ (forward+LSE, forward+JVP, backward).

Registers itself with :mod:`megatron_rcm.ops.attention` on import when the compiled extension
``megatron_rcm._fused_attention_C`` loads (or is JIT-built with MEGATRON_RCM_JIT_BUILD=1 on a machine
with a GPU and nvcc). Otherwise the module imports fine and registers nothing.
"""
from __future__ import annotations

import math
import os
import warnings
import weakref

import torch

from .attention import AttentionBackend, register_backend
from .masks import GroupMask, full_mask

# Tile sizes the kernels summarise masks with (mirrors csrc/fused_attention_kernels.cuh).
FWD_TILES = (64, 64)
JVP_TILES = (64, 32)
BWD_TILES = (64, 64)
HEAD_DIMS = (64, 128)


def _jit_build():
    """Compile csrc/ with torch.utils.cpp_extension.load; only with a GPU and a CUDA toolchain."""
    from torch.utils import cpp_extension

    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None or not torch.cuda.is_available():
        return None
    csrc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "csrc")
    csrc = os.path.normpath(csrc)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    return cpp_extension.load(
        name="_fused_attention_C",
        sources=[os.path.join(csrc, "fused_attention.cpp"), os.path.join(csrc, "fused_attention_kernels.cu")],
        extra_include_paths=[csrc],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=["-O3", "-std=c++17", "--use_fast_math"],
        verbose=os.environ.get("MEGATRON_RCM_JIT_VERBOSE") == "1",
    )


def _load_extension():
    try:
        from megatron_rcm import _fused_attention_C as ext  # type: ignore[attr-defined]
        return ext
    except ImportError:
        pass
    if os.environ.get("MEGATRON_RCM_JIT_BUILD") == "1":
        try:
            return _jit_build()
        except (RuntimeError, OSError) as exc:  # a failed build must not break model imports
            warnings.warn(f"fused attention JIT build failed, backend not registered: {exc}")
    return None


_C = _load_extension()


# ---------------------------------------------------------------- mask packing (cached per mask)
_PACK_CACHE: dict[int, tuple] = {}
_FULL_MASKS: dict[tuple[int, int], GroupMask] = {}


def _drop(key: int) -> None:
    _PACK_CACHE.pop(key, None)


def pack_mask(mask: GroupMask | None, sq: int, sk: int, tiles: tuple[int, int], device) -> tuple:
    """(q_groups int32, k_groups int32, allow uint8 [G*G], tile summary int8 [Tq, Tk], G) on device.

    Cached per (mask object, tile sizes, device) so repeated layers pay the summary once; entries
    vanish with the mask object.
    """
    if mask is None:
        mask = _FULL_MASKS.setdefault((sq, sk), full_mask(sq, sk))
    if mask.shape != (sq, sk):
        raise ValueError(f"mask covers {mask.shape} but q/k have {(sq, sk)} tokens")
    device = torch.device(device)
    key = id(mask)
    entry = _PACK_CACHE.get(key)
    if entry is None or entry[0]() is not mask:
        entry = (weakref.ref(mask), {})
        _PACK_CACHE[key] = entry
        weakref.finalize(mask, _drop, key)
    packs = entry[1]
    sub = (tiles, str(device))
    if sub not in packs:
        summary = mask.tile_summary(*tiles).to(torch.int8)
        packs[sub] = (
            mask.q_groups.to(device=device, dtype=torch.int32).contiguous(),
            mask.k_groups.to(device=device, dtype=torch.int32).contiguous(),
            mask.allow.to(device=device, dtype=torch.uint8).reshape(-1).contiguous(),
            summary.to(device).contiguous(),
            mask.num_groups,
        )
    return packs[sub]


# ---------------------------------------------------------------- autograd + backend functions
class _FusedAttention(torch.autograd.Function):
    """O = attention(q, k, v); backward is the CUDA kernel from dO and the saved LSE."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        qg, kg, allow, tiles, g = pack_mask(mask, q.shape[1], k.shape[1], FWD_TILES, q.device)
        o, lse = _C.fwd(q, k, v, qg, kg, allow, tiles, g, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mask, ctx.scale = mask, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, Sq]
        qg, kg, allow, tiles, g = pack_mask(ctx.mask, q.shape[1], k.shape[1], BWD_TILES, q.device)
        dq, dk, dv = _C.bwd(q, k, v, do, lse, delta, qg, kg, allow, tiles, g, ctx.scale)
        return dq, dk, dv, None, None


def _scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def fused_forward(q, k, v, mask: GroupMask | None = None, scale: float | None = None):
    """O [B, Sq, H, D], differentiable w.r.t. q, k, v."""
    return _FusedAttention.apply(q, k, v, mask, _scale(q, scale))


def fused_forward_lse(q, k, v, mask: GroupMask | None = None, scale: float | None = None):
    """(O, LSE [B, H, Sq] float32; -inf on fully masked rows), no autograd."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    qg, kg, allow, tiles, g = pack_mask(mask, q.shape[1], k.shape[1], FWD_TILES, q.device)
    return tuple(_C.fwd(q, k, v, qg, kg, allow, tiles, g, _scale(q, scale)))


def fused_forward_jvp(q, k, v, tq, tk, tv, mask: GroupMask | None = None, scale: float | None = None):
    """(O, dO) in one pass; None tangents are zero and their products are skipped."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    tq, tk, tv = (None if t is None else t.detach().contiguous() for t in (tq, tk, tv))
    qg, kg, allow, tiles, g = pack_mask(mask, q.shape[1], k.shape[1], JVP_TILES, q.device)
    with torch.no_grad():
        o, to = _C.fwd_jvp(q.detach(), k.detach(), v.detach(), tq, tk, tv, qg, kg, allow, tiles, g, _scale(q, scale))
    return o, to


def fused_available(t: torch.Tensor) -> bool:
    return (_C is not None and t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)
            and t.dim() == 4 and t.shape[-1] in HEAD_DIMS)


if _C is not None:
    register_backend(AttentionBackend("fused", fused_forward, fused_forward_jvp, fused_available))
