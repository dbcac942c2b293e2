"""Sharded optimizer for data (x context) parallelism: ZeRO-1 via ``ZeroRedundancyOptimizer``.

The default when ``parallel.fsdp`` is off (with it, ``fsdp.py`` shards weights and gradients too and a plain
AdamW runs on the shards). Why ZeRO-1 and not megatron-core's DistributedOptimizer:
- it works unchanged on gloo/CPU and NCCL/GPU (megatron-core's DistributedOptimizer needs its DDP
  wrapper, contiguous CUDA grad buffers and apex/TE);
- it only sees this rank's (already TP-sharded) local tensors, so it composes with TP/CP: the
  optimizer state of the params replicated over the data x context group is split over that group
  and updated params are broadcast back after ``step``.
Gradients must be synchronised first (:func:`megatron_rcm.parallel.model.sync_gradients`), which
also gives gradient accumulation: accumulate ``.grad`` over micro-batches, sync once, step once.
"""
from __future__ import annotations

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

from .state import ParallelGroups


def sharded_optimizer(params, groups: ParallelGroups, optimizer_class=torch.optim.AdamW, **kwargs):
    """``optimizer_class`` with its state sharded over the data x context-parallel group."""
    params = [p for p in params if p.requires_grad]
    if groups.cfg.dp * groups.cfg.cp == 1:
        return optimizer_class(params, **kwargs)
    return ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class,
                                   process_group=groups.dp_cp_group, **kwargs)
