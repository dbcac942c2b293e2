"""Training noise that does not depend on how the global batch is split over data-parallel ranks.

Why: objectives draw their noise (times, Gaussian noise, re-noising levels) from an RNG whose state
is the same on every rank. If each data-parallel rank simply drew noise for its own rows, DP2 would
train on different noise than one process with the same global batch. Instead every rank draws the
tensor for the GLOBAL batch (the same numbers on every rank) and keeps its rows, so the union over
ranks is exactly the single-process draw and all RNG streams stay in step. The cost is drawing
``dp`` times more noise than needed, negligible next to a forward pass.

The trainer sets the layout around each step with :func:`data_parallel_noise`; outside it (tests,
inference, one process) every draw is the plain draw.
"""
from __future__ import annotations

import contextlib

import torch

_LAYOUT = {"rank": 0, "size": 1}


@contextlib.contextmanager
def data_parallel_noise(rank: int, size: int):
    """Within this block, :func:`dp_draw` keeps rows ``[rank * b, (rank + 1) * b)`` of a ``size * b`` draw."""
    if not 0 <= rank < size:
        raise ValueError(f"data-parallel rank {rank} outside [0, {size})")
    old = dict(_LAYOUT)
    _LAYOUT.update(rank=rank, size=size)
    try:
        yield
    finally:
        _LAYOUT.update(old)


def dp_draw(draw, shape):
    """``draw(global_shape)`` -> this rank's rows; ``shape`` is the local shape (batch first)."""
    rank, size = _LAYOUT["rank"], _LAYOUT["size"]
    shape = tuple(shape)
    if size == 1:
        return draw(shape)
    n = shape[0]
    return draw((n * size,) + shape[1:]).narrow(0, rank * n, n).contiguous()


def randn_like(x: torch.Tensor, generator=None) -> torch.Tensor:
    """``torch.randn_like(x)`` (same numbers with one process), data-parallel aware."""
    return dp_draw(lambda s: torch.randn(s, generator=generator, device=x.device, dtype=x.dtype), x.shape)
