"""The data config and its checks, torch-free so config loading and CLI errors stay fast."""
from __future__ import annotations

from dataclasses import dataclass

from ..config.errors import ConfigError

DATA_KINDS = ("synthetic", "latent_shards")


@dataclass
class DataConfig:
    kind: str = "synthetic"  # "synthetic" | "latent_shards"
    num_frames: int = 8
    height: int = 32
    width: int = 32
    channels: int = 3
    num_classes: int = 8
    batch_size: int = 8
    seed: int = 0
    action_dim: int = 0  # 0 = no actions; else one-hot actions of this size per frame
    text_len: int = 8
    text_dim: int = 32
    shard_dir: str = ""  # for kind == "latent_shards": folder with manifest.json
    num_workers: int = 0  # reserved: data is generated/loaded in-process


def validate_data(cfg: DataConfig, prefix: str = "data") -> None:
    """Fail early, naming the key, on values the loaders cannot serve."""
    if cfg.kind not in DATA_KINDS:
        raise ConfigError(f"{prefix}.kind", cfg.kind, f"one of {DATA_KINDS}")
    for name in ("num_frames", "height", "width", "channels", "num_classes", "batch_size", "text_len", "text_dim"):
        if int(getattr(cfg, name)) <= 0:
            raise ConfigError(f"{prefix}.{name}", getattr(cfg, name), "a positive integer")
    if cfg.kind == "synthetic":
        if cfg.channels != 3:
            raise ConfigError(f"{prefix}.channels", cfg.channels, "3 (synthetic videos are RGB)")
        if min(cfg.height, cfg.width) < 8:
            raise ConfigError(f"{prefix}.height/width", (cfg.height, cfg.width), ">= 8 pixels")
        if cfg.num_frames < 2:
            raise ConfigError(f"{prefix}.num_frames", cfg.num_frames, ">= 2 (motion needs two frames)")
    if cfg.action_dim < 0 or cfg.action_dim == 1:
        raise ConfigError(f"{prefix}.action_dim", cfg.action_dim, "0 (off) or >= 2")
    if cfg.num_workers < 0:
        raise ConfigError(f"{prefix}.num_workers", cfg.num_workers, ">= 0")
    if cfg.kind == "latent_shards" and not cfg.shard_dir:
        raise ConfigError(f"{prefix}.shard_dir", cfg.shard_dir, "a folder holding manifest.json")
