"""How a video's (patched) latent frames group into the chunks of a causal model.

A chunk is the unit of causality: all its frames share one noise level in training, are denoised
together when streaming, and see each other fully. Masks, the KV cache, the objectives (per-chunk
noise levels, per-chunk norms) and streaming all ask this one object, so the chunk pattern is
defined once. ``first_chunk_frames`` lets the first chunk have its own size (Causal-rCM's c1-4: one
initial latent frame, then chunks of four); by default every chunk has ``chunk_frames`` frames.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChunkLayout:
    frames: int  # patched latent frames of the sequence
    chunk_frames: int
    first_chunk_frames: int | None = None  # None: the first chunk is like the others

    def __post_init__(self):
        first = self.first
        if self.frames <= 0 or self.chunk_frames <= 0 or first <= 0:
            raise ValueError(f"frames ({self.frames}) and chunk sizes ({first}, {self.chunk_frames}) must be positive")
        if self.frames < first or (self.frames - first) % self.chunk_frames:
            pattern = f"{first} + k x {self.chunk_frames}" if first != self.chunk_frames else f"k x {first}"
            raise ValueError(f"{self.frames} latent frames are not a whole number of chunks ({pattern} frames)")

    @classmethod
    def covering(cls, n_chunks: int, chunk_frames: int, first_chunk_frames: int | None = None) -> "ChunkLayout":
        """The layout of exactly ``n_chunks`` chunks (streaming: chunk indices grow past any training length)."""
        first = chunk_frames if first_chunk_frames is None else first_chunk_frames
        return cls(first + (n_chunks - 1) * chunk_frames, chunk_frames, first_chunk_frames)

    @property
    def first(self) -> int:
        return self.chunk_frames if self.first_chunk_frames is None else self.first_chunk_frames

    @property
    def sizes(self) -> tuple[int, ...]:
        """Frames of each chunk, in order."""
        return (self.first,) + (self.chunk_frames,) * ((self.frames - self.first) // self.chunk_frames)

    @property
    def n_chunks(self) -> int:
        return len(self.sizes)

    def start(self, chunk: int) -> int:
        """Index of the first frame of ``chunk`` (chunks past the end continue the pattern: streaming)."""
        return 0 if chunk == 0 else self.first + (chunk - 1) * self.chunk_frames

    def size(self, chunk: int) -> int:
        return self.first if chunk == 0 else self.chunk_frames

    def chunks_before(self, frame: int) -> int:
        """How many chunks end at or before ``frame`` (which must be a chunk boundary)."""
        starts = self.chunk_starts()
        if frame not in starts:
            raise ValueError(f"frame {frame} is not a chunk boundary (chunks start at {starts})")
        return starts.index(frame)

    def frame_slice(self, chunk: int, scale: int = 1) -> slice:
        """Frames of ``chunk`` (times ``scale``: latent frames per patched frame)."""
        a = self.start(chunk)
        return slice(a * scale, (a + self.size(chunk)) * scale)

    def chunk_starts(self) -> list[int]:
        """First frame of every chunk, plus the end: [0, first, first + chunk, ..., frames]."""
        return [self.start(i) for i in range(self.n_chunks + 1)]

    def chunk_of_frames(self) -> torch.Tensor:
        """Chunk index of every frame, int64 [frames]."""
        return torch.repeat_interleave(torch.arange(self.n_chunks), torch.tensor(self.sizes))

    def to_frames(self, per_chunk: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """[B, n_chunks] -> [B, frames * scale]: every frame takes its chunk's value."""
        if per_chunk.shape[-1] != self.n_chunks:
            raise ValueError(f"expected one value per chunk ({self.n_chunks}), got shape {tuple(per_chunk.shape)}")
        # one broadcast view per chunk and one copy: repeats given as a tensor would be a host-to-device copy and
        # an output size the host must read back (two waits for the GPU)
        lead = per_chunk.shape[:-1]
        return torch.cat([per_chunk[..., i:i + 1].expand(*lead, n * scale) for i, n in enumerate(self.sizes)], dim=-1)

    def fill_frames(self, values, lead: tuple[int, ...], scale: int = 1, device=None, dtype=None) -> torch.Tensor:
        """[*lead, frames * scale]: every frame holds its chunk's number from ``values`` (one float per chunk),
        filled on ``device`` (a tensor made from the list on the host would be copied there, and the host would
        wait for the copy)."""
        if len(values) != self.n_chunks:
            raise ValueError(f"expected one value per chunk ({self.n_chunks}), got {len(values)}")
        return torch.cat([torch.full((*lead, n * scale), float(v), device=device, dtype=dtype)
                          for v, n in zip(values, self.sizes)], dim=-1)

    def chunk_mean(self, e: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """Mean of latents-shaped e [B, C, F, H, W] over each chunk's elements -> [B, n_chunks]."""
        parts = torch.split(e, [n * scale for n in self.sizes], dim=2)
        return torch.stack([p.flatten(1).mean(1) for p in parts], dim=1)

    def chunk_norm(self, e: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """Per-(sample, chunk) L2 norm of e, broadcast back over its frames: [B, 1, F, 1, 1]."""
        parts = torch.split(e, [n * scale for n in self.sizes], dim=2)
        norms = torch.stack([p.flatten(1).norm(dim=1) for p in parts], dim=1)
        return self.to_frames(norms, scale)[:, None, :, None, None]
