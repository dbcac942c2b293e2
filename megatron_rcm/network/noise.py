"""Training noise for the GLOBAL batch, whatever the data-parallel layout (docs/design.md, "Noise").

Why: every rank seeds identically. If a data-parallel rank drew noise for its own rows only, DP2
would train on other numbers than one process with the same global batch. So every draw is made
for the global batch (the same numbers on every rank) and the rank keeps its rows: the union over
ranks is the one-process draw and all RNG streams stay in step. Drawing ``size`` times more noise
than needed costs nothing next to a forward pass.

Objectives never construct this themselves: the trainer hands one to every ``loss`` call inside a
:class:`StepContext` (micro-batches get their own rank in a finer split), so an objective cannot
draw noise that ignores the layout. Outside training (tests, inference) the default is one process.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class BatchNoise:
    """Draws for rows ``[rank * b, (rank + 1) * b)`` of a global batch of ``size * b`` rows."""

    rank: int = 0
    size: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.size:
            raise ValueError(f"data-parallel rank {self.rank} outside [0, {self.size})")

    def draw(self, sampler: Callable[[tuple], torch.Tensor], shape) -> torch.Tensor:
        """``sampler(global_shape)`` -> this rank's rows; ``shape`` is the local shape (batch first)."""
        shape = tuple(shape)
        if self.size == 1:
            return sampler(shape)
        n = shape[0]
        return sampler((n * self.size,) + shape[1:]).narrow(0, self.rank * n, n).contiguous()

    def randn(self, shape, *, device=None, dtype=None, generator=None) -> torch.Tensor:
        return self.draw(lambda s: torch.randn(s, generator=generator, device=device, dtype=dtype), shape)

    def randn_like(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        return self.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)

    def rand(self, shape, *, device=None, dtype=None, generator=None) -> torch.Tensor:
        return self.draw(lambda s: torch.rand(s, generator=generator, device=device, dtype=dtype), shape)

    def randint(self, high: int, shape, *, device=None, generator=None) -> torch.Tensor:
        return self.draw(lambda s: torch.randint(0, high, s, generator=generator, device=device), shape)


@dataclass(frozen=True)
class StepContext:
    """What an objective's ``loss`` gets besides the student and the batch: the step and its noise."""

    index: int = 0
    noise: BatchNoise = field(default_factory=BatchNoise)
