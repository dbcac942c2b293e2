"""Progress and metrics: a progress bar on a TTY, plain log lines otherwise, TensorBoard scalars.

The TensorBoard writer is created at the first scalar, so a trainer that is refused before any work
(a busy or unresumable run folder) leaves no event file behind.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path


def format_duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s: compact and readable at any scale."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class RunLogger:
    def __init__(self, log_dir: str | Path, log_every: int = 10, tensorboard: bool = True, stream=None):
        self.stream = stream or sys.stdout
        self.log_every = max(1, log_every)
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log_dir = Path(log_dir)
        self._tensorboard = tensorboard
        self._writer = None
        self._bar = None
        self._t0 = time.perf_counter()
        self._last = (self._t0, 0)
        self._phase_start = (self._t0, 0)
        self.total = 0

    @property
    def writer(self):
        """The SummaryWriter (None when tensorboard is off or not installed), made on first use."""
        if self._writer is None and self._tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.log_dir / "tensorboard"))
            except Exception:  # tensorboard is optional
                self._tensorboard = False
        return self._writer

    def start_phase(self, name: str, total: int, start: int = 0) -> None:
        self.phase, self.total = name, total
        self._last = self._phase_start = (time.perf_counter(), start)
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, desc=name, file=self.stream, dynamic_ncols=True)
        else:
            self.print(f"[{name}] steps {start} -> {total}")

    def eta(self, phase_step: int) -> float:
        """Seconds left in the phase at the mean step time since it (re)started."""
        t0, s0 = self._phase_start
        done = phase_step - s0
        return (time.perf_counter() - t0) / done * (self.total - phase_step) if done > 0 else float("nan")

    def step(self, global_step: int, phase_step: int, metrics: dict[str, float], samples_per_step: int) -> None:
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"{self.phase}/{k}", v, global_step)
        if self._bar is not None:  # tqdm shows the rate and the time left itself
            self._bar.update(1)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in list(metrics.items())[:4]})
        elif phase_step % self.log_every == 0 or phase_step == self.total:
            now = time.perf_counter()
            t_prev, s_prev = self._last
            rate = (phase_step - s_prev) * samples_per_step / max(now - t_prev, 1e-9)
            self._last = (now, phase_step)
            body = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            self.print(f"[{self.phase}] step {phase_step}/{self.total} {body} samples/s={rate:.1f} "
                       f"eta {format_duration(self.eta(phase_step))}")

    def end_phase(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def scalars(self, tag: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{tag}/{k}", v, step)

    def print(self, msg: str) -> None:
        print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        self.end_phase()
        if self._writer is not None:
            self._writer.close()
