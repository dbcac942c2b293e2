"""Throughput of concurrent CPU trainings under thread settings (issue 19: sane intra-op threads).

Each setting starts ``--runs`` copies of a short tiny-recipe training at once, each its own
``megatron-rcm train`` (or, with ``--launch``, one ``megatron-rcm launch --nproc-per-node RUNS`` job), and
prints every run's training samples/s (from its log lines, start-up excluded) and the wall time.
A setting is ``NAME=ENV`` with ENV a comma-separated list of VAR:VALUE (empty: the CLI's own rule);
``PIN:1`` runs run i under ``taskset -c i`` (its own core: the CLI's rule then gives it 1 thread):

    python benchmarks/cpu_threads.py --runs 2 --steps 120 \\
        "torch default=OMP_NUM_THREADS:2" "one thread=OMP_NUM_THREADS:1" "CLI rule="
    python benchmarks/cpu_threads.py --launch --runs 2 --steps 120 "old launch=OMP_NUM_THREADS:8" "CLI rule="
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train_args(out: Path, steps: int) -> list[str]:
    """The tiny recipe's teacher phase alone, no checkpoints or evaluation: pure training steps."""
    return ["train", str(ROOT / "examples" / "tiny_recipe.yaml"), f"output_dir={out}", f"phases.0.steps={steps}",
            "phases.1.steps=0", "phases.2.steps=0", "train.log_every=20", "train.checkpoint_every=0",
            "eval.at_phase_end=false"]


def _rates(log: str, phase: str = "teacher") -> list[float]:
    return [float(r) for r in re.findall(rf"^\[{phase}\] step \d+\S* .*samples/s=([\d.]+)", log, re.M)]


def run_setting(env_spec: str, runs: int, steps: int, launch: bool) -> tuple[list[float], float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    for item in filter(None, env_spec.split(",")):
        key, value = item.split(":", 1)
        env[key] = value
    pin = env.pop("PIN", "0") == "1"
    cli = [sys.executable, "-m", "megatron_rcm.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if launch:
            cmds = [cli + ["launch", "--nproc-per-node", str(runs), "--master-port", "0", "--",
                           *_train_args(Path(tmp) / "run", steps)]]
        else:
            cmds = [(["taskset", "-c", str(i % os.cpu_count())] if pin else []) + cli +
                    _train_args(Path(tmp) / f"run{i}", steps) for i in range(runs)]
        procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c in cmds]
        logs = [p.communicate()[0] for p in procs]
        wall = time.perf_counter() - t0
    for p, log in zip(procs, logs):
        if p.returncode != 0:
            raise SystemExit(f"a run failed ({p.returncode}):\n{log[-3000:]}")
    rates = []
    for log in logs:
        r = _rates(log)[1:]  # the first log line includes start-up
        rates.append(sum(r) / len(r) if r else float("nan"))
    return rates, wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("settings", nargs="+", help="NAME=VAR:VALUE,... (empty ENV: the CLI's own thread rule)")
    p.add_argument("--runs", type=int, default=2, help="concurrent trainings (or ranks with --launch)")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--launch", action="store_true", help="one `megatron-rcm launch` job of --runs ranks")
    args = p.parse_args(argv)
    print(f"{'setting':28s} | samples/s of each run{'':8s} | wall s")
    for setting in args.settings:
        name, env_spec = setting.split("=", 1)
        rates, wall = run_setting(env_spec, args.runs, args.steps, args.launch)
        print(f"{name:28s} | {' / '.join(f'{r:6.1f}' for r in rates):29s} | {wall:6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
