"""The objective contract: what the trainer (and checkpoints) may ask of an objective, in one place.

An objective is one class with class attributes that the registry and config checks read, one
constructor from a phase (:meth:`Objective.from_phase`), and the loss. It talks to networks only
through :class:`~megatron_rcm.network.Denoiser` s and draws all noise from the
:class:`~megatron_rcm.network.StepContext` it is handed, so it runs unchanged under every parallel
layout (nothing here imports ``parallel/``). Optional hooks have defaults that do nothing:
  * :meth:`side_modules`: small modules trained with the student's optimizer (sCM's adaptive weight);
  * :meth:`critic`: a second model with its own optimizer (DMD's fake score), obtained from
    :meth:`PhaseModels.new_critic` so the trainer can shard it, checkpoint it and step it;
  * :meth:`after_step`: work after each student step (critic updates);
  * :meth:`state_dict` / :meth:`load_state_dict`: small state for exact resumes (RNG streams).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from ..config.errors import ConfigError
from ..network import Denoiser, StepContext, TrainedSideModel

TEACHER_ROLES = ("required", "optional", "none")


@dataclass
class PhaseModels:
    """The frozen models of a phase and the factory for trained side models, built by the trainer."""

    teacher: Denoiser | None = None
    # new_critic(lr=, betas=, weight_decay=, grad_clip=) -> a trainable copy of the teacher, with its optimizer
    new_critic: Callable[..., TrainedSideModel] | None = None

    @classmethod
    def local(cls, teacher=None) -> "PhaseModels":
        """One process (tests, scripts): the critic is a deep copy of the teacher with a plain AdamW."""
        net = None if teacher is None else Denoiser.of(teacher)

        def new_critic(lr, betas=(0.9, 0.999), weight_decay=0.0, grad_clip=0.0):
            return TrainedSideModel.local(copy.deepcopy(net.model), lr, betas, weight_decay, grad_clip)

        return cls(net, new_critic if net is not None else None)


def config_from_dict(cls, args: dict, key: str):
    """A config dataclass from a YAML mapping; nested dataclass fields from nested mappings, tuple fields
    from lists. An unknown key or a wrong value is a ConfigError naming ``key.field``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    for k, v in dict(args or {}).items():
        if k not in names:
            raise ConfigError(f"{key}.{k}", v, f"a field of {cls.__name__}: {sorted(names)}")
        hint = hints.get(k)
        if dataclasses.is_dataclass(hint) and isinstance(v, dict):
            v = config_from_dict(hint, v, f"{key}.{k}")
        elif typing.get_origin(hint) is tuple and isinstance(v, (list, tuple)):
            v = tuple(v)
        kw[k] = v
    try:
        cfg = cls(**kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(key, dict(args or {}), f"valid {cls.__name__} values ({e})") from None
    check = getattr(cfg, "validate", None)
    if check is not None:
        check(key)
    return cfg


class Objective:
    """Base class of every training objective (see the module docstring)."""

    name: ClassVar[str]  # the registry name, used in ``phases.N.objective``
    config_class: ClassVar[type]  # the dataclass that ``phases.N.objective_args`` is checked against
    phase_kinds: ClassVar[tuple[str, ...]]  # the phase kinds it may run in
    teacher_role: ClassVar[str] = "required"  # does it need a frozen ``teacher_from``: required|optional|none
    self_forcing: ClassVar[bool] = False  # rolls the student out with its KV cache (layout checks, no micro-batches)
    # the token sequences its network calls run (context-parallel layout checks): "teacher_forcing" = the
    # [clean ; noisy] sequence (2x the video's frames), "video" = the video's own frames
    sequences: ClassVar[tuple[str, ...]] = ("teacher_forcing",)
    # honours causal.clean_first_frames (image-to-video training: the held first frames are given clean at level 0,
    # never noised, and carry no loss; ``Denoiser.hold_clean`` / ``loss_frames``); others refuse it at config load
    holds_clean_frames: ClassVar[bool] = False

    @classmethod
    def parse_config(cls, args: dict, key: str):
        return config_from_dict(cls.config_class, args, key)

    @classmethod
    def needs_interval_embedding(cls, cfg) -> bool:
        """Whether the student must have the MeanFlow interval embedding (``model.interval_embedding``)."""
        return False

    @classmethod
    def few_step_schedule(cls, cfg):
        """The per-chunk few-step schedule it trains the student for (a ``StepScheduleConfig``, e.g. the SF-DMD
        rollout's), reported as its own quality row; None when it has none."""
        return None

    @classmethod
    def check_run(cls, cfg, run, phase, key: str, parallel) -> None:
        """Checks of the parsed ``objective_args`` (``cfg``) against the whole run config, the phase and the
        parallel layout; raise ConfigError naming the key (``key`` = ``phases.N.objective_args``). Default: none."""
        return None

    @classmethod
    def from_phase(cls, cfg, models: PhaseModels) -> "Objective":
        """Build from the phase's config and models; objectives that use no teacher are built from the config."""
        if cls.teacher_role == "none":
            return cls(cfg)
        raise NotImplementedError(f"{cls.__name__} uses a teacher: define from_phase")

    def loss(self, student: Denoiser, batch: dict, step: StepContext) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def side_modules(self) -> list[nn.Module]:
        return []

    def critic(self) -> TrainedSideModel | None:
        return None

    def after_step(self, student: Denoiser, batch: dict, step: StepContext) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


class AdaptiveWeight(nn.Module):
    """Learned log-weight w(t) (EDM2/sCM uncertainty weighting): loss = exp(-w) L + w, optimum w = log L.

    t is fed as Fourier features of a scalar time code (e.g. log tan t for TrigFlow); zero-init output so
    training starts unweighted.
    """

    def __init__(self, num_features: int = 64, scale: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_features // 2) * scale * 2 * math.pi)
        self.register_buffer("phases", torch.rand(num_features // 2) * 2 * math.pi)
        self.linear = nn.Linear(num_features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, code):
        a = code[..., None].float() * self.freqs + self.phases
        feats = torch.cat([torch.cos(a), torch.sin(a)], dim=-1) * math.sqrt(2 / self.freqs.numel())
        return self.linear(feats.to(self.linear.weight.dtype))[..., 0]
