"""ODE-regression initialisation (CausVid, Yin et al. 2025; Self-Forcing's ``ode`` init): regress the causal
few-step student onto the teacher's ODE.

Data: the teacher's ODE states at the student's K sampling levels plus the ODE's end point x0 — from the
batch (``generate-data --trajectory K``: keys ``trajectory`` [B, K, C, F, H, W], ``trajectory_levels``
[B, K], ``latents`` = x0), or computed on the fly from the phase's teacher (``teacher_from``: an earlier
causal phase, streamed chunk by chunk, or a diffusers folder with ``teacher_mask: full``). Loss: every
chunk takes the ODE state at its own random one of the K levels (independently per chunk, as CausVid's
``independent`` frames); the student sees the whole video block-causally and its x0 prediction
``x - s v`` regresses onto the ODE's x0. Sequence: the video's frames (no clean copy).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config.errors import ConfigError
from ..network import Condition
from .base import Objective

TEACHER_MASKS = ("block_causal", "full")


@dataclass
class ODERegressionConfig:
    # used only when the batch holds no trajectory (the teacher's ODE is then solved for every batch):
    denoising_steps: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])  # student, Wan units
    shift: float = 1.0  # time shift of denoising_steps (Self-Forcing's warp_denoising_step)
    ode_steps: int = 32  # the teacher's ODE steps (shifted uniform grid + the student's levels)
    ode_shift: float = 1.0
    guidance_scale: float = 3.0  # the teacher's CFG
    teacher_mask: str = "block_causal"  # block_causal (a causal teacher phase) | full (a diffusers Wan teacher)
    solver: str = "multistep2"  # multistep2 | euler

    def validate(self, key: str = "ODERegressionConfig") -> None:
        from ..diffusion.step_schedule import wan_levels

        if self.teacher_mask not in TEACHER_MASKS:
            raise ConfigError(f"{key}.teacher_mask", self.teacher_mask, f"one of {TEACHER_MASKS}")
        if self.ode_steps < 1:
            raise ConfigError(f"{key}.ode_steps", self.ode_steps, "a positive number of ODE steps")
        if self.solver not in ("multistep2", "euler"):
            raise ConfigError(f"{key}.solver", self.solver, "multistep2 or euler")
        wan_levels(self.denoising_steps, f"{key}.denoising_steps")

    def levels(self) -> list[float]:
        from ..selfforcing.rollout import denoise_levels

        return denoise_levels(self.denoising_steps, self.shift)


class ODERegressionObjective(Objective):
    name, config_class, phase_kinds, teacher_role = "ode_regression", ODERegressionConfig, ("tf_cm",), "optional"
    sequences = ("video",)
    # held first frames: the ODE's own end point at level 0 (the clean frames the rest of its video goes with)
    holds_clean_frames = True

    def __init__(self, cfg: ODERegressionConfig = ODERegressionConfig(), teacher=None):
        cfg.validate()
        self.cfg, self.teacher = cfg, teacher

    @classmethod
    def check_run(cls, cfg, run, phase, key: str, parallel) -> None:
        if not phase.teacher_from and run.data.kind != "latent_shards":
            raise ConfigError(key.rsplit(".", 1)[0] + ".teacher_from", phase.teacher_from,
                              "a teacher (an earlier phase or diffusers:DIR) whose ODE is solved on the fly, or "
                              "data.kind=latent_shards made by `generate-data --trajectory K`")

    @classmethod
    def from_phase(cls, cfg, models):
        return cls(cfg, models.teacher)

    @torch.no_grad()
    def trajectory(self, batch: dict, noise) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0 [B, C, F, H, W], states [B, K, C, F, H, W], levels [B, K]) from the batch or the teacher's ODE."""
        x0 = batch["latents"]
        if "trajectory" in batch:
            return x0, batch["trajectory"].to(x0.dtype), batch["trajectory_levels"].to(x0.dtype)
        if self.teacher is None:
            raise ConfigError("data.shard_dir", None, "latent shards with ODE trajectories (`generate-data "
                              "--trajectory K`), or a teacher_from for ode_regression to solve the ODE on the fly")
        from ..inference.trajectory import teacher_trajectory

        c, levels = self.cfg, self.cfg.levels()
        fresh = lambda shape: noise.randn(shape, device=x0.device, dtype=x0.dtype)  # noqa: E731
        end, states = teacher_trajectory(self.teacher, Condition.from_batch(batch), fresh(tuple(x0.shape)), levels,
                                         c.ode_steps, c.ode_shift, c.guidance_scale, c.teacher_mask, c.solver, fresh)
        return end, states, torch.tensor(levels, dtype=x0.dtype, device=x0.device).expand(x0.shape[0], -1)

    def loss(self, student, batch, step):
        target, states, levels = self.trajectory(batch, step.noise)
        b, k = levels.shape
        layout = student.layout(target)
        pick = step.noise.randint(k, (b, layout.n_chunks), device=target.device)  # per (sample, chunk)
        pick_frames = layout.to_frames(pick, student.patch_frames)  # [B, latent frames]
        index = pick_frames[:, None, None, :, None, None].expand(-1, 1, *states.shape[2:])
        x = states.gather(1, index)[:, 0]  # [B, C, F, H, W]: every chunk at its own level
        s = levels.gather(1, layout.to_frames(pick))  # [B, patched frames]
        x, s = student.hold_clean(x, s, target)
        v, _ = student.velocity(x, s, Condition.from_batch(batch), attend="block_causal")
        x0 = x - s[:, None, :, None, None].repeat_interleave(student.patch_frames, 2) * v
        loss = student.loss_frames(x0.float() - target.float()).pow(2).mean()
        return loss, {"ode_loss": float(loss.detach()), "ode_level": float(s.mean())}
