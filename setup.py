"""Builds the optional CUDA attention extension (csrc/) when a CUDA toolchain and a CUDA torch exist.

On CPU machines (and inside pip's isolated build env, where torch is absent) it is skipped and the
pure-PyTorch reference path is used. GPU users: ``pip install --no-build-isolation -e .`` so the
build sees the installed CUDA torch; set ``MEGATRON_RCM_NO_EXT=1`` to skip the build.
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup


def _extensions():
    if os.environ.get("MEGATRON_RCM_NO_EXT") == "1":
        return [], {}
    build_py = Path(__file__).parent / "csrc" / "build.py"
    if not build_py.exists():
        return [], {}
    try:
        spec = importlib.util.spec_from_file_location("megatron_rcm_csrc_build", build_py)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        exts = mod.get_extensions()
    except Exception as e:  # no torch / no nvcc: CPU install
        print(f"megatron_rcm: skipping CUDA extension ({type(e).__name__}: {e})")
        return [], {}
    if not exts:
        print("megatron_rcm: no CUDA toolchain found, skipping the fused attention extension")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension

    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
