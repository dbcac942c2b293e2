"""TF flow matching: trains the causal teacher itself (the DMD fake score trains the same way, in dmd.py)."""
from __future__ import annotations

from dataclasses import dataclass

from ..diffusion.flow_matching import fm_noise, fm_target, sample_fm_times
from ..network import Condition
from .base import Objective


@dataclass
class FMConfig:
    shift: float = 3.0  # Wan's training shift for small resolutions (5.0 at 720p)
    time_mode: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0


class FlowMatchingObjective(Objective):
    """v-prediction on the teacher-forcing sequence: noisy chunk i sees clean chunks < i and itself,
    every chunk draws its own noise level. With noisy context (``causal.context_from_last_step``) the
    context copy is perturbed as the sampler will leave it (``Denoiser.training_context``)."""

    name, config_class, phase_kinds, teacher_role = "flow_matching", FMConfig, ("teacher",), "none"
    holds_clean_frames = True

    def __init__(self, cfg: FMConfig = FMConfig()):
        self.cfg = cfg

    def loss(self, student, batch, step):
        x0, c = batch["latents"], self.cfg
        layout = student.layout(x0)
        s = layout.to_frames(step.noise.draw(lambda shape: sample_fm_times(
            shape, c.time_mode, c.shift, c.logit_mean, c.logit_std, device=x0.device, dtype=x0.dtype),
            (x0.shape[0], layout.n_chunks)))
        eps = step.noise.randn_like(x0)
        context = student.training_context(x0, step.noise)
        x, s = student.hold_clean(fm_noise(x0, eps, s), s, x0)
        v, _ = student.teacher_forcing(context, x, s, Condition.from_batch(batch))
        loss = student.loss_frames(v.float() - fm_target(x0, eps).float()).pow(2).mean()
        return loss, {"fm_loss": float(loss.detach())}
