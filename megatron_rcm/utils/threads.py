"""How many intra-op CPU threads a process uses: the cores it may run on, shared by its node's ranks.

Why: torch's default is one thread per core of the machine, so N ranks of one node (or a trainer next
to other work) oversubscribe the cores, and OpenMP's spin-waiting then collapses throughput (10x seen
on 2 cores). Rule (README "Threads"): ``--threads N`` if given, else ``OMP_NUM_THREADS`` if set, else
the CPUs of this process's affinity mask (``os.sched_getaffinity``; a SLURM/cgroup cpuset shows up
there) divided by the ranks on this node (``LOCAL_WORLD_SIZE``, or the launcher's --nproc-per-node),
at least 1.
"""
from __future__ import annotations

import os
import sys


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def threads_per_process(local_ranks: int = 1, flag: int | None = None, env=None) -> tuple[int, str]:
    """(threads, where the number came from) for one of ``local_ranks`` processes on this node."""
    env = os.environ if env is None else env
    if flag is not None:
        return max(1, int(flag)), "--threads"
    value = env.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value), "OMP_NUM_THREADS"
    cpus = available_cpus()
    return max(1, cpus // max(1, local_ranks)), f"{cpus} CPUs / {local_ranks} local rank(s)"


def configure_threads(flag: int | None = None, env=None) -> int:
    """Set this process's intra-op threads by the rule above (the CLI calls it before torch loads).

    Before torch is imported the number goes into ``OMP_NUM_THREADS`` (torch and OpenMP read it at load);
    if torch is already imported (the CLI called in-process) only an explicit ``flag`` changes it, so a
    caller's own setting is kept."""
    env = os.environ if env is None else env
    local = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    n, _ = threads_per_process(local, flag, env)
    if "torch" not in sys.modules:
        env["OMP_NUM_THREADS"] = str(n)
    elif flag is not None:
        import torch

        torch.set_num_threads(n)
    return n
