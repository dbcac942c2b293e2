"""The few-step sampler's noise levels, chunk by chunk: one definition for the self-forcing rollout and streaming.

A causal student denoises every chunk with a short schedule of flow-matching levels
``s_0 > s_1 > ... > s_{k-1}`` (x0 prediction, re-noise to the next level). Causal-rCM gives the first chunk
more steps than the rest (it sets the scene): ``steps_per_chunk: [4, 2]`` with one list of intermediate times
per entry, ``chunk_schedules: [[15/16, 5/6, 5/8], [5/6]]``, and a ``sigma_max`` that sets the first level
``sigma_max / (sigma_max + 1)``. Lists shorter than the number of chunks repeat their last entry.

Reference names (Causal-rCM, ``rcm/models/t2v_model_causal.py`` and its inference script):
``steps_per_chunk`` = ``sf_simulation_steps_per_chunk`` / ``--steps_per_chunk``, ``chunk_schedules`` =
``sf_backward_timestep_schedules`` / ``--mid_t_schedules``, ``sigma_max`` = ``sigma_max``;
``denoising_steps`` is Self-Forcing's ``denoising_step_list`` (Wan timesteps, 1000 = noise) and ``shift``
its ``warp_denoising_step`` shift. Without ``chunk_schedules`` a chunk of k steps takes the first k levels of
``denoising_steps`` (the reference's prefix rule for its ``backward_timesteps``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from ..config.errors import ConfigError
from .flow_matching import time_shift

WAN_T_SCALE = 1000.0


@dataclass
class StepScheduleConfig:
    """Which levels the few-step sampler visits in each chunk (see the module docstring)."""

    denoising_steps: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])  # Wan units
    shift: float = 1.0  # time shift applied to denoising_steps (Self-Forcing's "warp_denoising_step")
    steps_per_chunk: list[int] = field(default_factory=list)  # [] = len(denoising_steps) for every chunk
    chunk_schedules: list = field(default_factory=list)  # per steps_per_chunk entry: steps - 1 FM times in (0, 1)
    sigma_max: float = 0.0  # > 0: the first level is sigma_max / (sigma_max + 1) (Causal-rCM: 1600)


@dataclass(frozen=True)
class StepSchedule:
    """Resolved levels: ``per_entry[i]`` for chunk i, the last entry repeated for later chunks."""

    per_entry: tuple[tuple[float, ...], ...]

    def levels(self, chunk: int) -> tuple[float, ...]:
        return self.per_entry[min(chunk, len(self.per_entry) - 1)]

    def steps(self, chunk: int) -> int:
        return len(self.levels(chunk))

    def last_level(self, chunk: int) -> float:
        """The input level of the chunk's last denoising forward (what a noisy-context stream caches)."""
        return self.levels(chunk)[-1]

    @classmethod
    def uniform(cls, levels) -> "StepSchedule":
        return cls((tuple(float(s) for s in levels),))


def parse_time(value, key: str) -> float:
    """A flow-matching time given as a number or a fraction string ("15/16")."""
    try:
        return float(Fraction(value.strip())) if isinstance(value, str) else float(value)
    except (ValueError, ZeroDivisionError, TypeError):
        raise ConfigError(key, value, "a number or a fraction such as 15/16") from None


def parse_chunk_schedules(text: str, key: str = "--mid-t-schedules") -> list[list[float]]:
    """'15/16,5/6,5/8;5/6' -> [[0.9375, 0.8333, 0.625], [0.8333]] (an empty entry: a 1-step chunk)."""
    return [[parse_time(t, key) for t in item.replace(",", " ").split()] for item in text.split(";")]


def wan_levels(timesteps, key: str) -> list[float]:
    levels = [float(t) / WAN_T_SCALE for t in timesteps]
    bad = [t for t, s in zip(timesteps, levels) if not 0.0 < s <= 1.0]
    if not levels or bad:
        raise ConfigError(key, list(timesteps), f"Wan timesteps in (0, {WAN_T_SCALE:g}] (1000 = noise), e.g. "
                          "[1000, 750, 500, 250]")
    return levels


def build_schedule(cfg: StepScheduleConfig, key: str = "rollout", names: dict | None = None) -> StepSchedule:
    """Resolve and validate ``cfg``; a bad value is a ConfigError naming ``key.<field>`` (or ``names[field]``,
    e.g. a CLI flag)."""
    def name(field: str, index: int | None = None) -> str:
        n = (names or {}).get(field, f"{key}.{field}")
        return n if index is None or not n.startswith(key) else f"{n}.{index}"

    base = wan_levels(cfg.denoising_steps, name("denoising_steps"))
    if cfg.shift <= 0:
        raise ConfigError(name("shift"), cfg.shift, "a positive time shift (1 = none)")
    base = [float(time_shift(s, cfg.shift)) for s in base] if cfg.shift != 1.0 else base
    if cfg.sigma_max < 0:
        raise ConfigError(name("sigma_max"), cfg.sigma_max, ">= 0 (0 = the first of denoising_steps)")
    first = cfg.sigma_max / (cfg.sigma_max + 1.0) if cfg.sigma_max > 0 else base[0]
    steps = [int(k) for k in cfg.steps_per_chunk]
    if any(k < 1 for k in steps) or any(a < b for a, b in zip(steps, steps[1:])):
        raise ConfigError(name("steps_per_chunk"), list(cfg.steps_per_chunk),
                          "positive step counts that never increase from chunk to chunk (the last one repeats), "
                          "e.g. [4, 2]")
    schedules = list(cfg.chunk_schedules or [])
    if schedules and not steps:
        raise ConfigError(name("chunk_schedules"), schedules, f"absent, or set {name('steps_per_chunk')} with one "
                          "entry per schedule")
    if schedules and len(schedules) != len(steps):
        raise ConfigError(name("chunk_schedules"), schedules, f"one schedule per {name('steps_per_chunk')} entry "
                          f"({len(steps)})")
    if not steps:
        return StepSchedule(((first, *base[1:]),))
    entries = []
    for i, k in enumerate(steps):
        if schedules:
            mids = [parse_time(t, name("chunk_schedules", i)) for t in (schedules[i] or [])]
            if len(mids) != k - 1:
                raise ConfigError(name("chunk_schedules", i), schedules[i],
                                  f"{k - 1} intermediate times for {k} steps (entry {i} of "
                                  f"{name('steps_per_chunk')})")
        else:
            if k > len(base):
                raise ConfigError(name("steps_per_chunk", i), k, f"<= {len(base)} (the levels of "
                                  f"{name('denoising_steps')}), or give {name('chunk_schedules')}")
            mids = base[1:k]
        levels = (first, *mids)
        if any(not 0.0 < s <= 1.0 for s in levels) or any(a <= b for a, b in zip(levels, levels[1:])):
            raise ConfigError(name("chunk_schedules", i) if schedules else name("denoising_steps"), list(levels),
                              "levels in (0, 1] that strictly decrease from the first level")
        entries.append(levels)
    return StepSchedule(tuple(entries))
