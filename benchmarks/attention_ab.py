"""Side-by-side A/B of fused-attention kernel versions in one GPU session.

Kernel changes move speed by a few percent while lent machines drift ±3% between sessions, so versions
are compared in one run: ``benchmarks/attention_ab.sh NAME=DIR ...`` builds each version's extension in
its own tree (DIR: a checkout, or a ``git archive`` export of one) and calls this script once per tree and
round, alternating.

    python benchmarks/attention_ab.py run TAG OUT_DIR [--peers]   # one tree: prints "ROW {json}"
    python benchmarks/attention_ab.py compare OUT_DIR BASE TAG,TAG LOG   # equality + table

``run`` times forward (+LSE), forward+JVP and backward on four cases (bf16, 12 heads x 128) in TFLOP/s
over unmasked 64x64 tiles (forward 4 Sq Sk D H, JVP 3x, backward 2.5x) and, with ``--peers``, cuDNN's
and flash's SDPA on the full mask. It saves two cases' outputs so ``compare`` can tell a reordering that
must be bitwise neutral (dK, dV, the forward) from one that changes rounding. ``AB_CASES=full32760,tf65520``
(environment) limits every run to those cases.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

CASES = (("full32760", "full", 21), ("bc32760", "block_causal", 21), ("tf65520", "teacher_forcing", 21),
         ("bc9360", "block_causal", 6))
SAVED = ("tf65520", "bc9360")
OUTPUTS = ("o", "o_jvp", "t_jvp", "dq", "dk", "dv")
H, D, TPF = 12, 128, 1560


def selected_cases():
    """CASES, or those named in AB_CASES (comma-separated) to spend a short device call on fewer."""
    names = [n for n in os.environ.get("AB_CASES", "").split(",") if n]
    unknown = sorted(set(names) - {c[0] for c in CASES})
    if unknown:
        raise SystemExit(f"attention_ab.py: AB_CASES names unknown cases {unknown}; choose from "
                         f"{', '.join(c[0] for c in CASES)}")
    return [c for c in CASES if not names or c[0] in names]


def _bench(fn):
    from megatron_rcm.utils.cuda_timing import median_ms
    return median_ms(fn, reps=12)


def _mask(kind, frames):
    from megatron_rcm.ops import masks as M
    if kind == "full":
        return M.full_mask(frames * TPF)
    if kind == "block_causal":
        return M.block_causal_mask(frames, TPF, 1)
    return M.teacher_forcing_mask(frames, TPF, 1)


def case_mask(name: str):
    """The mask of the case called ``name`` in CASES."""
    spec = {n: (kind, frames) for n, kind, frames in CASES}
    if name not in spec:
        raise SystemExit(f"attention_ab.py: unknown case {name}; choose from {', '.join(spec)}")
    return _mask(*spec[name])


def kernel_calls(mask):
    """The fused kernels' calls on one case's random bf16 inputs (seed 0): {"fwd": (O, LSE), "jvp": (O, its
    tangent), "bwd": (dQ, dK, dV) from dO}, and the inputs (q, k, v, dO). The timed A/B and the profiler
    (``profile_attention.py``) run these same calls. The backward's forward runs at its first call."""
    import functools

    import torch

    from megatron_rcm.ops import fused_attention as fa

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, tq, tk, tv, do = (torch.randn(1, mask.shape[0], H, D, device="cuda", generator=g, dtype=torch.bfloat16)
                               for _ in range(7))

    @functools.cache
    def graph():
        leaves = tuple(x.clone().requires_grad_() for x in (q, k, v))
        return fa.fused_forward(*leaves, mask), leaves

    def bwd():
        o, leaves = graph()
        return torch.autograd.grad(o, leaves, do, retain_graph=True)

    return {"fwd": lambda: fa.fused_forward_lse(q, k, v, mask),
            "jvp": lambda: fa.fused_forward_jvp(q, k, v, tq, tk, tv, mask), "bwd": bwd}, (q, k, v, do)


