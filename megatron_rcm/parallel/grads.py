"""Gradient bookkeeping across ranks: replicated side modules and the GLOBAL gradient norm.

``sync_gradients`` (model.py) handles the model's parameters. Two more things a trainer needs:

- small modules outside the model that every rank holds and evaluates on the full (gathered) loss,
  e.g. sCM's adaptive weight: each rank already has the gradient of ITS samples' loss, replicated
  over tensor/context parallel peers, so one average over the data x context group is exact (under
  pipeline parallelism only the last stage has it: summed over the pipeline group);
- clipping by the norm of the whole gradient as one process would see it: a tensor-parallel shard
  contributes its part once (summed over the TP group), a pipeline stage its blocks (summed over the
  PP group), an FSDP shard its dim-0 piece (summed over the data x context group), and everything
  replicated (embeddings, norms, head, side modules, and all gradients after the data-parallel
  average) counts once.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .fsdp import is_fsdp
from .model import tp_shard_dim
from .sharding import local
from .state import ParallelGroups


def average_replicated_gradients(params, groups: ParallelGroups) -> None:
    """Average ``.grad`` of parameters replicated on every rank over the data x context group."""
    cfg = groups.cfg
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    n = cfg.dp * cfg.cp
    if (n == 1 and cfg.pp == 1) or not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    if n > 1:
        dist.all_reduce(flat, group=groups.dp_cp_group)
        flat /= n
    if cfg.pp > 1:  # only the last stage computes the loss: the others hold zeros
        dist.all_reduce(flat, group=groups.pp_group)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def global_grad_norm(model: nn.Module, groups: ParallelGroups, extra=()) -> torch.Tensor:
    """L2 norm of the full gradient of ``model`` (+ replicated ``extra`` params), equal on every rank.

    Call after ``sync_gradients`` (so data/context-parallel replicas agree). Under FSDP each rank holds
    a disjoint dim-0 piece of every gradient: the squares are summed over the data x context group too.
    """
    cfg = groups.cfg
    device = next(model.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # TP-sharded block, other block, outside blocks
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        sq = local(p.grad).detach().double().pow(2).sum()
        if not name.startswith("blocks."):
            sums[2] += sq
        elif cfg.tp > 1 and tp_shard_dim(name) is not None:
            sums[0] += sq
        else:
            sums[1] += sq
    if is_fsdp(model) and cfg.dp * cfg.cp > 1:
        dist.all_reduce(sums, group=groups.dp_cp_group)
    sharded, block, other = sums.unbind(0)
    for p in extra:
        if p.grad is not None:
            other = other + p.grad.detach().double().pow(2).sum()
    if cfg.tp > 1:
        dist.all_reduce(sharded, group=groups.tp_group)
    blocks = sharded + block
    if cfg.pp > 1:
        dist.all_reduce(blocks, group=groups.pp_group)
    return (blocks + other).sqrt()


def clip_grad_norm_(model: nn.Module, max_norm: float, groups: ParallelGroups, extra=()) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` with the global norm (same coefficient on every rank)."""
    total = global_grad_norm(model, groups, extra)
    if math.isfinite(max_norm):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        grads = [local(p.grad) for p in list(model.parameters()) + list(extra) if p.grad is not None]
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return total
