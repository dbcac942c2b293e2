"""Conversion between CausalWanModel and diffusers' WanTransformer3DModel folders.

Our parameter names equal diffusers' keys, so conversion is a strict by-name copy plus a config
mapping. The image-to-video layout (``image_dim``, ``added_kv_proj_dim``, ``pos_embed_seq_len``: Wan2.1-I2V and
FLF2V) maps one-to-one too. We refuse anything diffusers can express that our model cannot (other q/k norms,
other classes), because silently dropping it would give a model that loads but computes something else.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config.errors import ConfigError
from ..config.model import ModelConfig, validate_model
from ..models.causal_wan import DTYPES, CausalWanModel, build_model
from ..utils.files import atomic_folder, save_safetensors
from .cli import add_convert_arguments  # noqa: F401  (the parser half of the CLI, torch-free)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CLASS_NAME = "WanTransformer3DModel"
DIFFUSERS_VERSION = "0.42.1"
_SHARED = ["patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
           "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "eps", "rope_max_seq_len",
           "image_dim", "added_kv_proj_dim", "pos_embed_seq_len"]  # the last three: null = text-to-video
_EXTRA_KEY = "_megatron_rcm"  # leading underscore: diffusers ignores it when loading
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted faithfully; the message names the offending key(s)."""


def _list_keys(keys) -> str:
    keys = sorted(keys)
    head = ", ".join(keys[:5])
    return f"{len(keys)} key(s): {head}" + (", ..." if len(keys) > 5 else "")


# ---------------------------------------------------------------------- config
def model_config_from_diffusers(config: dict, text_len: int | None = None) -> ModelConfig:
    """Map a diffusers config.json dict to ModelConfig, failing on features our model lacks."""
    cls = config.get("_class_name", CLASS_NAME)
    if cls != CLASS_NAME:
        raise ConversionError(f"config key '_class_name' = {cls!r}: only {CLASS_NAME} is supported")
    qk = config.get("qk_norm", "rms_norm_across_heads")
    if qk != "rms_norm_across_heads":
        raise ConversionError(f"config key 'qk_norm' = {qk!r} is not supported; only 'rms_norm_across_heads'")
    known = set(_SHARED) | {"qk_norm"}
    unknown = [k for k in config if not k.startswith("_") and k not in known]
    if unknown:
        raise ConversionError(f"config key(s) {unknown} are not known to this converter")
    defaults = ModelConfig()
    kw = {k: config[k] for k in _SHARED if k in config}
    if "patch_size" in kw:
        kw["patch_size"] = [int(p) for p in kw["patch_size"]]
    if kw.get("out_channels") is None:  # diffusers: out_channels = out_channels or in_channels
        kw["out_channels"] = kw.get("in_channels", defaults.in_channels)
    extra = config.get(_EXTRA_KEY) or {}
    kw["text_len"] = int(text_len or extra.get("text_len") or 512)  # Wan's umT5 context length
    kw["preset"] = extra.get("preset", "diffusers")
    cfg = ModelConfig(**kw)
    try:  # e.g. an image_dim without added_kv_proj_dim: name the config.json key, not a run's model.* key
        validate_model(cfg, prefix=CONFIG_NAME)
    except ConfigError as err:
        raise ConversionError(str(err)) from None
    return cfg


def diffusers_config_from_model(cfg: ModelConfig) -> dict:
    """A diffusers config.json dict for ``cfg`` (our extra fields ride along under '_megatron_rcm')."""
    out = {"_class_name": CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION}
    for k in _SHARED:
        v = getattr(cfg, k)
        out[k] = [int(p) for p in v] if k == "patch_size" else v
    out["qk_norm"] = "rms_norm_across_heads"
    out[_EXTRA_KEY] = {"text_len": cfg.text_len, "preset": cfg.preset}
    return out


# ---------------------------------------------------------------------- weights in
def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"diffusers config not found: {path}")
    return json.loads(path.read_text())


# tensors diffusers' WanTransformer3DModel drops on load (its _keys_to_ignore_on_load_unexpected): unused by its
# forward, present in some I2V conversions
_IGNORED_ON_LOAD = (".norm_added_q.",)


