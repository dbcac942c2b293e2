"""Frozen encoders of a Wan2.1 pipeline: the umT5 text encoder (prompts -> context) and the Wan VAE
(pixels <-> latents, streamed decoding). Loaded from a local diffusers folder; never trained or saved."""
from .config import EncodersConfig, validate_encoders
from .errors import EncoderError
from .folder import component_dir, is_pipeline_folder, scheduler_shift, strip_prefix, transformer_dir
from .loader import WanEncoders, check_latent_channels, check_text_width, load_encoders
from .text import DEFAULT_NEGATIVE_PROMPT, WanTextEncoder
from .vae import StreamingVAEDecoder, WanVideoVAE

__all__ = ["EncodersConfig", "validate_encoders", "EncoderError", "component_dir", "is_pipeline_folder",
           "scheduler_shift", "strip_prefix", "transformer_dir", "WanEncoders", "check_latent_channels",
           "check_text_width", "load_encoders", "DEFAULT_NEGATIVE_PROMPT", "WanTextEncoder", "StreamingVAEDecoder",
           "WanVideoVAE"]
