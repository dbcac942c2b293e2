"""One rank of the non-finite agreement check (launched by ``_launch_ranks.py``): DP2, rank 1's loss is NaN."""
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

from megatron_rcm.parallel import ParallelConfig, ParallelGroups
from megatron_rcm.training.distributed import TrainerParallel

out, rank = sys.argv[-1], int(os.environ["RANK"])
errors = []
try:
    dist.init_process_group("gloo")  # plain DP2 world: no megatron-core groups needed here
    par = TrainerParallel(ParallelGroups(cfg=ParallelConfig(dp=2), dp_rank=rank))
    mean, finite = par.global_loss(torch.tensor(1.0 + rank, dtype=torch.float64))
    if not finite or abs(mean - 1.5) > 1e-12:
        errors.append(f"finite losses 1, 2: got mean {mean}, finite {finite}")
    mean, finite = par.global_loss(torch.tensor(float("nan") if rank == 1 else 1.0))
    if finite:
        errors.append(f"rank 1 had a NaN loss but rank {rank} was told all losses are finite")
    dist.destroy_process_group()
except Exception:
    errors.append(traceback.format_exc())
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(errors, f)
