"""Latent shards on disk for real runs, plus the writer that produces them.

Layout of a shard folder: ``manifest.json`` = {"version": 1, "shards": [{"file", "count", "bytes",
"sha256"}...]} and the shard files it lists, each either
  * ``*.safetensors``: tensors "latents" [N,C,F,H,W], "context" [N,L,D], optional "actions" [N,F,A],
    "class_id" [N], "uncond_context" [L,D], "image_context" [N,L_img,image_dim] (image-to-video models),
    "trajectory" [N,K,C,F,H,W] + "trajectory_levels" [N,K] (the teacher's ODE states at K sampling levels:
    ``generate-data --trajectory K``; readers that do not use them ignore them); or
  * ``*.tar`` (webdataset style): per sample ``<key>.latents.npy``, ``<key>.context.npy``, optional
    ``<key>.actions.npy`` / ``<key>.class_id.npy``, and optionally one ``__uncond__.context.npy``.
Shards made from text prompts also keep each sample's prompt: a JSON list under the safetensors
metadata key "prompts", or ``<key>.prompt.txt`` tar members (:func:`read_shard_prompts`).
Every shard is checked against the manifest's size and sha256 when first opened; a bad shard is an
error naming the file, never a silent skip. Shard files and the manifest are written under a
temporary name and renamed, so a crash never leaves a half-written one.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections import OrderedDict

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..utils.files import sha256_file

MANIFEST = "manifest.json"
SAMPLE_KEYS = ("latents", "context", "actions", "class_id", "image_context", "trajectory",
               "trajectory_levels")  # per-sample tensors


class ShardError(RuntimeError):
    """A shard (or manifest) that cannot be read; the message names the file."""


def _npy_bytes(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, t.detach().cpu().numpy(), allow_pickle=False)
    return buf.getvalue()


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _tar_bytes(items) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for member, payload in items:
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def write_shard_file(path: str, samples: list[dict], uncond: torch.Tensor | None = None, fmt: str = "safetensors",
                     prompts: list[str] | None = None, key: str = "00000") -> dict:
    """Write one shard (``samples``: per-sample tensor dicts) atomically; returns its manifest entry."""
    if fmt == "safetensors":
        tensors = {k: torch.stack([s[k] for s in samples]).contiguous() for k in samples[0]}
        if uncond is not None:
            tensors["uncond_context"] = uncond
        meta = {"prompts": json.dumps(list(prompts), ensure_ascii=False)} if prompts is not None else None
        data = st_save(tensors, metadata=meta)
    else:
        items = [("__uncond__.context.npy", _npy_bytes(uncond))] if uncond is not None else []
        for j, s in enumerate(samples):
            items += [(f"{key}_{j:06d}.{k}.npy", _npy_bytes(v)) for k, v in s.items()]
            if prompts is not None:
                items.append((f"{key}_{j:06d}.prompt.txt", prompts[j].encode("utf-8")))
        data = _tar_bytes(items)
    _write_atomic(path, data)
    return {"file": os.path.basename(path), "count": len(samples), "bytes": os.path.getsize(path),
            "sha256": sha256_file(path)}


def write_manifest(out_dir: str, entries: list[dict]) -> str:
    path = os.path.join(out_dir, MANIFEST)
    _write_atomic(path, json.dumps({"version": 1, "shards": entries}, indent=1).encode())
    return path


def read_shard_prompts(path: str) -> list[str] | None:
    """The prompt text of each sample of a shard, or None for shards made without prompts."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
            return json.loads(meta["prompts"]) if "prompts" in meta else None
        with tarfile.open(path, "r") as tar:
            found = {m.name.rsplit(".", 2)[0]: tar.extractfile(m).read().decode("utf-8")
                     for m in tar.getmembers() if m.name.endswith(".prompt.txt")}
        return [found[k] for k in sorted(found)] if found else None
    except Exception as err:
        raise ShardError(f"cannot read the prompts of shard {path}: {type(err).__name__}: {err}") from err


class ShardWriter:
    """Accumulates samples and writes fixed-size shards plus the manifest (on close)."""

    def __init__(self, out_dir: str, shard_size: int = 256, fmt: str = "safetensors", prefix: str = "shard"):
        if fmt not in ("safetensors", "tar"):
            raise ValueError(f"shard format {fmt!r}: expected 'safetensors' or 'tar'")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.shard_size, self.fmt, self.prefix = out_dir, shard_size, fmt, prefix
        self.pending: list[dict] = []
        self.entries: list[dict] = []
        self.uncond: torch.Tensor | None = None

    def write(self, batch: dict) -> None:
        """Add a batch dict (latents, context, optional actions/class_id/uncond_context/image_context)."""
        n = batch["latents"].shape[0]
        if self.uncond is None and batch.get("uncond_context") is not None:
            self.uncond = batch["uncond_context"][0].detach().cpu().float().contiguous()
        for i in range(n):
            self.pending.append({k: batch[k][i].detach().cpu() for k in SAMPLE_KEYS if batch.get(k) is not None})
            if len(self.pending) == self.shard_size:
                self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        name = f"{self.prefix}-{len(self.entries):05d}.{'safetensors' if self.fmt == 'safetensors' else 'tar'}"
        self.entries.append(write_shard_file(os.path.join(self.out_dir, name), self.pending, self.uncond, self.fmt,
                                             key=f"{len(self.entries):05d}"))
        self.pending = []

    def close(self) -> str:
        """Write the last partial shard and the manifest; returns the manifest path."""
        self._flush()
        return write_manifest(self.out_dir, self.entries)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()


