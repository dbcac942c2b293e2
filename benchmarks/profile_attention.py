"""Hardware counters of the fused-attention kernels, one launch per case, side by side (Nsight Compute).

Why: the sm_90a forward and forward+JVP kernels run their masked cases below the full mask's rate on the
unmasked tiles (issue 22), and neither the tile counts nor a scheduling simulation explain it. This
script gives ``ncu`` one kernel launch per case and turns the reports into one table: time, tensor-pipe
activity, the SM clock (ncu runs with the clocks free, so compare kernels at equal clocks), DRAM bytes
against the inputs' size (how often K/V come back from memory), the L2 hit rate, the
busiest SM's active cycles over the mean (the launch ends with its busiest SM: load balance), and the
warp-stall reasons.

    bash benchmarks/profile_attention.sh tf65520:fwd full32760:fwd bc32760:jvp   # runs ncu, prints the table
    python benchmarks/profile_attention.py launch --case tf65520 --op fwd         # what ncu profiles
    python benchmarks/profile_attention.py table DIR/*.raw.csv                    # the table from ncu's raw CSVs

Cases are ``benchmarks/attention_ab.py``'s (bf16, 12 heads x 128, 1,560 tokens a frame).
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

OPS = ("fwd", "jvp", "bwd")
# (column, raw metric, scale) of the table; a metric the report lacks prints "-".
COLUMNS = (
    ("ms", "gpu__time_duration.sum", 1e-6),
    ("SM GHz", "sm__cycles_elapsed.avg.per_second", 1e-9),  # ncu leaves the clocks free: compare cycles
    ("tensor %", "TPC.TriageCompute.sm__pipe_tensor_cycles_active_realtime.avg.pct_of_peak_sustained_elapsed", 1.0),
    ("SM busy %", "sm__throughput.avg.pct_of_peak_sustained_elapsed", 1.0),
    ("DRAM GB", "dram__bytes_read.sum", 1e-9),
    ("DRAM %", "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed", 1.0),
    ("L2 hit %", "lts__t_sector_hit_rate.pct", 1.0),
    ("busiest SM / mean", None, None),
)
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio")


def input_bytes(case: str, op: str) -> int:
    """Bytes of the kernel's [tokens, heads, dim] inputs, each read once: the least its DRAM traffic can be.
    fwd reads Q, K, V; jvp also their tangents; bwd Q, K, V, O and dO."""
    from attention_ab import D, H, case_mask

    return case_mask(case).shape[0] * H * D * 2 * {"fwd": 3, "jvp": 6, "bwd": 5}[op]


def launch(case: str, op: str, calls: int) -> None:
    """``calls`` launches of one kernel, as ``attention_ab.py`` times them (ncu skips the first ones: the
    warm-up)."""
    import torch

    from attention_ab import case_mask, kernel_calls
    from megatron_rcm.ops import fused_attention as fa

    assert fa._C is not None, "fused extension not available (MEGATRON_RCM_JIT_BUILD=1 on a GPU machine)"
    fn = kernel_calls(case_mask(case))[0][op]
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()


def read_raw(path: str) -> dict[str, str]:
    """The last kernel row of ncu's ``--page raw --csv`` export: metric name -> value."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if len(rows) < 3:
        raise SystemExit(f"profile_attention.py: {path} holds no kernel row (did ncu profile a launch?)")
    return dict(zip(rows[0], rows[-1]))


def number(raw: dict[str, str], name: str) -> float | None:
    try:
        return float(raw[name].replace(",", ""))
    except (KeyError, ValueError):
        return None


def table(paths: list[str], input_bytes: dict[str, int] | None = None) -> str:
    """Markdown table, one row per report (named CASE-OP.raw.csv), and each kernel's four largest stalls."""
    head = ["case", *[c for c, _, _ in COLUMNS], "DRAM / inputs", "top stalls (cycles per issue)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for path in paths:
        name = os.path.basename(path).removesuffix(".raw.csv")
        raw = read_raw(path)
        cells = [name]
        for _, metric, scale in COLUMNS:
            if metric is None:
                mean, hi = number(raw, "sm__cycles_active.avg"), number(raw, "sm__cycles_active.max")
                cells.append(f"{hi / mean:.3f}" if mean and hi else "-")
                continue
            x = number(raw, metric)
            cells.append("-" if x is None else f"{x * scale:.4g}")
        dram, need = number(raw, "dram__bytes_read.sum"), (input_bytes or {}).get(name)
        cells.append(f"{dram / need:.2f}" if dram and need else "-")
        stalls = sorted(((number(raw, k) or 0.0, m.group(1)) for k in raw if (m := STALL.fullmatch(k))), reverse=True)
        cells.append(", ".join(f"{s} {x:.2f}" for x, s in stalls[:4]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    la = sub.add_parser("launch", help="the launches ncu profiles")
    la.add_argument("--case", required=True)
    la.add_argument("--op", choices=OPS, required=True)
    la.add_argument("--calls", type=int, default=3)
    ta = sub.add_parser("table", help="the table from ncu's raw CSV exports (CASE-OP.raw.csv)")
    ta.add_argument("paths", nargs="+")
    args = ap.parse_args()
    if args.cmd == "launch":
        launch(args.case, args.op, args.calls)
        return
    need = {}
    for path in args.paths:
        name = os.path.basename(path).removesuffix(".raw.csv")
        case, _, op = name.rpartition("-")
        if op in OPS:
            need[name] = input_bytes(case, op)
    print(table(args.paths, need))


if __name__ == "__main__":
    main()
