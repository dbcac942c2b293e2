"""The phased trainer: runs ``cfg.phases`` in order, resumable at any step.

Each phase trains one student with one objective (built by :mod:`.registry`), AdamW with warm-up,
gradient clipping and an EMA. Phase results (raw and EMA weights) are written to
``<output_dir>/phases/<name>/`` so later phases can start from them (``init_from``) or freeze them
as the teacher (``teacher_from``). Checkpoints (every ``train.checkpoint_every`` steps and at each
phase end) hold everything needed for a bitwise-exact resume on CPU: weights, EMA, optimizer,
objective state, RNG states and the data position.
"""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..config.run import PhaseConfig, RunConfig, to_yaml
from ..models import CausalWanModel, build_model
from . import checkpoint as ckpt
from .ema import EMA
from .logger import RunLogger
from .registry import build_objective, move_objective_modules
from .report import ReportContext, phase_report


class TrainingError(RuntimeError):
    pass


@dataclass
class PhaseResult:
    name: str
    steps: int
    final_loss: float
    skipped_steps: int
    metrics: dict = field(default_factory=dict)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


def _lr_lambda(warmup: int):
    return lambda step: 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)


class Trainer:
    def __init__(self, cfg: RunConfig, device: str | torch.device = "cpu", logger: RunLogger | None = None,
                 on_step=None):
        """``on_step(phase=, step=, student=, ema_model=, teacher=)`` runs after every optimizer step (e.g. to
        measure quality along training); it must leave the models and the RNG as it found them."""
        self.cfg = cfg
        self.on_step = on_step
        self.device = torch.device(device)
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.logger = logger or RunLogger(self.out, cfg.train.log_every)
        self.results: list[PhaseResult] = []

    @property
    def report_context(self) -> ReportContext:
        return ReportContext(self.cfg, self.out, self.device, self.logger.print, self.logger.scalars)

    # ------------------------------------------------------------------ models
    def new_model(self) -> CausalWanModel:
        model = build_model(self.cfg.model, self.cfg.causal).to(self.device)
        model.gradient_checkpointing = self.cfg.train.activation_checkpointing
        return model

    def phase_dir(self, name: str) -> Path:
        return self.out / "phases" / name

    def load_phase_weights(self, model: CausalWanModel, phase_name: str, which: str = "ema") -> CausalWanModel:
        path = self.phase_dir(phase_name) / f"{which}.safetensors"
        if not path.exists():
            raise TrainingError(f"phase '{phase_name}' has no {which} weights at {path}; run that phase first")
        model.load_state_dict(load_file(str(path)))
        return model

    def _init_student(self, phase: PhaseConfig, seed: int) -> CausalWanModel:
        torch.manual_seed(seed)
        model = self.new_model()
        if phase.init_from.startswith("diffusers:"):
            from ..convert.diffusers_wan import import_diffusers

            imported = import_diffusers(phase.init_from.split(":", 1)[1])
            model.load_state_dict(imported.state_dict(), strict=False)
        elif phase.init_from != "scratch":
            self.load_phase_weights(model, phase.init_from)
        return model

    def _frozen(self, phase_name: str) -> CausalWanModel:
        model = self.load_phase_weights(self.new_model(), phase_name)
        return model.eval().requires_grad_(False)

    # ------------------------------------------------------------------ data
    def make_data(self, phase: PhaseConfig, rank: int = 0, world_size: int = 1):
        from ..data import build_dataset

        batch_size = phase.batch_size or self.cfg.data.batch_size
        return build_dataset(self.cfg.data, batch_size=batch_size, rank=rank, world_size=world_size)

    def _to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    # ------------------------------------------------------------------ main loop
    def run(self) -> list[PhaseResult]:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(to_yaml(self.cfg))
        seed_everything(self.cfg.seed)
        resume = ckpt.load_latest(self.ckpt_root)
        start_phase, resume_state = 0, None
        if resume is not None:
            path, tensors, state = resume
            start_phase = state["phase_index"] + (1 if state.get("phase_done") else 0)
            resume_state = None if state.get("phase_done") else (tensors, state)
            self.results = [PhaseResult(**r) for r in state.get("results", [])]
            self.logger.print(f"resuming from {path} (phase {start_phase}, step {state['phase_step']})")
        for index in range(start_phase, len(self.cfg.phases)):
            self.run_phase(index, resume_state if index == start_phase else None)
        self.logger.close()
        return self.results

    def run_phase(self, index: int, resume_state=None) -> PhaseResult:
        cfg, phase = self.cfg, self.cfg.phases[index]
        seed = self.cfg.seed + 1000 * index
        student = self._init_student(phase, seed)
        teacher = self._frozen(phase.teacher_from) if phase.teacher_from else None
        objective = build_objective(phase, cfg, student=student, teacher=teacher, trainer=self)
        move_objective_modules(objective, self.device)
        # objectives may train small modules of their own with the student (e.g. sCM's adaptive weight)
        extra_params = list(getattr(objective, "trainable_parameters", lambda: [])())
        params = [p for p in student.parameters() if p.requires_grad] + extra_params
        o = phase.optim
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(o.warmup_steps))
        ema = EMA(student, phase.ema_decay)
        data = self.make_data(phase)
        step, bad, skipped, last_loss = 0, 0, 0, float("nan")
        torch.manual_seed(seed + 1)
        if resume_state is not None:
            tensors, state = resume_state
            student.load_state_dict(tensors["student"])
            ema.load_state_dict(tensors["ema"])
            with torch.no_grad():
                for i, p in enumerate(extra_params):
                    p.copy_(tensors["objective"][f"param_{i}"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if hasattr(objective, "load_extra_state") and "objective_extra" in state:
                objective.load_extra_state(state["objective_extra"])
            data.load_state_dict(state["data"])
            step, skipped, last_loss = state["phase_step"], state["skipped"], state["last_loss"]
            _set_rng_state(state["rng"])

        def save(at_step: int, phase_done: bool = False) -> None:
            groups = {"student": student.state_dict(), "ema": ema.state_dict()}
            if extra_params:
                groups["objective"] = {f"param_{i}": p for i, p in enumerate(extra_params)}
            state = {"phase_index": index, "phase_step": at_step, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "data": data.state_dict(), "rng": _rng_state(),
                     "skipped": skipped, "last_loss": last_loss, "phase_done": phase_done,
                     "results": [r.__dict__ for r in self.results]}
            if hasattr(objective, "extra_state"):
                state["objective_extra"] = objective.extra_state()
            ckpt.save_checkpoint(self.ckpt_root, self._global_step(index, at_step), groups, state,
                                 keep=cfg.train.keep_checkpoints)

        self.logger.start_phase(phase.name, phase.steps, step)
        student.train()
        data_iter = iter(data)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.train.precision == "bf16"
                    else contextlib.nullcontext())
        batch_size = phase.batch_size or cfg.data.batch_size
        while step < phase.steps:
            batch = self._to_device(next(data_iter))
            with autocast:
                loss, metrics = objective.loss(student, batch, step)
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                bad, skipped = bad + 1, skipped + 1
                self.logger.print(f"[{phase.name}] step {step}: non-finite loss ({loss.item()}), step skipped "
                                  f"({bad}/{cfg.train.max_bad_steps} in a row)")
                if bad >= cfg.train.max_bad_steps:
                    raise TrainingError(
                        f"phase '{phase.name}' stopped: {bad} consecutive non-finite losses at step {step}. "
                        f"Lower phases.{index}.optim.lr, enable train.precision=fp32, or check the data.")
                step += 1
                continue
            bad = 0
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip > 0 else math.inf)
            optimizer.step()
            scheduler.step()
            ema.update(student)
            if hasattr(objective, "after_student_step"):
                metrics.update(objective.after_student_step(student, batch, step) or {})
            step += 1
            last_loss = float(loss.detach())
            metrics = {"loss": last_loss, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0], **metrics}
            self.logger.step(self._global_step(index, step), step, metrics, batch_size)
            if self.on_step is not None:
                self.on_step(phase=phase, step=step, student=student, ema_model=ema.model, teacher=teacher)
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < phase.steps:
                save(step)
        self.logger.end_phase()
        self._write_phase_outputs(phase.name, student, ema)
        result = PhaseResult(phase.name, step, last_loss, skipped)
        result.metrics.update(phase_report(self.report_context, phase, ema.model, teacher) or {})
        self.results.append(result)
        save(step, phase_done=True)
        return result

    def _global_step(self, index: int, step: int) -> int:
        return sum(p.steps for p in self.cfg.phases[:index]) + step

    def _write_phase_outputs(self, name: str, student, ema: EMA) -> None:
        d = self.phase_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        for which, sd in (("model", student.state_dict()), ("ema", ema.state_dict())):
            tmp = d / f".{which}.tmp.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp))
            tmp.replace(d / f"{which}.safetensors")
