"""MeanFlow (Geng et al. 2025): average velocity u(z_t, r, t) = 1/(t-r) int_r^t v ds, FM time (t=1 noise).

Identity: u = v - (t - r) du/dt with du/dt = v . d_z u + d_t u (r held fixed), i.e. ONE JVP of u along
the tangent (dz, dr, dt) = (v, 0, 1). Loss ||u_theta - sg(u_tgt)||^2 with the paper's adaptive weight
sg(1 / (||delta||^2 + c)^p).

Why a protocol and not CausalWanModel directly: the target needs d_t u with r fixed, so the net must see
r and t (or t and t - r) as two inputs. A single-time net fed t with r = t - Delta cannot separate d_t u
from d_r u (its time derivative is d_t u + d_r u), so that shortcut is wrong unless Delta = 0 (plain FM).
The Wan model needs a second timestep embedding (interval t - r, zero-init, added to the AdaLN input)
to be a MeanFlowNet; see the report. ``MeanFlowNet`` is the hook this objective is written against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..diffusion.flow_matching import bcast, fm_noise, sample_fm_times
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


class MeanFlowObjective:
    def __init__(self, cfg: MeanFlowConfig = MeanFlowConfig(), chunk_frames: int = 1):
        self.cfg, self.chunk = cfg, chunk_frames

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

    def loss(self, net, batch, step):
        x0 = batch["latents"]
        b, f = x0.shape[0], x0.shape[2]
        r, t = self.sample_rt(b, f // self.chunk, x0.device, x0.dtype)
        r, t = r.repeat_interleave(self.chunk, 1), t.repeat_interleave(self.chunk, 1)
        eps = torch.randn_like(x0)
        z, v = fm_noise(x0, eps, t), eps - x0
        u_tgt = self.target(net, z, r, t, v, batch)
        u, _ = net(z, r, t, batch)
        delta = (u.float() - u_tgt.float()).pow(2)
        per = delta.flatten(1).mean(1)  # per-sample MSE
        w = 1.0 / (per.detach() + self.cfg.adaptive_c) ** self.cfg.adaptive_p
        loss = (w * per).mean()
        return loss, {"meanflow_loss": float(loss.detach()), "meanflow_mse": float(per.mean())}


_ = TFContext  # causal MeanFlowNet implementations use TFContext.run for the [clean ; noisy] sequence
