"""``init_from`` / ``teacher_from: diffusers:DIR``: a diffusers Wan transformer into a run's model, strictly.

The run's model config must describe the folder's architecture: every key of the folder's
``config.json`` that shapes the computation is compared with the run's ``model.*`` value and each
difference is named (one more layer would stay random, one fewer would drop the folder's last block,
another ``eps`` or ``cross_attn_norm`` would compute something else). Then every tensor is copied by
name; only our zero-initialised extras (action embedder, MeanFlow interval embedder) may be absent.
``rope_max_seq_len`` is not compared: it only sizes diffusers' precomputed RoPE table, ours has none.

A frozen teacher (``teacher_from: diffusers:DIR``, and the DMD critic made from it) is built with the
folder's own architecture instead (:func:`teacher_model_config`: a 1.3B student can distil from a 14B
teacher), so only what the two models exchange must agree: latent channels in and out, the patch (the
same latents and frames) and the text width (the same context tensors); each difference is named.
"""
from __future__ import annotations

import dataclasses
import json

from ..config.errors import ConfigError
from ..encoders import EncoderError, transformer_dir
from .diffusers_wan import ConversionError, _load_strict, load_diffusers_state_dict, model_config_from_diffusers

COMPARED = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
            "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "eps", "image_dim", "added_kv_proj_dim",
            "pos_embed_seq_len")
OUR_EXTRAS = ("action_embedder.", "condition_embedder.interval_embedder.")
TEACHER_SHARED = ("in_channels", "out_channels", "patch_size", "text_dim")  # what student and teacher exchange


class DiffusersSourceError(ConfigError):
    def __init__(self, key: str, message: str):
        self.key, self.value, self.allowed = key, None, message
        ValueError.__init__(self, f"{key}: {message}")


def _norm(value):
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else value


def config_differences(folder_cfg, run_cfg, keys=COMPARED) -> list[str]:
    """``model.KEY = run value (folder: value)`` for each architecture key that differs."""
    return [f"model.{k} = {_norm(getattr(run_cfg, k))!r} (folder: {_norm(getattr(folder_cfg, k))!r})"
            for k in keys if _norm(getattr(run_cfg, k)) != _norm(getattr(folder_cfg, k))]


def _folder_config(spec: str, key: str):
    try:
        folder = transformer_dir(spec)
        return folder, model_config_from_diffusers(json.loads((folder / "config.json").read_text()))
    except (EncoderError, ConversionError, ValueError) as err:
        raise DiffusersSourceError(key, str(err)) from None


def _checked_config(spec: str, run_model_cfg, key: str, teacher: bool):
    folder, folder_cfg = _folder_config(spec, key)
    diffs = config_differences(folder_cfg, run_model_cfg, TEACHER_SHARED if teacher else COMPARED)
    if diffs:
        what = ("a teacher must share the student's latent channels, patch and text width" if teacher else
                "set these model.* keys to the folder's values")
        raise DiffusersSourceError(key, f"the run's model differs from {folder / 'config.json'}: {'; '.join(diffs)}; "
                                   f"{what}")
    return folder, folder_cfg


def check_diffusers_source(spec: str, run_model_cfg, key: str, teacher: bool = False):
    """The transformer folder of ``spec`` after checking its config.json against the run's model config
    (every architecture key; with ``teacher`` only what a teacher shares with the student)."""
    return _checked_config(spec, run_model_cfg, key, teacher)[0]


def teacher_model_config(spec: str, run_model_cfg, key: str):
    """The ModelConfig a frozen ``diffusers:DIR`` teacher is built with: the folder's architecture (every
    compared key), the run's settings otherwise (parameter dtype, text length, zero-init extras)."""
    folder, folder_cfg = _checked_config(spec, run_model_cfg, key, teacher=True)
    same = not config_differences(folder_cfg, run_model_cfg)
    return with_architecture(run_model_cfg, folder_cfg, run_model_cfg.preset if same else f"diffusers:{folder}")


def with_architecture(run_model_cfg, arch_cfg, preset: str):
    """``run_model_cfg`` with every architecture key (``COMPARED``) taken from ``arch_cfg``."""
    return dataclasses.replace(run_model_cfg, **{k: getattr(arch_cfg, k) for k in COMPARED}, preset=preset)


def load_diffusers_into(model, spec: str, key: str):
    """Copy the weights of ``spec`` (``diffusers:DIR``) into ``model`` (built from the run's config, or for a
    teacher from :func:`teacher_model_config`), strictly."""
    folder = check_diffusers_source(spec, model.cfg, key)
    try:
        _load_strict(model, load_diffusers_state_dict(folder), allow_missing_action=False, source=str(folder),
                     optional_prefixes=OUR_EXTRAS)
    except (ConversionError, FileNotFoundError) as err:
        raise DiffusersSourceError(key, str(err)) from None
    return model
