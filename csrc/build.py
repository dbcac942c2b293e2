"""Build hook for the fused attention CUDA extension; importable by file path (no package imports).

``get_extensions()`` returns the CUDAExtension list for setup.py, or [] when no CUDA toolchain is
usable (CPU-only torch or no nvcc), so CPU installs never try to compile. The Hopper (wgmma) kernels
are added when CUTLASS/CuTe headers are found (``CUTLASS_PATH`` or the ``nvidia-cutlass`` wheel) and
the target architectures include sm_90a.
"""
from __future__ import annotations

import os

EXT_NAME = "megatron_rcm._fused_attention_C"
_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["fused_attention.cpp", "fused_attention_kernels.cu"]
SM90_SOURCE = "fused_attention_sm90.cu"
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-U__CUDA_NO_HALF_OPERATORS__",
              "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
SM90_NVCC_FLAGS = ["--expt-relaxed-constexpr", "-DMRCM_WITH_SM90"]
DEFAULT_ARCHS = ["-gencode=arch=compute_80,code=sm_80"]
SM90A_ARCH = "-gencode=arch=compute_90a,code=sm_90a"
SM90_ARCH = "-gencode=arch=compute_90,code=sm_90"


def cutlass_include() -> str | None:
    """Directory holding cute/ and cutlass/ headers, or None."""
    env = os.environ.get("CUTLASS_PATH")
    candidates = [os.path.join(env, "include"), env] if env else []
    try:
        import cutlass_library  # the nvidia-cutlass wheel ships the headers under source/include

        candidates.append(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))
    except ImportError:
        pass
    for path in candidates:
        if os.path.isfile(os.path.join(path, "cute", "tensor.hpp")):
            return path
    return None


def source_paths(relative_to: str | None = None, with_sm90: bool = False) -> list[str]:
    """Sources relative to ``relative_to`` when inside it (setuptools prefers relative paths)."""
    paths = [os.path.join(_HERE, s) for s in SOURCES + ([SM90_SOURCE] if with_sm90 else [])]
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


def sm90_enabled(arch_list: str | None, include: str | None) -> bool:
    """Hopper kernels need the headers and an sm_90a target (a user arch list must name 9.0a)."""
    if include is None:
        return False
    return arch_list is None or "9.0a" in arch_list.replace(" ", "")


def arch_flags(with_sm90: bool) -> list[str]:
    """Honour TORCH_CUDA_ARCH_LIST (torch adds its flags itself), else sm_80 + sm_90(a)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    return DEFAULT_ARCHS + [SM90A_ARCH if with_sm90 else SM90_ARCH]


def get_extensions() -> list:
    """CUDAExtension objects for setup.py's ext_modules; [] without a usable CUDA toolchain."""
    if not cuda_toolchain_usable():
        return []
    from torch.utils.cpp_extension import CUDAExtension

    include = cutlass_include()
    with_sm90 = sm90_enabled(os.environ.get("TORCH_CUDA_ARCH_LIST"), include)
    defines = ["-DMRCM_WITH_SM90"] if with_sm90 else []
    return [CUDAExtension(
        name=EXT_NAME,
        sources=source_paths(os.getcwd(), with_sm90),
        include_dirs=[_HERE] + ([include] if with_sm90 else []),
        extra_compile_args={"cxx": ["-O3", "-std=c++17"] + defines,
                            "nvcc": NVCC_FLAGS + (SM90_NVCC_FLAGS if with_sm90 else []) + arch_flags(with_sm90)},
    )]
