"""Intra-op threads: --threads, else OMP_NUM_THREADS, else the affinity's CPUs / the node's ranks."""
import os
import subprocess
import sys
from pathlib import Path

from megatron_rcm.utils.threads import available_cpus, threads_per_process

ROOT = Path(__file__).resolve().parents[1]


def test_the_rule(monkeypatch):
    from megatron_rcm.utils import threads

    monkeypatch.setattr(threads, "available_cpus", lambda: 6)
    assert threads_per_process(1, env={}) == (6, "6 CPUs / 1 local rank(s)")
    assert threads_per_process(4, env={})[0] == 1  # 6 // 4
    assert threads_per_process(8, env={})[0] == 1  # never 0
    assert threads_per_process(2, env={"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS")
    assert threads_per_process(2, flag=5, env={"OMP_NUM_THREADS": "3"}) == (5, "--threads")
    assert available_cpus() == len(os.sched_getaffinity(0))


def _cli_threads(*args, **env):
    """torch's thread count in a fresh process after the CLI ran ``args`` (``info`` builds nothing heavy)."""
    code = "import sys; from megatron_rcm.cli import main; main(sys.argv[1:]); import torch; print(torch.get_num_threads())"
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    res = subprocess.run([sys.executable, "-c", code, *args], env={**base, "PYTHONPATH": str(ROOT), **env},
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return int(res.stdout.strip().splitlines()[-1])


def test_the_cli_sets_threads_before_torch_loads():
    info = ["info", "examples/tiny_recipe.yaml"]
    assert _cli_threads(*info, LOCAL_WORLD_SIZE="2") == max(1, len(os.sched_getaffinity(0)) // 2)
    assert _cli_threads("--threads", "1", *info, OMP_NUM_THREADS="2") == 1  # the flag wins
    assert _cli_threads(*info, OMP_NUM_THREADS="1") == 1
