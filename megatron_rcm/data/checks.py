"""Latent shard folders checked before any work: manifest, shard files, tensor shapes against the config.

Only the manifest and the shard headers are read (safetensors: an 8-byte length and a JSON header; tar:
the ``.npy`` headers of the first sample), so a folder of any size is checked in moments and without
torch. Tensors and manifest fields this check does not know (prompt text, per-sample uncond contexts,
...) are ignored: writers may add them. A mismatch is a :class:`ShardCheckError` naming the config key,
the shard file and the shapes, so it reads as one line and exits with code 2 before a run folder exists.
"""
from __future__ import annotations

import json
import os
import struct
import tarfile

from ..config.errors import ConfigError

MANIFEST = "manifest.json"  # the same name as shards.MANIFEST (that module imports torch)
_MAX_HEADER = 100 << 20  # safetensors refuses headers above 100 MB too


class ShardCheckError(ConfigError):
    """A shard folder that does not fit the run's config (names the key, the file and the fix)."""


def safetensors_shapes(path: str) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header (no tensor data is read)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
        return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        raise ShardCheckError("data.shard_dir", path, f"readable safetensors shards ({type(err).__name__}: "
                              f"{err}); rewrite the shard or remove it from {MANIFEST}") from None


def tar_first_sample_shapes(path: str) -> dict[str, list[int]]:
    """Field -> per-sample shape of the first sample of a tar shard (``__uncond__`` as ``uncond_context``)."""
    import numpy as np

    shapes: dict[str, list[int]] = {}
    first = None
    try:
        with tarfile.open(path, "r") as tar:
            for m in tar:
                key, field, ext = m.name.rsplit(".", 2)
                if ext != "npy":
                    continue
                if key == "__uncond__":
                    field = "uncond_context"
                elif first is None:
                    first = key
                elif key != first:
                    break  # the first sample is complete
                f = tar.extractfile(m)
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape = read(f)[0]
                shapes[field] = list(shape)
    except (OSError, ValueError, tarfile.TarError) as err:
        raise ShardCheckError("data.shard_dir", path, f"readable tar shards ({type(err).__name__}: {err}); "
                              f"rewrite the shard or remove it from {MANIFEST}") from None
    return shapes


