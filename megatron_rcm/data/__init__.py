"""Data: the synthetic default set and on-disk latent shards, behind one constructor."""
from .synthetic import DataConfig, SyntheticVideoDataset, TextConditioner, validate_data


def build_dataset(cfg: DataConfig, batch_size: int | None = None, rank: int = 0, world_size: int = 1):
    """The streamed, resumable, rank-sharded batch iterator that cfg.kind names."""
    validate_data(cfg)
    if cfg.kind == "latent_shards":
        from .shards import LatentShardDataset

        return LatentShardDataset(cfg.shard_dir, batch_size or cfg.batch_size, rank=rank,
                                  world_size=world_size, seed=cfg.seed)
    return SyntheticVideoDataset(cfg, batch_size=batch_size, rank=rank, world_size=world_size)


__all__ = ["DataConfig", "SyntheticVideoDataset", "TextConditioner", "validate_data", "build_dataset"]
