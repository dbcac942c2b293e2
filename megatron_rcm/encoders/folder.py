"""Finding the parts of a local diffusers Wan pipeline folder, with one clear error for each missing piece.

A pipeline folder (``Wan2.1-T2V-1.3B-Diffusers``) holds ``model_index.json`` and the sub-folders
``tokenizer/``, ``text_encoder/``, ``vae/``, ``scheduler/`` and ``transformer/``. ``diffusers:DIR`` in a
run config may name such a folder or a bare transformer folder (``config.json`` + safetensors).
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import EncoderError

PIPELINE_INDEX = "model_index.json"
PIPELINE_PARTS = ("tokenizer", "text_encoder", "vae", "scheduler", "transformer")
DIFFUSERS_PREFIX = "diffusers:"


def strip_prefix(spec: str) -> str:
    """``diffusers:DIR`` -> ``DIR`` (a plain path is returned as is)."""
    return spec[len(DIFFUSERS_PREFIX):] if spec.startswith(DIFFUSERS_PREFIX) else spec


def is_pipeline_folder(path) -> bool:
    return (Path(path) / PIPELINE_INDEX).is_file()


def component_dir(root, name: str, purpose: str = "") -> Path:
    """``root/name``; a missing folder names the sub-folder, what it is needed for and what a pipeline holds."""
    root = Path(strip_prefix(str(root)))
    if not root.is_dir():
        raise EncoderError(f"diffusers folder {root} does not exist (a local Wan pipeline folder such as "
                           "Wan2.1-T2V-1.3B-Diffusers was expected)")
    sub = root / name
    if not sub.is_dir():
        why = f" ({purpose})" if purpose else ""
        raise EncoderError(f"{root} has no {name}/ sub-folder{why}; a diffusers Wan pipeline folder holds "
                           f"{', '.join(p + '/' for p in PIPELINE_PARTS)} and {PIPELINE_INDEX}")
    return sub


def transformer_dir(spec: str) -> Path:
    """The ``WanTransformer3DModel`` folder that ``diffusers:DIR`` names: DIR/transformer or DIR itself."""
    root = Path(strip_prefix(spec))
    if not root.is_dir():
        raise EncoderError(f"{spec}: folder {root} does not exist (expected a diffusers Wan pipeline folder or a "
                           "WanTransformer3DModel folder with config.json)")
    if (root / "config.json").is_file():
        return root
    if is_pipeline_folder(root) or (root / "transformer").is_dir():
        return component_dir(root, "transformer", "the Wan transformer weights")
    raise EncoderError(f"{spec}: {root} holds neither config.json (a transformer folder) nor {PIPELINE_INDEX} "
                       "(a pipeline folder)")


def scheduler_shift(root, default: float = 3.0) -> float:
    """The flow-matching shift of the pipeline's scheduler (UniPC ``flow_shift`` or FlowMatchEuler ``shift``)."""
    path = Path(strip_prefix(str(root))) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return default
    try:
        cfg = json.loads(path.read_text())
    except ValueError as err:
        raise EncoderError(f"cannot read {path}: {err}") from None
    for key in ("flow_shift", "shift"):
        if isinstance(cfg.get(key), (int, float)):
            return float(cfg[key])
    return default
