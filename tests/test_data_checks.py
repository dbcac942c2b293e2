"""Shard folders are checked against the config before any work: one line, exit 2, no run folder."""
import json
import os

import pytest
import torch

from megatron_rcm.cli import main
from megatron_rcm.config.run import load_config
from megatron_rcm.data.checks import ShardCheckError, check_shard_dir
from megatron_rcm.data.shards import ShardWriter

TINY = ["model.num_layers=1", "data.height=8", "data.width=8", "data.num_frames=4", "data.batch_size=2",
        "causal.chunk_frames=2", "eval.at_phase_end=false", "data.kind=latent_shards",
        "phases=[{name: t, kind: teacher, objective: flow_matching, steps: 1}]"]


def _shards(folder, n=3, c=3, f=4, h=8, w=8, text=(8, 32), actions=None, fmt="safetensors", extra=None, image=None):
    with ShardWriter(str(folder), shard_size=2, fmt=fmt) as wr:
        batch = {"latents": torch.randn(n, c, f, h, w), "context": torch.randn(n, *text),
                 "class_id": torch.arange(n), "uncond_context": torch.zeros(n, *text)}
        if actions:
            batch["actions"] = torch.zeros(n, f, actions)
        if image:
            batch["image_context"] = torch.zeros(n, *image)
        wr.write(batch)
    if extra:  # writers may add tensors/fields this check does not know: they are ignored
        manifest = folder / "manifest.json"
        m = json.loads(manifest.read_text())
        m.update(extra)
        manifest.write_text(json.dumps(m))
    return folder


def _cfg(shard_dir, *extra):
    return load_config(None, TINY + [f"data.shard_dir={shard_dir}", *extra])


@pytest.mark.parametrize("fmt", ["safetensors", "tar"])
def test_matching_shards_pass_and_unknown_fields_are_ignored(tmp_path, fmt):
    folder = _shards(tmp_path / "s", fmt=fmt, extra={"prompts_file": "prompts.jsonl", "version": 2})
    cfg = _cfg(folder)
    assert check_shard_dir(cfg.data, cfg.model) == 3


@pytest.mark.parametrize("fmt", ["safetensors", "tar"])
@pytest.mark.parametrize("shape,key", [
    (dict(h=16, w=16), "data.height"),
    (dict(w=16), "data.width"),
    (dict(f=8), "data.num_frames"),
    (dict(c=4), "data.channels"),
    (dict(text=(8, 16)), "model.text_dim"),
    (dict(actions=4), "data.action_dim"),
])
def test_shape_mismatches_name_the_key_and_the_shard(tmp_path, fmt, shape, key):
    folder = _shards(tmp_path / "s", fmt=fmt, **shape)
    cfg = _cfg(folder)
    with pytest.raises(ShardCheckError) as err:
        check_shard_dir(cfg.data, cfg.model)
    msg = str(err.value)
    assert f"'{key}'" in msg and "shard-00000" in msg and "\n" not in msg


def test_world_model_shards_need_actions_of_the_configured_width(tmp_path):
    folder = _shards(tmp_path / "s", actions=4)
    cfg = _cfg(folder, "data.action_dim=4", "model.action_dim=4")
    assert check_shard_dir(cfg.data, cfg.model) == 3
    cfg = _cfg(folder, "data.action_dim=3", "model.action_dim=3")
    with pytest.raises(ShardCheckError, match="'data.action_dim'"):
        check_shard_dir(cfg.data, cfg.model)


@pytest.mark.parametrize("fmt", ["safetensors", "tar"])
def test_image_to_video_shards_need_image_context_of_the_layout(tmp_path, fmt):
    i2v = ["model.image_dim=12", "model.added_kv_proj_dim=64"]
    folder = _shards(tmp_path / "s", fmt=fmt, image=(6, 12))
    assert check_shard_dir(_cfg(folder, *i2v).data, _cfg(folder, *i2v).model) == 3
    for args, shards in (([], folder), (i2v + ["model.pos_embed_seq_len=4"], folder),
                         (i2v, _shards(tmp_path / "t", fmt=fmt)), (i2v, _shards(tmp_path / "u", fmt=fmt, image=(6, 8)))):
        cfg = _cfg(shards, *args)
        with pytest.raises(ShardCheckError, match="'model.image_dim'"):
            check_shard_dir(cfg.data, cfg.model)


def test_broken_folders_are_named(tmp_path):
    def err(folder):
        cfg = _cfg(folder)
        with pytest.raises(ShardCheckError) as e:
            check_shard_dir(cfg.data, cfg.model)
        return str(e.value)

    assert "an existing folder" in err(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "manifest.json (the folder is empty)" in err(tmp_path / "empty")
    folder = _shards(tmp_path / "s")
    (folder / "manifest.json").write_text('{"version": 1, "shards": []}')
    assert "at least one shard" in err(folder)
    folder = _shards(tmp_path / "s2")
    os.remove(folder / "shard-00001.safetensors")
    assert "shard-00001.safetensors is missing" in err(folder)
    folder = _shards(tmp_path / "s3")
    (folder / "shard-00000.safetensors").write_bytes(b"\x05\x00")
    assert "shard-00000.safetensors" in err(folder) and "readable safetensors" in err(folder)
    folder = _shards(tmp_path / "s4")
    (folder / "manifest.json").write_text("{")
    assert "a readable manifest.json" in err(folder)


def test_train_refuses_before_creating_the_run_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    bad = _shards(tmp_path / "big", h=16, w=16)
    config = tmp_path / "run.yaml"
    config.write_text("data: {kind: latent_shards}\n")
    for shard_dir, key in ((tmp_path / "empty", "data.shard_dir"), (bad, "data.height")):
        out = tmp_path / "run"
        assert main(["train", str(config), *TINY, f"data.shard_dir={shard_dir}", f"output_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and f"'{key}'" in err and err.count("\n") == 1
        assert not out.exists()
