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
samples (target v = ε - x̂0) with its own AdamW, ``critic_ratio`` updates per generator step via the
``after_student_step`` hook that the trainer calls. The teacher is frozen and in eval mode.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..diffusion.flow_matching import time_shift
from ..ops.masks import block_causal_mask
from ..parallel.noise import dp_draw, randn_like
from ..parallel.pipeline import outputs_on_every_stage, pipeline_forward_backward
from ..selfforcing.rollout import RolloutConfig, self_forcing_rollout

WAN_T = 1000.0


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

    @classmethod
    def from_dict(cls, d: dict | None) -> "DMDConfig":
        """From a YAML/CLI mapping; ``rollout`` may be a nested mapping. Unknown keys are an error."""
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown DMDConfig keys {bad}; known: {sorted(known)}")
        if isinstance(d.get("rollout"), dict):
            d["rollout"] = RolloutConfig(**d["rollout"])
        if "critic_betas" in d:
            d["critic_betas"] = tuple(d["critic_betas"])
        return cls(**d)


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


def sample_renoise_levels(batch: int, cfg: DMDConfig, generator=None, device="cpu", dtype=torch.float32):
    """One FM level per sample, uniform in [min_s, max_s], then shifted."""
    u = dp_draw(lambda shape: torch.rand(shape, generator=generator, device=device, dtype=dtype), (batch,))
    s = cfg.min_s + (cfg.max_s - cfg.min_s) * u
    return time_shift(s, cfg.shift) if cfg.shift != 1.0 else s


def guided_velocity(model, x, t, context, uncond_context, scale, mask, actions=None):
    """v_u + w (v_c - v_u) in one batched forward; plain conditional when w = 1 or no uncond context."""
    if scale == 1.0 or uncond_context is None:
        return outputs_on_every_stage(model, (model(x, t, context, mask, actions=actions),), (x,))[0]
    a2 = None if actions is None else torch.cat([actions, actions])
    x2 = torch.cat([x, x])
    v = model(x2, torch.cat([t, t]), torch.cat([context, uncond_context]), mask, actions=a2)
    vc, vu = outputs_on_every_stage(model, (v,), (x2,))[0].chunk(2)
    return vu + scale * (vc - vu)


