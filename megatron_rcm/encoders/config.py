"""Where a run's frozen encoders (umT5 text encoder + tokenizer, Wan VAE) come from, and how they run.

A plain dataclass with no heavy imports, so the run config (and ``megatron-rcm info``) can hold it
without loading ``transformers``. Paths are only checked when the encoders are loaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config.errors import ConfigError

ENCODER_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class EncodersConfig:
    # a diffusers Wan pipeline folder (tokenizer/, text_encoder/, vae/, ...); "" = the run has no encoders
    diffusers_dir: str = ""
    # optional separate folders, each overriding the matching sub-folder of diffusers_dir
    tokenizer: str = ""
    text_encoder: str = ""
    vae: str = ""
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    cpu_offload: bool = False  # keep the encoders on the CPU between calls (moved to the device per call)
    negative_prompt: Optional[str] = None  # None: Wan2.1's default negative prompt

    @property
    def enabled(self) -> bool:
        return bool(self.diffusers_dir or self.text_encoder or self.vae)

    @property
    def has_text(self) -> bool:
        return bool(self.diffusers_dir or self.text_encoder)

    @property
    def has_vae(self) -> bool:
        return bool(self.diffusers_dir or self.vae)


def validate_encoders(cfg: EncodersConfig, prefix: str = "encoders") -> None:
    if cfg.dtype not in ENCODER_DTYPES:
        raise ConfigError(f"{prefix}.dtype", cfg.dtype, f"one of {ENCODER_DTYPES}")
    if cfg.text_encoder and not (cfg.tokenizer or cfg.diffusers_dir):
        raise ConfigError(f"{prefix}.tokenizer", cfg.tokenizer, f"the tokenizer folder that goes with "
                          f"{prefix}.text_encoder={cfg.text_encoder!r} (or set {prefix}.diffusers_dir)")
