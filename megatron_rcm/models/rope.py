"""3-D rotary position embedding of Wan2.1, computed from explicit (frame, row, col) positions.

Diffusers precomputes a table indexed by grid position; we compute angles from per-token positions
instead, because causal training needs positions that are not a plain grid: the clean and noisy
copies of a frame in the teacher-forcing sequence share their positions, and a streamed chunk
starts at an absolute frame offset. Head dim splits as in Wan: h = w = 2 * (D // 6), t = the rest.
"""
from __future__ import annotations

import torch

from ..ops.fusion import fusable


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def grid_positions(num_frames: int, height: int, width: int, frame_offset: int | torch.Tensor = 0,
                   device=None) -> torch.Tensor:
    """int64 [F*H*W, 3] (frame, row, col) of tokens in (f, h, w) raster order. ``frame_offset`` may be a device
    scalar (a preallocated stream cache's: read at run time, so a CUDA graph serves every chunk)."""
    if isinstance(frame_offset, torch.Tensor):
        f = torch.arange(num_frames, device=device) + frame_offset
    else:
        f = torch.arange(frame_offset, frame_offset + num_frames, device=device)
    h = torch.arange(height, device=device)
    w = torch.arange(width, device=device)
    return torch.stack(torch.meshgrid(f, h, w, indexing="ij"), dim=-1).reshape(-1, 3)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """float64 [S, head_dim // 2] rotation angles; pair i of the head uses angle[:, i]."""
    parts = []
    for axis, dim in enumerate(rope_axis_dims(head_dim)):
        inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device)[: dim // 2] / dim)
        parts.append(positions[:, axis].to(torch.float64)[:, None] * inv[None, :])
    return torch.cat(parts, dim=1)


def rope_tables(positions: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos [S, D/2], signed sin [S, D/2, 2] = (-sin, sin)): what :func:`apply_rope` takes, made once per forward
    (the sign folded in here, not in each of a forward's 2 x layers rotations)."""
    ang = rope_angles(positions, head_dim)
    sin = torch.sin(ang)
    return torch.cos(ang).to(dtype), torch.stack([-sin, sin], dim=-1).to(dtype)


@fusable
def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, S, H, D] by per-token angles [S, D/2]
    (tables of :func:`rope_tables`).

    Linear in x, so the tangent of a rotated tensor is the rotated tangent. Written as
    ``pair * cos + swapped pair * (-sin, sin)``: four launches in an eager call instead of eight.
    """
    pairs = x.unflatten(-1, (-1, 2))  # [B, S, H, D/2, 2]
    out = torch.addcmul(pairs * cos[None, :, None, :, None], pairs.flip(-1), signed_sin[None, :, None])
    return out.flatten(-2).to(x.dtype)
