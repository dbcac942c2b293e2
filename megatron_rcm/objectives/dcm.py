"""Discrete-time consistency baseline on the TF sequence (FM time grid with Wan shift).

Grid 0 = s_0 < ... < s_N = 1. Per chunk pick n; x_{n+1} = FM-noised data; the CFG teacher takes one
Euler step to s_n; the target is the stop-grad consistency map f(x, s) = x - s v (the FM x0
prediction, which satisfies f(x, 0) = x) of the target net (EMA or the student) at s_n.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion.flow_matching import WAN_T_SCALE, bcast, fm_noise, fm_sigmas
from ..parallel.noise import dp_draw, randn_like
from .base import TFContext


@dataclass
class DCMConfig:
    num_steps: int = 40
    shift: float = 3.0
    cfg_scale: float = 5.0


class DCMObjective:
    def __init__(self, teacher, cfg: DCMConfig = DCMConfig(), target=None):
        self.teacher, self.cfg, self.target = teacher, cfg, target  # target=None: stop-grad student

    def grid(self, dtype, device):
        return fm_sigmas(self.cfg.num_steps, self.cfg.shift).flip(0).to(dtype=dtype, device=device)

    @torch.no_grad()
    def target_and_inputs(self, student, tf: TFContext, n, eps):
        """(x_{n+1}, s_{n+1}, f^-(x_n, s_n)) for per-chunk grid indices n [B, n_chunks]."""
        g = self.grid(tf.x0.dtype, tf.x0.device)
        s_hi, s_lo = tf.chunk_to_frames(g[n + 1]), tf.chunk_to_frames(g[n])
        x_hi = fm_noise(tf.x0, eps, s_hi)
        v_t, _ = tf.guided(self.teacher, x_hi, WAN_T_SCALE * s_hi, self.cfg.cfg_scale)
        x_lo = x_hi + bcast(s_lo - s_hi, x_hi) * v_t
        v_lo, _ = tf.run(self.target or student, x_lo, WAN_T_SCALE * s_lo)
        return x_hi, s_hi, x_lo - bcast(s_lo, x_lo) * v_lo

    def loss(self, student, batch, step):
        tf = TFContext(student, batch)
        n = dp_draw(lambda shape: torch.randint(0, self.cfg.num_steps, shape, device=tf.x0.device),
                    (tf.batch, tf.n_chunks))
        eps = randn_like(tf.x0)
        x_hi, s_hi, f_tgt = self.target_and_inputs(student, tf, n, eps)
        v, _ = tf.run(student, x_hi, WAN_T_SCALE * s_hi)
        f = x_hi - bcast(s_hi, x_hi) * v
        loss = (f.float() - f_tgt.float()).pow(2).mean()
        return loss, {"dcm_loss": float(loss.detach())}
