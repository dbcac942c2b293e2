"""Known frames held clean inside a chunk: image-to-video by first frame, one rule for streaming and training.

An image-to-video stream starts from known latents (an image: one latent frame). When they fill whole chunks they
simply prefill the KV cache (``stream_chunks``' ``prefix``). When they fill only part of a chunk (one image frame,
chunks of 3), that chunk is denoised with the known frames *held clean*: every denoising call gets them in place of
the chunk's first frames at level 0 (the model takes per-frame timesteps), and the chunk's output keeps them
(Causal-rCM's "I2V by first frame"). ``causal.clean_first_frames`` trains a student for exactly that: teacher
forcing and the self-forcing rollout give the video's first frames clean at level 0, never noised, and the loss
leaves them out (:func:`free_frames`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def frame_levels(s, batch: int, frames: int, like: torch.Tensor) -> torch.Tensor:
    """An FM level (scalar, [B] or per-frame [B, F]) as per-frame levels [B, F] (a new tensor)."""
    s = torch.as_tensor(s, device=like.device, dtype=like.dtype)
    if s.dim() == 0:
        return s.expand(batch, frames).clone()
    if s.dim() == 1:
        return s[:, None].expand(batch, frames).clone()
    return s.clone()


@dataclass(frozen=True)
class HeldFrames:
    """The first latent frames of a chunk, known and held clean while the rest of it is denoised."""

    clean: torch.Tensor  # [B, C, n, H, W] latents (n a multiple of ``scale``)
    scale: int = 1  # latent frames per patched frame (the model's temporal patch)

    def __post_init__(self):
        if self.clean.shape[2] % self.scale:
            raise ValueError(f"held frames ({self.clean.shape[2]}) must be whole patched frames of {self.scale}")

    @property
    def frames(self) -> int:
        return self.clean.shape[2]

    def inputs(self, x: torch.Tensor, s):
        """(x with its first frames replaced by the clean ones, per-frame levels [B, F] that are 0 there)."""
        n = self.frames
        x = torch.cat([self.clean.to(x.dtype), x[:, :, n:]], dim=2)
        levels = frame_levels(s, x.shape[0], x.shape[2] // self.scale, x)
        levels[:, :n // self.scale] = 0.0
        return x, levels

    def output(self, x0: torch.Tensor) -> torch.Tensor:
        """The chunk's output with the known frames exactly as given."""
        return torch.cat([self.clean.to(x0.dtype), x0[:, :, self.frames:]], dim=2)

    def denoiser(self, denoise):
        """Wrap a chunk's ``denoise(x, s, **kw) -> v`` so that every call sees the held frames."""
        def held(x, s, **kw):
            x, s = self.inputs(x, s)
            return denoise(x, s, **kw)

        return held


def hold_first_frames(x: torch.Tensor, s: torch.Tensor, x0: torch.Tensor, n: int, scale: int = 1):
    """Training (``causal.clean_first_frames = n``): the noisy latents x [B, C, F, H, W] at per-frame levels s
    [B, F / scale] with the video's first ``n`` latent frames clean (from x0) at level 0. n = 0: unchanged."""
    if n == 0:
        return x, s
    return HeldFrames(x0[:, :, :n], scale).inputs(x, s)


def free_mask(x: torch.Tensor, n: int, scale: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents mask [1, 1, F, 1, 1], per-frame mask [1, F / scale]) of x [B, C, F, H, W]: 1 on the frames that move
    with time (carry a JVP tangent and a loss), 0 on the first ``n`` held ones. Tangents of held frames are zero:
    their inputs stay x0 at level 0 whatever t is."""
    m = torch.ones(x.shape[2], dtype=x.dtype, device=x.device)
    m[:n] = 0.0
    return m.view(1, 1, -1, 1, 1), m[::scale].view(1, -1)


def free_chunk_mean(e: torch.Tensor, layout, n: int, scale: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-(sample, chunk) mean of latents-shaped e over the free frames [B, n_chunks], which chunks have any
    [n_chunks] bool): the chunk-wise loss of a run with ``n`` held first frames (a chunk they fill has none)."""
    mask, _ = free_mask(e, n, scale)
    total = layout.chunk_mean(e * mask, scale)
    share = layout.chunk_mean(mask.expand_as(e), scale)[0]
    # which chunks have free frames is the layout's business: decided on the host (reading `share > 0` back from
    # the GPU would make the host wait for it)
    has = torch.tensor([(layout.start(i) + layout.size(i)) * scale > n for i in range(layout.n_chunks)])
    return total / share.clamp_min(1e-12), has


def free_frames(e: torch.Tensor, n: int) -> torch.Tensor:
    """The frames of latents-shaped e that carry a loss: all but the first ``n`` (held clean)."""
    return e if n == 0 else e[:, :, n:]
