"""Frozen encoders of a Wan2.1 pipeline: the umT5 text encoder (prompts -> context) and the Wan VAE
(pixels <-> latents, streamed decoding). Loaded from a local diffusers folder; never trained or saved.

The config and its checks import without torch (config loading and CLI errors stay fast); the encoders
themselves load on first use.
"""
from .config import EncodersConfig, validate_encoders
from .errors import EncoderError

_LAZY = {"component_dir": "folder", "is_pipeline_folder": "folder", "scheduler_shift": "folder",
         "strip_prefix": "folder", "transformer_dir": "folder", "WanEncoders": "loader",
         "check_latent_channels": "loader", "check_text_width": "loader", "load_encoders": "loader",
         "DEFAULT_NEGATIVE_PROMPT": "text", "WanTextEncoder": "text", "StreamingVAEDecoder": "vae",
         "WanVideoVAE": "vae"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EncodersConfig", "validate_encoders", "EncoderError", *_LAZY]