def load_diffusers_state_dict(folder) -> dict[str, torch.Tensor]:
    """All tensors of a diffusers folder, single-file or sharded (index.json + shards), less the ones diffusers
    itself ignores on load (``norm_added_q``: never used by its forward)."""
    state = _read_diffusers_tensors(folder)
    return {k: v for k, v in state.items() if not any(p in k for p in _IGNORED_ON_LOAD)}


def _read_diffusers_tensors(folder) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    _read_config(folder)
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.is_file():
        return load_file(str(single))
    if not index.is_file():
        raise FileNotFoundError(f"diffusers weights not found: neither {single} nor {index} exists")
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{index}: no 'weight_map' object")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = folder / shard
        if not path.is_file():
            raise FileNotFoundError(f"diffusers weight shard not found: {path} (listed in {index})")
        tensors = load_file(str(path))
        state.update({k: v for k, v in tensors.items()})
    missing = set(weight_map) - set(state)
    if missing:
        raise ConversionError(f"{index} lists tensors absent from their shards: {_list_keys(missing)}")
    return state


def _load_strict(model: CausalWanModel, state: dict, allow_missing_action: bool, source: str,
                 optional_prefixes: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``model`` by name; any unknown/missing key, shape or dtype problem is an error.

    Keys under ``optional_prefixes`` (and the action embedder with ``allow_missing_action``) may be absent:
    those are our zero-initialised extras, which leave the loaded model computing what it did.
    """
    own = model.state_dict()
    unexpected = set(state) - set(own)
    if unexpected:
        raise ConversionError(f"{source}: unexpected {_list_keys(unexpected)} (not in CausalWanModel)")
    missing = set(own) - set(state)
    optional = tuple(optional_prefixes) + (("action_embedder.",) if allow_missing_action else ())
    if optional:
        missing = {k for k in missing if not k.startswith(optional)}
    if missing:
        raise ConversionError(f"{source}: missing {_list_keys(missing)}")
    bad_dtype = [f"{k} ({v.dtype})" for k, v in state.items() if v.dtype not in _SUPPORTED_DTYPES]
    if bad_dtype:
        raise ConversionError(f"{source}: unsupported dtype for {_list_keys(bad_dtype)}; "
                              "expected float32/bfloat16/float16/float64")
    bad_shape = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in state.items()
                 if tuple(v.shape) != tuple(own[k].shape)]
    if bad_shape:
        raise ConversionError(f"{source}: shape mismatch for {_list_keys(bad_shape)}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def _stored_dtype(state: dict) -> torch.dtype:
    dtypes = {v.dtype for v in state.values() if v.dtype in _SUPPORTED_DTYPES}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32  # mixed (fp32-kept modules) -> float32


def import_diffusers(folder, dtype: torch.dtype | None = None, action_dim: int = 0,
                     text_len: int | None = None) -> CausalWanModel:
    """Build our model from a diffusers WanTransformer3DModel folder (strict by-name load).

    ``dtype`` None keeps the stored dtype (float32 if mixed). ``action_dim`` > 0 adds a
    zero-initialised action embedder, so the imported teacher computes exactly what it did.
    """
    folder = Path(folder)
    cfg = model_config_from_diffusers(_read_config(folder), text_len=text_len)
    cfg.action_dim = int(action_dim)
    state = load_diffusers_state_dict(folder)
    if dtype is not None and dtype not in _SUPPORTED_DTYPES:
        raise ConversionError(f"dtype {dtype} is not supported; expected one of {list(_DTYPE_NAMES)}")
    cfg.param_dtype = _DTYPE_NAMES[dtype or torch.float32]
    model = build_model(cfg)
    _load_strict(model, state, allow_missing_action=cfg.action_dim > 0, source=str(folder))
    target = dtype or _stored_dtype(state)
    if target != model.dtype:
        model = model.to(target)
        model.cfg.param_dtype = _DTYPE_NAMES[target]
    return model


# ---------------------------------------------------------------------- weights out
def _shard(state: dict, max_shard_size: int) -> list[dict]:
    """Greedy in key order, like diffusers/transformers: a tensor larger than the limit gets its own shard."""
    shards, cur, size = [], {}, 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if cur and size + n > max_shard_size:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += n
    if cur or not shards:
        shards.append(cur)
    return shards


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
                       ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def export_diffusers(model: CausalWanModel, folder, max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None,
                     drop_action_embedder: bool = False) -> Path:
    """Write a diffusers folder (config.json + safetensors, sharded with index.json above max_shard_size).

    Written into a temp folder beside the target and renamed, so a crash never leaves a half folder.
    An interval (MeanFlow) embedder is dropped only while its output layer is exactly zero (the model
    then computes the plain model); otherwise export fails naming the key.
    """
    folder = Path(folder)
    cfg = model.cfg
    if cfg.action_dim > 0 and not drop_action_embedder:
        raise ConversionError(f"model.action_dim = {cfg.action_dim}: diffusers has no action embedder; pass "
                              "drop_action_embedder=True to export the model without it")
    if dtype is not None and dtype not in _SUPPORTED_DTYPES:
        raise ConversionError(f"dtype {dtype} is not supported; expected one of {list(_DTYPE_NAMES)}")
    interval = model.condition_embedder.interval_embedder
    if interval is not None:  # an exactly-zero output layer adds nothing: dropping it is lossless
        for name, p in interval.linear_2.named_parameters():
            if torch.count_nonzero(p):
                raise ConversionError(
                    f"condition_embedder.interval_embedder.linear_2.{name} is non-zero: diffusers' {CLASS_NAME} has "
                    "no interval (MeanFlow) embedding, so this model cannot be exported losslessly; export a model "
                    "with model.interval_embedding=false (e.g. the teacher phase of a run without it)")
    limit = _parse_size(max_shard_size)
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith(("action_embedder.", "condition_embedder.interval_embedder.")):
            continue
        v = v.detach().cpu()
        state[k] = (v.to(dtype) if dtype is not None else v).contiguous()
    config = diffusers_config_from_model(cfg)
    if cfg.action_dim > 0:
        config[_EXTRA_KEY]["dropped_action_dim"] = cfg.action_dim

    with atomic_folder(folder) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        shards = _shard(state, limit)
        if len(shards) == 1:
            save_safetensors(shards[0], tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, 1):
                name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_safetensors(shard, tmp / name, metadata={"format": "pt"})
                for k, v in shard.items():
                    weight_map[k] = name
                    total += v.numel() * v.element_size()
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return folder


# ---------------------------------------------------------------------- CLI
class ConvertInputError(ConfigError):
    """A refused conversion, reported by the CLI as one line (exit code 2)."""

    def __init__(self, message: str):
        self.key, self.value, self.allowed = "convert", None, message
        ValueError.__init__(self, message)


def run_convert(ns: argparse.Namespace) -> int:
    """Run the conversion the parsed arguments describe; returns 0 (a CLI exit status).

    Refusals (unsupported features, missing files, wrong shapes) become one :class:`ConvertInputError` line.
    """
    try:
        return _convert(ns)
    except ConfigError:
        raise
    except (ConversionError, FileNotFoundError, ValueError) as err:
        raise ConvertInputError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None


def _convert(ns: argparse.Namespace) -> int:
    from .native import load_model_checkpoint, load_sharded_checkpoint_model, save_model_checkpoint

    dtype = DTYPES[ns.dtype] if ns.dtype else None
    if ns.from_diffusers:
        if ns.pipeline_from:
            raise ConversionError("--pipeline-from goes with --to-diffusers (it names the pipeline whose vae, text "
                                  "encoder, tokenizer and scheduler join the exported transformer)")
        from ..encoders import transformer_dir

        folder = transformer_dir(ns.from_diffusers)  # a pipeline folder's transformer/ or a bare transformer folder
        model = import_diffusers(folder, dtype=dtype, action_dim=ns.action_dim, text_len=ns.text_len)
        out = save_model_checkpoint(model, ns.out)
    else:
        if Path(ns.to_diffusers).is_dir():
            model = load_sharded_checkpoint_model(ns.to_diffusers, weights=ns.weights)
        else:
            model = load_model_checkpoint(ns.to_diffusers)
        if ns.pipeline_from:
            from .pipeline_export import export_pipeline

            out = export_pipeline(model, ns.out, ns.pipeline_from, max_shard_size=ns.max_shard_size, dtype=dtype,
                                  drop_action_embedder=ns.drop_action_embedder)
        else:
            out = export_diffusers(model, ns.out, max_shard_size=ns.max_shard_size, dtype=dtype,
                                   drop_action_embedder=ns.drop_action_embedder)
    print(f"wrote {out}")
    return 0
