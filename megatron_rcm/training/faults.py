"""Deliberate failures for fault-tolerance tests: ``MEGATRON_RCM_FAIL_AT=<point>:<step>:<rank>``.

Why an env var: the processes to break are started by torchrun, so the only channel into them is the
environment, and torchrun passes it unchanged to every restart. The failure fires only in the first
attempt (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so the restarted group runs through. ``point``
is ``step`` (after that optimizer step) or ``save`` (midway through writing that step's checkpoint);
the process leaves with ``os._exit(17)``: no clean-up, no flush, like a crashed node.
"""
from __future__ import annotations

import os

ENV = "MEGATRON_RCM_FAIL_AT"
EXIT_CODE = 17


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def parse_fail_at(value: str) -> tuple[str, int, int]:
    parts = value.split(":")
    if len(parts) != 3 or parts[0] not in ("step", "save") or not parts[1].isdigit() or not parts[2].isdigit():
        raise ValueError(f"{ENV}={value!r}: expected <step|save>:<step>:<rank>, e.g. save:4:1")
    return parts[0], int(parts[1]), int(parts[2])


def maybe_fail(point: str, step: int) -> None:
    """Exit this process now if ``MEGATRON_RCM_FAIL_AT`` names this point, step and rank (first attempt only)."""
    value = os.environ.get(ENV)
    if not value or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:
        return
    if parse_fail_at(value) == (point, step, _rank()):
        print(f"[faults] rank {_rank()}: deliberate failure at {point} {step} ({ENV})", flush=True)
        os._exit(EXIT_CODE)
