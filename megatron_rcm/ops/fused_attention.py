"""The "fused" attention backend: CUDA kernels from csrc/ (forward+LSE, forward+JVP, backward).

Registers itself with :mod:`megatron_rcm.ops.attention` on import when the compiled extension
``megatron_rcm._fused_attention_C`` loads (or is JIT-built with MEGATRON_RCM_JIT_BUILD=1 on a machine
with a GPU and nvcc). Otherwise the module imports fine and registers nothing.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
import weakref
from typing import NamedTuple

import torch

from .attention import AttentionBackend, register_backend
from .kept_attention import split_attention
from .masks import TILE_FULL, TILE_SKIP, GroupMask

# Tile sizes the kernels summarise masks with (mirrors csrc/fused_attention_kernels.cuh).
FWD_TILES = (64, 64)
JVP_TILES = (64, 32)
BWD_TILES = (64, 64)
SM90_FWD_TILES = (128, 192)  # Hopper wgmma kernels: forward, forward+JVP, backward
SM90_JVP_TILES = (128, 64)
SM90_BWD_TILES = (64, 128)
HEAD_DIMS = (64, 128)
SM90_ENV = "MEGATRON_RCM_FUSED_SM90"  # "0" keeps Hopper on the mma.sync kernels (A/B checks)


def _jit_build():
    """Compile csrc/ with torch.utils.cpp_extension.load; only with a GPU and a CUDA toolchain."""
    from torch.utils import cpp_extension

    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None or not torch.cuda.is_available():
        return None
    csrc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "csrc")
    csrc = os.path.normpath(csrc)
    build = _build_helpers(csrc)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a" if (major, minor) == (9, 0) else f"{major}.{minor}"
    include = build.cutlass_include()
    with_sm90 = build.sm90_enabled(os.environ["TORCH_CUDA_ARCH_LIST"], include)
    defines = ["-DMRCM_WITH_SM90"] if with_sm90 else []
    return cpp_extension.load(
        name="_fused_attention_C",
        sources=build.source_paths(with_sm90=with_sm90),
        extra_include_paths=[csrc] + ([include] if with_sm90 else []),
        extra_cflags=["-O3", "-std=c++17"] + defines,
        extra_cuda_cflags=build.NVCC_FLAGS + (build.SM90_NVCC_FLAGS if with_sm90 else []),
        verbose=os.environ.get("MEGATRON_RCM_JIT_VERBOSE") == "1",
    )


def _build_helpers(csrc: str):
    """csrc/build.py, loaded by path (it is not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("megatron_rcm_csrc_build", os.path.join(csrc, "build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
_PACK_CACHE: dict[int, tuple] = {}  # id(mask) -> (weakref, {(tiles, device): PackedMask})


def _drop(key: int) -> None:
    _PACK_CACHE.pop(key, None)


class PackedMask(NamedTuple):
    """A mask laid out for the kernels' tiles, on the kernels' device."""

    q_groups: torch.Tensor  # int32 [Sq]
    k_groups: torch.Tensor  # int32 [Sk]
    allow: torch.Tensor  # uint8 [G * G]
    tiles: torch.Tensor  # int8 tile summary [Tq, Tk]
    key_bits: torch.Tensor  # int32 [G * Tk * block_k / 32]: the sm_90a forward kernels' element mask
    query_bits: torch.Tensor  # int32 [G * Tq * block_q / 32]: the sm_90a backward kernel's element mask
    num_groups: int
    rows_grow: bool  # the last row of tiles has more work than the first (block-causal, teacher forcing)


def rows_grow(summary: torch.Tensor) -> bool:
    """Whether the last row of tiles has more work (unskipped tiles) than the first: block-causal and
    teacher-forcing summaries, whose rows get longer towards the end of the sequence."""
    work = (summary != TILE_SKIP).sum(dim=1)
    return bool(work[-1] > work[0])


# A forward launch of at most this many waves of CTAs walks the rows longest first across all heads
# (H200, block-causal 9,360 tokens, 6.7 waves: fwd+JVP 451 -> 495 TFLOP/s). Larger launches keep one
# head after the other: there the idle tail is a smaller share, and interleaving the heads costs L2 hits
# (block-causal 32,760, 23 waves: fwd+JVP 522 -> ~450). The backward keeps launch order: the same walk
# over its key columns cost it 10% (registers; RESULTS.md).
LONGEST_FIRST_MAX_WAVES = 8


def cta_order(grow: bool, ctas: int, sms: int) -> int:
    """The sm_90a forward kernels' CTA walk: 1 = longest rows first across all heads, 0 = launch order.

    The GPU starts CTAs in launch order; when rows get longer towards the end, a launch of few waves
    otherwise ends on the longest rows of the last heads and leaves most SMs idle meanwhile.
    """
    return int(grow and ctas <= LONGEST_FIRST_MAX_WAVES * sms)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def forward_order(sm90: bool, m: PackedMask, q: torch.Tensor) -> int:
    """cta_order of a forward launch (one CTA per row of tiles and head); launch order off the sm_90a path."""
    if not sm90:
        return 0
    return cta_order(m.rows_grow, m.tiles.shape[0] * q.shape[0] * q.shape[2], _sm_count(q.device))


def pair_bitmap(allow: torch.Tensor, groups: torch.Tensor, padded: int) -> torch.Tensor:
    """Bit i of row g = ``allow[g, groups[i]]``, tokens from ``len(groups)`` to ``padded`` off; int32
    [G * padded / 32], bit i % 32 of word i // 32 (two's complement: bit 31 is the sign).

    The sm_90a kernels test a partially masked tile's elements against these bits, one pair of words per 64
    tokens and row: the forward kernels the keys of a query group (``allow``, ``k_groups``), the backward the
    queries of a key group (``allow.T``, ``q_groups``). A lookup of each token's group and then of ``allow``
    cost two dependent global loads an element and made those tiles several times dearer than full ones."""
    g, n = allow.shape[0], groups.shape[0]
    if padded % 32 or padded < n:
        raise ValueError(f"padded must be a multiple of 32 and at least {n}, got {padded}")
    bits = torch.zeros(g, padded, dtype=torch.uint8, device=allow.device)
    bits[:, :n] = allow.bool()[:, groups.long()]
    weights = 1 << torch.arange(8, dtype=torch.uint8, device=allow.device)  # made on the device: no copy
    packed = (bits.view(g, -1, 8) * weights).sum(-1, dtype=torch.uint8)  # byte i // 8, bit i % 8 (no carries)
    return packed.view(torch.int32).reshape(-1)  # little-endian bytes: word i // 32, bit i % 32


def pack_mask(mask: GroupMask | None, sq: int, sk: int, tiles: tuple[int, int], device) -> PackedMask:
    """The mask packed for the kernels' ``tiles`` (query, key tile sizes) on ``device``.

    Cached per (mask, tile sizes, device) so repeated layers and steps pay the summary and the copies once;
    entries vanish with the mask object. Made on the host and copied: no step of it waits for the GPU.
    """
    if mask is None:
        return _full_pack(sq, sk, tuple(tiles), str(torch.device(device)))
    if mask.shape != (sq, sk):
        raise ValueError(f"mask covers {mask.shape} but q/k have {(sq, sk)} tokens")
    device = torch.device(device)
    mask = mask.host()  # one entry for a mask and its device copies; summaries are made on the host
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
        on_device = mask.to(device)
        key_bits = pair_bitmap(mask.allow, mask.k_groups, summary.shape[1] * tiles[1])
        query_bits = pair_bitmap(mask.allow.t(), mask.q_groups, summary.shape[0] * tiles[0])
        # One host-to-device copy for the three: the bitmaps first (each an even number of words, so every part
        # starts 8-byte aligned, as the kernels' paired loads need), the summary after them.
        nk, nq = 4 * key_bits.numel(), 4 * query_bits.numel()
        packed = torch.cat([key_bits.view(torch.int8), query_bits.view(torch.int8), summary.reshape(-1)]).to(device)
        packs[sub] = PackedMask(
            q_groups=on_device.q_groups.contiguous(),
            k_groups=on_device.k_groups.contiguous(),
            allow=on_device.allow.to(torch.uint8).reshape(-1).contiguous(),
            tiles=packed[nk + nq:].view(summary.shape),
            key_bits=packed[:nk].view(torch.int32),
            query_bits=packed[nk:nk + nq].view(torch.int32),
            num_groups=mask.num_groups,
            rows_grow=rows_grow(summary),
        )
    return packs[sub]


@functools.lru_cache(maxsize=64)
def _full_pack(sq: int, sk: int, tiles: tuple[int, int], device: str) -> PackedMask:
    """Unmasked attention packed for ``tiles``, filled on the device: a stream's growing key counts would otherwise
    each cost a mask built on the host and copied over (the host waiting for each copy)."""
    d = torch.device(device)
    rows, cols = -(-sq // tiles[0]), -(-sk // tiles[1])
    q_groups, k_groups = (torch.zeros(n, dtype=torch.int32, device=d) for n in (sq, sk))
    allow = torch.ones(1, 1, dtype=torch.bool, device=d)
    return PackedMask(q_groups=q_groups, k_groups=k_groups, allow=allow.to(torch.uint8).reshape(-1),
                      tiles=torch.full((rows, cols), TILE_FULL, dtype=torch.int8, device=d),
                      key_bits=pair_bitmap(allow, k_groups, cols * tiles[1]),
                      query_bits=pair_bitmap(allow, q_groups, rows * tiles[0]),
                      num_groups=1, rows_grow=False)


def use_sm90(t: torch.Tensor, *operands: torch.Tensor | None) -> bool:
    """Whether the Hopper wgmma kernels serve this call: built, a 9.0 device, not disabled, and every
    operand 16-byte aligned (their TMA descriptors need it; a misaligned view takes the mma.sync path)."""
    if _C is None or not getattr(_C, "HAS_SM90", False) or not t.is_cuda:
        return False
    if os.environ.get(SM90_ENV, "1") == "0":
        return False
    if any(x is not None and x.data_ptr() % 16 for x in (t, *operands)):
        return False
    return torch.cuda.get_device_capability(t.device) == (9, 0)


# pass -> (mma.sync tiles, sm_90a tiles)
_TILES = {"fwd": (FWD_TILES, SM90_FWD_TILES), "jvp": (JVP_TILES, SM90_JVP_TILES), "bwd": (BWD_TILES, SM90_BWD_TILES)}


def kernel_and_mask(kind: str, mask, q, k, *operands) -> tuple[bool, PackedMask]:
    """(whether the sm_90a kernel runs, the mask packed for that kernel's tiles) for pass ``kind``."""
    sm90 = use_sm90(q, k, *operands)
    return sm90, pack_mask(mask, q.shape[1], k.shape[1], _TILES[kind][sm90], q.device)


def _fwd(q, k, v, mask, scale):
    """(O, LSE) of contiguous q, k, v."""
    sm90, m = kernel_and_mask("fwd", mask, q, k, v)
    order = forward_order(sm90, m, q)
    return _C.fwd(q, k, v, m.q_groups, m.k_groups, m.allow, m.tiles, m.key_bits, m.num_groups, scale, sm90, order)


# ---------------------------------------------------------------- autograd + backend functions
def _bwd(q, k, v, o, do, lse, mask, scale):
    """(dq, dk, dv) from dO and the saved O and LSE (Delta is made inside the kernel)."""
    sm90, m = kernel_and_mask("bwd", mask, q, k, v, do)
    dq, dk, dv = _C.bwd(q, k, v, o, do, lse, m.q_groups, m.k_groups, m.allow, m.tiles, m.query_bits, m.num_groups,
                        scale, sm90)
    return dq, dk, dv


def _scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def fused_forward(q, k, v, mask: GroupMask | None = None, scale: float | None = None):
    """O [B, Sq, H, D], differentiable w.r.t. q, k, v (the backward kernel from dO and the saved LSE)."""
    return split_attention(_fwd, _bwd, q, k, v, mask, _scale(q, scale))


def fused_forward_lse(q, k, v, mask: GroupMask | None = None, scale: float | None = None):
    """(O, LSE [B, H, Sq] float32; -inf on fully masked rows), no autograd."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return tuple(_fwd(q, k, v, mask, _scale(q, scale)))


def fused_forward_jvp(q, k, v, tq, tk, tv, mask: GroupMask | None = None, scale: float | None = None):
    """(O, dO) in one pass; None tangents are zero (the mma.sync kernels skip their products, the sm_90a
    kernel is given zeros: optional products would serialise its wgmma pipeline)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    tq, tk, tv = (None if t is None else t.detach().contiguous() for t in (tq, tk, tv))
    sm90, m = kernel_and_mask("jvp", mask, q, k, v, tq, tk, tv)
    order = forward_order(sm90, m, q)
    with torch.no_grad():
        o, to = _C.fwd_jvp(q.detach(), k.detach(), v.detach(), tq, tk, tv, m.q_groups, m.k_groups, m.allow, m.tiles,
                           m.key_bits, m.num_groups, _scale(q, scale), sm90, order)
    return o, to


def fused_available(t: torch.Tensor) -> bool:
    return (_C is not None and t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)
            and t.dim() == 4 and t.shape[-1] in HEAD_DIMS)


if _C is not None:
    register_backend(AttentionBackend("fused", fused_forward, fused_forward_jvp, fused_available,
                                      jvp_differentiable=False, forward_lse=_fwd, backward=_bwd))
