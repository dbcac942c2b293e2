"""Distribution matching distillation on self-forcing rollouts (DMD: Yin et al. 2024; DMD2; Self Forcing).

Generator loss. x̂0 = student rollout (grad through each chunk's exit step). Re-noise at a random
FM level s: x_s = (1-s) x̂0 + s ε. Real score = frozen teacher with CFG, fake score = the critic;
both as x0 predictions x̂0_real/fake = x_s - s v. The DMD gradient of KL(p_fake || p_real) w.r.t. x̂0
is proportional to (score_fake - score_real) ∝ (x̂0_fake - x̂0_real) (up to a positive
time-dependent factor), normalized per sample by mean |x̂0 - x̂0_real| (DMD eq. 8):
    grad = (x̂0_fake - x̂0_real) / mean|x̂0 - x̂0_real|,  loss = ½ mean (x̂0 - sg(x̂0 - grad))²
so d loss / d x̂0 = grad / numel and gradient descent moves x̂0 from the fake towards the real
distribution. (Same as DMD2/Self-Forcing's ``0.5 * mse(x, (x - grad).detach())``.)

Critic ("fake score"). Initialised from the teacher, trained by flow matching on detached generator
samples (target v = ε - x̂0) with its own optimizer, ``critic_ratio`` updates per generator step via the
``after_step`` hook that the trainer calls. The teacher is frozen and in eval mode. Both scores attend
with ``score_mask``: block-causal (a causal teacher) or full (a bidirectional teacher, as Self-Forcing
and Causal-rCM use Wan2.1 itself as the real score).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config.errors import ConfigError
from ..diffusion.flow_matching import time_shift
from ..diffusion.step_schedule import build_schedule
from ..network import BatchNoise, Condition, Denoiser, TrainedSideModel
from ..selfforcing.rollout import RolloutConfig, self_forcing_rollout
from .base import Objective


@dataclass
class DMDConfig:
    guidance_scale: float = 3.0  # CFG of the real score (teacher)
    fake_guidance_scale: float = 1.0  # CFG of the fake score (1 = conditional only, as Self-Forcing)
    min_s: float = 0.02  # re-noising level range (FM s = t_wan / 1000), before the shift
    max_s: float = 0.98
    shift: float = 1.0  # time shift of the re-noising level (Self-Forcing and rCM use 5 on Wan; see the tiny recipe)
    critic_ratio: int = 1  # critic updates per generator step
    critic_lr: float = 1e-4
    critic_betas: tuple[float, float] = (0.0, 0.999)  # DMD2 / Self-Forcing use beta1 = 0
    critic_weight_decay: float = 0.0
    critic_grad_clip: float = 10.0
    critic_fresh_samples: bool = False  # True: every critic update rolls out a new (no-grad) sample
    score_mask: str = "block_causal"  # "block_causal" or "full": how teacher and critic attend
    normalizer_eps: float = 1e-8
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    seed: int = 0  # critic noise / exit-step RNG

    def validate(self, key: str = "DMDConfig") -> None:
        if self.score_mask not in ("block_causal", "full"):
            raise ConfigError(f"{key}.score_mask", self.score_mask, "'block_causal' or 'full'")
        if self.critic_ratio < 0:
            raise ConfigError(f"{key}.critic_ratio", self.critic_ratio, ">= 0")
        build_schedule(self.rollout, f"{key}.rollout")  # per-chunk steps and levels: lengths, order, range


def _levels_like(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample [B] or per-frame [B, F] levels broadcast over latents x [B, C, F, H, W] (temporal patch 1 frames
    repeat over their latent frames)."""
    if s.dim() == 1:
        return s.view(-1, 1, 1, 1, 1)
    return s.repeat_interleave(x.shape[2] // s.shape[1], dim=1)[:, None, :, None, None]


def dmd_gradient(x0_gen, x0_real, x0_fake, eps: float = 1e-8):
    """(x̂0_fake - x̂0_real) / mean_per_sample|x̂0_gen - x̂0_real|; no grad."""
    with torch.no_grad():
        dims = tuple(range(1, x0_gen.dim()))
        norm = (x0_gen - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(eps)
        return torch.nan_to_num((x0_fake - x0_real) / norm)


def dmd_loss(x0_gen, grad):
    """½ mean (x̂0 - sg(x̂0 - grad))² : its gradient w.r.t. x̂0 is grad / numel. Computed in float32+."""
    dt = torch.promote_types(x0_gen.dtype, torch.float32)
    target = (x0_gen.detach() - grad).to(dt)
    return 0.5 * F.mse_loss(x0_gen.to(dt), target, reduction="mean")


def sample_renoise_levels(batch: int, cfg: DMDConfig, noise: BatchNoise, generator=None, device="cpu",
                          dtype=torch.float32):
    """One FM level per sample, uniform in [min_s, max_s], then shifted (drawn for the global batch)."""
    u = noise.rand((batch,), generator=generator, device=device, dtype=dtype)
    s = cfg.min_s + (cfg.max_s - cfg.min_s) * u
    return time_shift(s, cfg.shift) if cfg.shift != 1.0 else s


class SelfForcingDMD(Objective):
    """Self-forcing + DMD objective: ``loss`` (generator) and ``after_step`` (``critic_ratio`` critic updates).

    The teacher (real score) is frozen; the critic (fake score) is a :class:`TrainedSideModel` that the
    trainer shards, checkpoints and steps under the run's layout.
    """

    name, config_class, phase_kinds, self_forcing, sequences = "dmd", DMDConfig, ("sf_dmd",), True, ("video",)
    holds_clean_frames = True  # the rollout holds the batch's first frames; scores see them clean; no loss there

    def __init__(self, teacher: Denoiser, cfg: DMDConfig, critic: TrainedSideModel):
        self.cfg = cfg
        cfg.validate()
        self.teacher, self._critic = teacher, critic
        self.rng = random.Random(cfg.seed)
        self.gen = None  # torch.Generator for critic noise, created on first use on the right device
        self._last_sample = None

    @classmethod
    def few_step_schedule(cls, cfg: DMDConfig):
        return cfg.rollout

    @classmethod
    def check_run(cls, cfg: DMDConfig, run, phase, key: str, parallel) -> None:
        if cfg.rollout.replayed_backprop and parallel.pp > 1:
            raise ConfigError(f"{key}.rollout.replayed_backprop", True,
                              "false under pipeline parallelism (parallel.pp > 1): the replay recomputes each chunk "
                              "inside backward, outside the pipeline schedule")

    @classmethod
    def from_phase(cls, cfg: DMDConfig, models):
        critic = models.new_critic(lr=cfg.critic_lr, betas=tuple(cfg.critic_betas),
                                   weight_decay=cfg.critic_weight_decay, grad_clip=cfg.critic_grad_clip)
        return cls(models.teacher, cfg, critic)

    def critic(self) -> TrainedSideModel:
        return self._critic

    # ------------------------------------------------------------------ helpers
    def _generator(self, device):
        if self.gen is None or self.gen.device != torch.device(device):
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(self.cfg.seed + 1)
        return self.gen

    def rollout(self, student: Denoiser, batch, noise: BatchNoise, grad: bool):
        x = batch["latents"]
        return self_forcing_rollout(student, Condition.from_batch(batch), tuple(x.shape), self.cfg.rollout,
                                    grad=grad, rng=self.rng, noise=noise, held=student.held_frames(x))

    def _renoise(self, x0, noise: BatchNoise, net: Denoiser | None = None):
        """(x_s, s) at a random level per sample, from the objective's own generator; with ``net``'s held first
        frames (``causal.clean_first_frames``) those stay clean at level 0 (then s is per frame)."""
        g = self._generator(x0.device)
        s = sample_renoise_levels(x0.shape[0], self.cfg, noise, g, x0.device, x0.dtype)
        eps = noise.randn_like(x0, generator=g)
        sb = s.view(-1, 1, 1, 1, 1)
        x_s = (1 - sb) * x0 + sb * eps
        if net is not None and net.clean_first_frames:
            x_s, s = net.hold_clean(x_s, s, x0)
        return x_s, s, eps

    # ------------------------------------------------------------------ generator
    def loss_from_sample(self, x0_gen, batch, noise: BatchNoise = BatchNoise(), student: Denoiser | None = None):
        """DMD loss and metrics for a generator sample x̂0 (with grad); ``student``: whose held first frames
        (``causal.clean_first_frames``) the scores see clean and the loss leaves out."""
        cfg = self.cfg
        cond = Condition.from_batch(batch)
        free = student.loss_frames if student is not None else (lambda e: e)
        with torch.no_grad():
            x_s, s, _ = self._renoise(x0_gen.detach(), noise, student)
            sb = _levels_like(s, x_s)
            v_real, _ = self.teacher.velocity(x_s, s, cond, attend=cfg.score_mask, guidance=cfg.guidance_scale)
            v_fake, _ = self._critic.net.velocity(x_s, s, cond, attend=cfg.score_mask,
                                                  guidance=cfg.fake_guidance_scale)
            grad = dmd_gradient(free(x0_gen.detach()), free(x_s - sb * v_real), free(x_s - sb * v_fake),
                                cfg.normalizer_eps)
        loss = dmd_loss(free(x0_gen), grad)
        metrics = {"dmd_loss": float(loss.detach()), "dmd_grad_norm": float(grad.norm() / grad.numel() ** 0.5),
                   "dmd_s": float(s.mean())}
        return loss, metrics

    def loss(self, student, batch, step):
        res = self.rollout(student, batch, step.noise, grad=True)
        self._last_sample = res.video.detach()
        loss, metrics = self.loss_from_sample(res.video, batch, step.noise, student)
        metrics["sf_exit_step"] = float(sum(res.exit_steps) / len(res.exit_steps))
        return loss, metrics

    # ------------------------------------------------------------------ critic
    def critic_loss(self, critic: Denoiser, x0, batch, noise: BatchNoise = BatchNoise()):
        """Flow matching of the critic on a detached generator sample (target v = ε - x̂0); held first frames stay
        clean and carry no loss (the critic is the student's kind of model: same ``causal`` config)."""
        x0 = x0.detach()
        x_s, s, eps = self._renoise(x0, noise, critic)
        v, _ = critic.velocity(x_s, s, Condition.from_batch(batch), attend=self.cfg.score_mask)
        return F.mse_loss(critic.loss_frames(v.float()), critic.loss_frames((eps - x0).float()))

    def critic_step(self, batch, noise: BatchNoise = BatchNoise(), sample=None, student: Denoiser | None = None):
        """One critic update; uses ``sample``, else a fresh no-grad rollout, else the last generator sample."""
        if sample is None:
            if self.cfg.critic_fresh_samples or self._last_sample is None:
                if student is None:
                    raise ValueError("critic_step needs a sample, a student, or a preceding loss() call")
                with torch.no_grad():
                    sample = self.rollout(student, batch, noise, grad=False).video
            else:
                sample = self._last_sample
        out = self._critic.update(lambda net: self.critic_loss(net, sample, batch, noise))
        return {"critic_loss": out["loss"], "critic_grad_norm": out["grad_norm"]}

    def after_step(self, student, batch, step) -> dict:
        out: dict = {}
        for _ in range(self.cfg.critic_ratio):
            for k, v in self.critic_step(batch, step.noise, student=student).items():
                out[k] = out.get(k, 0.0) + v / self.cfg.critic_ratio
        return out

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """The RNG streams (the critic's tensors and optimizer are checkpointed by the trainer)."""
        st = {"rng": self.rng.getstate()}
        if self.gen is not None:
            st["gen"] = self.gen.get_state()
        return st

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        if "gen" in state:
            self._generator(next(self._critic.model.parameters()).device).set_state(state["gen"])
