"""Objective registry: ``phases.N.objective`` name -> objective class. A new objective is one module in
``objectives/`` (a subclass of :class:`~megatron_rcm.objectives.Objective`) plus one entry here; the
config checks, the trainer, checkpoints and the parallel tests read everything else from the class.
"""
from __future__ import annotations

from ..config.errors import ConfigError


def objectives() -> dict:
    """name -> class (imported lazily: configs are checked without importing torch-heavy modules twice)."""
    from ..objectives import (DCMObjective, DiffusionForcingObjective, FlowMatchingObjective, MeanFlowObjective,
                              ODERegressionObjective, RCMObjective, SCMObjective, SelfForcingDMD)

    return {cls.name: cls for cls in (FlowMatchingObjective, DiffusionForcingObjective, DCMObjective, SCMObjective,
                                      MeanFlowObjective, ODERegressionObjective, SelfForcingDMD, RCMObjective)}


def objective_class(phase, key: str):
    table = objectives()
    if phase.objective not in table:
        raise ConfigError(f"{key}.objective", phase.objective, f"one of {sorted(table)}")
    return table[phase.objective]


def validate_objective(phase, key: str, model_cfg=None) -> None:
    """Check a phase's objective, kind, teacher and args; with ``model_cfg`` also the model features it needs."""
    cls = objective_class(phase, key)
    if phase.kind not in cls.phase_kinds:
        raise ConfigError(f"{key}.kind", phase.kind, f"{' or '.join(cls.phase_kinds)} for objective '{cls.name}'")
    if cls.teacher_role == "required" and not phase.teacher_from:
        raise ConfigError(f"{key}.teacher_from", phase.teacher_from,
                          f"an earlier phase name: objective '{cls.name}' distills from a frozen teacher")
    if cls.teacher_role == "none" and phase.teacher_from:
        raise ConfigError(f"{key}.teacher_from", phase.teacher_from, f"empty: objective '{cls.name}' uses no teacher")
    cfg = cls.parse_config(dict(phase.objective_args), f"{key}.objective_args")
    if model_cfg is not None and cls.needs_interval_embedding(cfg) and not model_cfg.interval_embedding:
        raise ConfigError("model.interval_embedding", model_cfg.interval_embedding,
                          f"true: {key} ('{phase.name}') trains MeanFlow, whose net needs the interval t - r as a "
                          "second input; set model.interval_embedding=true (zero-init, teachers load into it)")


def is_self_forcing(phase) -> bool:
    """Whether the phase's objective rolls the student out with its KV cache (layout checks, no micro-batches)."""
    return objectives()[phase.objective].self_forcing


def build_objective(phase, models):
    """The phase's objective from its parsed ``objective_args`` and the phase's models (:class:`PhaseModels`)."""
    key = f"phases.{phase.name}"
    cls = objective_class(phase, key)
    return cls.from_phase(cls.parse_config(dict(phase.objective_args), f"{key}.objective_args"), models)
