"""Objective registry: phase config -> objective instance. The one place a new objective is wired in.

``objective_args`` of a phase are checked against the objective's config dataclass at config-load
time (unknown keys and wrong kinds fail before any work, naming ``phases.N.objective_args.KEY``).
"""
from __future__ import annotations

import dataclasses

from ..config.errors import ConfigError

# objective -> (phase kinds it may run in, needs a frozen teacher)
# meanflow: teacher optional; with ``teacher_from`` v is the teacher's CFG velocity (distillation),
# without it v = eps - x0 (MeanFlow trained from data).
OBJECTIVES = {
    "flow_matching": (("teacher",), False),
    "dcm": (("tf_cm",), True),
    "scm": (("tf_cm",), True),
    "meanflow": (("tf_cm",), False),
    "dmd": (("sf_dmd",), True),
    "rcm": (("sf_dmd", "tf_cm"), True),
}


def _config_classes():
    from ..objectives import DCMConfig, FMConfig, MeanFlowConfig, SCMConfig
    from ..objectives.dmd import DMDConfig
    from ..objectives.rcm import RCMConfig

    return {"flow_matching": FMConfig, "dcm": DCMConfig, "scm": SCMConfig, "meanflow": MeanFlowConfig,
            "dmd": DMDConfig, "rcm": RCMConfig}


def _from_dict(cls, args: dict, key: str):
    if cls.__name__ == "DMDConfig":
        try:
            return cls.from_dict(args)
        except (TypeError, ValueError) as e:
            raise ConfigError(key, dict(args), f"DMDConfig fields ({e})") from None
    names = {f.name for f in dataclasses.fields(cls)}
    for k in args:
        if k not in names:
            raise ConfigError(f"{key}.{k}", args[k], f"a field of {cls.__name__}: {sorted(names)}")
    try:
        return cls(**args)
    except TypeError as e:
        raise ConfigError(key, dict(args), f"valid {cls.__name__} values ({e})") from None


RCM_CM_CHOICES = ("scm", "meanflow")  # the consistency part of rCM (objective_args.cm, default scm)


def _rcm_parts(args: dict, key: str):
    """(cm name, cm config, DMD config, rCM config) from ``{cm: scm|meanflow, scm|meanflow: {..}, dmd, rcm}``."""
    classes = _config_classes()
    unknown = set(args) - {"cm", *RCM_CM_CHOICES, "dmd", "rcm"}
    if unknown:
        raise ConfigError(f"{key}.{sorted(unknown)[0]}", None, "one of cm, scm, meanflow, dmd, rcm")
    cm = args.get("cm", "scm")
    if cm not in RCM_CM_CHOICES:
        raise ConfigError(f"{key}.cm", cm, f"one of {list(RCM_CM_CHOICES)} (the consistency part of rCM)")
    for other in RCM_CM_CHOICES:
        if other != cm and other in args:
            raise ConfigError(f"{key}.{other}", dict(args[other]), f"absent, or set {key}.cm={other} to use it")
    return (cm, _from_dict(classes[cm], dict(args.get(cm, {})), f"{key}.{cm}"),
            _from_dict(classes["dmd"], dict(args.get("dmd", {})), f"{key}.dmd"),
            _from_dict(classes["rcm"], dict(args.get("rcm", {})), f"{key}.rcm"))


def trains_meanflow(phase) -> bool:
    """MeanFlow (alone or as rCM's CM part) needs the model's interval embedding."""
    if phase.objective == "meanflow":
        return True
    return phase.objective == "rcm" and dict(phase.objective_args).get("cm", "scm") == "meanflow"


def validate_objective(phase, key: str, model_cfg=None) -> None:
    """Check a phase's objective, kind, teacher and args; with ``model_cfg`` also the model features it needs."""
    if phase.objective not in OBJECTIVES:
        raise ConfigError(f"{key}.objective", phase.objective, f"one of {sorted(OBJECTIVES)}")
    kinds, needs_teacher = OBJECTIVES[phase.objective]
    if phase.kind not in kinds:
        raise ConfigError(f"{key}.kind", phase.kind, f"{' or '.join(kinds)} for objective '{phase.objective}'")
    if needs_teacher and not phase.teacher_from:
        raise ConfigError(f"{key}.teacher_from", phase.teacher_from,
                          f"an earlier phase name: objective '{phase.objective}' distills from a frozen teacher")
    args, akey = dict(phase.objective_args), f"{key}.objective_args"
    if phase.objective == "rcm":
        _rcm_parts(args, akey)
    else:
        _from_dict(_config_classes()[phase.objective], args, akey)
    if model_cfg is not None and trains_meanflow(phase) and not model_cfg.interval_embedding:
        raise ConfigError("model.interval_embedding", model_cfg.interval_embedding,
                          f"true: {key} ('{phase.name}') trains MeanFlow, whose net needs the interval t - r as a "
                          "second input; set model.interval_embedding=true (zero-init, teachers load into it)")


def build_objective(phase, run_cfg, student, teacher, trainer=None, critic=None):
    """``critic``: the DMD fake-score model (default: a copy of ``teacher``; pass one when the teacher
    is already sharded for model parallelism, since sharded models cannot be copied)."""
    from ..objectives import DCMObjective, FlowMatchingObjective, MeanFlowObjective, SCMObjective
    from ..objectives.dmd import SelfForcingDMD
    from ..objectives.rcm import RCMObjective

    args, key = dict(phase.objective_args), f"phases.{phase.name}.objective_args"
    if phase.objective == "rcm":
        cm, cm_cfg, dmd_cfg, rcm_cfg = _rcm_parts(args, key)
        cm_obj = SCMObjective(teacher, cm_cfg) if cm == "scm" else MeanFlowObjective(cm_cfg, teacher=teacher)
        return RCMObjective(cm_obj, SelfForcingDMD(teacher, dmd_cfg, critic=critic), rcm_cfg)
    cfg = _from_dict(_config_classes()[phase.objective], args, key)
    if phase.objective == "flow_matching":
        return FlowMatchingObjective(cfg)
    if phase.objective == "dcm":
        return DCMObjective(teacher, cfg)
    if phase.objective == "meanflow":
        return MeanFlowObjective(cfg, teacher=teacher)
    if phase.objective == "scm":
        obj = SCMObjective(teacher, cfg)
        if obj.weighting is not None:  # the learned adaptive weight trains with the student
            obj.trainable_parameters = lambda: list(obj.weighting.parameters())
        return obj
    return SelfForcingDMD(teacher, cfg, critic=critic)


def move_objective_modules(objective, device) -> None:
    """Put the modules an objective owns (e.g. sCM's adaptive weight, also inside rCM) on the training device.

    Objectives are built on the CPU default; the student and teacher already live on ``device``
    (for them ``.to`` is a no-op). Walks plain attributes recursively, never into modules.
    """
    import torch

    seen: set[int] = set()

    def walk(obj):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        for value in vars(obj).values():
            if isinstance(value, torch.nn.Module):
                value.to(device)
            elif hasattr(value, "__dict__") and not isinstance(value, (type, torch.Tensor)) and not callable(value):
                walk(value)

    walk(objective)
