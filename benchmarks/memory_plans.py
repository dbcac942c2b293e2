"""The README's "Memory plans" table: the planner's peak GiB per GPU for the 1.3B and 14B recipes (CPU, seconds).

    python benchmarks/memory_plans.py [--gpus 8,32]

Each row is ``megatron-rcm info examples/wan2.1_t2v_1.3b.yaml --gpus N --teacher-preset P [overrides]``; the
peaks are the planner's estimates (``megatron_rcm/training/memory_plan.py``), not measurements.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megatron_rcm.cli import _teacher_architectures
from megatron_rcm.config.run import load_config
from megatron_rcm.training.memory_plan import GIB, plan_run

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "wan2.1_t2v_1.3b.yaml"
FSDP = ["parallel.fsdp=true", "parallel.fsdp_param_dtype=bfloat16", "parallel.fsdp_reduce_dtype=float32"]
BIG = ["model.preset=wan2.1-14b", "train.checkpoint_layers=0"]
ROWS = [  # (recipe, layout, SF-DMD teacher preset, overrides)
    ("1.3B", "ZeRO-1", "wan2.1-1.3b", []),
    ("1.3B", "FSDP2", "wan2.1-1.3b", FSDP),
    ("1.3B, 14B SF-DMD teacher", "FSDP2", "wan2.1-14b", FSDP),
    ("1.3B, 14B SF-DMD teacher, all blocks ckpt", "FSDP2", "wan2.1-14b", FSDP + ["train.checkpoint_layers=0"]),
    ("14B", "ZeRO-1", "wan2.1-14b", BIG),
    ("14B", "FSDP2", "wan2.1-14b", BIG + FSDP),
    ("14B", "FSDP2 x TP2", "wan2.1-14b", BIG + FSDP + ["parallel.tp=2"]),
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="8,32")
    args = ap.parse_args(argv)
    print("| recipe | layout | GPUs | causal teacher | TF-sCM | SF-DMD |")
    print("|---|---|---|---|---|---|")
    for gpus in (int(g) for g in args.gpus.split(",")):
        for recipe, layout, teacher, overrides in ROWS:
            tp = int(next((o.split("=")[1] for o in overrides if o.startswith("parallel.tp=")), 1))
            cfg = load_config(RECIPE, overrides + [f"data.batch_size={gpus // tp}"])  # a video per DP rank
            plans = plan_run(cfg, gpus, _teacher_architectures(cfg, teacher))
            peaks = " | ".join(f"{p.peak / GIB:.0f}" for p in plans)
            print(f"| {recipe} | {layout} | {gpus} | {peaks} |")


if __name__ == "__main__":
    main()
