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
import warnings
from typing import Callable

import torch

_enabled = os.environ.get("MEGATRON_RCM_COMPILE", "0") == "1"
_devices: tuple[str, ...] = ("cuda",)  # device types whose calls take the compiled path
_backend = "inductor"
# torch.compile's ``dynamic``: "auto" (static graphs first, a dynamic one once a shape changes: streaming,
# whose shapes never change, keeps the faster static kernels) or "true" (dynamic from the first call)
_DYNAMIC = {"auto": None, "true": True, "false": False}[os.environ.get("MEGATRON_RCM_COMPILE_DYNAMIC", "auto")]
_registry: list = []  # every fusable wrapper, so reset() can drop their compiled versions
# Calls whose first tensor has fewer elements stay eager. Why: a compiled call costs the host 3-5x an eager one
# (CPU, a 64-wide gated residual: 18.8 vs 6.1 us without grad, 37.8 vs 7.2 us with grad: dynamo's frame and guards,
# AOTAutograd's runtime wrapper; benchmarks/host_overhead.py --fusable-call), while its GPU saving grows with the
# tensor. A self-forcing rollout's chunk calls (4,680 x 1,536) may be host-bound where teacher forcing's
# (65,520 x 1,536) are not. 0 compiles every call (train.compile_min_elements; A/Bs: train_step.py
# --compile-min-elements).
_min_elements = int(os.environ.get("MEGATRON_RCM_COMPILE_MIN_ELEMENTS", "0"))
# A fusable function legitimately has one graph per (grad mode, tangent or not, array rank of its call
# site), plus the static graph it starts with: up to 9, past dynamo's default limit of 8, after which it
# silently runs eager. Views never add graphs (_unview); tests/test_fusion_cpu.py counts them.
RECOMPILE_LIMIT = 32
# How a compiled call finds its graph. "dynamo": torch.compile, whose frame evaluation and guards run on every call.
# "own": each call signature (see _signature) is traced once with torch.fx, compiled by inductor (compile_fx) and
# then looked up in a dict. Why: a compiled call then costs the host about a third less, and view arguments need no
# re-aliasing, since nothing guards on their bases. CPU, a gated residual: 35-38 vs 52-58 µs with grad, 15.5-15.9 vs
# 24.3-24.5 without, 3.8 µs of it the signature (benchmarks/host_overhead.py --fusable-call, RESULTS.md eleventh
# session). Opt-in (MEGATRON_RCM_COMPILE_GUARDS=own, set_enabled(guards=)): on an H200 the 1.3B TF-sCM step ran 0.8%
# faster than with dynamo in the same call (within the machines' noise), and an SF-DMD step compiling every call stayed
# slower than eager (RESULTS.md, twelfth session). Past OWN_GRAPH_LIMIT signatures a function runs eager, as past
# dynamo's limit.
_guards = os.environ.get("MEGATRON_RCM_COMPILE_GUARDS", "dynamo")
OWN_GRAPH_LIMIT = 64
_graph_compiler = None  # (graph module, example inputs) -> callable; None: inductor's compile_fx (tests swap it)


def set_enabled(flag: bool, devices: tuple[str, ...] = ("cuda",), backend="inductor",
                min_elements: int | None = None, guards: str | None = None) -> None:
    """Switch the compiled path on or off for every :func:`fusable` function.

    ``devices`` and ``backend`` exist for tests and tools (e.g. counting the graphs dynamo makes on the
    CPU with a counting backend); training uses the defaults. Changing them drops compiled versions.
    ``min_elements`` (None: unchanged): calls on smaller tensors stay eager (see ``_min_elements``).
    ``guards`` (None: unchanged): "dynamo" or "own" (see ``_guards``); changing it drops compiled versions.
    """
    global _enabled, _devices, _backend, _min_elements, _guards
    if guards is not None and guards != _guards:
        if guards not in ("dynamo", "own"):
            raise ValueError(f"guards must be 'dynamo' or 'own', got {guards!r}")
        reset()
        _guards = guards
    if min_elements is not None:
        if min_elements < 0:
            raise ValueError(f"min_elements must be >= 0, got {min_elements}")
        _min_elements = int(min_elements)
    if (tuple(devices), backend) != (_devices, _backend):
        reset()
    _enabled, _devices, _backend = bool(flag), tuple(devices), backend
    if _enabled:  # see RECOMPILE_LIMIT
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)


def enabled() -> bool:
    return _enabled


def reset() -> None:
    """Forget every compiled version (the next enabled CUDA call compiles again); for tests and tools."""
    for wrapper in _registry:
        wrapper.compiled = None
        wrapper.graphs.clear()


