"""File helpers shared by checkpoints, phase weights, exports and data shards."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """Streaming sha256 of a file (manifests of checkpoints and shards)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it, which
    races with other threads creating files); falls back to that where /proc has no Umask line."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> Path:
    """Give ``path`` the mode a plain ``open()`` / ``mkdir`` would have: writers that go through private
    temporary files (safetensors' ``save_file``, ``tempfile.mkdtemp``) leave 0600 / 0700, which colleagues
    sharing a run folder cannot read."""
    path = Path(path)
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~current_umask())
    return path


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> Path:
    """``safetensors.torch.save_file`` with the file mode following the umask."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return follow_umask(path)


@contextlib.contextmanager
def atomic_folder(folder: str | Path, tag: str = "tmp"):
    """Yield an empty temporary folder beside ``folder``; when the block ends it replaces ``folder`` (an
    existing one is moved aside first, then removed), when the block raises it is removed. So a crash
    never leaves a half-written folder, and readers see the old folder or the whole new one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = follow_umask(tempfile.mkdtemp(prefix=f".{folder.name}.{tag}-", dir=folder.parent))  # mkdtemp: 0700
    try:
        yield tmp
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / "x")
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
