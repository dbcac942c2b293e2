"""The phased trainer: runs ``cfg.phases`` in order, resumable at any step.

Each phase trains one student with one objective (built by :mod:`.registry`), AdamW with warm-up,
gradient clipping and an EMA. Phase results (raw and EMA weights) are written to
``<output_dir>/phases/<name>/`` so later phases can start from them (``init_from``) or freeze them
as the teacher (``teacher_from``). Checkpoints (every ``train.checkpoint_every`` steps and at each
phase end) hold everything needed for a bitwise-exact resume on CPU: weights, EMA, optimizer,
objective state, RNG states and the data position.

Under torchrun (``WORLD_SIZE > 1``) the same loop runs on every rank with the layout of
``cfg.parallel`` (see :mod:`.distributed` for the batch split, the RNG rule and what rank 0 does).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..config.run import PhaseConfig, RunConfig, to_yaml
from ..models import CausalWanModel, build_model
from . import checkpoint as ckpt
from .distributed import TrainerParallel
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
                 parallel: TrainerParallel | None = None, on_step=None):
        """``on_step(phase=, step=, student=, ema_model=, teacher=)`` runs after every optimizer step (e.g. to
        measure quality along training); it must leave the models and the RNG as it found them."""
        self.cfg = cfg
        self.on_step = on_step
        self.device = torch.device(device)
        self.par = parallel or TrainerParallel.from_env(cfg, self.device)
        if self.par.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (LOCAL_RANK)
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        if logger is None:  # only rank 0 talks; the others log into the void
            logger = (RunLogger(self.out, cfg.train.log_every) if self.par.is_main else
                      RunLogger(self.out, cfg.train.log_every, tensorboard=False, stream=open(os.devnull, "w")))
        self.logger = logger
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
    def make_data(self, phase: PhaseConfig):
        """This data-parallel rank's share of the phase's GLOBAL batch (rows r*b .. (r+1)*b - 1 of it)."""
        from ..data import build_dataset

        index = self.cfg.phases.index(phase)
        key = f"phases.{index}.batch_size" if phase.batch_size else "data.batch_size"
        local = self.par.local_batch_size(phase.batch_size or self.cfg.data.batch_size, key)
        return build_dataset(self.cfg.data, batch_size=local, rank=self.par.dp_rank, world_size=self.par.dp)

    def _to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    # ------------------------------------------------------------------ main loop
    def run(self) -> list[PhaseResult]:
        if self.par.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(to_yaml(self.cfg))
        self.par.barrier()
        seed_everything(self.cfg.seed)
        resume = self.load_checkpoint()
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
        self.par.close()
        return self.results

    # ------------------------------------------------------------------ checkpoint hooks
    # The only two places that touch checkpoint files. With several processes each rank writes its
    # own local state (its shards, its ZeRO-1 optimizer partition) under checkpoints/rank_NNNNN/ with
    # the single-process writer; resume needs the same layout. To be replaced by sharded,
    # layout-independent checkpoints (training/dist_checkpoint.py).
    def _ckpt_dir(self) -> Path:
        return self.ckpt_root if not self.par.distributed else self.ckpt_root / f"rank_{self.par.rank:05d}"

    def _layout(self) -> list[int]:
        g = self.par.groups
        return [1, 1, 1, 1] if g is None else [g.cfg.tp, g.cfg.cp, g.cfg.pp, g.cfg.dp]

    def save_checkpoint(self, step: int, tensors: dict, state: dict) -> None:
        state = {**state, "parallel_layout": self._layout()} if self.par.distributed else state
        ckpt.save_checkpoint(self._ckpt_dir(), step, tensors, state, keep=self.cfg.train.keep_checkpoints)
        self.par.barrier()

    def load_checkpoint(self):
        other = (ckpt.list_checkpoints(self.ckpt_root) if self.par.distributed
                 else sorted(self.ckpt_root.glob("rank_*")))
        found = ckpt.load_latest(self._ckpt_dir())
        if found is None and other:
            kind = "single" if self.par.distributed else "multi"
            raise TrainingError(f"{self.ckpt_root} holds checkpoints of a {kind}-process run; resume it the same "
                                "way (or use a new output_dir)")
        if self.par.distributed:
            import torch.distributed as dist

            names = [None] * self.par.world_size
            dist.all_gather_object(names, None if found is None else found[0].name)
            if len(set(names)) > 1:
                raise TrainingError(f"ranks found different latest checkpoints under {self.ckpt_root}/rank_*: "
                                    f"{names}; resume with the number of processes and parallel.* settings that "
                                    "wrote them, or remove the newer ones so all ranks resume from the same step")
            if found is not None and found[2].get("parallel_layout") != self._layout():
                raise TrainingError(f"checkpoint {found[0]} was written with parallel (tp, cp, pp, dp) = "
                                    f"{tuple(found[2].get('parallel_layout') or ())}, this run has "
                                    f"{tuple(self._layout())}: resume with the same parallel.* settings")
        return found

    def run_phase(self, index: int, resume_state=None) -> PhaseResult:
        cfg, phase = self.cfg, self.cfg.phases[index]
        seed = self.cfg.seed + 1000 * index
        par = self.par
        # full models first, identical on every rank; copies (EMA, DMD critic) BEFORE sharding
        student = self._init_student(phase, seed)
        ema_model = copy.deepcopy(student)
        teacher = self._frozen(phase.teacher_from) if phase.teacher_from else None
        critic = copy.deepcopy(teacher) if teacher is not None and phase.objective in ("dmd", "rcm") else None
        student, ema_model = par.wrap(student), par.wrap(ema_model)
        teacher = None if teacher is None else par.wrap(teacher)
        critic = None if critic is None else par.wrap(critic)
        objective = build_objective(phase, cfg, student=student, teacher=teacher, trainer=self, critic=critic)
        dmd = objective if hasattr(objective, "critic_step") else getattr(objective, "dmd", None)
        if dmd is not None and par.distributed:
            dmd.sync_and_clip = par.sync_and_clip
        move_objective_modules(objective, self.device)
        # objectives may train small modules of their own with the student (e.g. sCM's adaptive weight)
        extra_params = list(getattr(objective, "trainable_parameters", lambda: [])())
        o = phase.optim
        optimizers = par.optimizers([p for p in student.parameters() if p.requires_grad], extra_params,
                                    lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(o.warmup_steps)) for opt in optimizers]
        ema = EMA(ema_model, phase.ema_decay, copy_model=False)
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
            par.load_optimizer_states(optimizers, state["optimizer"])
            for scheduler in schedulers:
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
            state = {"phase_index": index, "phase_step": at_step, "optimizer": par.optimizer_states(optimizers),
                     "scheduler": schedulers[0].state_dict(), "data": data.state_dict(), "rng": _rng_state(),
                     "skipped": skipped, "last_loss": last_loss, "phase_done": phase_done,
                     "results": [r.__dict__ for r in self.results]}
            if hasattr(objective, "extra_state"):
                state["objective_extra"] = objective.extra_state()
            self.save_checkpoint(self._global_step(index, at_step), groups, state)

        self.logger.start_phase(phase.name, phase.steps, step)
        student.train()
        data_iter = iter(data)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.train.precision == "bf16"
                    else contextlib.nullcontext())
        batch_size = phase.batch_size or cfg.data.batch_size  # global
        while step < phase.steps:
            batch = self._to_device(next(data_iter))
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            direct = cfg.train.grad_accum == 1 and not par.pipelined
            if direct:
                with autocast, par.noise():
                    loss, metrics = objective.loss(student, batch, step)
            else:  # micro-batches (GPipe under pipeline parallelism): forward AND backward happen here
                with autocast:
                    loss, metrics = par.accumulate_step(objective, student, batch, step, cfg.train.grad_accum)
            mean_loss, finite = par.global_loss(loss)  # agreed by all ranks
            if not finite:
                bad, skipped = bad + 1, skipped + 1
                self.logger.print(f"[{phase.name}] step {step}: non-finite loss ({mean_loss}), step skipped "
                                  f"({bad}/{cfg.train.max_bad_steps} in a row)")
                if bad >= cfg.train.max_bad_steps:
                    raise TrainingError(
                        f"phase '{phase.name}' stopped: {bad} consecutive non-finite losses at step {step}. "
                        f"Lower phases.{index}.optim.lr, enable train.precision=fp32, or check the data.")
                step += 1
                continue
            bad = 0
            if direct:
                loss.backward()
            grad_norm = par.sync_and_clip(student, o.grad_clip if o.grad_clip > 0 else math.inf, extra_params)
            for opt, scheduler in zip(optimizers, schedulers):
                opt.step()
                scheduler.step()
            ema.update(student)  # sharded models: each rank averages its own shards
            if hasattr(objective, "after_student_step"):
                with par.noise():
                    metrics.update(objective.after_student_step(student, batch, step) or {})
            step += 1
            last_loss = mean_loss
            metrics = {"loss": last_loss, "grad_norm": float(grad_norm), "lr": schedulers[0].get_last_lr()[0],
                       **metrics}
            self.logger.step(self._global_step(index, step), step, metrics, batch_size)
            if self.on_step is not None:
                self.on_step(phase=phase, step=step, student=student, ema_model=ema.model, teacher=teacher)
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < phase.steps:
                save(step)
        self.logger.end_phase()
        self._write_phase_outputs(phase.name, student, ema)
        result = PhaseResult(phase.name, step, last_loss, skipped)
        result.metrics.update(self._phase_report(phase, ema.model, teacher) or {})
        self.results.append(result)
        save(step, phase_done=True)
        return result

    def _global_step(self, index: int, step: int) -> int:
        return sum(p.steps for p in self.cfg.phases[:index]) + step

    def _phase_report(self, phase: PhaseConfig, ema_model, teacher) -> dict:
        """Rank 0 evaluates full (unsharded) models; the other ranks wait."""
        if not self.cfg.eval.at_phase_end:
            return {}
        if not self.par.distributed:
            return phase_report(self.report_context, phase, ema_model, teacher)
        metrics: dict = {}
        if self.par.is_main:
            with torch.random.fork_rng():  # building models must not move the training RNG
                ema_full = self.load_phase_weights(self.new_model(), phase.name, "ema").eval().requires_grad_(False)
                teacher_full = self._frozen(phase.teacher_from) if phase.teacher_from else None
            metrics = phase_report(self.report_context, phase, ema_full, teacher_full) or {}
        self.par.barrier()
        return metrics

    def _write_phase_outputs(self, name: str, student, ema: EMA) -> None:
        """Full weights (gathered from tensor/pipeline shards) so later phases and eval are layout-free."""
        states = [("model", self.par.full_state_dict(student)), ("ema", self.par.full_state_dict(ema.model))]
        if not self.par.is_main:
            self.par.barrier()
            return
        d = self.phase_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        for which, sd in states:
            tmp = d / f".{which}.tmp.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp))
            tmp.replace(d / f"{which}.safetensors")
        self.par.barrier()
