"""Where does the GPU wait for the host? Idle time of one profiled step, charged to what the host was doing.

    trace = profile_to_trace(prof)          # a torch.profiler run with CPU + CUDA activities
    print(idle_table(trace))

A step is host-bound where the GPU has no kernel to run. Kernel time alone cannot show that (the eighth session
found 6.55 s of kernels in a 13.1 s profiled step). This module takes a Chrome trace (``prof.export_chrome_trace``),
merges every kernel, copy and memset into busy intervals, and charges each idle interval between them to the
innermost ``record_function`` label that the host was inside at that moment (``train_step.py --gaps`` labels each
network call, the backward, the optimizer and the critic's step). Host-device synchronisations (``cuda*Synchronize``
calls) are counted beside: each drains the queue, so the GPU then idles until the host is ahead again.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict

_GPU_CATS = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})


def profile_to_trace(prof) -> dict:
    """The profiler's Chrome trace as a dict (written to a temporary file and read back)."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)
    finally:
        os.unlink(path)


def busy_intervals(trace: dict) -> list[tuple[float, float]]:
    """Union of the GPU's work intervals (µs), sorted and disjoint."""
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0.0)) for e in trace["traceEvents"]
                   if e.get("ph") == "X" and e.get("cat") in _GPU_CATS)
    merged: list[list[float]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _labels(trace: dict) -> list[tuple[float, float, int, str]]:
    """(start, end, depth, name) of the host's ``record_function`` ranges; depth counts enclosing ranges of the
    same thread, so the innermost one wins."""
    by_thread = defaultdict(list)
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e.get("cat") == "user_annotation":
            by_thread[e.get("tid")].append((e["ts"], e["ts"] + e.get("dur", 0.0), e["name"]))
    out = []
    for spans in by_thread.values():
        spans.sort(key=lambda s: (s[0], -s[1]))
        stack: list[float] = []
        for a, b, name in spans:
            while stack and stack[-1] <= a:
                stack.pop()
            out.append((a, b, len(stack), name))
            stack.append(b)
    return out


def idle_by_label(trace: dict, labels=None) -> tuple[dict[str, float], float, float]:
    """(idle µs per innermost host label, busy µs, span µs) between the first and the last GPU work of the trace.
    Idle time under no label is charged to ``(unlabelled)``. ``labels``: :func:`_labels` of the trace if known."""
    busy = busy_intervals(trace)
    if not busy:
        return {}, 0.0, 0.0
    gaps = [(a[1], b[0]) for a, b in zip(busy, busy[1:]) if b[0] > a[1]]
    labels = sorted(_labels(trace) if labels is None else labels, key=lambda s: -s[2])  # innermost first
    idle: dict[str, float] = defaultdict(float)
    for g0, g1 in gaps:
        free = [(g0, g1)]  # the parts of this gap not yet charged
        for a, b, _, name in labels:
            if b <= g0 or a >= g1 or not free:
                continue
            rest = []
            for f0, f1 in free:
                lo, hi = max(f0, a), min(f1, b)
                if lo >= hi:
                    rest.append((f0, f1))
                    continue
                idle[name] += hi - lo
                rest += [(f0, lo)] * (lo > f0) + [(hi, f1)] * (f1 > hi)
            free = rest
        for f0, f1 in free:
            idle["(unlabelled)"] += f1 - f0
    busy_us = sum(b - a for a, b in busy)
    return dict(idle), busy_us, busy[-1][1] - busy[0][0]


def sync_calls(trace: dict) -> tuple[int, float]:
    """(count, total µs) of the host's ``cuda*Synchronize`` runtime calls."""
    syncs = [e.get("dur", 0.0) for e in trace["traceEvents"]
             if e.get("ph") == "X" and e.get("cat") == "cuda_runtime" and "Synchronize" in e.get("name", "")]
    return len(syncs), sum(syncs)


def label_totals(trace: dict, labels=None) -> dict[str, tuple[int, float]]:
    """name -> (count, host µs) of the labels, for the share of each call kind."""
    out: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for a, b, _, name in _labels(trace) if labels is None else labels:
        out[name][0] += 1
        out[name][1] += b - a
    return {k: (n, t) for k, (n, t) in out.items()}


def idle_table(trace: dict, top: int = 12) -> str:
    """A short markdown table: the GPU's busy and idle share of the step, then the labels that held the most
    idle time, with their host time beside."""
    labels = _labels(trace)  # once: a step's trace holds ~10^5 events
    idle, busy, span = idle_by_label(trace, labels)
    n_sync, t_sync = sync_calls(trace)
    totals = label_totals(trace, labels)
    total_idle = span - busy
    out = [f"GPU busy {busy / 1e3:.1f} ms of {span / 1e3:.1f} ms ({100 * busy / max(span, 1e-9):.1f}%), idle "
           f"{total_idle / 1e3:.1f} ms; {n_sync} host syncs ({t_sync / 1e3:.1f} ms in them)",
           "| host was in | calls | host ms | GPU idle ms | share of idle |", "|---|---|---|---|---|"]
    for name, t in sorted(idle.items(), key=lambda kv: -kv[1])[:top]:
        n, host = totals.get(name, (0, 0.0))
        out.append(f"| {name} | {n or '-'} | {host / 1e3:.1f} | {t / 1e3:.1f} | "
                   f"{100 * t / max(total_idle, 1e-9):.1f}% |")
    return "\n".join(out)
