"""Process groups: torch.distributed + megatron-core ``parallel_state``.

Why megatron-core's ``parallel_state``: it is the rank layout every Megatron user knows (order
``tp-cp-ep-dp-pp``: TP ranks adjacent, then CP, then DP, then PP), and its getters are what
megatron-core layers and checkpoints expect. The backend is NCCL when CUDA is available, else
gloo (CPU tests). Rendezvous comes from torchrun's env (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``)
or, failing that, from SLURM's (``SLURM_PROCID``/``SLURM_NTASKS``; ``MASTER_ADDR`` must be set by
the sbatch script).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ParallelConfig


@dataclass
class ParallelGroups:
    """The groups and this rank's coordinates in them (all sizes 1 / groups None = single process)."""

    cfg: ParallelConfig
    tp_group: object = None
    cp_group: object = None
    dp_group: object = None  # data parallel WITHOUT context parallel
    dp_cp_group: object = None  # data x context parallel: where gradients of replicated weights meet
    tp_rank: int = 0
    cp_rank: int = 0
    dp_rank: int = 0
    pp_group: object = None
    pp_rank: int = 0
    pp_prev: int = 0  # global ranks of the neighbouring pipeline stages
    pp_next: int = 0


def _env_rank_world():
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ:
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
        return rank, world, int(os.environ.get("SLURM_LOCALID", 0))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # single process: a private rendezvous
    os.environ.setdefault("MASTER_PORT", "29500")
    return 0, 1, 0


def initialize_parallel(cfg: ParallelConfig, backend: str | None = None) -> ParallelGroups:
    """Init torch.distributed (if needed) and megatron-core's groups for ``cfg``; returns the groups."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        rank, world, local = _env_rank_world()
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, rank=rank, world_size=world)
    cfg = cfg.resolved(dist.get_world_size())
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=cfg.tp, pipeline_model_parallel_size=cfg.pp,
                                     context_parallel_size=cfg.cp)
    return ParallelGroups(
        cfg=cfg,
        tp_group=ps.get_tensor_model_parallel_group(), cp_group=ps.get_context_parallel_group(),
        dp_group=ps.get_data_parallel_group(), dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        tp_rank=ps.get_tensor_model_parallel_rank(), cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        pp_group=ps.get_pipeline_model_parallel_group(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_prev=ps.get_pipeline_model_parallel_prev_rank(), pp_next=ps.get_pipeline_model_parallel_next_rank())


def destroy_parallel() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
