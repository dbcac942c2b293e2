"""The image-encoder context of the Wan image-to-video layout (diffusers' ``WanImageEmbedding``).

Wan2.1-I2V conditions every cross-attention on CLIP image tokens besides the text: the tokens are embedded
here (LayerNorm -> Linear -> GELU -> Linear -> LayerNorm, FLF2V adds a learned position table first) and each
block attends them through its own K/V projections (``layers.Attention`` with ``added_kv_dim``). The image
context is a condition, never a variable the JVP differentiates along, so this module has no tangent path.
Key names equal diffusers' (``condition_embedder.image_embedder.norm1`` / ``ff.net.0.proj`` / ``ff.net.2`` /
``norm2`` / ``pos_embed``), so a Wan2.1-I2V state dict converts by name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import dual

_NORM_EPS = 1e-5  # diffusers builds these two LayerNorms with torch's default eps, not the model's


class _Projection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)


class _ImageFeedForward(nn.Module):
    """Linear -> GELU (exact) -> Linear; keys ``net.0.proj`` and ``net.2`` as in diffusers' FeedForward."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.net = nn.ModuleList([_Projection(dim_in, dim_in), nn.Identity(), nn.Linear(dim_in, dim_out)])

    def forward(self, x):
        return self.net[2](F.gelu(self.net[0].proj(x)))


class ImageEmbedder(nn.Module):
    """Image-encoder tokens [B, L, image_dim] -> image context [B, L, hidden] for the added cross-attention K/V."""

    def __init__(self, image_dim: int, hidden: int, pos_embed_seq_len: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(image_dim, eps=_NORM_EPS)
        self.ff = _ImageFeedForward(image_dim, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=_NORM_EPS)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, image_dim)) if pos_embed_seq_len else None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` [B, L, image_dim]; with a position table L must be its length (FLF2V: the first and the last
        frame's 257 tokens each, concatenated along L; diffusers takes them as [2B, 257, D])."""
        d = self.norm1.normalized_shape[0]
        if image.dim() != 3 or image.shape[-1] != d:
            raise ValueError(f"the image context must be [B, tokens, image_dim={d}], got {tuple(image.shape)}")
        if self.pos_embed is not None:
            if image.shape[1] != self.pos_embed.shape[1]:
                raise ValueError(f"the image context must have pos_embed_seq_len = {self.pos_embed.shape[1]} tokens "
                                 f"(the first and last frames' tokens concatenated), got {image.shape[1]}")
            image = image + self.pos_embed
        h, _ = dual.layer_norm(image, None, self.norm1.weight, self.norm1.bias, eps=self.norm1.eps)
        h = self.ff(h)
        h, _ = dual.layer_norm(h, None, self.norm2.weight, self.norm2.bias, eps=self.norm2.eps)
        return h
