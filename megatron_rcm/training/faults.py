"""Deliberate failures for fault-tolerance tests: ``MEGATRON_RCM_FAIL_AT=<point>:<step>:<rank>[,...]``.

Why an env var: the processes to break are started by torchrun, so the only channel into them is the
environment, and torchrun passes it unchanged to every restart. The k-th comma-separated entry fires
in attempt k only (``TORCHELASTIC_RESTART_COUNT`` = k), so each restarted group gets past the failure
before it, and the attempt after the last entry runs through. ``point`` is ``step`` (after that
optimizer step) or ``save`` (midway through writing that step's checkpoint: after this rank's files,
before the commit); the process leaves with ``os._exit(17)``: no clean-up, no flush, like a crashed node.
"""
from __future__ import annotations

import os

ENV = "MEGATRON_RCM_FAIL_AT"
EXIT_CODE = 17


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def parse_fail_at(value: str) -> list[tuple[str, int, int]]:
    """The (point, step, rank) of each attempt, in order."""
    out = []
    for entry in value.split(","):
        parts = entry.strip().split(":")
        if len(parts) != 3 or parts[0] not in ("step", "save") or not parts[1].isdigit() or not parts[2].isdigit():
            raise ValueError(f"{ENV}={value!r}: expected <step|save>:<step>:<rank>[,...], e.g. step:3:1,save:4:1")
        out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


def maybe_fail(point: str, step: int) -> None:
    """Exit this process now if this attempt's entry of ``MEGATRON_RCM_FAIL_AT`` names this point, step and rank."""
    value = os.environ.get(ENV)
    if not value:
        return
    plan, attempt = parse_fail_at(value), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if attempt < len(plan) and plan[attempt] == (point, step, _rank()):
        print(f"[faults] rank {_rank()}: deliberate failure at {point} {step} ({ENV})", flush=True)
        os._exit(EXIT_CODE)
