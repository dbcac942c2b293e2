"""What a video is conditioned on: text context, the unconditional context for CFG, per-frame actions, and the
image-encoder tokens of image-to-video models."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Condition:
    context: torch.Tensor  # [B, L, D] text (or class) context
    uncond: torch.Tensor | None = None  # [B, L, D] the context of the unconditional CFG branch
    actions: torch.Tensor | None = None  # [B, frames, A] per (patched) frame of the tokens it goes with
    # [B, L_img, image_dim] image-encoder (CLIP) tokens for models with the I2V layout (model.image_dim); per video,
    # tangent-free, and shared by both CFG branches (as in Wan's image-to-video pipeline)
    image: torch.Tensor | None = None

    @classmethod
    def from_batch(cls, batch: dict) -> "Condition":
        return cls(batch["context"], batch.get("uncond_context"), batch.get("actions"), batch.get("image_context"))

    def frames(self, frames: slice) -> "Condition":
        """The condition of a run of frames (a chunk): the actions are sliced, the text and image stay."""
        return self if self.actions is None else replace(self, actions=self.actions[:, frames])

    def with_actions(self, actions: torch.Tensor | None) -> "Condition":
        return replace(self, actions=actions)

    @property
    def batch(self) -> int:
        return self.context.shape[0]
