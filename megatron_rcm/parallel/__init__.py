"""Megatron-style parallelism (tensor, context, pipeline, data) that keeps the explicit JVP path exact.

Typical use in a trainer (every rank, launched by torchrun or srun)::

    groups = initialize_parallel(ParallelConfig(tp=2, cp=2))      # dp = auto
    model = parallelize_model(build_model(cfg, causal), groups)   # same seed / checkpoint on all ranks
    opt = sharded_optimizer(model.parameters(), groups, lr=1e-4)
    # or FSDP2 over the data x context ranks (ParallelConfig(fsdp=True)): weights, grads, states sharded
    # model = fsdp.shard_model(model, groups, device); opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = batch_for_rank(batch, groups)                         # this DP rank's samples
    loss = ...model.forward_teacher_forcing(...)...; loss.backward()
    # or, with pipeline parallelism / micro-batches (also fine for pp = 1):
    # loss = pipeline_forward_backward(model, microbatches, forward_fn, loss_fn)
    sync_gradients(model, groups); opt.step()
"""
from __future__ import annotations

from .config import ParallelConfig, validate_parallel

# the torch-heavy parts load on first use, so `parallel.config` (read by every config load) stays torch-free
_LAZY = {"ParallelContext": "model", "parallelize_model": "model", "shard_like": "model",
         "sync_gradients": "model", "tp_shard_dim": "model", "sharded_optimizer": "optim",
         "pipeline_forward_backward": "pipeline",
         "ParallelGroups": "state", "destroy_parallel": "state", "initialize_parallel": "state"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ParallelConfig", "validate_parallel", "ParallelContext", "parallelize_model", "shard_like",
           "sync_gradients", "tp_shard_dim", "sharded_optimizer", "pipeline_forward_backward", "ParallelGroups",
           "initialize_parallel", "destroy_parallel", "batch_for_rank"]


def batch_for_rank(x, groups: ParallelGroups, dim: int = 0):
    """This data-parallel rank's contiguous slice of a global batch (None passes through)."""
    if x is None or groups.cfg.dp == 1:
        return x
    n = x.shape[dim] // groups.cfg.dp
    return x.narrow(dim, groups.dp_rank * n, n)
