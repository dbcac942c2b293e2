"""Find where a CUDA run would make the host wait for the GPU, on a machine without one.

Why: a copy of pageable host memory to the GPU (PyTorch synchronises the stream after it), ``.item()`` /
``float(t)`` / ``bool(t)``, ``nonzero``, a boolean index, ``repeat_interleave`` without ``output_size`` ... each
makes the host wait until the GPU has drained its queue. In a step of many short kernels (a self-forcing
rollout's chunk calls) every such wait turns "launch while the GPU computes" into "launch, then compute".

How: run the code with its device tensors on the ``meta`` device, the stand-in GPU (shapes, no data), while host
tensors stay real CPU tensors. :class:`SyncAudit` records each operation that would synchronise, with the package
lines that called it. Data-dependent results are placeholders (0, empty): code that branches on them takes one
branch, which is what an audit of the launch pattern needs, not a run of the algorithm.
"""
from __future__ import annotations

import collections
import contextlib
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

STAND_IN = "meta"  # the device that plays the GPU
# ops whose output size or value needs the device's data on the host
DATA_DEPENDENT = frozenset({"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "equal", "allclose",
                            "unique", "_unique2", "unique_consecutive", "unique_dim", "bincount", "histc"})


def _site(depth: int = 3) -> str:
    """The innermost ``depth`` frames of the package (or of the test) that led here, innermost first."""
    keep = [f for f in traceback.extract_stack()[:-2]
            if ("megatron_rcm" in f.filename or "/tests/" in f.filename or "/benchmarks/" in f.filename)
            and f.filename != __file__]
    return " <- ".join(f"{f.filename.split('megatron_rcm/')[-1].split('/tests/')[-1]}:{f.lineno}"
                       for f in keep[-depth:][::-1])


def _is_device(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == STAND_IN


class SyncAudit(TorchDispatchMode):
    """Context manager: ``events`` counts (kind, site) of every would-be synchronisation inside it.

    Kinds: ``h2d`` / ``d2h`` (a copy between host and stand-in device; ``torch.tensor(..., device=)`` and
    ``torch.as_tensor`` included), the name of a data-dependent op (``_local_scalar_dense`` is ``item()``), ``bool
    index`` and ``repeat_interleave`` (tensor repeats without ``output_size``). ``depth``: frames per site.
    """

    def __init__(self, depth: int = 3):
        super().__init__()
        self.depth = depth
        self.events: collections.Counter = collections.Counter()
        self._patches = contextlib.ExitStack()

    # ---------------------------------------------------------------- recording
    def record(self, kind: str) -> None:
        self.events[(kind, _site(self.depth))] += 1

    @property
    def total(self) -> int:
        return sum(self.events.values())

    def table(self) -> str:
        rows = [f"{n:6d}  {kind:22s} {site}" for (kind, site), n in self.events.most_common()]
        return "\n".join(rows) if rows else "(no synchronisations)"

    # ---------------------------------------------------------------- factories that bypass the dispatcher
    def __enter__(self):
        super().__enter__()
        for name in ("tensor", "as_tensor"):
            self._patches.enter_context(_patched_factory(self, name))
        return self

    def __exit__(self, *exc):
        self._patches.close()
        return super().__exit__(*exc)

    # ---------------------------------------------------------------- every dispatched op
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else torch.device(kwargs.get("device") or src.device)
            if src.device.type != dst.type:
                self.record("h2d" if dst.type == STAND_IN else "d2h")
                if src.device.type == STAND_IN:  # the stand-in has no data to copy back: zeros
                    if name == "copy_":
                        return args[0]
                    return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype, device=dst)
        if not any(_is_device(t) for t in tensors):
            return func(*args, **kwargs)
        if name in DATA_DEPENDENT:
            self.record(name)
            return _placeholder(name, args)
        if name in ("index", "index_put", "index_put_") and _bool_index(args[1]):
            self.record("bool index")
            if name == "index":
                idx = [i for i in args[1] if i is not None][0]
                return args[0].new_empty((0, *args[0].shape[idx.dim():]))
            return args[0]
        if name == "repeat_interleave" and func._overloadname == "Tensor" and kwargs.get("output_size") is None:
            self.record("repeat_interleave")  # tensor repeats, output size unknown on the host
            return args[0].new_empty((0,))
        return func(*args, **kwargs)


def _bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and _is_device(i) for i in tree_flatten(indices)[0])


def _placeholder(name: str, args):
    x = args[0]
    if name == "_local_scalar_dense":
        return False if x.dtype == torch.bool else (0.0 if x.dtype.is_floating_point else 0)
    if name in ("is_nonzero", "equal", "allclose"):
        return False
    if name == "nonzero":
        return x.new_empty((0, x.dim()), dtype=torch.long)
    if name == "_unique2":
        return x.new_empty((0,)), x.new_empty((0,), dtype=torch.long), x.new_empty((0,), dtype=torch.long)
    return x.new_empty((0,))


@contextlib.contextmanager
def _patched_factory(audit: SyncAudit, name: str):
    """``torch.tensor`` / ``torch.as_tensor`` build host data and copy it below the dispatcher: count them here."""
    original = getattr(torch, name)

    def factory(data, *args, **kwargs):
        device = kwargs.get("device")
        on_device = device is not None and torch.device(device).type == STAND_IN
        if on_device and not (isinstance(data, torch.Tensor) and _is_device(data)):
            audit.record("h2d")
        return original(data, *args, **kwargs)

    setattr(torch, name, factory)
    try:
        yield
    finally:
        setattr(torch, name, original)
