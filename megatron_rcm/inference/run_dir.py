"""Open a training run folder (``output_dir``) for sampling: its config and a phase's weights.

A run folder holds ``config.yaml`` (written by ``megatron-rcm train``; ``config.resume-N.yaml`` beside it after
resumes with changed settings, the newest being the one read) and
``phases/<name>/{model,ema}.safetensors`` (written at the end of each phase). Every way this can be
wrong (no folder, no config, unknown phase, phase not trained yet) is a :class:`RunDirError` that
names the missing piece and how to produce it.
"""
from __future__ import annotations

from pathlib import Path

from ..config.errors import ConfigError, UsageError

WEIGHTS = ("ema", "model")


class RunDirError(UsageError):
    """A run folder that cannot serve the request; a ConfigError so the CLI reports it without a trace."""

    def __init__(self, message: str):
        super().__init__(message, key="RUN_DIR")


def load_run_config(run_dir: str | Path):
    """The run's saved config (the newest: ``config.resume-N.yaml`` after resumes with changed settings,
    else ``config.yaml``), with ``output_dir`` pointing at ``run_dir`` (the folder may have moved)."""
    from ..config.run import load_config
    from ..training.resume import effective_config_path

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run folder {run_dir} does not exist; give the output_dir of a run "
                          "(`megatron-rcm train CONFIG output_dir=...` creates it)")
    path = effective_config_path(run_dir) or run_dir / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"{path} is missing: {run_dir} is not a training run folder "
                          "(`megatron-rcm train CONFIG output_dir=...` writes config.yaml there)")
    try:
        cfg = load_config(path)
    except ConfigError:
        raise
    except Exception as err:  # unreadable YAML: name the file instead of a parser trace
        raise RunDirError(f"cannot read {path}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    cfg.output_dir = str(run_dir)
    return cfg


def find_phase(cfg, name: str):
    """The PhaseConfig called ``name``; an unknown name lists the run's phases."""
    for phase in cfg.phases:
        if phase.name == name:
            return phase
    names = [p.name for p in cfg.phases]
    raise RunDirError(f"unknown phase '{name}' in {cfg.output_dir}/config.yaml; available phases: {names}")


def weights_path(cfg, phase_name: str, which: str = "ema") -> Path:
    if which not in WEIGHTS:
        raise RunDirError(f"--weights {which!r}: expected one of {WEIGHTS}")
    return Path(cfg.output_dir) / "phases" / phase_name / f"{which}.safetensors"


def load_phase_model(cfg, phase_name: str, which: str = "ema", device: str | torch.device = "cpu"):
    """A frozen model (eval mode, no grads) with phase ``phase_name``'s ``which`` (ema | model) weights."""
    from safetensors.torch import load_file

    from ..models import build_model

    find_phase(cfg, phase_name)
    if cfg.model.image_dim is not None:
        raise RunDirError(f"{cfg.output_dir} has the image-to-video layout (model.image_dim = {cfg.model.image_dim}): "
                          "sample, eval, generate-data, generate and serve do not feed image contexts yet")
    path = weights_path(cfg, phase_name, which)
    if not path.is_file():
        raise RunDirError(f"phase '{phase_name}' has no {which} weights: {path} is missing; train that phase "
                          f"first (`megatron-rcm train {Path(cfg.output_dir) / 'config.yaml'}` resumes the run "
                          "and writes it when the phase ends)")
    model = build_model(cfg.model, cfg.causal)
    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as err:  # shape mismatch, truncated or foreign file: name the file, no trace
        first = str(err).splitlines()[0]
        raise RunDirError(f"cannot load {path} into the model of {cfg.output_dir}/config.yaml: {first}") from None
    return model.to(device).eval().requires_grad_(False)


def load_teacher_model(cfg, source: str, device: str | torch.device = "cpu"):
    """A phase's frozen teacher: an earlier phase's EMA weights, or a diffusers transformer (``diffusers:DIR``)."""
    if not source.startswith("diffusers:"):
        return load_phase_model(cfg, source, "ema", device)
    from ..convert.into_run import load_diffusers_into, teacher_model_config
    from ..models import build_model

    key = next((f"phases.{i}.teacher_from" for i, p in enumerate(cfg.phases) if p.teacher_from == source),
               "teacher_from")
    model = build_model(teacher_model_config(source, cfg.model, key), cfg.causal)  # the folder's own size
    model = load_diffusers_into(model, source, key)
    return model.to(device).eval().requires_grad_(False)
