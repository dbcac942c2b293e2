"""Discrete-time consistency baseline on the TF sequence (FM time grid with Wan shift).

Grid 0 = s_0 < ... < s_N = 1. Per chunk pick n; x_{n+1} = FM-noised data; the CFG teacher takes one
Euler step to s_n; the target is the stop-grad consistency map f(x, s) = x - s v (the FM x0
prediction, which satisfies f(x, 0) = x) of the target net (EMA or the student) at s_n.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion.flow_matching import bcast, fm_noise, fm_sigmas
from ..network import Condition
from .base import Objective


@dataclass
class DCMConfig:
    num_steps: int = 40
    shift: float = 3.0
    cfg_scale: float = 5.0


class DCMObjective(Objective):
    name, config_class, phase_kinds = "dcm", DCMConfig, ("tf_cm",)
    holds_clean_frames = True  # held frames sit at s = 0 on both ends: x - 0 v = x0, so their error is exactly 0

    def __init__(self, teacher, cfg: DCMConfig = DCMConfig(), target=None):
        self.teacher, self.cfg, self.target = teacher, cfg, target  # target=None: stop-grad student

    @classmethod
    def from_phase(cls, cfg, models):
        return cls(models.teacher, cfg)

    def grid(self, dtype, device):
        return fm_sigmas(self.cfg.num_steps, self.cfg.shift).flip(0).to(dtype=dtype, device=device)

    @torch.no_grad()
    def target_and_inputs(self, student, x0, cond: Condition, n, eps, context=None):
        """(x_{n+1}, s_{n+1}, f^-(x_n, s_n)) for per-chunk grid indices n [B, n_chunks]; ``context``: the
        teacher-forcing context (default clean x0; a noisy ``TeacherForcingContext`` with noisy context)."""
        g = self.grid(x0.dtype, x0.device)
        layout = student.layout(x0)
        context = x0 if context is None else context
        s_hi, s_lo = layout.to_frames(g[n + 1]), layout.to_frames(g[n])
        x_hi, s_hi = student.hold_clean(fm_noise(x0, eps, s_hi), s_hi, x0)
        s_lo = student.hold_clean(x_hi, s_lo, x0)[1]
        v_t, _ = self.teacher.teacher_forcing(context, x_hi, s_hi, cond, guidance=self.cfg.cfg_scale)
        x_lo = x_hi + bcast(s_lo - s_hi, x_hi) * v_t
        v_lo, _ = (self.target or student).teacher_forcing(context, x_lo, s_lo, cond)
        return x_hi, s_hi, x_lo - bcast(s_lo, x_lo) * v_lo

    def loss(self, student, batch, step):
        x0, cond = batch["latents"], Condition.from_batch(batch)
        n = step.noise.randint(self.cfg.num_steps, (x0.shape[0], student.layout(x0).n_chunks), device=x0.device)
        eps = step.noise.randn_like(x0)
        context = student.training_context(x0, step.noise)
        x_hi, s_hi, f_tgt = self.target_and_inputs(student, x0, cond, n, eps, context)
        v, _ = student.teacher_forcing(context, x_hi, s_hi, cond)
        f = x_hi - bcast(s_hi, x_hi) * v
        loss = student.loss_frames(f.float() - f_tgt.float()).pow(2).mean()
        return loss, {"dcm_loss": float(loss.detach())}