class _Alias(torch.autograd.Function):
    """The same tensor as a non-view alias (gradient passes through unchanged)."""

    @staticmethod
    def forward(ctx, x):
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad


def _unview(a):
    """Why: dynamo guards on a view input's base tensor (its sizes and strides), and the same activation
    reaches these functions as a view of differently laid out bases (the embedding's concat, the previous
    block's [B, F, T, D] output, a received pipeline message), so every call site recompiled until the
    recompile limit sent the calls back to eager. An alias that is not a view has no base to guard on."""
    if not isinstance(a, torch.Tensor) or not a._is_view():
        return a
    return _Alias.apply(a) if a.requires_grad and torch.is_grad_enabled() else a.detach()


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
        if (not _enabled or x is None or x.device.type not in _devices or x.numel() < _min_elements
                or (eager_if is not None and eager_if(*args, **kwargs))):
            return fn(*args, **kwargs)
        if _guards == "own":
            return _call_own_graph(wrapper, x, args, kwargs)
        return _call_dynamo(wrapper, args, kwargs)

    wrapper.eager = fn
    wrapper.compiled = None
    wrapper.graphs = {}  # guards="own": call signature -> (compiled graph, tensor positions, output layout)
    _registry.append(wrapper)
    return wrapper


def _call_dynamo(wrapper, args, kwargs):
    if wrapper.compiled is None:
        wrapper.compiled = torch.compile(wrapper.eager, dynamic=_DYNAMIC, backend=_backend)
    return wrapper.compiled(*(_unview(a) for a in args), **{k: _unview(v) for k, v in kwargs.items()})


# ------------------------------------------------------------------------------- guards="own": a dict of graphs
def _signature(x: torch.Tensor, args, kwargs) -> tuple:
    """Everything a traced graph is specialised on: per tensor its shape, strides, dtype, device and requires-grad;
    every other argument by value (None tangents, eps, dtypes); the grad mode; autocast on the call's device."""
    def one(a):
        if isinstance(a, torch.Tensor):
            return (a.shape, a.stride(), a.dtype, a.device, a.requires_grad)
        return (type(a), a)

    dev = x.device.type
    return (torch.is_grad_enabled(), torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev),
            tuple(one(a) for a in args), tuple((k, one(v)) for k, v in kwargs.items()))


def _trace_and_compile(fn, args, kwargs):
    """(compiled graph of ``fn`` over its tensor arguments, their positions, (tuple output?, which outputs are None)).
    Traced at the torch level (torch.fx, as dynamo would hand it over), with the other arguments as constants."""
    pos = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    layout = []  # (tuple output?, which outputs are None), recorded while tracing (None stays None there)

    def over_tensors(*tensors):
        full = list(args)
        for i, t in zip(pos, tensors):
            full[i] = t
        out = fn(*full, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        layout[:] = [isinstance(out, tuple), tuple(o is None for o in outs)]
        return tuple(o for o in outs if o is not None)

    names = [f"t{i}" for i in pos]  # fx names the graph's inputs after the traced function's parameters
    graph = torch.fx.symbolic_trace(_named(over_tensors, names))
    compiler = _graph_compiler
    if compiler is None:
        from torch._inductor.compile_fx import compile_fx as compiler
    return compiler(graph, [args[i] for i in pos]), pos, tuple(layout)


def _named(fn, names):
    """``fn(*tensors)`` as a function of named positional parameters (torch.fx traces a fixed signature)."""
    src = f"def traced({', '.join(names)}):\n    return fn({', '.join(names)})\n"
    scope = {"fn": fn}
    exec(src, scope)  # noqa: S102 - a generated signature, no outside input
    return scope["traced"]


def _call_own_graph(wrapper, x, args, kwargs):
    if any(isinstance(v, torch.Tensor) for v in kwargs.values()):  # not traced this way: tensors go positionally
        return wrapper.eager(*args, **kwargs)
    key = _signature(x, args, kwargs)
    entry = wrapper.graphs.get(key)
    if entry is None and key not in wrapper.graphs:
        if len(wrapper.graphs) >= OWN_GRAPH_LIMIT:
            return wrapper.eager(*args, **kwargs)
        try:
            entry = _trace_and_compile(wrapper.eager, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - not traceable this way: dynamo's path serves this signature
            warnings.warn(f"fusion: {wrapper.__name__} takes dynamo's path for one call signature ({exc})")
            entry = None
        wrapper.graphs[key] = entry
    if entry is None:
        return _call_dynamo(wrapper, args, kwargs)
    graph, pos, (is_tuple, none) = entry
    outs = iter(graph(*(args[i] for i in pos)))
    result = tuple(None if n else next(outs) for n in none)
    return result if is_tuple else result[0]
