"""Typed configs (dataclasses + omegaconf), presets and validation."""
from .errors import ConfigError
from .model import CausalConfig, ModelConfig, model_preset

__all__ = ["ConfigError", "CausalConfig", "ModelConfig", "model_preset"]