def _manifest_entries(shard_dir: str) -> list[dict]:
    how = "write shards with `megatron-rcm generate-data RUN_DIR --phase TEACHER --num-videos N --out DIR`"
    if not os.path.isdir(shard_dir):
        raise ShardCheckError("data.shard_dir", shard_dir, f"an existing folder of latent shards ({how})")
    path = os.path.join(shard_dir, MANIFEST)
    if not os.path.isfile(path):
        empty = " (the folder is empty)" if not os.listdir(shard_dir) else ""
        raise ShardCheckError("data.shard_dir", shard_dir, f"a folder holding {MANIFEST}{empty}; {how}")
    try:
        with open(path) as f:
            entries = json.load(f)["shards"]
        files = [str(e["file"]) for e in entries]
        for e in entries:
            int(e["count"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ShardCheckError("data.shard_dir", shard_dir, f"a readable {MANIFEST} ({path}: {type(err).__name__}: "
                              f"{err})") from None
    if not entries:
        raise ShardCheckError("data.shard_dir", shard_dir, f"a {MANIFEST} that lists at least one shard ({how})")
    for name in files:
        if not os.path.isfile(os.path.join(shard_dir, name)):
            raise ShardCheckError("data.shard_dir", shard_dir, f"every shard {MANIFEST} lists: "
                                  f"{os.path.join(shard_dir, name)} is missing")
    return entries


def _check_shapes(path: str, shapes: dict[str, list[int]], data, model) -> None:
    """``shapes`` per sample (the leading sample dimension already removed)."""
    where = f"shard {path}"
    for name in ("latents", "context"):
        if name not in shapes:
            raise ShardCheckError("data.shard_dir", os.path.dirname(path), f"shards holding '{name}' ({where} has "
                                  f"{sorted(shapes)})")
    lat = shapes["latents"]
    if len(lat) != 4:
        raise ShardCheckError("data.shard_dir", os.path.dirname(path), f"'latents' of [N, C, F, H, W] ({where}: "
                              f"per-sample shape {lat})")
    for key, value, got in zip(("data.channels", "data.num_frames", "data.height", "data.width"),
                               (data.channels, data.num_frames, data.height, data.width), lat):
        if got != value:
            raise ShardCheckError(key, value, f"{got} to match the shards ({where}: 'latents' per sample is C x F x "
                                  f"H x W = {' x '.join(map(str, lat))}), or data.shard_dir pointing at shards made "
                                  "for this config")
    ctx = shapes["context"]
    if len(ctx) != 2 or ctx[1] != model.text_dim:
        raise ShardCheckError("model.text_dim", model.text_dim, f"the shards' context width ({where}: 'context' per "
                              f"sample is {ctx} = L x D); set model.text_dim and data.text_dim to D")
    unc = shapes.get("uncond_context")
    if unc is not None and (not unc or unc[-1] != model.text_dim):
        raise ShardCheckError("model.text_dim", model.text_dim, f"the shards' uncond_context width ({where}: "
                              f"{unc})")
    act = shapes.get("actions")
    if data.action_dim and (act is None or act != [data.num_frames, data.action_dim]):
        raise ShardCheckError("data.action_dim", data.action_dim, f"shards with 'actions' of [F, A] = "
                              f"[{data.num_frames}, {data.action_dim}] per sample ({where}: {act})")
    if not data.action_dim and act is not None:
        raise ShardCheckError("data.action_dim", 0, f"{act[-1]} with model.action_dim={act[-1]}: the shards hold "
                              f"actions ({where}: {act}), i.e. a world-model data set")
    _check_image_context(where, shapes.get("image_context"), model)


def _check_image_context(where: str, img, model) -> None:
    """'image_context' [L, image_dim] per sample exactly when the model has the image-to-video layout."""
    if model.image_dim is None:
        if img is not None:
            raise ShardCheckError("model.image_dim", None, f"{img[-1]} (with added_kv_proj_dim = the hidden size): the "
                                  f"shards hold image-encoder tokens ({where}: 'image_context' {img}), i.e. an "
                                  "image-to-video data set")
        return
    want = f"[L, {model.image_dim}]" if model.pos_embed_seq_len is None else f"[{model.pos_embed_seq_len}, " \
        f"{model.image_dim}]"
    ok = img is not None and len(img) == 2 and img[1] == model.image_dim and \
        model.pos_embed_seq_len in (None, img[0])
    if not ok:
        raise ShardCheckError("model.image_dim", model.image_dim, f"shards with 'image_context' of {want} per sample "
                              f"for the image-to-video layout ({where}: {img})")


def check_shard_dir(data, model) -> int:
    """Check ``data.shard_dir`` against ``data`` / ``model`` configs; returns the number of samples listed."""
    entries = _manifest_entries(data.shard_dir)
    context_len = None
    for e in entries:
        path = os.path.join(data.shard_dir, e["file"])
        if path.endswith(".safetensors"):
            full = safetensors_shapes(path)
            n = full["latents"][0] if full.get("latents") else None
            if n is not None and n != int(e["count"]):
                raise ShardCheckError("data.shard_dir", data.shard_dir, f"shards holding what {MANIFEST} says "
                                      f"(shard {path} holds {n} samples, the manifest {e['count']})")
            # uncond_context: one [L, D] per shard, or per sample: only its width is checked
            per_sample = {k: (v if k == "uncond_context" else v[1:]) for k, v in full.items()}
        elif path.endswith(".tar"):
            per_sample = tar_first_sample_shapes(path)
        else:
            raise ShardCheckError("data.shard_dir", data.shard_dir, f"shards ending in .safetensors or .tar "
                                  f"({MANIFEST} lists {e['file']})")
        _check_shapes(path, per_sample, data, model)
        if context_len is None:
            context_len = per_sample["context"][0]
        elif per_sample["context"][0] != context_len:
            raise ShardCheckError("data.shard_dir", data.shard_dir, f"shards with one context length (shard {path}: "
                                  f"{per_sample['context'][0]} tokens, earlier shards {context_len}): batches "
                                  "stack samples of several shards")
    return sum(int(e["count"]) for e in entries)


def check_data(cfg) -> None:
    """Everything about ``cfg.data`` that can be checked on disk before a run starts (a RunConfig)."""
    if cfg.data.kind == "latent_shards":
        check_shard_dir(cfg.data, cfg.model)
