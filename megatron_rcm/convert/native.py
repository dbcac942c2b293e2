"""Native checkpoints as model sources: one safetensors file + JSON sidecar with the ModelConfig, or a
sharded training checkpoint (any parallel layout) read in one process."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config.model import ModelConfig
from ..utils.files import save_safetensors


def _sidecar(path: Path) -> Path:
    return path.with_suffix(path.suffix + ".json")


def save_model_checkpoint(model, path) -> Path:
    """Write ``path`` (safetensors) and ``path.json`` (config); each written to a temp name then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_safetensors(state, tmp)
    side_tmp = path.with_name(path.name + ".json.tmp")
    side_tmp.write_text(json.dumps({"model": dataclasses.asdict(model.cfg)}, indent=2))
    os.replace(tmp, path)
    os.replace(side_tmp, _sidecar(path))
    return path


def _run_model_config(path: Path) -> ModelConfig | None:
    """The model config of the run a phase file belongs to (``RUN/phases/<name>/{ema,model}.safetensors``)."""
    run_config = path.parent.parent.parent / "config.yaml"
    if path.parent.parent.name != "phases" or not run_config.is_file():
        return None
    from ..config.run import load_config

    return load_config(run_config).model


def load_model_checkpoint(path, dtype: torch.dtype | None = None):
    """Rebuild the model from the sidecar config (or, for a phase file, its run's config.yaml) and load strictly."""
    from ..models.causal_wan import build_model
    from .diffusers_wan import _load_strict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    side = _sidecar(path)
    if side.is_file():
        cfg = ModelConfig(**json.loads(side.read_text())["model"])
    else:
        cfg = _run_model_config(path)
        if cfg is None:
            raise FileNotFoundError(f"checkpoint config not found: neither the sidecar {side} nor, for a phase file "
                                    "RUN/phases/<name>/*.safetensors, the run's config.yaml exists")
    model = build_model(cfg)
    _load_strict(model, load_file(str(path)), allow_missing_action=False, source=str(path))
    return model if dtype is None else model.to(dtype)


def load_sharded_checkpoint_model(path, weights: str = "ema", dtype: torch.dtype | None = None):
    """The full model from a sharded training checkpoint (a ``step_*`` folder or its root: the newest
    complete one), any parallel layout; ``weights`` is the tensor group: ema, model, critic, ..."""
    from ..models.causal_wan import build_model
    from ..training.dist_checkpoint import read_checkpoint_meta, read_full_tensors, resolve_checkpoint
    from .diffusers_wan import _load_strict

    path = resolve_checkpoint(path)
    meta = read_checkpoint_meta(path)
    if "model_config" not in meta:
        raise ValueError(f"{path}/meta.json has no 'model_config': this checkpoint was saved without the model's "
                         "config (pass meta={'model_config': ...} to save_distributed)")
    model = build_model(ModelConfig(**meta["model_config"]))
    _load_strict(model, read_full_tensors(path, weights), allow_missing_action=False, source=f"{path} [{weights}]")
    return model if dtype is None else model.to(dtype)
