"""An input image as the first latent frame of a stream (``generate --image``): read, fitted, encoded.

The image is scaled to cover the run's frame size and centre-cropped (as ``encode-data`` does with clips), in
[-1, 1]. With a VAE (``encoders.diffusers_dir``) it is encoded as a one-frame video: Wan's VAE is causal in time,
so one image makes exactly one normalised latent frame, the training latents' normalisation. Without one (the
synthetic recipe) the latents are the pixels themselves, in the data set's [-1, 1] range (``data/synthetic.py``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config.errors import ConfigError


def read_image(path: str) -> torch.Tensor:
    """An image file as [3, H, W] in [0, 1] (grey and RGBA become RGB); an unreadable file is a ConfigError."""
    import imageio.v2 as imageio

    if not Path(path).is_file():
        raise ConfigError("--image", path, "an existing image file (PNG, JPEG, ...)")
    try:
        pixels = np.asarray(imageio.imread(path))
    except Exception as err:  # not an image, truncated, unknown format: name the file
        first = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError("--image", path, f"a readable image file (cannot decode it: {type(err).__name__}: "
                          f"{first})") from None
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ConfigError("--image", path, f"a still image (got an array of shape {pixels.shape})")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    scale = 65535.0 if pixels.dtype == np.uint16 else 255.0
    return torch.from_numpy(pixels[..., :3].astype(np.float32) / scale).permute(2, 0, 1).contiguous()


def fit_image(image: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, str | None]:
    """[3, H0, W0] in [0, 1] -> ([3, height, width] in [-1, 1], a note when it was resized/cropped, else None)."""
    from ..data.encode_videos import resize_and_crop

    h0, w0 = image.shape[-2:]
    fitted = resize_and_crop(image[None], height, width)[0] * 2 - 1
    note = None if (h0, w0) == (height, width) else \
        f"image {w0}x{h0} scaled to cover {width}x{height} and centre-cropped"
    return fitted, note


def image_latents(path: str, data_cfg, in_channels: int, vae=None, device="cpu") -> tuple[torch.Tensor, str | None]:
    """(the image's latent frame [1, C, 1, h, w], a note on resizing or None) for a run's geometry.

    ``data_cfg.height/width`` are the latent size; with ``vae`` the image is fitted to the pixel size behind them
    and encoded.
    """
    factor = 1 if vae is None else vae.spatial_factor
    if vae is None and in_channels != 3:
        raise ConfigError("--image", path, f"a run with a VAE (encoders.diffusers_dir): this model's latents have "
                          f"{in_channels} channels, not the 3 pixel channels an image gives")
    pixels, note = fit_image(read_image(path), data_cfg.height * factor, data_cfg.width * factor)
    frame = pixels[None, :, None].to(device)  # [1, 3, 1, H, W]
    return (frame if vae is None else vae.encode(frame).float()), note
