"""Objective registry: phase config -> objective instance. The one place a new objective is wired in.

``objective_args`` of a phase are checked against the objective's config dataclass at config-load
time (unknown keys and wrong kinds fail before any work, naming ``phases.N.objective_args.KEY``).
"""
from __future__ import annotations

import dataclasses

from ..config.errors import ConfigError

# objective -> (phase kinds it may run in, needs a frozen teacher)
OBJECTIVES = {
    "flow_matching": (("teacher",), False),
    "dcm": (("tf_cm",), True),
    "scm": (("tf_cm",), True),
    "dmd": (("sf_dmd",), True),
    "rcm": (("sf_dmd", "tf_cm"), True),
}


def _config_classes():
    from ..objectives import DCMConfig, FMConfig, SCMConfig
    from ..objectives.dmd import DMDConfig
    from ..objectives.rcm import RCMConfig

    return {"flow_matching": FMConfig, "dcm": DCMConfig, "scm": SCMConfig, "dmd": DMDConfig, "rcm": RCMConfig}


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


def _rcm_parts(args: dict, key: str):
    classes = _config_classes()
    unknown = set(args) - {"scm", "dmd", "rcm"}
    if unknown:
        raise ConfigError(f"{key}.{sorted(unknown)[0]}", None, "one of scm, dmd, rcm (sub-mappings)")
    return (_from_dict(classes["scm"], dict(args.get("scm", {})), f"{key}.scm"),
            _from_dict(classes["dmd"], dict(args.get("dmd", {})), f"{key}.dmd"),
            _from_dict(classes["rcm"], dict(args.get("rcm", {})), f"{key}.rcm"))


def validate_objective(phase, key: str) -> None:
    if phase.objective == "meanflow":
        raise ConfigError(f"{key}.objective", "meanflow", "flow_matching, dcm, scm, dmd or rcm: MeanFlow on the "
                          "Wan model needs the interval-embedding hook that is not built yet")
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


def build_objective(phase, run_cfg, student, teacher, trainer=None):
    from ..objectives import DCMObjective, FlowMatchingObjective, SCMObjective
    from ..objectives.dmd import SelfForcingDMD
    from ..objectives.rcm import RCMObjective

    args, key = dict(phase.objective_args), f"phases.{phase.name}.objective_args"
    if phase.objective == "rcm":
        scm_cfg, dmd_cfg, rcm_cfg = _rcm_parts(args, key)
        return RCMObjective(SCMObjective(teacher, scm_cfg), SelfForcingDMD(teacher, dmd_cfg), rcm_cfg)
    cfg = _from_dict(_config_classes()[phase.objective], args, key)
    if phase.objective == "flow_matching":
        return FlowMatchingObjective(cfg)
    if phase.objective == "dcm":
        return DCMObjective(teacher, cfg)
    if phase.objective == "scm":
        obj = SCMObjective(teacher, cfg)
        if obj.weighting is not None:  # the learned adaptive weight trains with the student
            obj.trainable_parameters = lambda: list(obj.weighting.parameters())
        return obj
    return SelfForcingDMD(teacher, cfg)


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