class SelfForcingDMD:
    """Self-forcing + DMD objective: ``loss(student, batch, step)`` and ``after_student_step`` (critic).

    Not an nn.Module on purpose: the trainer's optimizer must not see the teacher or critic; the
    critic and its optimizer go through ``extra_state``/``load_extra_state`` (state.pt).
    """

    def __init__(self, teacher, cfg: DMDConfig | None = None, critic=None, student=None):
        self.cfg = cfg or DMDConfig()
        if self.cfg.score_mask not in ("block_causal", "full"):
            raise ValueError(f"DMDConfig.score_mask must be 'block_causal' or 'full', got {self.cfg.score_mask!r}")
        if self.cfg.critic_ratio < 0:
            raise ValueError("DMDConfig.critic_ratio must be >= 0")
        self.teacher = teacher.eval().requires_grad_(False)
        self.critic = critic if critic is not None else copy.deepcopy(teacher)
        self.critic.train().requires_grad_(True)
        self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=self.cfg.critic_lr,
                                            betas=tuple(self.cfg.critic_betas),
                                            weight_decay=self.cfg.critic_weight_decay)
        self.student = student  # optional: lets critic_step roll out fresh samples without an argument
        self.rng = random.Random(self.cfg.seed)
        self.gen = None  # torch.Generator for critic noise, created on first use on the right device
        self._last_sample = None
        self._masks: dict = {}
        self.sync_and_clip = None  # trainer hook: (critic, max_norm) -> grad norm, for data/model parallelism

    # ------------------------------------------------------------------ helpers
    def _generator(self, device):
        if self.gen is None or self.gen.device != torch.device(device):
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(self.cfg.seed + 1)
        return self.gen

    def _mask(self, model, x):
        if self.cfg.score_mask == "full":
            return None
        f, h, w = x.shape[2:]
        key = (f, h, w, model.causal.chunk_frames, model.causal.window_chunks, model.causal.sink_chunks)
        if key not in self._masks:
            frames = f // model.patch[0]
            self._masks[key] = block_causal_mask(frames, model.tokens_per_frame(h, w), model.causal.chunk_frames,
                                                 model.visibility())
        return self._masks[key]

    def _per_frame(self, model, s, x):
        return (s * WAN_T)[:, None].expand(x.shape[0], x.shape[2] // model.patch[0])

    def rollout(self, student, batch, grad: bool):
        x = batch["latents"]
        return self_forcing_rollout(student, batch["context"], tuple(x.shape), self.cfg.rollout,
                                    actions=batch.get("actions"), grad=grad, rng=self.rng)

    # ------------------------------------------------------------------ generator
    def loss_from_sample(self, x0_gen, batch):
        """DMD loss and metrics for a generator sample x̂0 (with grad)."""
        cfg = self.cfg
        g = self._generator(x0_gen.device)
        s = sample_renoise_levels(x0_gen.shape[0], cfg, g, x0_gen.device, x0_gen.dtype)
        eps = randn_like(x0_gen, generator=g)
        with torch.no_grad():
            sb = s.view(-1, 1, 1, 1, 1)
            x_s = (1 - sb) * x0_gen.detach() + sb * eps
            t = self._per_frame(self.teacher, s, x0_gen)
            mask = self._mask(self.teacher, x0_gen)
            act = batch.get("actions")
            v_real = guided_velocity(self.teacher, x_s, t, batch["context"], batch.get("uncond_context"),
                                     cfg.guidance_scale, mask, act)
            v_fake = guided_velocity(self.critic, x_s, t, batch["context"], batch.get("uncond_context"),
                                     cfg.fake_guidance_scale, mask, act)
            x0_real, x0_fake = x_s - sb * v_real, x_s - sb * v_fake
            grad = dmd_gradient(x0_gen.detach(), x0_real, x0_fake, cfg.normalizer_eps)
        loss = dmd_loss(x0_gen, grad)
        metrics = {"dmd_loss": float(loss.detach()), "dmd_grad_norm": float(grad.norm() / grad.numel() ** 0.5),
                   "dmd_s": float(s.mean())}
        return loss, metrics

    def loss(self, student, batch, step):
        res = self.rollout(student, batch, grad=True)
        self._last_sample = res.video.detach()
        loss, metrics = self.loss_from_sample(res.video, batch)
        metrics["sf_exit_step"] = float(sum(res.exit_steps) / len(res.exit_steps))
        return loss, metrics

    # ------------------------------------------------------------------ critic
    def critic_loss(self, x0, batch):
        """Flow matching of the critic on a detached generator sample (target v = ε - x̂0)."""
        g = self._generator(x0.device)
        x0 = x0.detach()
        s = sample_renoise_levels(x0.shape[0], self.cfg, g, x0.device, x0.dtype)
        eps = randn_like(x0, generator=g)
        sb = s.view(-1, 1, 1, 1, 1)
        x_s = (1 - sb) * x0 + sb * eps
        v = self.critic(x_s, self._per_frame(self.critic, s, x0), batch["context"], self._mask(self.critic, x0),
                        actions=batch.get("actions"))
        v = outputs_on_every_stage(self.critic, (v,), (x_s,))[0]
        return F.mse_loss(v.float(), (eps - x0).float())

    def critic_step(self, batch, sample=None, student=None):
        """One AdamW update of the critic; uses ``sample``, else a fresh no-grad rollout, else the last sample."""
        student = student or self.student
        if sample is None:
            if self.cfg.critic_fresh_samples or self._last_sample is None:
                if student is None:
                    raise ValueError("critic_step needs a sample, a student, or a preceding loss() call")
                with torch.no_grad():
                    sample = self.rollout(student, batch, grad=False).video
            else:
                sample = self._last_sample
        self.critic.train()
        self.critic_opt.zero_grad(set_to_none=True)
        ctx = getattr(self.critic, "parallel", None)
        if ctx is not None and ctx.pp > 1:  # forward + backward through the critic's pipeline stages
            loss = pipeline_forward_backward(self.critic, [batch], lambda m, mb: self.critic_loss(sample, mb),
                                             lambda out, mb: out)
        else:
            loss = self.critic_loss(sample, batch)
            loss.backward()
        max_norm = self.cfg.critic_grad_clip if self.cfg.critic_grad_clip > 0 else float("inf")
        if self.sync_and_clip is not None:  # multi-process: gradient sync + global-norm clipping
            gn = self.sync_and_clip(self.critic, max_norm)
        else:
            gn = torch.nn.utils.clip_grad_norm_(self.critic.parameters(), max_norm)
        self.critic_opt.step()
        return {"critic_loss": float(loss.detach()), "critic_grad_norm": float(gn)}

    def after_student_step(self, student, batch, step) -> dict:
        """Trainer hook: ``critic_ratio`` critic updates after each generator step."""
        out: dict = {}
        for i in range(self.cfg.critic_ratio):
            m = self.critic_step(batch, student=student)
            for k, v in m.items():
                out[k] = out.get(k, 0.0) + v / self.cfg.critic_ratio
        return out

    # ------------------------------------------------------------------ trainer plumbing
    def trainable_parameters(self):
        return []  # the critic has its own optimizer

    def extra_state(self, with_critic: bool = True) -> dict:
        """RNG states and, with ``with_critic``, the critic's weights and optimizer state.

        The trainer passes False: its checkpoints hold the critic as sharded tensors (and a ZeRO-1
        critic optimizer has no local full state dict to give).
        """
        st = {"rng": self.rng.getstate()}
        if with_critic:
            st["critic"] = {k: v.detach().cpu() for k, v in self.critic.state_dict().items()}
            st["critic_opt"] = self.critic_opt.state_dict()
        if self.gen is not None:
            st["gen"] = self.gen.get_state()
        return st

    def load_extra_state(self, state: dict) -> None:
        """Inverse of :meth:`extra_state`; critic entries that are absent (or a placeholder string, as in
        older checkpoints) were loaded from the checkpoint's tensors already."""
        if isinstance(state.get("critic"), dict):
            self.critic.load_state_dict(state["critic"])
        if isinstance(state.get("critic_opt"), dict):
            self.critic_opt.load_state_dict(state["critic_opt"])
        self.rng.setstate(state["rng"])
        if "gen" in state:
            self._generator(next(self.critic.parameters()).device).set_state(state["gen"])

    state_dict = extra_state
    load_state_dict = load_extra_state
