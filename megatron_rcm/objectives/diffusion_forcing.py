"""Diffusion forcing (Chen et al. 2024; Causal-rCM ``training_type: df``): the causal teacher's alternative to
teacher-forcing flow matching.

Flow matching on the plain block-causal video (no clean copy): every chunk draws its own noise level, so
chunk i learns to denoise while attending to earlier chunks that are themselves noisy at independent
levels. ``chunk_levels: same`` draws one level per sample instead (Causal-rCM ``df_timestep_strategy``
``random`` / ``same``). Sequence: the video's own frames (half the teacher-forcing sequence).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config.errors import ConfigError
from ..diffusion.flow_matching import fm_noise, fm_target, sample_fm_times
from ..network import Condition
from .base import Objective
from .flow_matching import FMConfig

CHUNK_LEVELS = ("independent", "same")


@dataclass
class DiffusionForcingConfig(FMConfig):
    chunk_levels: str = "independent"  # independent per chunk (reference "random") | one per sample ("same")

    def validate(self, key: str = "DiffusionForcingConfig") -> None:
        if self.chunk_levels not in CHUNK_LEVELS:
            raise ConfigError(f"{key}.chunk_levels", self.chunk_levels, f"one of {CHUNK_LEVELS}")


class DiffusionForcingObjective(Objective):
    """v-prediction on the block-causal video with a noise level per chunk."""

    name, config_class, phase_kinds, teacher_role = "diffusion_forcing", DiffusionForcingConfig, ("teacher",), "none"
    sequences, holds_clean_frames = ("video",), True

    def __init__(self, cfg: DiffusionForcingConfig = DiffusionForcingConfig()):
        cfg.validate()
        self.cfg = cfg

    def loss(self, student, batch, step):
        x0, c = batch["latents"], self.cfg
        layout = student.layout(x0)
        per = layout.n_chunks if c.chunk_levels == "independent" else 1
        s = step.noise.draw(lambda shape: sample_fm_times(shape, c.time_mode, c.shift, c.logit_mean, c.logit_std,
                                                          device=x0.device, dtype=x0.dtype), (x0.shape[0], per))
        s = layout.to_frames(s.expand(-1, layout.n_chunks))
        eps = step.noise.randn_like(x0)
        x, s = student.hold_clean(fm_noise(x0, eps, s), s, x0)
        v, _ = student.velocity(x, s, Condition.from_batch(batch), attend="block_causal")
        loss = student.loss_frames(v.float() - fm_target(x0, eps).float()).pow(2).mean()
        return loss, {"df_loss": float(loss.detach())}
