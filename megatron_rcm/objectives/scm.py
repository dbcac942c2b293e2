"""Continuous-time consistency (sCM, Lu & Song 2024) distillation in TrigFlow on the TF sequence.

Student and teacher are FM velocity nets; TrigFlow quantities come from the exact conversion in
``diffusion.trigflow`` (F from v; the net sees x_s = x_t / (cos t + sigma_d sin t) at FM level s(t)).
Tangent (sCM Alg. 1): g = cos t * df^-/dt = -cos^2 t (sigma_d F^- - dx_t/dt) - r cos t sin t (x_t + sigma_d dF^-/dt),
with dx_t/dt = sigma_d F_teacher (CFG) and dF^-/dt the JVP of the stop-grad student along (dx_t/dt, 1).
g <- g / (||g|| + c) per (sample, chunk); loss = exp(-w(t))/D ||F_theta - F^- - g||^2 + w(t).
(docs/design.md, "sCM".)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion.flow_matching import bcast
from ..diffusion.trigflow import fm_from_trig, sample_trig_times, trig_F_and_dFdt, trig_F_from_v
from ..network import Condition
from .base import AdaptiveWeight, Objective


@dataclass
class SCMConfig:
    sigma_d: float = 1.0  # std of the (normalized) latents; sCM used 0.5 for pixel/SD-VAE latents
    p_mean: float = -0.8  # sCM ImageNet-512 proposal: tau ~ N(-0.8, 1.6^2) (CIFAR: -1.0, 1.4)
    p_std: float = 1.6
    tangent_norm_c: float = 0.1  # sCM: g / (||g|| + 0.1)
    r_warmup_steps: int = 10000  # sCM tangent warm-up length
    cfg_scale: float = 5.0
    adaptive_weight: bool = True


class SCMObjective(Objective):
    name, config_class, phase_kinds = "scm", SCMConfig, ("tf_cm",)
    holds_clean_frames = True  # held frames: t = 0, zero tangents, left out of the chunk means

    def __init__(self, teacher, cfg: SCMConfig = SCMConfig()):
        self.teacher, self.cfg = teacher, cfg
        self.weighting = AdaptiveWeight() if cfg.adaptive_weight else None

    @classmethod
    def from_phase(cls, cfg, models):
        return cls(models.teacher, cfg)

    def side_modules(self):
        return [] if self.weighting is None else [self.weighting]

    def warmup_r(self, step: int) -> float:
        n = self.cfg.r_warmup_steps
        return 1.0 if n <= 0 else min(1.0, step / n)

    @torch.no_grad()
    def tangent(self, student, x0, cond: Condition, x_t, t, r: float):
        """(F^-, g, dx_t/dt) for TrigFlow points x_t at per-frame times t [B, F]; no graph is built.

        ``x0``: the teacher-forcing context (clean latents or a noisy ``TeacherForcingContext``), the same for
        teacher and student."""
        sd = self.cfg.sigma_d
        cos, sin = bcast(torch.cos(t), x_t), bcast(torch.sin(t), x_t)
        D = cos + sd * sin
        moves, moves_t = student.free_mask(x_t)  # held first frames (causal.clean_first_frames) stay put: no tangent
        v_teacher, _ = self.teacher.teacher_forcing(x0, x_t / D, fm_from_trig(t, sd), cond, guidance=self.cfg.cfg_scale)
        dxdt = sd * trig_F_from_v(x_t, v_teacher, t, sd) * moves
        fm_jvp = lambda xs, s, dxs, ds: student.teacher_forcing(x0, xs, s, cond, tangent=dxs * moves,  # noqa: E731
                                                                s_tangent=ds * moves_t)
        F_m, dF_m = trig_F_and_dFdt(fm_jvp, x_t, t, dxdt, sd)
        g = (-cos**2 * (sd * F_m - dxdt) - r * cos * sin * (x_t + sd * dF_m)) * moves
        return F_m, g, dxdt

    def loss(self, student, batch, step):
        c = self.cfg
        x0, cond = batch["latents"], Condition.from_batch(batch)
        layout = student.layout(x0)
        t_chunk = step.noise.draw(lambda shape: sample_trig_times(shape, c.sigma_d, c.p_mean, c.p_std,
                                                                  device=x0.device, dtype=x0.dtype),
                                  (x0.shape[0], layout.n_chunks))
        t = layout.to_frames(t_chunk)
        x_t = bcast(torch.cos(t), x0) * x0 + bcast(torch.sin(t), x0) * c.sigma_d * step.noise.randn_like(x0)
        x_t, t = student.hold_clean(x_t, t, x0)  # held first frames: x0 at t = 0 (TrigFlow and FM time agree there)
        r = self.warmup_r(step.index)
        context = student.training_context(x0, step.noise)
        F_m, g, _ = self.tangent(student, context, cond, x_t, t, r)
        g_norm = layout.chunk_norm(g, student.patch_frames)
        g = g / (g_norm + c.tangent_norm_c)

        D = bcast(torch.cos(t) + c.sigma_d * torch.sin(t), x0)
        v, _ = student.teacher_forcing(context, x_t / D, fm_from_trig(t, c.sigma_d), cond)
        F = trig_F_from_v(x_t, v, t, c.sigma_d)
        err, has = student.chunk_loss_mean((F.float() - F_m.float() - g.float()).pow(2))  # [B, n_chunks]
        if not bool(has.all()):  # leading chunks made only of held frames have no loss (`has`: a host tensor)
            first = int((~has).sum())
            err, t_chunk = err[:, first:], t_chunk[:, first:]
        if self.weighting is not None:
            w = self.weighting(torch.log(torch.tan(t_chunk)))
            loss = (torch.exp(-w) * err + w).mean()
        else:
            loss = err.mean()
        return loss, {"scm_loss": float(loss.detach()), "scm_mse": float(err.detach().mean()), "scm_r": r,
                      "scm_g_norm": float(g_norm.mean())}
