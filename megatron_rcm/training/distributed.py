"""The trainer's view of a multi-process run: which rank does what, and the few collectives it needs.

One process (no torchrun) gets ``TrainerParallel.single()``: every method is the plain
single-process operation, so the trainer has one code path. Under torchrun (``WORLD_SIZE > 1``)
``from_env`` initialises the process groups for ``cfg.parallel`` (gloo on CPU, NCCL on CUDA).

Decisions (README "Parallelism"):
- batch: a phase's batch size is the GLOBAL batch; each data-parallel rank loads ``global / dp``
  samples, the rows ``[r * b, (r + 1) * b)`` of the single-process batch (``build_dataset`` with
  rank/world_size = dp rank/size); tensor/context-parallel peers load the same rows;
- RNG: every rank seeds identically (same model init), every objective draws its noise for the
  global batch and keeps its rows (:class:`megatron_rcm.network.BatchNoise`), so a DP run trains on
  exactly the single-process noise; ``train.grad_accum`` micro-batches rewind the RNG so they too
  see the whole batch's noise;
- rank 0 alone logs, writes phase outputs (full weights gathered from the shards) and runs the
  end-of-phase evaluation on full, unwrapped models; the others wait at a barrier;
- models: TP/CP/PP split for every model, then FSDP2 (``parallel.fsdp``) for student, EMA and critic
  and, unless ``parallel.fsdp_teacher: replicate``, the frozen teacher (:meth:`TrainerParallel.wrap`).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..config.errors import ConfigError, UsageError
from ..network import BatchNoise, StepContext


class TrainerParallel:
    def __init__(self, groups=None):
        self.groups = groups  # None = one process
        if groups is None:
            self.rank, self.world_size, self.dp_rank, self.dp = 0, 1, 0, 1
        else:
            import torch.distributed as dist

            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self.dp_rank, self.dp = groups.dp_rank, groups.cfg.dp

    @classmethod
    def single(cls) -> "TrainerParallel":
        return cls(None)

    @classmethod
    def from_env(cls, cfg, device: torch.device) -> "TrainerParallel":
        """Groups for ``cfg.parallel`` when started with ``WORLD_SIZE > 1`` (torchrun, ``megatron-rcm launch``;
        SLURM jobs start torchrun per node, see launch.py), else the single-process view."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls.single()
        from ..config.run import validate_run_parallel
        from ..parallel import initialize_parallel

        validate_run_parallel(cfg, world_size=world)  # ConfigError naming the key, before any group exists
        backend = "nccl" if device.type == "cuda" else "gloo"
        return cls(initialize_parallel(cfg.parallel, backend=backend))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.groups is not None

    # ---------------------------------------------------------------- models and data
    ROLES = ("student", "ema", "critic", "teacher")

    def wrap(self, model: nn.Module, role: str = "student") -> nn.Module:
        """Shard a full model in place for this rank (copy it BEFORE, e.g. for EMA: wrapped models do not deepcopy).

        TP/CP/PP split by ``parallelize_model``; then, with ``parallel.fsdp``, FSDP2 over the data x context
        ranks for every ``role`` (student, ema, critic), the frozen teacher unless ``parallel.fsdp_teacher`` is
        ``replicate``."""
        if role not in self.ROLES:
            raise ValueError(f"role must be one of {self.ROLES}, got {role!r}")
        if self.groups is None:
            return model
        from ..parallel import parallelize_model

        model = parallelize_model(model, self.groups)
        if self.fsdp and (role != "teacher" or self.groups.cfg.fsdp_teacher == "shard"):
            from ..parallel.fsdp import shard_model

            model = shard_model(model, self.groups, next(model.parameters()).device)
        return model

    @property
    def fsdp(self) -> bool:
        return self.groups is not None and self.groups.cfg.fsdp

    def local_batch_size(self, global_batch: int, key: str) -> int:
        if global_batch % self.dp:
            raise ConfigError(key, global_batch, f"a multiple of the data-parallel size {self.dp}")
        return global_batch // self.dp

    def batch_noise(self, micro: int = 1, index: int = 0) -> BatchNoise:
        """Noise for the global batch, keeping this rank's rows (of micro-batch ``index`` of ``micro``)."""
        return BatchNoise(self.dp_rank * micro + index, self.dp * micro)

    @property
    def pipelined(self) -> bool:
        return self.groups is not None and self.groups.cfg.pp > 1

    def accumulate_step(self, objective, net, batch: dict, step: int, micro: int):
        """Forward + backward of one optimizer step over ``micro`` micro-batches of this rank's rows
        (GPipe over the stages under pipeline parallelism); gradients accumulate, loss = their mean.

        The noise equals one process's with the whole global batch: before each micro-batch the RNG
        is reset to the step's start and the draw is made for the global batch, keeping the
        micro-batch's rows (noise layout rank ``dp_rank * micro + i`` of ``dp * micro``); after the
        last one the RNG is where one process would be. Returns (loss, metrics): the loss on every
        rank, the objective's metrics of the last micro-batch, only on the last pipeline stage
        (that is where the loss lives)."""
        from ..parallel import pipeline_forward_backward

        parts = split_batch(batch, micro)
        start = _rng_snapshot()
        seen: dict = {}

        def forward(_model, i):
            _rng_restore(start)
            loss, metrics = objective.loss(net, parts[i], StepContext(step, self.batch_noise(micro, i)))
            seen.update(metrics or {})
            return loss

        if self.pipelined:
            loss = pipeline_forward_backward(net.model, list(range(micro)), forward, lambda out, i: out,
                                             schedule=self.groups.cfg.pp_schedule)
            return loss, (seen if net.model.parallel.is_last_stage else {})
        total = None
        for i in range(micro):
            loss = forward(net.model, i) / micro
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total, seen

    def side_backward(self, net, loss_fn) -> torch.Tensor:
        """Forward + backward of a side model's loss (DMD's critic), through its pipeline stages when split."""
        if self.pipelined:
            from ..parallel import pipeline_forward_backward

            return pipeline_forward_backward(net.model, [None], lambda _m, _mb: loss_fn(net), lambda out, _mb: out,
                                             schedule=self.groups.cfg.pp_schedule)
        loss = loss_fn(net)
        loss.backward()
        return loss.detach()

    # ---------------------------------------------------------------- gradients
    def sync_and_clip(self, model: nn.Module, max_norm: float, extra=()) -> torch.Tensor:
        """Synchronise gradients (DP average, CP sum; side params averaged) and clip by the GLOBAL norm."""
        extra = [p for p in extra if p.requires_grad]
        if self.groups is None:
            params = [p for p in model.parameters() if p.requires_grad] + extra
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        from ..parallel import sync_gradients
        from ..parallel.grads import average_replicated_gradients, clip_grad_norm_

        sync_gradients(model, self.groups)
        average_replicated_gradients(extra, self.groups)
        return clip_grad_norm_(model, max_norm, self.groups, extra)

    def optimizers(self, model_params, side_params, **kwargs) -> list:
        """One AdamW over everything with one process. With several: for the model ZeRO-1 (state sharded
        over the data x context group) or, under FSDP, a plain AdamW over its already sharded parameters;
        plus a plain AdamW for small replicated side modules (sCM's adaptive weight), which may have another
        dtype than the model (ZeRO-1 needs one dtype) and are not DTensors."""
        if self.groups is None:
            return [torch.optim.AdamW(list(model_params) + list(side_params), **kwargs)]
        from ..parallel import sharded_optimizer

        model_params = list(model_params)
        opts = [torch.optim.AdamW(model_params, **kwargs) if self.fsdp else
                sharded_optimizer(model_params, self.groups, **kwargs)]
        if side_params:
            opts.append(torch.optim.AdamW(side_params, **kwargs))
        return opts

    # ---------------------------------------------------------------- agreement
    def global_loss(self, loss: torch.Tensor) -> tuple[float, bool]:
        """(mean loss over the data-parallel ranks, finite on EVERY rank) - the same answer everywhere,
        so a non-finite loss on one rank makes all ranks skip the step together (no deadlock)."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if self.groups is None:
            return float(loss.detach()), finite
        import torch.distributed as dist

        local = loss.detach().double().reshape(()) if finite else torch.zeros((), dtype=torch.float64)
        t = torch.stack([local.cpu(), torch.tensor(0.0 if finite else 1.0, dtype=torch.float64)])
        t = t.to(self._comm_device())
        dist.all_reduce(t)
        # tensor/context-parallel peers hold the same loss: the world mean is the data-parallel mean
        bad = float(t[1]) > 0
        return (float("nan") if bad else float(t[0]) / self.world_size), not bad

    def _comm_device(self):
        import torch.distributed as dist

        nccl = dist.get_backend() == "nccl"
        return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def barrier(self) -> None:
        if self.groups is not None:
            import torch.distributed as dist

            dist.barrier()

    def agree(self, decide):
        """Rank 0 runs ``decide()``; every rank returns its result, or raises its ConfigError (the other
        ranks quietly: rank 0 reports it), so no rank waits for a peer that has given up. Collective."""
        if self.groups is None:
            return decide()
        import torch.distributed as dist

        box = [None]
        error = None
        if self.is_main:
            try:
                box = [("ok", decide())]
            except ConfigError as e:
                error, box = e, [("error", str(e))]
            except BaseException as e:  # tell the others before dying, so they do not hang
                error, box = e, [("crash", f"{type(e).__name__}: {e}")]
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if error is not None:
            raise error
        if status == "ok":
            return value
        if status == "error":
            raise UsageError(value, quiet=True)
        raise RuntimeError(f"rank 0 failed while starting the run: {value}")

    def full_state_dict(self, model: nn.Module) -> dict | None:
        """Unsharded weights on rank 0 (None on the others). Collective."""
        if self.groups is None:
            return model.state_dict()
        from ..parallel.gather import full_state_dict

        return full_state_dict(model, self.groups)

    def close(self) -> None:
        if self.groups is not None:
            from ..parallel import destroy_parallel

            destroy_parallel()


def split_batch(batch: dict, parts: int) -> list[dict]:
    """``parts`` equal micro-batches along dim 0 of every tensor (non-tensors shared)."""
    n = batch["latents"].shape[0]
    if n % parts:
        raise ConfigError("train.grad_accum", parts, f"a divisor of this rank's batch of {n} samples")
    size = n // parts
    return [{k: (v[i * size:(i + 1) * size] if torch.is_tensor(v) else v) for k, v in batch.items()}
            for i in range(parts)]


def _rng_snapshot():
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _rng_restore(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])
