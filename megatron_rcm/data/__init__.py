"""Data: the synthetic default set and on-disk latent shards, behind one constructor.

The config and its checks import without torch (fast CLI errors); the data sets load on first use.
"""
from ..config.data import DataConfig, validate_data


def build_dataset(cfg: DataConfig, batch_size: int | None = None, rank: int = 0, world_size: int = 1):
    """The streamed, resumable, rank-sharded batch iterator that cfg.kind names."""
    validate_data(cfg)
    if cfg.kind == "latent_shards":
        from .shards import LatentShardDataset

        return LatentShardDataset(cfg.shard_dir, batch_size or cfg.batch_size, rank=rank,
                                  world_size=world_size, seed=cfg.seed)
    from .synthetic import SyntheticVideoDataset

    return SyntheticVideoDataset(cfg, batch_size=batch_size, rank=rank, world_size=world_size)


def __getattr__(name: str):
    if name in ("SyntheticVideoDataset", "TextConditioner"):
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DataConfig", "SyntheticVideoDataset", "TextConditioner", "validate_data", "build_dataset"]
