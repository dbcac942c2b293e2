"""MeanFlow (Geng et al. 2025): average velocity u(z_t, r, t) = 1/(t-r) int_r^t v ds, FM time (t=1 noise).

Identity: u = v - (t - r) du/dt with du/dt = v . d_z u + d_t u (r held fixed), i.e. ONE JVP of u along
the tangent (dz, dr, dt) = (v, 0, 1). Loss ||u_theta - sg(u_tgt)||^2 with the paper's adaptive weight
sg(1 / (||delta||^2 + c)^p).

The net must see r and t as two inputs: the target needs d_t u with r fixed, and a single-time net fed
t with r = t - Delta cannot separate d_t u from d_r u. On the causal Wan model that is the interval
embedding (``ModelConfig.interval_embedding``, Delta = t - r); :class:`TFMeanFlowNet` adapts it to
the ``MeanFlowNet`` protocol on the teacher-forcing sequence, per-chunk (r, t) as in sCM.

Instantaneous velocity v at z_t: with a teacher, its CFG velocity (distillation on synthetic data
only: the data point only places z_t); without one, the conditional FM velocity eps - x0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..diffusion.flow_matching import WAN_T_SCALE, bcast, fm_noise, sample_fm_times
from .base import TFContext


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
    """``MeanFlowNet`` over a causal Wan interval model on one batch's TF sequence [x0 ; z].

    FM times r, t in [0, 1] become Wan timestep 1000 t and interval 1000 (t - r); tangents likewise
    (d interval = 1000 (dt - dr)). The clean context x0 carries no tangent.
    """

    def __init__(self, model, tf: TFContext):
        if getattr(model.condition_embedder, "interval_embedder", None) is None:
            raise ValueError("MeanFlow needs the interval embedding: set model.interval_embedding=true")
        self.model, self.tf = model, tf

    def __call__(self, z, r, t, batch=None, tangent=None, r_tangent=None, t_tangent=None):
        s = WAN_T_SCALE
        dt = di = None
        if r_tangent is not None or t_tangent is not None:
            dt = torch.zeros_like(t) if t_tangent is None else t_tangent
            dr = torch.zeros_like(r) if r_tangent is None else r_tangent
            dt, di = s * dt, s * (dt - dr)
        return self.tf.run(self.model, z, s * t, tangent=tangent, t_tangent=dt, interval=s * (t - r),
                           interval_tangent=di)


class MeanFlowObjective:
    """``loss(student, batch, step)`` for a causal Wan interval model or any ``MeanFlowNet`` (no teacher)."""

    def __init__(self, cfg: MeanFlowConfig = MeanFlowConfig(), chunk_frames: int = 1, teacher=None):
        self.cfg, self.chunk, self.teacher = cfg, chunk_frames, teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def as_net(self, student, batch):
        """(net, tf, chunk -> frame expansion); tf is None for a plain ``MeanFlowNet``."""
        if hasattr(student, "forward_teacher_forcing"):
            tf = TFContext(student, batch)
            return TFMeanFlowNet(student, tf), tf, tf.chunk_to_frames
        if self.teacher is not None:
            raise ValueError("a MeanFlow teacher needs a causal Wan student (the teacher runs the TF sequence)")
        return student, None, lambda a: a.repeat_interleave(self.chunk, 1)

    @torch.no_grad()
    def velocity(self, tf: TFContext | None, z, t, x0, eps):
        """Instantaneous velocity at z_t: the teacher's CFG velocity, else eps - x0."""
        if self.teacher is None:
            return eps - x0
        return tf.guided(self.teacher, z, WAN_T_SCALE * t, self.cfg.cfg_scale)[0]

    def sample_rt(self, b, n_chunks, device, dtype):
        c = self.cfg
        draw = lambda: sample_fm_times((b, n_chunks), c.time_mode, c.shift, c.logit_mean, c.logit_std,
                                       device=device, dtype=dtype)
        a, bb = draw(), draw()
        t, r = torch.maximum(a, bb), torch.minimum(a, bb)
        keep = torch.rand(b, n_chunks, device=device) < c.ratio_r_neq_t
        return torch.where(keep, r, t), t

    def target(self, net, z, r, t, v, batch):
        """u_tgt = v - (t - r)(v . d_z u + d_t u), one JVP along (v, 0, 1), no graph."""
        with torch.no_grad():
            _, du = net(z, r, t, batch, tangent=v, r_tangent=torch.zeros_like(r), t_tangent=torch.ones_like(t))
        return v - bcast(t - r, z) * du

    def loss(self, student, batch, step):
        x0 = batch["latents"]
        net, tf, to_frames = self.as_net(student, batch)
        n_chunks = tf.n_chunks if tf is not None else x0.shape[2] // self.chunk
        r, t = (to_frames(a) for a in self.sample_rt(x0.shape[0], n_chunks, x0.device, x0.dtype))
        eps = torch.randn_like(x0)
        z = fm_noise(x0, eps, t)
        v = self.velocity(tf, z, t, x0, eps)
        u_tgt = self.target(net, z, r, t, v, batch)
        u, _ = net(z, r, t, batch)
        delta = (u.float() - u_tgt.float()).pow(2)
        per = delta.flatten(1).mean(1)  # per-sample MSE
        w = 1.0 / (per.detach() + self.cfg.adaptive_c) ** self.cfg.adaptive_p
        loss = (w * per).mean()
        return loss, {"meanflow_loss": float(loss.detach()), "meanflow_mse": float(per.detach().mean())}

