"""Write [C,F,H,W] videos in [-1, 1] to .mp4 (if imageio-ffmpeg works) or .gif, whole or streamed."""
from __future__ import annotations

import os

import numpy as np
import torch


def to_frames(video: torch.Tensor, scale: int = 1) -> np.ndarray:
    """[C,F,H,W] in [-1,1] -> uint8 [F,H*scale,W*scale,3] (grey for 1 channel, first 3 channels otherwise)."""
    v = video.detach().float().cpu().clamp(-1, 1)
    if v.shape[0] == 1:
        v = v.expand(3, -1, -1, -1)
    v = ((v[:3] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
    if scale > 1:
        v = v.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return v.numpy()


def make_grid(videos, ncol: int | None = None, pad: int = 1) -> torch.Tensor:
    """List/batch of [C,F,H,W] videos -> one [C,F,H',W'] grid video (padding in black)."""
    videos = list(videos)
    n = len(videos)
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = (n + ncol - 1) // ncol
    c, f, h, w = videos[0].shape
    grid = torch.full((c, f, nrow * (h + pad) + pad, ncol * (w + pad) + pad), -1.0)
    for i, v in enumerate(videos):
        r, k = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[:, :, y:y + h, x:x + w] = v.detach().float().cpu()
    return grid


def mp4_available() -> bool:
    try:
        import imageio_ffmpeg

        return os.path.exists(imageio_ffmpeg.get_ffmpeg_exe())
    except Exception:
        return False


class StreamingVideoWriter:
    """Appends frames or chunks ([C,f,H,W]) as they are generated; falls back from .mp4 to .gif.

    ``path`` is the file actually written (the suffix may change to .gif on fallback).
    """

    def __init__(self, path: str, fps: int = 8, scale: int = 4):
        import imageio.v2 as imageio

        self.fps, self.scale, self.frames_written = fps, scale, 0
        root, ext = os.path.splitext(path)
        if ext.lower() == ".mp4" and not mp4_available():
            ext = ".gif"
        self.path = root + (ext or ".gif")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if self.path.lower().endswith(".mp4"):
            self._w = imageio.get_writer(self.path, fps=fps, codec="libx264", macro_block_size=1,
                                         quality=8, ffmpeg_log_level="error")
        else:
            self._w = imageio.get_writer(self.path, mode="I", duration=1000.0 / fps, loop=0)

    def append(self, chunk: torch.Tensor) -> None:
        """chunk: [C,H,W] (one frame) or [C,f,H,W]."""
        if chunk.dim() == 3:
            chunk = chunk.unsqueeze(1)
        for frame in to_frames(chunk, self.scale):
            self._w.append_data(frame)
            self.frames_written += 1

    def close(self) -> str:
        self._w.close()
        return self.path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_video(path: str, video, fps: int = 8, scale: int = 4, ncol: int | None = None) -> str:
    """Write one video [C,F,H,W], or a grid of several ([B,C,F,H,W] or a list); returns the path written."""
    if isinstance(video, (list, tuple)) or video.dim() == 5:
        video = make_grid(video, ncol)
    with StreamingVideoWriter(path, fps, scale) as w:
        w.append(video)
    return w.path


def read_video(path: str) -> np.ndarray:
    """Read back frames [F,H,W,3] uint8 (tests, sanity checks)."""
    import imageio.v2 as imageio

    return np.stack([np.asarray(f)[..., :3] for f in imageio.mimread(path)])
