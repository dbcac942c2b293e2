"""Atomic checkpoints: a killed save never replaces the last good one; corruption is named and skipped."""
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_rcm.training import checkpoint as ckpt


def _save(root, step, size=1000):
    """A checkpoint folder written as the sharded saver writes one: temp folder, files, then the commit."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.fresh_temp_dir(root, step, f"tmp-{os.getpid()}")
    save_file({"w": torch.full((size,), float(step))}, str(tmp / "student.safetensors"))
    torch.save({"step": step}, tmp / "state.pt")
    return ckpt.commit_checkpoint(root, tmp, step, keep=3)


def _load_best(root):
    """(path, tensors, state) of the checkpoint a resume would use: the first that verifies."""
    path = next(ckpt.valid_checkpoints(root))
    return path, load_file(str(path / "student.safetensors")), torch.load(path / "state.pt", weights_only=False)


def test_round_trip_and_latest_pointer(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    path, tensors, state = _load_best(tmp_path)
    assert path.name == "step_00000002" and state["step"] == 2
    assert torch.equal(tensors["w"], torch.full((1000,), 2.0))
    assert (tmp_path / "latest").read_text().strip() == "step_00000002"


def test_keep_last_n(tmp_path):
    for s in range(1, 6):
        _save(tmp_path, s)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000005", "step_00000004", "step_00000003"]


def test_corrupt_checkpoint_is_named_and_skipped(tmp_path, capsys):
    _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    with open(bad / "student.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00garbage\x00")
    with pytest.raises(ckpt.CheckpointError, match="student.safetensors fails its sha256"):
        ckpt.verify_checkpoint(bad)
    path, _, state = _load_best(tmp_path)
    assert state["step"] == 1
    assert "step_00000002/student.safetensors" in capsys.readouterr().out


def test_truncated_and_incomplete_checkpoints(tmp_path):
    _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    os.truncate(bad / "state.pt", 10)
    with pytest.raises(ckpt.CheckpointError, match="state.pt has 10 bytes"):
        ckpt.verify_checkpoint(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.verify_checkpoint(bad)
    assert _load_best(tmp_path)[2]["step"] == 1


def _slow_save(root):
    _save(Path(root), 2, size=30_000_000)  # ~120 MB: long enough to be killed midway


def test_save_killed_midway_leaves_previous_checkpoint_loadable(tmp_path):
    _save(tmp_path, 1)
    proc = mp.get_context("spawn").Process(target=_slow_save, args=(str(tmp_path),))
    proc.start()
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".step_00000002") for p in tmp_path.iterdir()):
        time.sleep(0.01)
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    path, tensors, state = _load_best(tmp_path)
    assert state["step"] == 1 and path.name == "step_00000001"
    assert (tmp_path / "latest").read_text().strip() == "step_00000001"
    # the next save succeeds despite the leftover temporary folder
    _save(tmp_path, 2)
    assert _load_best(tmp_path)[2]["step"] == 2
