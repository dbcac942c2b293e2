"""Load a run's frozen encoders from :class:`EncodersConfig` and check them against the transformer.

The encoders are never trained and never saved with our checkpoints: they are rebuilt from their
folders whenever a command needs them (data generation, sampling, the end-of-phase video).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import EncodersConfig, validate_encoders
from .errors import EncoderError
from .folder import component_dir
from .text import DEFAULT_NEGATIVE_PROMPT, WanTextEncoder
from .vae import WanVideoVAE


@dataclass
class WanEncoders:
    text: WanTextEncoder | None
    vae: WanVideoVAE | None
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT

    def prompt_contexts(self, prompts: list[str], negative_prompt: str | None = None) -> dict:
        """{"context": [B, L, D], "uncond_context": [B, L, D]} for the prompts and the negative prompt."""
        if self.text is None:
            raise EncoderError("no text encoder: set encoders.diffusers_dir (or encoders.text_encoder) in the config")
        neg = self.negative_prompt if negative_prompt is None else negative_prompt
        context = self.text.encode(list(prompts))
        uncond = self.text.encode([neg]).expand(len(prompts), -1, -1)
        return {"context": context, "uncond_context": uncond.contiguous()}


def _part(cfg: EncodersConfig, name: str, override: str, purpose: str):
    return override if override else component_dir(cfg.diffusers_dir, name, purpose)


def check_text_width(text: WanTextEncoder, text_dim: int, key: str = "model.text_dim") -> None:
    if text.width != text_dim:
        raise EncoderError(f"the text encoder at {text.source} is {text.width} wide (d_model) but {key} = "
                           f"{text_dim}: use the text encoder the transformer was trained with, or set "
                           f"{key}={text.width}")


def check_latent_channels(vae: WanVideoVAE, in_channels: int, key: str = "model.in_channels") -> None:
    if vae.z_dim != in_channels:
        raise EncoderError(f"the VAE at {vae.source} makes {vae.z_dim} latent channels (z_dim) but {key} = "
                           f"{in_channels}: use the VAE the transformer was trained with, or set "
                           f"{key}={vae.z_dim}")


def load_encoders(cfg: EncodersConfig, model_cfg=None, device="cpu", text: bool = True, vae: bool = True,
                  text_len: int | None = None) -> WanEncoders:
    """The encoders ``cfg`` names (``text``/``vae`` pick which), checked against ``model_cfg`` when given.

    ``text_len`` (default ``model_cfg.text_len``, else 512) is the tokenizer length, Wan's 512.
    """
    validate_encoders(cfg)
    device = torch.device(device)
    if not cfg.enabled:
        raise EncoderError("this run has no encoders: set encoders.diffusers_dir to a diffusers Wan pipeline "
                           "folder (it holds tokenizer/, text_encoder/ and vae/)")
    length = text_len or (model_cfg.text_len if model_cfg is not None else 512)
    text_enc = vae_enc = None
    if text:
        tok_dir = _part(cfg, "tokenizer", cfg.tokenizer, "the umT5 tokenizer")
        enc_dir = _part(cfg, "text_encoder", cfg.text_encoder, "the umT5 text encoder")
        text_enc = WanTextEncoder.from_folders(tok_dir, enc_dir, length, cfg.dtype, device, cfg.cpu_offload)
        if model_cfg is not None:
            check_text_width(text_enc, model_cfg.text_dim)
    if vae:
        vae_dir = _part(cfg, "vae", cfg.vae, "the Wan VAE")
        vae_enc = WanVideoVAE.from_folder(vae_dir, cfg.dtype, device, cfg.cpu_offload)
        if model_cfg is not None:
            check_latent_channels(vae_enc, model_cfg.in_channels)
    neg = DEFAULT_NEGATIVE_PROMPT if cfg.negative_prompt is None else cfg.negative_prompt
    return WanEncoders(text_enc, vae_enc, neg)
