"""Progress and metrics: a progress bar on a TTY, plain log lines otherwise, TensorBoard scalars."""
from __future__ import annotations

import sys
import time
from pathlib import Path


class RunLogger:
    def __init__(self, log_dir: str | Path, log_every: int = 10, tensorboard: bool = True, stream=None):
        self.stream = stream or sys.stdout
        self.log_every = max(1, log_every)
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(log_dir) / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.writer = None
        self._bar = None
        self._t0 = time.perf_counter()
        self._last = (self._t0, 0)

    def start_phase(self, name: str, total: int, start: int = 0) -> None:
        self.phase = name
        self._last = (time.perf_counter(), start)
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, desc=name, file=self.stream, dynamic_ncols=True)
        else:
            self.print(f"[{name}] steps {start} -> {total}")

    def step(self, global_step: int, phase_step: int, metrics: dict[str, float], samples_per_step: int) -> None:
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"{self.phase}/{k}", v, global_step)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in list(metrics.items())[:4]})
        elif phase_step % self.log_every == 0:
            now = time.perf_counter()
            t_prev, s_prev = self._last
            rate = (phase_step - s_prev) * samples_per_step / max(now - t_prev, 1e-9)
            self._last = (now, phase_step)
            body = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            self.print(f"[{self.phase}] step {phase_step} {body} samples/s={rate:.1f}")

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
        if self.writer is not None:
            self.writer.close()
