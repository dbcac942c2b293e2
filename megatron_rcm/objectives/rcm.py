"""rCM: a consistency-model loss plus lambda x the self-forcing DMD loss, on one student (DESIGN §4).

The CM part is any objective with ``loss(student, batch, step) -> (loss, metrics)`` (sCM, MeanFlow,
dCM); the DMD part is :class:`SelfForcingDMD`, whose critic keeps its own optimizer. Weights are
applied exactly: total = cm_weight * L_cm + dmd_weight * L_dmd.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .dmd import SelfForcingDMD


@dataclass
class RCMConfig:
    cm_weight: float = 1.0
    dmd_weight: float = 1.0  # lambda
    dmd_every: int = 1  # compute the (rollout-heavy) DMD term every k-th step; 1 = always


class RCMObjective(torch.nn.Module):
    """nn.Module only so the trainer checkpoints a CM objective's own modules (e.g. sCM's adaptive weight)."""

    def __init__(self, cm_objective, dmd: SelfForcingDMD, cfg: RCMConfig | None = None):
        super().__init__()
        self.cfg = cfg or RCMConfig()
        if self.cfg.dmd_every < 1:
            raise ValueError("RCMConfig.dmd_every must be >= 1")
        if isinstance(cm_objective, torch.nn.Module):
            self.cm = cm_objective
        else:
            self.__dict__["cm"] = cm_objective  # not a module: keep out of state_dict
            # a plain CM objective's own learned module (sCM/MeanFlow adaptive weight): checkpoint + train it
            weighting = getattr(cm_objective, "weighting", None)
            if isinstance(weighting, torch.nn.Module):
                self.cm_weighting = weighting
        self.__dict__["dmd"] = dmd  # the critic is saved through extra_state, never by the trainer's optimizer

    def loss(self, student, batch, step):
        l_cm, m_cm = self.cm.loss(student, batch, step)
        total = self.cfg.cm_weight * l_cm
        metrics = {f"cm/{k}": v for k, v in (m_cm or {}).items()}
        metrics["cm_loss"] = float(l_cm.detach())
        if step % self.cfg.dmd_every == 0 and self.cfg.dmd_weight != 0:
            l_dmd, m_dmd = self.dmd.loss(student, batch, step)
            total = total + self.cfg.dmd_weight * l_dmd
            metrics.update({f"dmd/{k}": v for k, v in (m_dmd or {}).items()})
            metrics["dmd_loss"] = float(l_dmd.detach())
        metrics["rcm_loss"] = float(total.detach())
        return total, metrics

    def after_student_step(self, student, batch, step) -> dict:
        out = {}
        if hasattr(self.cm, "after_student_step"):
            out.update({f"cm/{k}": v for k, v in (self.cm.after_student_step(student, batch, step) or {}).items()})
        out.update(self.dmd.after_student_step(student, batch, step))
        return out

    def trainable_parameters(self):
        """The CM objective's own trainables (its ``trainable_parameters()``, else its adaptive weight)."""
        if hasattr(self.cm, "trainable_parameters"):
            return list(self.cm.trainable_parameters())
        w = getattr(self, "cm_weighting", None)
        return [] if w is None else [p for p in w.parameters() if p.requires_grad]

    def extra_state(self, with_critic: bool = True) -> dict:
        st = {"dmd": self.dmd.extra_state() if with_critic else self.dmd.extra_state(with_critic=False)}
        if hasattr(self.cm, "extra_state"):
            st["cm"] = self.cm.extra_state()
        return st

    def load_extra_state(self, state: dict) -> None:
        self.dmd.load_extra_state(state["dmd"])
        if "cm" in state and hasattr(self.cm, "load_extra_state"):
            self.cm.load_extra_state(state["cm"])
