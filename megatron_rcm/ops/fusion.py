"""Opt-in kernel fusion of the elementwise chains (norms, modulation, gates, GELU, RoPE) on CUDA.

Why: in eager PyTorch every norm, modulation and gate of a Wan block is a chain of 5-15 kernels over
[tokens, 1536] (or [tokens, 8960]) activations, and the tangent pass doubles them: on the H200 these
chains took about a third of a TF-sCM step's GPU time, more than the linear layers. ``torch.compile``
of each small pure function (``ops/dual.py``, ``models/rope.py``) fuses a chain into one or two
kernels, forward and backward, without touching the math: the eager function stays the definition,
CPU runs and the tests use it unchanged.

Off by default (compiling costs about a minute per new shape family); turn it on with
``train.compile_elementwise: true``, :func:`set_enabled`, or ``MEGATRON_RCM_COMPILE=1``. Only CUDA
inputs take the compiled path.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch

_enabled = os.environ.get("MEGATRON_RCM_COMPILE", "0") == "1"
_registry: list = []  # every fusable wrapper, so reset() can drop their compiled versions


def set_enabled(flag: bool) -> None:
    """Switch the compiled path on or off for every :func:`fusable` function."""
    global _enabled
    _enabled = bool(flag)


def enabled() -> bool:
    return _enabled


def reset() -> None:
    """Forget every compiled version (the next enabled CUDA call compiles again); for tests and tools."""
    for wrapper in _registry:
        wrapper.compiled = None


def _first_tensor(args) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    return None


def fusable(fn: Callable | None = None, *, eager_if: Callable[..., bool] | None = None):
    """Decorate a pure tensor function so that, when enabled and on CUDA, it runs ``torch.compile``d.

    ``eager_if(*args, **kwargs)`` -> True keeps a call eager (e.g. a callable argument that runs a
    collective, which a fused graph cannot hold). The eager function stays reachable as ``.eager``.
    """
    if fn is None:
        return lambda f: fusable(f, eager_if=eager_if)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():  # already inside a fused graph: trace the plain function
            return fn(*args, **kwargs)
        x = _first_tensor(args)
        if not _enabled or x is None or not x.is_cuda or (eager_if is not None and eager_if(*args, **kwargs)):
            return fn(*args, **kwargs)
        if wrapper.compiled is None:
            wrapper.compiled = torch.compile(fn, dynamic=None)
        return wrapper.compiled(*args, **kwargs)

    wrapper.eager = fn
    wrapper.compiled = None
    _registry.append(wrapper)
    return wrapper
