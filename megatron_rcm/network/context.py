"""Noisy context (Causal-rCM's ``context_from_last_step``): what later chunks attend to, one rule everywhere.

By default a finished chunk is re-run at s = 0 and its clean K/V are cached: N + 1 forwards per chunk for an
N-step sampler. With noisy context, chunks from ``start_chunk`` on are cached at the noise level ``level``
instead; when the sampler's last step runs at that level, its own forward writes the cache (N forwards per
chunk), otherwise the chunk's output is re-noised to ``level`` with fresh noise and run once more. Training
sees the same thing: teacher forcing perturbs the clean context of those chunks to ``level``
(:meth:`NoisyContext.perturb`), and the self-forcing rollout caches its chunks by the same rule as streaming.

Config keys (``causal.*``): ``context_from_last_step`` (reference: ``model.config.context_from_last_step`` /
``--context_from_last_step``), ``context_from_last_step_start_chunk`` (same name in the reference) and
``context_noise_level`` (the reference's ``backward_timesteps[-1]``, 5/8: the last step's level of its
recommended noisy-context schedules).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..ops.chunks import ChunkLayout
from .noise import BatchNoise


@dataclass(frozen=True)
class TeacherForcingContext:
    """The context copy of a teacher-forcing sequence: latents and, when noisy, their per-frame FM levels."""

    x: torch.Tensor  # [B, C, F, H, W]
    s: torch.Tensor | None = None  # [B, F] per patched frame; None = clean (s = 0)


@dataclass(frozen=True)
class NoisyContext:
    level: float = 0.0  # FM level of the cached context; 0 = clean context (the default)
    start_chunk: int = 0  # the first chunk cached at ``level`` (earlier chunks stay clean)

    def __post_init__(self):
        if not 0.0 <= self.level < 1.0:
            raise ValueError(f"noisy-context level must be in [0, 1), got {self.level}")
        if self.start_chunk < 0:
            raise ValueError(f"noisy-context start chunk must be >= 0, got {self.start_chunk}")

    @classmethod
    def of(cls, causal) -> "NoisyContext":
        """From a :class:`~megatron_rcm.config.model.CausalConfig` (clean unless ``context_from_last_step``)."""
        if not getattr(causal, "context_from_last_step", False):
            return cls()
        return cls(causal.context_noise_level, causal.context_from_last_step_start_chunk)

    @property
    def enabled(self) -> bool:
        return self.level > 0.0

    def level_of(self, chunk: int) -> float:
        """The FM level at which chunk ``chunk`` is cached (0: clean)."""
        return self.level if self.enabled and chunk >= self.start_chunk else 0.0

    def cached_copy(self, x0: torch.Tensor, chunk: int, fresh: Callable[[tuple], torch.Tensor]):
        """(latents, level) to write for a finished chunk: x0 itself (clean), or x0 re-noised to the level
        with ``fresh(shape)`` noise (drawn only then)."""
        s = self.level_of(chunk)
        if s == 0.0:
            return x0, 0.0
        return (1.0 - s) * x0 + s * fresh(tuple(x0.shape)), s

    def perturb(self, x0: torch.Tensor, layout: ChunkLayout, noise: BatchNoise,
                scale: int = 1) -> TeacherForcingContext:
        """The teacher-forcing context of a training step: x0, with the noisy chunks re-noised to the level
        (noise drawn for the global batch; nothing is drawn when the context is clean)."""
        levels = [self.level_of(i) for i in range(layout.n_chunks)]
        if not any(level > 0 for level in levels):
            return TeacherForcingContext(x0)
        s = layout.fill_frames(levels, (x0.shape[0],), 1, device=x0.device, dtype=x0.dtype)
        sb = layout.fill_frames(levels, (x0.shape[0],), scale, device=x0.device, dtype=x0.dtype)[:, None, :, None, None]
        eps = noise.randn_like(x0)
        return TeacherForcingContext((1 - sb) * x0 + sb * eps, s)
