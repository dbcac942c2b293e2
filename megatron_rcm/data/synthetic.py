"""The embedded default data set (DESIGN.md section 6): procedurally rendered moving shapes.

Each video shows one anti-aliased shape moving on a torus (wraps at the borders, so it never
leaves the frame). The prompt class fixes direction, speed and shape kind; colour, size, start
position and background are random per video, so a model (and the evaluation classifier) must
use the *motion* to tell classes apart. With ``action_dim > 0`` the shape is instead driven by
per-frame one-hot actions (a world model): action k moves it along angle 2*pi*k/action_dim.
"""
from __future__ import annotations

import math

import torch

from ..config.errors import ConfigError
from .config import DATA_KINDS, DataConfig, validate_data  # noqa: F401  (re-exported)

_TEXT_SEED = 0x7E47  # fixed: the built-in conditioner is a constant table, not learned


class TextConditioner:
    """Class id -> fixed context [text_len, text_dim]; row ``num_classes`` is the null (CFG) context."""

    def __init__(self, num_classes: int, text_len: int = 8, text_dim: int = 32, seed: int = _TEXT_SEED):
        g = torch.Generator().manual_seed(seed)
        self.num_classes = num_classes
        self.table = torch.randn(num_classes + 1, text_len, text_dim, generator=g)

    def __call__(self, class_id: torch.Tensor) -> torch.Tensor:
        return self.table[class_id.long()]

    def uncond(self, batch: int) -> torch.Tensor:
        return self.table[self.num_classes].expand(batch, -1, -1).clone()


def class_motion(class_id: int, num_classes: int) -> tuple[float, float, int]:
    """(angle, speed px/frame, shape kind) of a class: 8 directions, two speeds, two shapes."""
    angle = 2 * math.pi * (class_id % 8) / 8
    speed = 1.5 if (class_id // 8) % 2 == 0 else 2.5
    return angle, speed, class_id % 2  # 0 = disk, 1 = square


def _sample_rng(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + index * 7919 + 17) % (2**62))


def render(centres: torch.Tensor, radius: float, kind: int, colour: torch.Tensor, bg: torch.Tensor,
           height: int, width: int) -> torch.Tensor:
    """Anti-aliased shape at sub-pixel centres [F, 2] (y, x) on a torus -> [3, F, H, W] in [-1, 1]."""
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    dy = ys[None, :, None] - centres[:, 0, None, None]
    dx = xs[None, None, :] - centres[:, 1, None, None]
    dy = torch.remainder(dy + height / 2, height) - height / 2  # toroidal offsets
    dx = torch.remainder(dx + width / 2, width) - width / 2
    if kind == 0:
        dist = torch.sqrt(dy**2 + dx**2) - radius
    else:
        dist = torch.maximum(dy.abs(), dx.abs()) - radius * 0.9
    cover = (0.5 - dist).clamp(0.0, 1.0)  # 1-pixel linear ramp = area coverage approximation
    img = bg[:, None, None, None] * (1 - cover)[None] + colour[:, None, None, None] * cover[None]
    return img * 2 - 1


def make_sample(cfg: DataConfig, index: int) -> dict:
    """One video, fully determined by (cfg.seed, index)."""
    g = _sample_rng(cfg.seed, index)
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    cls = int(torch.randint(cfg.num_classes, (1,), generator=g))
    angle, speed, kind = class_motion(cls, cfg.num_classes)
    radius = 3.0 + 2.0 * float(u(1)) * min(cfg.height, cfg.width) / 32
    colour = 0.55 + 0.45 * u(3)
    bg = 0.25 * u(3)
    start = u(2) * torch.tensor([cfg.height, cfg.width], dtype=torch.float32)
    F = cfg.num_frames
    out = {"class_id": cls}
    if cfg.action_dim:
        # piecewise-constant random actions; action at frame t moves the shape between t-1 and t
        acts = torch.empty(F, dtype=torch.long)
        t = 0
        while t < F:
            run = int(torch.randint(2, 5, (1,), generator=g))
            acts[t:t + run] = int(torch.randint(cfg.action_dim, (1,), generator=g))
            t += run
        ang = 2 * math.pi * acts.float() / cfg.action_dim
        step = torch.stack([-torch.sin(ang), torch.cos(ang)], -1) * 2.0
        step[0] = 0.0  # frame 0 is the start position
        centres = start + torch.cumsum(step, 0)
        out["actions"] = torch.nn.functional.one_hot(acts, cfg.action_dim).float()
    else:
        vel = torch.tensor([-math.sin(angle), math.cos(angle)]) * speed  # y grows downward
        centres = start + torch.arange(F, dtype=torch.float32)[:, None] * vel
    out["centres"] = centres  # ground-truth trajectory [F, 2] (y, x); not collated into batches
    out["latents"] = render(centres, radius, kind, colour, bg, cfg.height, cfg.width)
    return out


class SyntheticVideoDataset:
    """Infinite stream of batches; resumable (state_dict gives the exact next batch) and rank-sharded.

    Batch ``s`` of rank ``r`` holds sample indices ``(s * world_size + r) * B + b``, so ranks are
    disjoint and a resumed run reproduces the stream exactly.
    """

    def __init__(self, cfg: DataConfig, batch_size: int | None = None, rank: int = 0, world_size: int = 1):
        validate_data(cfg)
        if not 0 <= rank < world_size:
            raise ConfigError("data.rank", rank, f"0 <= rank < world_size ({world_size})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.batch_size = batch_size or cfg.batch_size
        self.text = TextConditioner(cfg.num_classes, cfg.text_len, cfg.text_dim)
        self.step = 0

    def sample_indices(self, step: int) -> list[int]:
        base = (step * self.world_size + self.rank) * self.batch_size
        return list(range(base, base + self.batch_size))

    def batch_at(self, step: int) -> dict:
        return collate([make_sample(self.cfg, i) for i in self.sample_indices(step)], self.text)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"kind": "synthetic", "step": self.step, "seed": self.cfg.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.cfg.seed) != self.cfg.seed:
            raise ConfigError("data.seed", self.cfg.seed, f"the checkpoint's data seed {state['seed']}")
        self.step = int(state["step"])


def collate(samples: list[dict], text: TextConditioner) -> dict:
    cls = torch.tensor([s["class_id"] for s in samples], dtype=torch.long)
    batch = {"latents": torch.stack([s["latents"] for s in samples]).float(),
             "context": text(cls), "uncond_context": text.uncond(len(samples)), "class_id": cls}
    if "actions" in samples[0]:
        batch["actions"] = torch.stack([s["actions"] for s in samples])
    return batch
