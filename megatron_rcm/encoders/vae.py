"""The frozen Wan2.1 VAE: pixels [-1, 1] <-> the transformer's normalised latents, whole or streamed.

Latents are normalised the way ``WanPipeline`` does: z = (raw - latents_mean) / latents_std with the
VAE config's per-channel lists. Time is causal: the first video frame makes one latent frame, every
further ``scale_factor_temporal`` (4) frames make one more, so a video needs 4k + 1 frames. Decoding
runs latent frame by latent frame through the decoder's causal-conv feature cache; keeping that cache
between calls (:class:`StreamingVAEDecoder`) decodes a stream chunk by chunk with the same result as one
decode of the whole video.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from .device import Placement, encoder_dtype
from .errors import EncoderError


class WanVideoVAE:
    def __init__(self, vae, device="cpu", offload: bool = False, source: str = ""):
        self.placement = Placement(vae, device, offload)
        self.source = source
        cfg = vae.config
        self.z_dim = int(cfg.z_dim)
        self.temporal_factor = int(cfg.scale_factor_temporal or 4)
        self.spatial_factor = int(cfg.scale_factor_spatial or 8)
        self._mean = torch.tensor(cfg.latents_mean, dtype=torch.float64).view(1, self.z_dim, 1, 1, 1)
        self._std = torch.tensor(cfg.latents_std, dtype=torch.float64).view(1, self.z_dim, 1, 1, 1)

    @classmethod
    def from_folder(cls, folder, dtype: str = "auto", device="cpu", offload: bool = False) -> "WanVideoVAE":
        from diffusers import AutoencoderKLWan

        try:
            vae = AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=encoder_dtype(dtype, device))
        except Exception as err:  # a broken folder: name it, no trace
            raise EncoderError(f"cannot load the Wan VAE from {folder}: {type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}") from None
        return cls(vae, device, offload, source=str(Path(folder)))

    @property
    def module(self):
        return self.placement.module

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    # ------------------------------------------------------------------ geometry
    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + self.temporal_factor * (int(latent_frames) - 1)

    def latent_frames(self, pixel_frames: int, what: str = "the video") -> int:
        """Latent frames for ``pixel_frames``; a count the causal VAE cannot take is an error saying so."""
        k = self.temporal_factor
        if pixel_frames < 1 or (pixel_frames - 1) % k:
            lo = max(1, 1 + k * ((pixel_frames - 1) // k))
            raise EncoderError(f"{what} has {pixel_frames} frames; the Wan VAE takes {k}k+1 frames "
                               f"(e.g. {lo} or {lo + k})")
        return 1 + (pixel_frames - 1) // k

    # ------------------------------------------------------------------ normalisation
    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self._mean.to(raw)) / self._std.to(raw)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self._std.to(latents) + self._mean.to(latents)

    # ------------------------------------------------------------------ encode / decode
    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, F, H, W] in [-1, 1] (F = 4k+1) -> normalised latents (the posterior mean)."""
        self.latent_frames(pixels.shape[2])
        s = self.spatial_factor
        if pixels.shape[3] % s or pixels.shape[4] % s:
            raise EncoderError(f"video size {pixels.shape[3]}x{pixels.shape[4]} is not a multiple of the VAE's "
                               f"spatial factor {s}")
        with self.placement.active() as vae:
            raw = vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mode()
        return self.normalize(raw)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, F, H, W] -> pixels [B, 3, 4(F-1)+1, 8H, 8W] in [-1, 1] (one full decode)."""
        self._check_channels(latents)
        with self.placement.active() as vae:
            return vae.decode(self.denormalize(latents.to(self.device, self.dtype)), return_dict=False)[0]

    def stream(self) -> "StreamingVAEDecoder":
        """A decoder for a latent stream, fed chunk by chunk in order."""
        return StreamingVAEDecoder(self)

    def _check_channels(self, latents: torch.Tensor) -> None:
        if latents.dim() != 5 or latents.shape[1] != self.z_dim:
            raise EncoderError(f"latents of shape {tuple(latents.shape)} cannot be decoded by the VAE at "
                               f"{self.source or 'the run'}: it takes [B, {self.z_dim}, F, H, W]")


class StreamingVAEDecoder:
    """Decodes consecutive latent chunks of one stream, keeping the VAE decoder's causal feature cache.

    The first chunk's first latent frame gives one video frame, each later latent frame gives
    ``temporal_factor`` frames, so the concatenated output equals ``WanVideoVAE.decode`` of the whole video.
    """

    def __init__(self, vae: WanVideoVAE):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self.vae = vae
        self.latent_frames_seen = 0
        convs = sum(isinstance(m, WanCausalConv3d) for m in vae.module.decoder.modules())
        self._cache: list = [None] * convs
        # diffusers >= 0.35 tells the decoder which call holds the first frame (Wan2.2's residual up-blocks)
        self._has_first_chunk = "first_chunk" in inspect.signature(vae.module.decoder.forward).parameters

    @torch.no_grad()
    def decode(self, chunk: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, f, H, W] (the next f frames of the stream) -> their video frames."""
        vae = self.vae
        vae._check_channels(chunk)
        with vae.placement.active() as module:
            z = module.post_quant_conv(vae.denormalize(chunk.to(vae.device, vae.dtype)))
            outs = []
            for i in range(z.shape[2]):
                kw = {"first_chunk": self.latent_frames_seen == 0} if self._has_first_chunk else {}
                outs.append(module.decoder(z[:, :, i:i + 1], feat_cache=self._cache, feat_idx=[0], **kw))
                self.latent_frames_seen += 1
            out = torch.cat(outs, dim=2)
            if getattr(module.config, "patch_size", None) is not None:  # Wan2.2's patchified VAE
                from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

                out = unpatchify(out, patch_size=module.config.patch_size)
        return out.clamp(-1.0, 1.0)
