"""The phased trainer: runs ``cfg.phases`` in order, resumable at any step.

Each phase trains one student with one objective (built by :mod:`.registry`), AdamW with warm-up,
gradient clipping and an EMA. Phase results (raw and EMA weights) are written to
``<output_dir>/phases/<name>/`` so later phases can start from them (``init_from``) or freeze them
as the teacher (``teacher_from``). Checkpoints (every ``train.checkpoint_every`` steps and at each
phase end) hold everything needed for a bitwise-exact resume on CPU: weights, EMA, optimizer,
objective state, RNG states and the data position.

Before any work the trainer checks the data (:mod:`..data.checks`), locks the run folder (one trainer
per folder, :mod:`.run_lock`) and decides where to start (:mod:`.resume`: the newest checkpoint that
verifies, the finished phases' weights, or a clear refusal), rank 0 deciding for every rank.

Under torchrun (``WORLD_SIZE > 1``) the same loop runs on every rank with the layout of
``cfg.parallel`` (see :mod:`.distributed` for the batch split, the RNG rule and what rank 0 does).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..config.run import PhaseConfig, RunConfig
from ..data.checks import check_data
from ..models import CausalWanModel, build_model
from ..network import Denoiser, StepContext, TrainedSideModel
from ..objectives import PhaseModels
from ..ops import fusion
from ..utils.files import save_safetensors
from . import dist_checkpoint as dck
from .distributed import TrainerParallel
from .ema import EMA
from .faults import maybe_fail
from .checkpoint import checkpoint_name as ckpt_name
from .checkpoint import remove_stale_temporaries
from .logger import RunLogger
from .phase_checkpoint import PhaseObjects, load_phase, save_phase
from .registry import build_objective
from .report import ReportContext, phase_report
from .resume import StartPlan, carry_out, effective_mode, mark_reported, plan_start, read_done, write_done
from .run_lock import RunLock


class TrainingError(RuntimeError):
    pass


@dataclass
class PhaseResult:
    name: str
    steps: int
    final_loss: float
    skipped_steps: int
    metrics: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


def _lr_lambda(warmup: int):
    return lambda step: 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)


class Trainer:
    def __init__(self, cfg: RunConfig, device: str | torch.device = "cpu", logger: RunLogger | None = None,
                 parallel: TrainerParallel | None = None, on_step=None, start: str = "auto"):
        """``on_step(phase=, step=, student=, ema_model=, teacher=)`` runs after every optimizer step (e.g. to
        measure quality along training); it must leave the models and the RNG as it found them.
        ``start``: ``auto`` | ``restart`` | ``finished_phases``, what to do with an existing run folder
        (:mod:`.resume`; the ``train`` flags ``--restart`` / ``--from-finished-phases``)."""
        self.cfg = cfg
        self.on_step = on_step
        self.start_mode = start
        self._lock: RunLock | None = None
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
    def new_model(self, model_cfg=None) -> CausalWanModel:
        """A model of the run's architecture (or ``model_cfg``'s: a diffusers teacher of its own size)."""
        model = build_model(model_cfg or self.cfg.model, self.cfg.causal).to(self.device)
        model.gradient_checkpointing = self.cfg.train.activation_checkpointing
        model.checkpoint_layers = self.cfg.train.checkpoint_layers
        model.keep_attention = self.cfg.train.checkpoint_keep_attention
        fusion.set_enabled(self.cfg.train.compile_elementwise, min_elements=self.cfg.train.compile_min_elements,
                           guards=self.cfg.train.compile_guards)
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
            from ..convert.into_run import load_diffusers_into

            load_diffusers_into(model, phase.init_from, self._phase_key(phase, "init_from"))
        elif phase.init_from != "scratch":
            self.load_phase_weights(model, phase.init_from)
        return model

    def teacher_config(self, source: str):
        """The architecture of the frozen teacher ``source``: an earlier phase's is the run's model; a
        ``diffusers:DIR`` teacher keeps its folder's (wider / deeper than the student is fine)."""
        if not source.startswith("diffusers:"):
            return self.cfg.model
        from ..convert.into_run import teacher_model_config

        return teacher_model_config(source, self.cfg.model, self._teacher_key(source))

    def _teacher_key(self, source: str) -> str:
        return next((self._phase_key(p, "teacher_from") for p in self.cfg.phases if p.teacher_from == source),
                    "teacher_from")

    def _frozen(self, source: str) -> CausalWanModel:
        """The frozen teacher: an earlier phase's EMA weights, or a diffusers transformer (``diffusers:DIR``)."""
        model = self.new_model(self.teacher_config(source))
        if source.startswith("diffusers:"):
            from ..convert.into_run import load_diffusers_into

            model = load_diffusers_into(model, source, self._teacher_key(source))
        else:
            model = self.load_phase_weights(model, source)
        return model.eval().requires_grad_(False)

    def _new_critic(self, phase: PhaseConfig, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0,
                    grad_clip: float = 0.0) -> TrainedSideModel:
        """A trainable copy of the phase's teacher (DMD's fake score), sharded like the student, with an
        optimizer of the run's layout (ZeRO-1 over data x context ranks when distributed)."""
        par = self.par
        model = par.wrap(self._frozen(phase.teacher_from).train().requires_grad_(True), "critic")
        opt = par.optimizers([p for p in model.parameters() if p.requires_grad], [], lr=lr, betas=tuple(betas),
                             weight_decay=weight_decay)[0]
        return TrainedSideModel(model, opt, grad_clip, backward=par.side_backward, sync_and_clip=par.sync_and_clip)

    def _phase_key(self, phase: PhaseConfig, ref: str) -> str:
        return f"phases.{self.cfg.phases.index(phase)}.{ref}"

    def check_diffusers_sources(self) -> None:
        """Before any work: every diffusers folder that an unfinished phase reads fits the run (finished phases
        are recognised by their done.json, so a resume does not need folders they used): an ``init_from``
        folder matches the run's model, a ``teacher_from`` folder shares what a teacher exchanges with the
        student, and its own architecture splits under the run's layout."""
        from ..convert.into_run import check_diffusers_source
        from ..parallel.config import validate_teacher_layout

        for phase in self.cfg.phases:
            if read_done(self.phase_dir(phase.name)) is not None:
                continue
            if phase.init_from.startswith("diffusers:"):
                check_diffusers_source(phase.init_from, self.cfg.model, self._phase_key(phase, "init_from"))
            if phase.teacher_from.startswith("diffusers:"):
                teacher = self.teacher_config(phase.teacher_from)
                if self.par.groups is not None:
                    validate_teacher_layout(self.par.groups.cfg, teacher, self._phase_key(phase, "teacher_from"))

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
        plan = self._open_run_folder()
        try:
            seed_everything(self.cfg.seed)
            self.results = [PhaseResult(**r) for r in plan.results]
            for index in plan.pending_reports:
                self._report_finished_phase(index)
            for index in range(plan.start_phase, len(self.cfg.phases)):
                self.run_phase(index, Path(plan.checkpoint) if plan.checkpoint and index == plan.start_phase else None)
            dck.wait_for_pending_save()  # flush point of asynchronous checkpoints
        finally:
            self._close_run_folder()
        self.logger.close()
        self.par.close()
        return self.results

    # ------------------------------------------------------------------ the run folder
    def _open_run_folder(self) -> StartPlan:
        """Check the data, lock the folder and decide where to start (:mod:`.resume`), all before any work;
        rank 0 decides, the other ranks follow its verdict (a refusal ends every rank with exit code 2)."""
        log = self.logger.print

        def claim():
            self.check_diffusers_sources()
            check_data(self.cfg)
            self._lock = RunLock(self.out).acquire(log=log)
            stale = remove_stale_temporaries(self.ckpt_root)  # saves cut short by a crash: never checkpoints
            if stale:
                log(f"[checkpoint] removed the temporary folders of {len(stale)} save(s) cut short: {', '.join(stale)}")

        self.par.agree(claim)
        try:
            mode = effective_mode(self.start_mode, log=log)
            bad: list[str] = []
            found = dck.choose_checkpoint(self.ckpt_root, bad=bad) if mode == "auto" else None  # collective

            def decide() -> StartPlan:
                state = dck.read_shared_state(found) if found is not None else None
                plan = plan_start(self.cfg, self.out, mode, found, state, bad)
                carry_out(self.out, plan, log=log)
                return plan

            return self.par.agree(decide)
        except BaseException:
            self._close_run_folder()
            raise

    def _close_run_folder(self) -> None:
        if self._lock is None:
            return
        if not self.par.distributed:  # a background save must not outlive the lock (peers may be gone: skip)
            with contextlib.suppress(Exception):
                dck.wait_for_pending_save()
        self._lock.release()
        self._lock = None

    def _mark_finished(self, index: int, result: PhaseResult, reported: bool = False) -> None:
        """``phases/<name>/done.json`` (rank 0): after the weights (the phase counts as finished), then after
        the end-of-phase report (its outcome)."""
        if not self.par.is_main:
            return
        d = self.phase_dir(result.name)
        if not reported:
            write_done(d, index, dict(result.__dict__), "pending" if self.cfg.eval.at_phase_end else "skipped")
        else:
            mark_reported(d, result.metrics, "done" if self.cfg.eval.at_phase_end else "skipped")

    def _report_finished_phase(self, index: int) -> None:
        """The end-of-phase report of a phase whose training finished before the last stop."""
        phase = self.cfg.phases[index]
        self.logger.print(f"[{phase.name}] training had finished; running its end-of-phase report")
        if self.par.distributed:  # rank 0 loads full models itself
            ema_model = teacher = None
        else:
            ema_model = self._frozen(phase.name)
            teacher = self._frozen(phase.teacher_from) if phase.teacher_from else None
        result = self.results[index]
        result.metrics.update(self._phase_report(phase, ema_model, teacher) or {})
        self._mark_finished(index, result, reported=True)

    # ------------------------------------------------------------------ checkpoint hooks
    # The only places that touch checkpoint files: sharded checkpoints (training/dist_checkpoint.py,
    # contents in training/phase_checkpoint.py) for any number of processes; a checkpoint written
    # under one parallel layout resumes under any other (tp/cp/pp/dp, one process).
    def save_checkpoint(self, step: int, objs: PhaseObjects, scalars: dict) -> None:
        t0 = time.perf_counter()
        saved = save_phase(self.ckpt_root, step, objs, scalars, groups=self.par.groups, model_config=self.cfg.model,
                           keep=self.cfg.train.keep_checkpoints, async_save=self.cfg.train.async_checkpoint)
        name = self.ckpt_root / ckpt_name(step)
        if isinstance(saved, dck.PendingSave):
            self.logger.print(f"[checkpoint] writing {name} in the background")
        else:
            self.logger.print(f"[checkpoint] saved {name} ({time.perf_counter() - t0:.1f} s)")

    def load_checkpoint(self, path: Path, objs: PhaseObjects) -> dict:
        return load_phase(path, objs, groups=self.par.groups, log=self.logger.print)

    def run_phase(self, index: int, resume_path: Path | None = None) -> PhaseResult:
        cfg, phase = self.cfg, self.cfg.phases[index]
        seed = self.cfg.seed + 1000 * index
        par = self.par
        # full models first, identical on every rank; the EMA copy BEFORE sharding (sharded models do not copy)
        student = self._init_student(phase, seed)
        ema_model = copy.deepcopy(student)
        teacher = self._frozen(phase.teacher_from) if phase.teacher_from else None
        student, ema_model = par.wrap(student, "student"), par.wrap(ema_model, "ema")
        teacher = None if teacher is None else par.wrap(teacher, "teacher")
        student_net = Denoiser(student)
        models = PhaseModels(None if teacher is None else Denoiser(teacher),
                             new_critic=lambda **optim: self._new_critic(phase, **optim))
        objective = build_objective(phase, models)
        side = objective.side_modules()  # small modules trained with the student (e.g. sCM's adaptive weight)
        for module in side:
            module.to(self.device)
        extra_params = [p for m in side for p in m.parameters() if p.requires_grad]
        o = phase.optim
        optimizers = par.optimizers([p for p in student.parameters() if p.requires_grad], extra_params,
                                    lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(o.warmup_steps)) for opt in optimizers]
        ema = EMA(ema_model, phase.ema_decay, copy_model=False)
        data = self.make_data(phase)
        step, bad, skipped, last_loss = 0, 0, 0, float("nan")
        torch.manual_seed(seed + 1)
        objs = PhaseObjects(student, ema, extra_params, optimizers, schedulers, objective, data)
        if resume_path is not None:
            state = self.load_checkpoint(resume_path, objs)
            step, skipped, last_loss = state["phase_step"], state["skipped"], state["last_loss"]

        def save(at_step: int, phase_done: bool = False) -> None:
            scalars = {"phase_index": index, "phase_step": at_step, "skipped": skipped, "last_loss": last_loss,
                       "phase_done": phase_done, "results": [r.__dict__ for r in self.results]}
            self.save_checkpoint(self._global_step(index, at_step), objs, scalars)

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
                with autocast:
                    loss, metrics = objective.loss(student_net, batch, StepContext(step, par.batch_noise()))
            else:  # micro-batches (GPipe under pipeline parallelism): forward AND backward happen here
                with autocast:
                    loss, metrics = par.accumulate_step(objective, student_net, batch, step, cfg.train.grad_accum)
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
            with autocast:  # the critic's step computes in the precision of the student's (bf16: half the memory)
                metrics.update(objective.after_step(student_net, batch, StepContext(step, par.batch_noise())) or {})
            step += 1
            last_loss = mean_loss
            metrics = {"loss": last_loss, "grad_norm": float(grad_norm), "lr": schedulers[0].get_last_lr()[0],
                       **metrics}
            self.logger.step(self._global_step(index, step), step, metrics, batch_size)
            if self.on_step is not None:
                self.on_step(phase=phase, step=step, student=student, ema_model=ema.model, teacher=teacher)
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < phase.steps:
                save(step)
            maybe_fail("step", self._global_step(index, step))  # fault-tolerance tests (MEGATRON_RCM_FAIL_AT)
        self.logger.end_phase()
        self._write_phase_outputs(phase.name, student, ema)
        result = PhaseResult(phase.name, step, last_loss, skipped)
        self._mark_finished(index, result)  # done.json: the weights are final
        result.metrics.update(self._phase_report(phase, ema.model, teacher) or {})
        self._mark_finished(index, result, reported=True)
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
            save_safetensors({k: v.detach().contiguous().cpu() for k, v in sd.items()}, tmp)
            tmp.replace(d / f"{which}.safetensors")
        self.par.barrier()