def write_teacher_shards(sample_fn, dataset, out_dir: str, num_videos: int, shard_size: int = 256,
                         fmt: str = "safetensors") -> str:
    """Sample teacher videos for the dataset's prompts into shards; returns the manifest path.

    ``sample_fn(batch) -> latents`` [B,C,F,H,W] (or a dict of per-sample tensors with "latents", e.g. an ODE
    trajectory too); the batch's context/actions/class ids are kept so the shards can replace the synthetic
    set one-for-one.
    """
    writer = ShardWriter(out_dir, shard_size, fmt)
    done = 0
    it = iter(dataset)
    while done < num_videos:
        batch = dict(next(it))
        take = min(num_videos - done, batch["latents"].shape[0])
        with torch.no_grad():
            made = sample_fn(batch)
        batch.update(made if isinstance(made, dict) else {"latents": made})
        writer.write({k: (v[:take] if k != "uncond_context" else v) for k, v in batch.items()
                      if isinstance(v, torch.Tensor)})
        done += take
    return writer.close()


def _read_shard(path: str) -> dict:
    """Load one shard fully -> dict of stacked tensors (+ optional uncond_context)."""
    try:
        if path.endswith(".safetensors"):
            with open(path, "rb") as f:
                return dict(st_load(f.read()))
        samples: dict[str, dict] = {}
        out: dict = {}
        with tarfile.open(path, "r") as tar:
            for m in tar.getmembers():
                key, field, ext = m.name.rsplit(".", 2)
                if ext != "npy":  # e.g. <key>.prompt.txt: text, read by read_shard_prompts
                    continue
                arr = torch.from_numpy(np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False))
                if key == "__uncond__":
                    out["uncond_context"] = arr
                else:
                    samples.setdefault(key, {})[field] = arr
        keys = sorted(samples)
        for field in samples[keys[0]]:
            out[field] = torch.stack([samples[k][field] for k in keys])
        return out
    except ShardError:
        raise
    except Exception as err:  # safetensors, tarfile, numpy errors all mean a broken shard
        raise ShardError(f"cannot read shard {path}: {type(err).__name__}: {err}") from err


class LatentShardDataset:
    """Streams batches from a shard folder forever (epoch after epoch), resumable and rank-sharded.

    Global sample order is the manifest order; batch ``s`` of rank ``r`` holds global positions
    ``(s * world_size + r) * B + b`` modulo the total, so ranks are disjoint within each pass.
    """

    def __init__(self, shard_dir: str, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 verify: bool = True, cache_shards: int = 2):
        mpath = os.path.join(shard_dir, MANIFEST)
        try:
            with open(mpath) as f:
                manifest = json.load(f)
            self.entries = manifest["shards"]
        except (OSError, ValueError, KeyError) as err:
            raise ShardError(f"cannot read shard manifest {mpath}: {err}") from err
        if not self.entries:
            raise ShardError(f"shard manifest {mpath} lists no shards")
        self.dir, self.batch_size, self.rank, self.world_size = shard_dir, batch_size, rank, world_size
        self.seed, self.verify, self.cache_size = seed, verify, cache_shards
        self.offsets = np.cumsum([0] + [int(e["count"]) for e in self.entries])
        self.total = int(self.offsets[-1])
        self.step = 0
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._verified: set[int] = set()

    def _shard(self, i: int) -> dict:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        entry = self.entries[i]
        path = os.path.join(self.dir, entry["file"])
        if not os.path.exists(path):
            raise ShardError(f"shard {path} listed in the manifest is missing")
        if self.verify and i not in self._verified:
            size = os.path.getsize(path)
            if "bytes" in entry and size != int(entry["bytes"]):
                raise ShardError(f"shard {path} is truncated or changed: {size} bytes, manifest says {entry['bytes']}")
            if "sha256" in entry and sha256_file(path) != entry["sha256"]:
                raise ShardError(f"shard {path} is corrupt: sha256 does not match the manifest")
            self._verified.add(i)
        data = _read_shard(path)
        n = data["latents"].shape[0] if "latents" in data else -1
        if n != int(entry["count"]) or "context" not in data:
            raise ShardError(f"shard {path} holds {n} samples (need latents+context), manifest says {entry['count']}")
        self._cache[i] = data
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return data

    def sample(self, pos: int) -> dict:
        pos %= self.total
        i = int(np.searchsorted(self.offsets, pos, side="right") - 1)
        data, j = self._shard(i), pos - int(self.offsets[i])
        out = {k: v[j] for k, v in data.items() if k != "uncond_context"}
        out["uncond_context"] = data.get("uncond_context", torch.zeros_like(data["context"][0]))
        return out

    def batch_at(self, step: int) -> dict:
        base = (step * self.world_size + self.rank) * self.batch_size
        samples = [self.sample(base + b) for b in range(self.batch_size)]
        batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        batch["latents"] = batch["latents"].float()
        if "class_id" in batch:
            batch["class_id"] = batch["class_id"].long()
        else:
            batch["class_id"] = torch.full((self.batch_size,), -1, dtype=torch.long)
        return batch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"kind": "latent_shards", "step": self.step, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
