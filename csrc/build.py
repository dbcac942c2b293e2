"""Build hook for the fused attention CUDA extension; importable by file path (no package imports).

``get_extensions()`` returns the CUDAExtension list for setup.py, or [] when no CUDA toolchain is
usable (CPU-only torch or no nvcc), so CPU installs never try to compile.
"""
from __future__ import annotations

import os

EXT_NAME = "megatron_rcm._fused_attention_C"
_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["fused_attention.cpp", "fused_attention_kernels.cu"]
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-U__CUDA_NO_HALF_OPERATORS__",
              "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
DEFAULT_ARCHS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]


def source_paths(relative_to: str | None = None) -> list[str]:
    """Sources relative to ``relative_to`` when inside it (setuptools prefers relative paths)."""
    paths = [os.path.join(_HERE, s) for s in SOURCES]
    if relative_to:
        base = os.path.abspath(relative_to)
        paths = [os.path.relpath(p, base) if p.startswith(base + os.sep) else p for p in paths]
    return paths


def cuda_toolchain_usable() -> bool:
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def arch_flags() -> list[str]:
    """Honour TORCH_CUDA_ARCH_LIST (torch adds its flags itself), else sm_80 + sm_90."""
    return [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else list(DEFAULT_ARCHS)


def get_extensions() -> list:
    """CUDAExtension objects for setup.py's ext_modules; [] without a usable CUDA toolchain."""
    if not cuda_toolchain_usable():
        return []
    from torch.utils.cpp_extension import CUDAExtension

    return [CUDAExtension(
        name=EXT_NAME,
        sources=source_paths(os.getcwd()),
        include_dirs=[_HERE],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": NVCC_FLAGS + arch_flags()},
    )]
