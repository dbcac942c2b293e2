"""What a training phase puts into a sharded checkpoint, and how it comes back (:mod:`.dist_checkpoint`).

Tensor groups (global parameter names, so any layout can read them): ``model`` (the student),
``ema``, ``objective`` (small trained side modules, e.g. sCM's adaptive weight) and ``critic``
(the DMD fake-score model). Optimizer state per parameter: ``optim`` (student + side modules, in
however many optimizers the layout uses) and ``critic_optim``. Everything else (scheduler, counters,
data position, RNG, the objective's remaining state) is small: each rank keeps its own copy
(``rank_state``, used when resuming under the same layout) and rank 0's is also kept as ``shared``
(used under another layout: every rank seeds and draws noise identically, so rank 0's is everyone's).
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import dist_checkpoint as dck

def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


@dataclass
class PhaseObjects:
    """The live state of one phase on this rank."""

    student: torch.nn.Module
    ema: object  # training.ema.EMA
    extra_params: list
    optimizers: list
    schedulers: list
    objective: object
    data: object

    @property
    def critic(self):
        """The objective's trained side model (DMD's fake score: model + optimizer), or None."""
        return self.objective.critic()

    def named_trainables(self) -> dict:
        named = {n: p for n, p in self.student.named_parameters() if p.requires_grad}
        named.update({f"objective.param_{i}": p for i, p in enumerate(self.extra_params)})
        return named

    def tensors(self) -> dict:
        groups = {"model": self.student.state_dict(), "ema": self.ema.state_dict()}
        if self.extra_params:
            groups["objective"] = {f"param_{i}": p.detach() for i, p in enumerate(self.extra_params)}
        if self.critic is not None:
            groups["critic"] = self.critic.model.state_dict()
        return groups

    def optimizer_specs(self) -> dict:
        named = self.named_trainables()
        specs = {"optim": [(opt, named) for opt in self.optimizers]}
        if self.critic is not None:
            critic = {n: p for n, p in self.critic.model.named_parameters() if p.requires_grad}
            specs["critic_optim"] = (self.critic.optimizer, critic)
        return specs

    def small_state(self) -> dict:
        """Scheduler, data position, RNG and the objective's own small state (the critic's tensors travel
        in :meth:`tensors` / :meth:`optimizer_specs`)."""
        return {"scheduler": self.schedulers[0].state_dict(), "data": self.data.state_dict(), "rng": rng_state(),
                "objective_extra": self.objective.state_dict()}

    def load_small_state(self, st: dict) -> None:
        for scheduler in self.schedulers:
            scheduler.load_state_dict(st["scheduler"])
        self.data.load_state_dict(st["data"])
        if st.get("objective_extra"):
            self.objective.load_state_dict(st["objective_extra"])
        set_rng_state(st["rng"])


def save_phase(root, step: int, objs: PhaseObjects, scalars: dict, groups=None, model_config=None,
               keep: int = 2, async_save: bool = False):
    """Collective save of a phase; ``scalars`` are the trainer's counters (phase index, step, results)."""
    small = objs.small_state()
    meta = {"model_config": dataclasses.asdict(model_config)} if model_config is not None else None
    return dck.save_distributed(root, step, objs.tensors(), objs.optimizer_specs(), shared={**scalars, **small},
                                rank_state=small, groups=groups, meta=meta, keep=keep, async_save=async_save)


def load_phase(path: Path, objs: PhaseObjects, groups=None, log=print) -> dict:
    """Collective load of checkpoint ``path`` into the phase's live objects; returns the saved scalars."""
    res = dck.load_distributed(None, objs.tensors(), objs.optimizer_specs(), groups=groups, path=path)
    if res.rank_state is None:
        log(f"checkpoint {path} was written under layout {res.saved_layout}; resharded into this run's, "
            "with rank 0's RNG/data state for every rank")
    objs.load_small_state(res.rank_state if res.rank_state is not None else res.shared)
    return res.shared
