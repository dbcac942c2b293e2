"""TF flow matching: trains the causal teacher itself (and the DMD fake-score critic)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion.flow_matching import WAN_T_SCALE, fm_noise, fm_target, sample_fm_times
from ..parallel.noise import dp_draw, randn_like
from .base import TFContext


@dataclass
class FMConfig:
    shift: float = 3.0  # Wan's training shift for small resolutions (5.0 at 720p)
    time_mode: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0


class FlowMatchingObjective:
    def __init__(self, cfg: FMConfig = FMConfig()):
        self.cfg = cfg

    def loss(self, student, batch, step):
        tf = TFContext(student, batch)
        x0, c = tf.x0, self.cfg
        s = tf.chunk_to_frames(dp_draw(lambda shape: sample_fm_times(shape, c.time_mode, c.shift, c.logit_mean,
                                                                     c.logit_std, device=x0.device, dtype=x0.dtype),
                                       (tf.batch, tf.n_chunks)))
        eps = randn_like(x0)
        v, _ = tf.run(student, fm_noise(x0, eps, s), WAN_T_SCALE * s)
        loss = (v.float() - fm_target(x0, eps).float()).pow(2).mean()
        return loss, {"fm_loss": float(loss.detach())}
