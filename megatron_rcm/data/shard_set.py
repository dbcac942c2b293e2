"""A shard folder filled shard by shard by any number of ranks, resumable after a crash.

Row ``i`` of the data (a video) always lands in shard ``i // shard_size`` and rank ``r`` of ``W``
writes the shards ``k`` with ``k % W == r``, so a re-run (with any number of ranks) finds the same
shards to do. Each shard is written under a temporary name and renamed, then a small record
(``progress/<shard>.json``: count, bytes, sha256) marks it done; a re-run skips recorded shards and
never rewrites one. ``plan.json`` holds the arguments the folder was made with: a re-run with other
arguments is refused instead of mixing two data sets. The manifest is written (by whichever rank
finishes last) only once every shard is done, so a partial folder is never mistaken for a data set.
"""
from __future__ import annotations

import glob
import json
import math
import os

from ..config.errors import ConfigError
from ..utils.files import sha256_file
from .shards import MANIFEST, ShardError, _read_shard, _write_atomic, write_manifest, write_shard_file

PLAN = "plan.json"
PROGRESS = "progress"


class ShardSetError(ConfigError):
    def __init__(self, message: str):
        self.key, self.value, self.allowed = "--out", None, message
        ValueError.__init__(self, message)


class ResumableShards:
    def __init__(self, out_dir: str, total: int, shard_size: int, fmt: str = "safetensors", plan: dict | None = None):
        if fmt not in ("safetensors", "tar"):
            raise ShardSetError(f"shard format {fmt!r}: expected 'safetensors' or 'tar'")
        if total < 1 or shard_size < 1:
            raise ShardSetError(f"nothing to write ({total} videos, {shard_size} per shard)")
        self.dir, self.total, self.shard_size, self.fmt = str(out_dir), int(total), int(shard_size), fmt
        self.num_shards = math.ceil(self.total / self.shard_size)
        self.plan = dict(plan or {}, total=self.total, shard_size=self.shard_size, format=fmt)
        os.makedirs(os.path.join(self.dir, PROGRESS), exist_ok=True)
        self._check_plan()

    # ------------------------------------------------------------------ layout
    def name(self, index: int) -> str:
        return f"shard-{index:05d}.{'safetensors' if self.fmt == 'safetensors' else 'tar'}"

    def rows(self, index: int) -> range:
        return range(index * self.shard_size, min((index + 1) * self.shard_size, self.total))

    def _record_path(self, index: int) -> str:
        return os.path.join(self.dir, PROGRESS, self.name(index) + ".json")

    def _check_plan(self) -> None:
        path = os.path.join(self.dir, PLAN)
        if os.path.exists(path):
            try:
                old = json.load(open(path))
            except ValueError as err:
                raise ShardSetError(f"{path} is unreadable ({err}); remove the folder or choose another "
                                    "--out") from None
            diff = sorted(k for k in set(old) | set(self.plan) if old.get(k) != self.plan.get(k))
            if diff:
                shown = ", ".join(f"{k}: {old.get(k)!r} -> {self.plan.get(k)!r}" for k in diff[:4])
                raise ShardSetError(f"{self.dir} was started with other arguments ({shown}); re-run with the same "
                                    "arguments to finish it, or write to another --out")
            return
        if os.path.exists(os.path.join(self.dir, MANIFEST)) or glob.glob(os.path.join(self.dir, "shard-*")):
            raise ShardSetError(f"{self.dir} already holds shards that this command did not start; choose another "
                                "--out")
        _write_atomic(path, json.dumps(self.plan, indent=1, sort_keys=True).encode())

    # ------------------------------------------------------------------ progress
    def record(self, index: int) -> dict | None:
        """The manifest entry of a finished shard, or None. A shard renamed into place whose record was lost
        (a crash between the two) is complete: it gets its record now instead of being rewritten."""
        rec = self._record_path(index)
        if os.path.exists(rec):
            return json.load(open(rec))
        path = os.path.join(self.dir, self.name(index))
        if not os.path.exists(path):
            return None
        try:
            count = int(_read_shard(path)["latents"].shape[0])
        except (ShardError, KeyError):
            count = -1
        if count != len(self.rows(index)):  # not ours or damaged after the rename: do it again
            os.remove(path)
            return None
        entry = {"file": self.name(index), "count": count, "bytes": os.path.getsize(path), "sha256": sha256_file(path)}
        _write_atomic(rec, json.dumps(entry).encode())
        return entry

    def pending(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """This rank's shards still to write (stale temporary files of them are removed)."""
        todo = [i for i in range(rank, self.num_shards, world_size) if self.record(i) is None]
        for i in todo:
            for tmp in glob.glob(os.path.join(self.dir, self.name(i) + ".tmp-*")):
                os.remove(tmp)
        return todo

    def write(self, index: int, samples: list[dict], uncond=None, prompts: list[str] | None = None) -> dict:
        if len(samples) != len(self.rows(index)):
            raise ValueError(f"shard {index} takes {len(self.rows(index))} samples, got {len(samples)}")
        entry = write_shard_file(os.path.join(self.dir, self.name(index)), samples, uncond, self.fmt, prompts,
                                 key=f"{index:05d}")
        _write_atomic(self._record_path(index), json.dumps(entry).encode())
        return entry

    def finalize(self) -> str | None:
        """Write the manifest if every shard is done; returns its path (None while shards are missing)."""
        entries = [self.record(i) for i in range(self.num_shards)]
        if any(e is None for e in entries):
            return None
        return write_manifest(self.dir, entries)
