"""rCM: a consistency-model loss plus lambda x the self-forcing DMD loss, on one student (docs/design.md, "rCM").

The CM part is sCM or MeanFlow (``objective_args.cm``); the DMD part is :class:`SelfForcingDMD`,
whose critic keeps its own optimizer. Weights are applied exactly: total = cm_weight * L_cm +
dmd_weight * L_dmd. ``objective_args: {cm: scm|meanflow, scm|meanflow: {...}, dmd: {...}, rcm: {...}}``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config.errors import ConfigError
from .base import Objective, config_from_dict
from .dmd import DMDConfig, SelfForcingDMD
from .meanflow import MeanFlowObjective
from .scm import SCMObjective

CM_PARTS = {"scm": SCMObjective, "meanflow": MeanFlowObjective}  # the consistency part of rCM


@dataclass
class RCMConfig:
    cm_weight: float = 1.0
    dmd_weight: float = 1.0  # lambda
    dmd_every: int = 1  # compute the (rollout-heavy) DMD term every k-th step; 1 = always

    def validate(self, key: str = "RCMConfig") -> None:
        if self.dmd_every < 1:
            raise ConfigError(f"{key}.dmd_every", self.dmd_every, "an integer >= 1")


@dataclass
class RCMSetup:
    """The parsed ``objective_args`` of an rCM phase."""

    cm: str
    cm_cfg: object
    dmd_cfg: DMDConfig
    rcm_cfg: RCMConfig


class RCMObjective(Objective):
    name, config_class, phase_kinds, self_forcing = "rcm", RCMSetup, ("sf_dmd", "tf_cm"), True
    sequences = ("teacher_forcing", "video")

    def __init__(self, cm_objective: Objective, dmd: SelfForcingDMD, cfg: RCMConfig | None = None):
        self.cm, self.dmd, self.cfg = cm_objective, dmd, cfg or RCMConfig()
        self.cfg.validate()

    @classmethod
    def parse_config(cls, args: dict, key: str) -> RCMSetup:
        args = dict(args or {})
        unknown = set(args) - {"cm", *CM_PARTS, "dmd", "rcm"}
        if unknown:
            raise ConfigError(f"{key}.{sorted(unknown)[0]}", None, f"one of cm, {', '.join(CM_PARTS)}, dmd, rcm")
        cm = args.get("cm", "scm")
        if cm not in CM_PARTS:
            raise ConfigError(f"{key}.cm", cm, f"one of {list(CM_PARTS)} (the consistency part of rCM)")
        for other in CM_PARTS:
            if other != cm and other in args:
                raise ConfigError(f"{key}.{other}", dict(args[other]), f"absent, or set {key}.cm={other} to use it")
        return RCMSetup(cm, CM_PARTS[cm].parse_config(args.get(cm, {}), f"{key}.{cm}"),
                        SelfForcingDMD.parse_config(args.get("dmd", {}), f"{key}.dmd"),
                        config_from_dict(RCMConfig, args.get("rcm", {}), f"{key}.rcm"))

    holds_clean_frames = True  # both parts do (scm / meanflow and dmd)

    @classmethod
    def needs_interval_embedding(cls, cfg: RCMSetup) -> bool:
        return CM_PARTS[cfg.cm].needs_interval_embedding(cfg.cm_cfg)

    @classmethod
    def few_step_schedule(cls, cfg: RCMSetup):
        return cfg.dmd_cfg.rollout

    @classmethod
    def check_run(cls, cfg: RCMSetup, run, phase, key: str, parallel) -> None:
        SelfForcingDMD.check_run(cfg.dmd_cfg, run, phase, f"{key}.dmd", parallel)

    @classmethod
    def from_phase(cls, cfg: RCMSetup, models):
        return cls(CM_PARTS[cfg.cm].from_phase(cfg.cm_cfg, models), SelfForcingDMD.from_phase(cfg.dmd_cfg, models),
                   cfg.rcm_cfg)

    def loss(self, student, batch, step):
        l_cm, m_cm = self.cm.loss(student, batch, step)
        total = self.cfg.cm_weight * l_cm
        metrics = {f"cm/{k}": v for k, v in (m_cm or {}).items()}
        metrics["cm_loss"] = float(l_cm.detach())
        if step.index % self.cfg.dmd_every == 0 and self.cfg.dmd_weight != 0:
            l_dmd, m_dmd = self.dmd.loss(student, batch, step)
            total = total + self.cfg.dmd_weight * l_dmd
            metrics.update({f"dmd/{k}": v for k, v in (m_dmd or {}).items()})
            metrics["dmd_loss"] = float(l_dmd.detach())
        metrics["rcm_loss"] = float(total.detach())
        return total, metrics

    def side_modules(self):
        return self.cm.side_modules()

    def critic(self):
        return self.dmd.critic()

    def after_step(self, student, batch, step) -> dict:
        out = {f"cm/{k}": v for k, v in (self.cm.after_step(student, batch, step) or {}).items()}
        out.update(self.dmd.after_step(student, batch, step))
        return out

    def state_dict(self) -> dict:
        return {"dmd": self.dmd.state_dict(), "cm": self.cm.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.dmd.load_state_dict(state["dmd"])
        self.cm.load_state_dict(state.get("cm", {}))