def run(tag: str, out: str, peers: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_rcm.ops import fused_attention as fa
    from megatron_rcm.ops import masks as M

    assert fa._C is not None, "fused extension not available (MEGATRON_RCM_JIT_BUILD=1 on a GPU machine)"
    row, saved = {"tag": tag}, {}
    for name, kind, frames in selected_cases():
        mask = _mask(kind, frames)
        sq, sk = mask.shape
        dens = float((mask.tile_summary(64, 64) != M.TILE_SKIP).float().mean())
        f1 = 4.0 * sq * sk * D * H * dens
        calls, (q, k, v, do) = kernel_calls(mask)
        row[f"{name}_fwd"] = f1 / _bench(calls["fwd"]) / 1e9
        row[f"{name}_jvp"] = 3 * f1 / _bench(calls["jvp"]) / 1e9
        row[f"{name}_bwd"] = 2.5 * f1 / _bench(calls["bwd"]) / 1e9
        if name in SAVED:
            saved[name] = [calls["fwd"]()[0], *calls["jvp"](), *calls["bwd"]()]
        if peers and mask.is_full():
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            for backend, peer in ((SDPBackend.CUDNN_ATTENTION, "cudnn"), (SDPBackend.FLASH_ATTENTION, "flash")):
                with sdpa_kernel(backend):
                    row[f"{name}_{peer}_fwd"] = f1 / _bench(lambda: F.scaled_dot_product_attention(qt, kt, vt)) / 1e9
                    qs, ks, vs = (x.clone().requires_grad_() for x in (qt, kt, vt))
                    os_ = F.scaled_dot_product_attention(qs, ks, vs)
                    row[f"{name}_{peer}_bwd"] = 2.5 * f1 / _bench(
                        lambda: torch.autograd.grad(os_, (qs, ks, vs), do.transpose(1, 2), retain_graph=True)) / 1e9
                    del os_
        del calls, q, k, v, do
        torch.cuda.empty_cache()
    torch.save({k: [t.cpu() for t in v] for k, v in saved.items()}, os.path.join(out, f"{tag}.pt"))
    row = {k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}
    print("ROW " + json.dumps(row), flush=True)
    return row


def rows_from_log(lines) -> dict[str, list[dict]]:
    """The ROW lines of a log, grouped by tag in first-seen order (one entry per round)."""
    rows = collections.OrderedDict()
    for line in lines:
        if line.startswith("ROW "):
            r = json.loads(line[4:])
            rows.setdefault(r.pop("tag"), []).append(r)
    return rows


def metric_table(rows: dict[str, list[dict]]) -> str:
    """Markdown: one line per metric, one column per tag, each cell the rounds' values."""
    keys = sorted({k for rs in rows.values() for r in rs for k in r})
    lines = ["| metric | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for k in keys:
        cells = (", ".join(f"{r[k]:.0f}" for r in rs if k in r) for rs in rows.values())
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def equality_lines(ref: dict, got: dict, tag: str, base: str) -> list[str]:
    """Per saved case: '==' where bitwise equal, else the relative error, for each output."""
    import torch
    out = []
    for case, tensors in ref.items():
        cells = []
        for n, a, b in zip(OUTPUTS, tensors, got[case]):
            a, b = a.double(), b.double()
            cells.append(f"{n}:" + ("==" if torch.equal(a, b) else f"{((a - b).norm() / a.norm()).item():.1e}"))
        out.append(f"{tag} vs {base} {case}: " + " ".join(cells))
    return out


def compare(out: str, base: str, tags: list[str], log: str) -> None:
    import torch
    path = os.path.join(out, f"{base}.pt")
    if not os.path.exists(path):
        print(f"attention_ab.py: no outputs of the base version {base} in {out}: its runs failed (see {log})",
              file=sys.stderr)
        raise SystemExit(2)
    ref = torch.load(path)
    for tag in tags:
        path = os.path.join(out, f"{tag}.pt")
        if not os.path.exists(path):
            print(f"{tag}: no outputs (its run failed)")
            continue
        print("\n".join(equality_lines(ref, torch.load(path), tag, base)))
    with open(log) as f:
        print(metric_table(rows_from_log(f)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("tag")
    r.add_argument("out")
    r.add_argument("--peers", action="store_true", help="also time cuDNN and flash SDPA on the full mask")
    c = sub.add_parser("compare")
    c.add_argument("out")
    c.add_argument("base")
    c.add_argument("tags", help="comma-separated")
    c.add_argument("log")
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.tag, args.out, args.peers)
    else:
        compare(args.out, args.base, args.tags.split(","), args.log)


if __name__ == "__main__":
    main()
