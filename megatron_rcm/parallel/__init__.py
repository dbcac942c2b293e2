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
from .config import ParallelConfig, validate_parallel
from .model import ParallelContext, parallelize_model, shard_like, sync_gradients, tp_shard_dim
from .optim import sharded_optimizer
from .pipeline import pipeline_forward_backward
from .state import ParallelGroups, destroy_parallel, initialize_parallel

__all__ = ["ParallelConfig", "validate_parallel", "ParallelContext", "parallelize_model", "shard_like",
           "sync_gradients", "tp_shard_dim", "sharded_optimizer", "pipeline_forward_backward", "ParallelGroups",
           "initialize_parallel", "destroy_parallel", "batch_for_rank"]


def batch_for_rank(x, groups: ParallelGroups, dim: int = 0):
    """This data-parallel rank's contiguous slice of a global batch (None passes through)."""
    if x is None or groups.cfg.dp == 1:
        return x
    n = x.shape[dim] // groups.cfg.dp
    return x.narrow(dim, groups.dp_rank * n, n)
