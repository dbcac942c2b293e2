"""MeanFlow (Geng et al. 2025): average velocity u(z_t, r, t) = 1/(t-r) int_r^t v ds, FM time (t=1 noise).

Identity: u = v - (t - r) du/dt with du/dt = v . d_z u + d_t u (r held fixed), i.e. ONE JVP of u along
the tangent (dz, dr, dt) = (v, 0, 1). Loss ||u_theta - sg(u_tgt)||^2 with the paper's adaptive weight
sg(1 / (||delta||^2 + c)^p).

The net must see r and t as two inputs: the target needs d_t u with r fixed, and a single-time net fed
t with r = t - Delta cannot separate d_t u from d_r u. On the causal Wan model that is the interval
embedding (``ModelConfig.interval_embedding``, Delta = t - r); :class:`TFMeanFlowNet` adapts it to
the ``MeanFlowNet`` protocol on the teacher-forcing sequence, per-chunk (r, t) as in sCM. All times and
noise are drawn for the global batch from the step's noise (the DP2 run equals one process).

Instantaneous velocity v at z_t: with a teacher, its CFG velocity (distillation on synthetic data
only: the data point only places z_t); without one, the conditional FM velocity eps - x0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..diffusion.flow_matching import bcast, fm_noise, sample_fm_times
from ..network import BatchNoise, Condition, Denoiser
from .base import Objective


class MeanFlowNet(Protocol):
    def __call__(self, z, r, t, batch: dict, tangent=None, r_tangent=None, t_tangent=None):
        """(u, du) for latents z [B,C,F,H,W] and FM times r <= t, each [B, F]; du is None without tangents.

        A causal implementation runs the TF sequence with batch['latents'] as the clean context.
        """


@dataclass
class MeanFlowConfig:
    ratio_r_neq_t: float = 0.25  # MeanFlow: fraction of samples with r != t (the rest is plain FM)
    time_mode: str = "logit_normal"
    logit_mean: float = -0.4  # MeanFlow ImageNet setting lognorm(-0.4, 1.0)
    logit_std: float = 1.0
    shift: float = 1.0
    adaptive_p: float = 1.0  # weight = 1 / (||delta||^2 + c)^p
    adaptive_c: float = 1e-3
    cfg_scale: float = 5.0  # CFG of the teacher's velocity v (only with a teacher)


class TFMeanFlowNet:
    """``MeanFlowNet`` over a causal Wan interval model's denoiser on one batch's TF sequence [x0 ; z].

    The interval t - r (and its tangent dt - dr) goes to the model's interval embedding; the context
    (clean x0, or ``context``: a noisy-context ``TeacherForcingContext``) carries no tangent.
    """

    def __init__(self, net: Denoiser, batch: dict, context=None):
        if getattr(net.model.condition_embedder, "interval_embedder", None) is None:
            raise ValueError("MeanFlow needs the interval embedding: set model.interval_embedding=true")
        self.net, self.cond = net, Condition.from_batch(batch)
        self.x0 = batch["latents"] if context is None else context

    def __call__(self, z, r, t, batch=None, tangent=None, r_tangent=None, t_tangent=None):
        dt = di = None
        if r_tangent is not None or t_tangent is not None:
            dt = torch.zeros_like(t) if t_tangent is None else t_tangent
            dr = torch.zeros_like(r) if r_tangent is None else r_tangent
            di = dt - dr
        return self.net.teacher_forcing(self.x0, z, t, self.cond, tangent=tangent, s_tangent=dt, interval=t - r,
                                        interval_tangent=di)


class MeanFlowObjective(Objective):
    """``loss(student, batch, step)`` for a causal Wan interval model's denoiser or any ``MeanFlowNet``."""

    name, config_class, phase_kinds, teacher_role = "meanflow", MeanFlowConfig, ("tf_cm",), "optional"
    holds_clean_frames = True  # held frames: r = t = 0, zero tangents, no loss (Denoiser students)

    def __init__(self, cfg: MeanFlowConfig = MeanFlowConfig(), chunk_frames: int = 1, teacher=None):
        self.cfg, self.chunk, self.teacher = cfg, chunk_frames, teacher

    @classmethod
    def from_phase(cls, cfg, models):
        return cls(cfg, teacher=models.teacher)

    @classmethod
    def needs_interval_embedding(cls, cfg) -> bool:
        return True

    def as_net(self, student, batch, context=None):
        """(net, chunk -> frame expansion, number of chunks) for a Denoiser or a plain ``MeanFlowNet``."""
        x0 = batch["latents"]
        if isinstance(student, Denoiser):
            layout = student.layout(x0)
            return TFMeanFlowNet(student, batch, context), layout.to_frames, layout.n_chunks
        if self.teacher is not None:
            raise ValueError("a MeanFlow teacher needs a causal Wan student (the teacher runs the TF sequence)")
        return student, lambda a: a.repeat_interleave(self.chunk, 1), x0.shape[2] // self.chunk

    @torch.no_grad()
    def velocity(self, batch, z, t, x0, eps, context=None):
        """Instantaneous velocity at z_t: the teacher's CFG velocity (on the teacher-forcing ``context``, default
        clean x0), else eps - x0."""
        if self.teacher is None:
            return eps - x0
        return self.teacher.teacher_forcing(x0 if context is None else context, z, t, Condition.from_batch(batch),
                                            guidance=self.cfg.cfg_scale)[0]

    def sample_rt(self, b, n_chunks, device, dtype, noise: BatchNoise = BatchNoise()):
        """Per-chunk (r, t), r <= t, drawn for the global batch."""
        c = self.cfg
        draw = lambda: noise.draw(lambda shape: sample_fm_times(shape, c.time_mode, c.shift, c.logit_mean,
                                                                c.logit_std, device=device, dtype=dtype),
                                  (b, n_chunks))
        a, bb = draw(), draw()
        t, r = torch.maximum(a, bb), torch.minimum(a, bb)
        keep = noise.rand((b, n_chunks), device=device) < c.ratio_r_neq_t
        return torch.where(keep, r, t), t

    def target(self, net, z, r, t, v, batch, moves=None):
        """u_tgt = v - (t - r)(v . d_z u + d_t u), one JVP along (v, 0, 1), no graph. ``moves``: (latents, per-frame)
        masks that zero the tangent of held first frames (``Denoiser.free_mask``)."""
        dz, dt = v, torch.ones_like(t)
        if moves is not None:
            dz, dt = v * moves[0], dt * moves[1]
        with torch.no_grad():
            _, du = net(z, r, t, batch, tangent=dz, r_tangent=torch.zeros_like(r), t_tangent=dt)
        return v - bcast(t - r, z) * du

    def loss(self, student, batch, step):
        x0 = batch["latents"]
        context = student.training_context(x0, step.noise) if isinstance(student, Denoiser) else None
        net, to_frames, n_chunks = self.as_net(student, batch, context)
        r, t = (to_frames(a) for a in self.sample_rt(x0.shape[0], n_chunks, x0.device, x0.dtype, step.noise))
        eps = step.noise.randn_like(x0)
        z = fm_noise(x0, eps, t)
        held = isinstance(student, Denoiser) and student.clean_first_frames > 0
        if held:  # image-to-video training: the held first frames are x0 at r = t = 0
            z, t = student.hold_clean(z, t, x0)
            r = student.hold_clean(z, r, x0)[1]
        v = self.velocity(batch, z, t, x0, eps, context)
        u_tgt = self.target(net, z, r, t, v, batch, student.free_mask(z) if held else None)
        u, _ = net(z, r, t, batch)
        delta = (u.float() - u_tgt.float()).pow(2)
        delta = student.loss_frames(delta) if held else delta
        per = delta.flatten(1).mean(1)  # per-sample MSE
        w = 1.0 / (per.detach() + self.cfg.adaptive_c) ** self.cfg.adaptive_p
        loss = (w * per).mean()
        return loss, {"meanflow_loss": float(loss.detach()), "meanflow_mse": float(per.detach().mean())}
