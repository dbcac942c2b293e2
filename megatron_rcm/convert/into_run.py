"""``init_from`` / ``teacher_from: diffusers:DIR``: a diffusers Wan transformer into a run's model, strictly.

The run's model config must describe the folder's architecture: every key of the folder's
``config.json`` that shapes the computation is compared with the run's ``model.*`` value and each
difference is named (one more layer would stay random, one fewer would drop the folder's last block,
another ``eps`` or ``cross_attn_norm`` would compute something else). Then every tensor is copied by
name; only our zero-initialised extras (action embedder, MeanFlow interval embedder) may be absent.
``rope_max_seq_len`` is not compared: it only sizes diffusers' precomputed RoPE table, ours has none.
"""
from __future__ import annotations

import json

from ..config.errors import ConfigError
from ..encoders import EncoderError, transformer_dir
from .diffusers_wan import ConversionError, _load_strict, load_diffusers_state_dict, model_config_from_diffusers

COMPARED = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
            "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "eps", "image_dim", "added_kv_proj_dim",
            "pos_embed_seq_len")
OUR_EXTRAS = ("action_embedder.", "condition_embedder.interval_embedder.")


class DiffusersSourceError(ConfigError):
    def __init__(self, key: str, message: str):
        self.key, self.value, self.allowed = key, None, message
        ValueError.__init__(self, f"{key}: {message}")


def _norm(value):
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else value


def config_differences(folder_cfg, run_cfg) -> list[str]:
    """``model.KEY = run value (folder: value)`` for each architecture key that differs."""
    return [f"model.{k} = {_norm(getattr(run_cfg, k))!r} (folder: {_norm(getattr(folder_cfg, k))!r})"
            for k in COMPARED if _norm(getattr(run_cfg, k)) != _norm(getattr(folder_cfg, k))]


def check_diffusers_source(spec: str, run_model_cfg, key: str):
    """The transformer folder of ``spec`` after checking its config.json against the run's model config."""
    try:
        folder = transformer_dir(spec)
        folder_cfg = model_config_from_diffusers(json.loads((folder / "config.json").read_text()))
    except (EncoderError, ConversionError, ValueError) as err:
        raise DiffusersSourceError(key, str(err)) from None
    diffs = config_differences(folder_cfg, run_model_cfg)
    if diffs:
        raise DiffusersSourceError(key, f"the run's model differs from {folder / 'config.json'}: {'; '.join(diffs)}; "
                                   "set these model.* keys to the folder's values")
    return folder


def load_diffusers_into(model, spec: str, key: str):
    """Copy the weights of ``spec`` (``diffusers:DIR``) into ``model`` (built from the run's config), strictly."""
    folder = check_diffusers_source(spec, model.cfg, key)
    try:
        _load_strict(model, load_diffusers_state_dict(folder), allow_missing_action=False, source=str(folder),
                     optional_prefixes=OUR_EXTRAS)
    except (ConversionError, FileNotFoundError) as err:
        raise DiffusersSourceError(key, str(err)) from None
    return model
