"""Atomic, verifiable checkpoint folders (the mechanics under :mod:`.dist_checkpoint`'s sharded format).

A checkpoint is a folder ``step_XXXXXXXX/`` of files plus ``manifest.json`` with each file's size
and sha256. It is written under a temporary name and renamed when complete; the ``latest`` pointer
is replaced (write temp + rename) only afterwards. A kill at any moment therefore leaves the previous
checkpoint and pointer intact. Verification names the missing, truncated or corrupt file, and the
caller falls back to the newest older checkpoint that verifies.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from ..utils.files import sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def remove_stale_temporaries(root: str | Path) -> list[str]:
    """Delete the temporary folders of saves that were cut short (``.step_XXXXXXXX.<suffix>``; never a
    checkpoint). Call only while holding the run lock, when no save of this run can be in flight."""
    root = Path(root)
    stale = sorted(p for p in root.glob(".step_*") if p.is_dir()) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in stale]


def fresh_temp_dir(root: Path, step: int, suffix: str) -> Path:
    """An empty ``root/.step_XXXXXXXX.<suffix>`` (a leftover of a killed save is removed first)."""
    tmp = root / f".{checkpoint_name(step)}.{suffix}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def file_digest(path: Path) -> dict:
    """fsync ``path`` and return its manifest entry (size and sha256)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def commit_checkpoint(root: Path, tmp: Path, step: int, keep: int, info: dict | None = None,
                      digests: dict | None = None) -> Path:
    """Finish a checkpoint written into ``tmp``: manifest (every file's size + sha256), fsync, rename to
    ``step_XXXXXXXX``, then move ``latest`` and prune to the newest ``keep``. ``info`` joins the manifest;
    ``digests`` (relative name -> :func:`file_digest`) are entries already computed, e.g. by the rank
    that wrote the file."""
    digests = digests or {}
    files = {}
    for p in sorted(q for q in tmp.rglob("*") if q.is_file()):
        name = p.relative_to(tmp).as_posix()
        files[name] = digests[name] if name in digests else file_digest(p)
    (tmp / MANIFEST).write_text(json.dumps({"step": step, **(info or {}), "files": files}, indent=1))
    _fsync_dir(tmp)
    final = root / checkpoint_name(step)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace atomically-ish
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / LATEST, final.name + "\n")
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(path: Path, part: tuple[int, int] = (0, 1)) -> None:
    """Raise :class:`CheckpointError` naming the first missing, truncated or corrupt file.

    ``part`` = (k, n) checks only the k-th of every n files of the manifest, so n processes can
    share the work."""
    manifest = path / MANIFEST
    if not manifest.exists():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it is incomplete")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"checkpoint manifest {manifest} is corrupt: {e}") from None
    k, n = part
    for name, meta in list(files.items())[k::n]:
        p = path / name
        if not p.exists():
            raise CheckpointError(f"checkpoint file {p} is missing")
        if p.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"checkpoint file {p} has {p.stat().st_size} bytes, manifest says {meta['bytes']}")
        if sha256_file(p) != meta["sha256"]:
            raise CheckpointError(f"checkpoint file {p} fails its sha256 check (corrupt)")


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete-looking checkpoints, newest first (temporary folders are ignored)."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)


def candidate_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders in the order to try them: the one ``latest`` names, then newest to oldest."""
    root = Path(root)
    candidates = list_checkpoints(root)
    pointer = root / LATEST
    if pointer.exists():
        named = root / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    return candidates


def valid_checkpoints(root: str | Path, bad: list | None = None):
    """Checkpoints that verify, best first: the one ``latest`` names, then newest to oldest.

    Each bad one is reported (with the offending file; its message also appended to ``bad``) and
    skipped. A generator, so only as many are verified as the caller needs."""
    for path in candidate_checkpoints(root):
        try:
            verify_checkpoint(path)
        except (CheckpointError, OSError) as e:
            report_unusable(e)
            if bad is not None:
                bad.append(str(e))
            continue
        yield path


def report_unusable(error: Exception) -> None:
    log.warning("skipping unusable checkpoint: %s", error)
    print(f"[checkpoint] skipping unusable checkpoint: {error}", flush=True)
