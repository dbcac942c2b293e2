"""Everything a run writes follows the umask (weights used to be 0600: colleagues could not read them)."""
import os
import stat

import pytest
import torch

from megatron_rcm.config.run import load_config
from megatron_rcm.convert import export_diffusers, save_model_checkpoint
from megatron_rcm.evaluation.extractor import VideoFeatureExtractor
from megatron_rcm.models import build_model
from megatron_rcm.training.logger import RunLogger
from megatron_rcm.training.trainer import Trainer

TINY = ["model.num_layers=1", "data.height=8", "data.width=8", "data.num_frames=4", "data.batch_size=2",
        "causal.chunk_frames=2", "train.checkpoint_every=1", "eval.at_phase_end=false",
        "phases=[{name: t, kind: teacher, objective: flow_matching, steps: 2}]"]


@pytest.fixture
def umask():
    def set_mask(mask):
        os.umask(mask)
        return mask
    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def _modes(root):
    """(relative path, permission bits) of every file and folder under root."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            out.append((os.path.relpath(p, root), stat.S_IMODE(os.stat(p).st_mode), os.path.isdir(p)))
    return out


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_run_folder_checkpoints_and_exports_follow_the_umask(tmp_path, umask, mask, one_thread):
    umask(mask)
    cfg = load_config(None, TINY + [f"output_dir={tmp_path / 'run'}"])
    Trainer(cfg, logger=RunLogger(cfg.output_dir, tensorboard=False)).run()
    model = build_model(cfg.model, cfg.causal)
    export_diffusers(model, tmp_path / "diffusers", max_shard_size=20_000)  # sharded: several files + index
    save_model_checkpoint(model, tmp_path / "native" / "model.safetensors")
    VideoFeatureExtractor().save(str(tmp_path / "extractor.safetensors"))
    found = _modes(tmp_path)
    names = {p for p, _, _ in found}
    assert {"run/phases/t/ema.safetensors", "run/phases/t/model.safetensors", "diffusers/config.json",
            "native/model.safetensors", "extractor.safetensors"} <= names
    assert any(p.startswith("run/checkpoints/step_") and p.endswith(".distcp") for p in names)
    assert len([p for p in names if p.startswith("diffusers/") and p.endswith(".safetensors")]) > 1
    wrong = [(p, oct(m)) for p, m, is_dir in found if m != (0o777 if is_dir else 0o666) & ~mask]
    assert not wrong, wrong
