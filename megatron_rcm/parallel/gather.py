"""Full (single-process layout) weights from a parallelized model, for phase outputs and evaluation.

FSDP shards are all-gathered over the data x context group first (``DTensor.full_tensor``), then
tensor-parallel shards over the TP group (tensor collectives, cheap); pipeline
stages each hold their own ``blocks.<i>`` entries, which one rank per stage (data/context/tensor
coordinate 0) sends to ``dst`` as a pickled dict. The result loads into a plain ``build_model``
model with ``load_state_dict`` (parameter names are unchanged by ``parallelize_model``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .model import tp_shard_dim
from .state import ParallelGroups


def full_state_dict(model: nn.Module, groups: ParallelGroups, dst: int = 0) -> dict | None:
    """The unsharded state dict (CPU tensors) on global rank ``dst``; None elsewhere. Collective: all ranks call."""
    cfg = groups.cfg
    local = {}
    for name, t in model.state_dict().items():
        if isinstance(t, DTensor):
            t = t.full_tensor()
        dim = tp_shard_dim(name)
        if cfg.tp > 1 and dim is not None:
            parts = [torch.empty_like(t) for _ in range(cfg.tp)]
            dist.all_gather(parts, t.detach().contiguous(), group=groups.tp_group)
            t = torch.cat(parts, dim)
        local[name] = t.detach().cpu()
    rank = dist.get_rank()
    if cfg.pp == 1:
        return local if rank == dst else None
    sender = groups.dp_rank == 0 and groups.cp_rank == 0 and groups.tp_rank == 0
    contrib = {k: v for k, v in local.items() if k.startswith("blocks.") or groups.pp_rank == 0} if sender else {}
    parts = [None] * dist.get_world_size() if rank == dst else None
    dist.gather_object(contrib, parts, dst=dst)
    if rank != dst:
        return None
    full: dict = {}
    for p in parts:
        full.update(p)
    return full
