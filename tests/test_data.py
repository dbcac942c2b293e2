import json
import os

import pytest
import torch

from megatron_rcm.config.errors import ConfigError
from megatron_rcm.data import DataConfig, build_dataset, validate_data
from megatron_rcm.data.shards import LatentShardDataset, ShardError, ShardWriter, write_teacher_shards
from megatron_rcm.data.synthetic import make_sample


def _centroid(video):
    """Brightness-weighted centre of mass per frame [F, 2] (background subtracted)."""
    g = video.mean(0)
    g = g - g.flatten(1).min(1).values[:, None, None]
    ys = torch.arange(g.shape[1]).float()
    w = g.sum((1, 2))
    return torch.stack([(g.sum(2) * ys).sum(1) / w, (g.sum(1) * ys).sum(1) / w], -1)


def test_batch_shapes_and_range():
    b = next(build_dataset(DataConfig(), batch_size=4))
    assert b["latents"].shape == (4, 3, 8, 32, 32) and b["latents"].dtype == torch.float32
    assert b["context"].shape == b["uncond_context"].shape == (4, 8, 32)
    assert b["class_id"].dtype == torch.long and "actions" not in b
    assert b["latents"].min() >= -1 and b["latents"].max() <= 1


def test_deterministic_by_seed():
    a = next(build_dataset(DataConfig(seed=3), batch_size=2))
    b = next(build_dataset(DataConfig(seed=3), batch_size=2))
    c = next(build_dataset(DataConfig(seed=4), batch_size=2))
    assert torch.equal(a["latents"], b["latents"]) and not torch.equal(a["latents"], c["latents"])
    # context is a fixed table: same class -> same context, regardless of seed
    assert torch.equal(c["context"][0], build_dataset(DataConfig(seed=9)).text(c["class_id"][:1])[0])


def test_resume_gives_exact_next_batch():
    d = build_dataset(DataConfig(), batch_size=3)
    next(d), next(d)
    state = d.state_dict()
    expected = next(d)
    e = build_dataset(DataConfig(), batch_size=3)
    e.load_state_dict(state)
    got = next(e)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_rank_sharding_disjoint():
    r0 = build_dataset(DataConfig(), batch_size=4, rank=0, world_size=2)
    r1 = build_dataset(DataConfig(), batch_size=4, rank=1, world_size=2)
    i0 = {i for s in range(3) for i in r0.sample_indices(s)}
    i1 = {i for s in range(3) for i in r1.sample_indices(s)}
    assert not i0 & i1 and len(i0) == len(i1) == 12
    assert not torch.equal(next(r0)["latents"], next(r1)["latents"])


def _pixel_at(video, centres):
    """Mean colour at the (wrapped) trajectory pixel vs. the frame's mean: the shape is where we say."""
    f = torch.arange(video.shape[1])
    y = centres[:, 0].floor().long() % video.shape[2]
    x = centres[:, 1].floor().long() % video.shape[3]
    return video[:, f, y, x].mean(0), video.mean((0, 2, 3))


def test_class_determines_distinct_motion():
    cfg = DataConfig(seed=0)
    vel: dict[int, list] = {}
    for i in range(60):
        s = make_sample(cfg, i)
        at, mean = _pixel_at(s["latents"], s["centres"])
        assert torch.all(at > mean + 0.3)  # rendered shape follows the trajectory
        d = s["centres"][1:] - s["centres"][:-1]
        assert torch.allclose(d, d[0].expand_as(d), atol=1e-4)  # constant velocity within a video
        vel.setdefault(s["class_id"], []).append(d[0])
    assert len(vel) == cfg.num_classes
    for k, v in vel.items():
        assert all(torch.allclose(x, v[0], atol=1e-4) for x in v)  # class fixes the velocity
        assert 1.0 < float(v[0].norm()) < 3.0  # sub-pixel-smooth speeds
    means = [v[0] for v in vel.values()]
    for i in range(len(means)):
        for j in range(i + 1, len(means)):
            assert float((means[i] - means[j]).norm()) > 0.5
    # frames change smoothly: consecutive frames closer than frames far apart
    s = make_sample(cfg, 0)["latents"]
    assert (s[:, 1] - s[:, 0]).abs().mean() < (s[:, 4] - s[:, 0]).abs().mean()


def test_actions_change_motion():
    cfg = DataConfig(action_dim=4)
    b = next(build_dataset(cfg, batch_size=8))
    assert b["actions"].shape == (8, 8, 4) and torch.all(b["actions"].sum(-1) == 1)
    for i in range(16):
        s = make_sample(cfg, i)
        a = s["actions"].argmax(-1)
        d = s["centres"][1:] - s["centres"][:-1]
        ang = 2 * torch.pi * a[1:].float() / 4
        want = torch.stack([-torch.sin(ang), torch.cos(ang)], -1) * 2
        assert torch.allclose(d, want, atol=1e-4)  # each action moves the shape its own way
        at, mean = _pixel_at(s["latents"], s["centres"])
        assert torch.all(at > mean + 0.3)
    # different actions -> visibly different videos from the same start
    s = make_sample(cfg, 3)
    acts = s["actions"].argmax(-1)
    seen = set(acts[1:].tolist())
    assert len(seen) >= 1 and (s["latents"][:, -1] - s["latents"][:, 0]).abs().max() > 0.5


def test_validate_data_names_key():
    with pytest.raises(ConfigError, match="data.kind"):
        validate_data(DataConfig(kind="nope"))
    with pytest.raises(ConfigError, match="data.batch_size"):
        validate_data(DataConfig(batch_size=0))
    with pytest.raises(ConfigError, match="data.shard_dir"):
        validate_data(DataConfig(kind="latent_shards"))


@pytest.mark.parametrize("fmt", ["safetensors", "tar"])
def test_shard_round_trip_resume_and_ranks(tmp_path, fmt):
    src = build_dataset(DataConfig(action_dim=3), batch_size=5)
    ref = [src.batch_at(0), src.batch_at(1)]
    write_teacher_shards(lambda b: b["latents"] * 0.5, build_dataset(DataConfig(action_dim=3), batch_size=5),
                         str(tmp_path), num_videos=10, shard_size=4, fmt=fmt)
    manifest = json.load(open(tmp_path / "manifest.json"))
    assert [e["count"] for e in manifest["shards"]] == [4, 4, 2]
    ds = build_dataset(DataConfig(kind="latent_shards", shard_dir=str(tmp_path)), batch_size=10)
    b = next(ds)
    want = torch.cat([r["latents"] for r in ref]) * 0.5
    assert torch.allclose(b["latents"], want)
    assert torch.equal(b["context"], torch.cat([r["context"] for r in ref]))
    assert torch.equal(b["actions"], torch.cat([r["actions"] for r in ref]))
    assert torch.equal(b["class_id"], torch.cat([r["class_id"] for r in ref]))
    assert torch.equal(b["uncond_context"], torch.cat([r["uncond_context"] for r in ref]))
    # resume and rank sharding
    d = LatentShardDataset(str(tmp_path), 2)
    next(d)
    st = d.state_dict()
    exp = next(d)
    e = LatentShardDataset(str(tmp_path), 2)
    e.load_state_dict(st)
    assert torch.equal(next(e)["latents"], exp["latents"])
    r0, r1 = LatentShardDataset(str(tmp_path), 2, 0, 2), LatentShardDataset(str(tmp_path), 2, 1, 2)
    a, c = next(r0)["latents"], next(r1)["latents"]
    assert torch.equal(a, want[0:2]) and torch.equal(c, want[2:4])


@pytest.mark.parametrize("fmt", ["safetensors", "tar"])
@pytest.mark.parametrize("damage", ["truncate", "corrupt", "corrupt_unchecked"])
def test_bad_shard_error_names_file(tmp_path, fmt, damage):
    with ShardWriter(str(tmp_path), shard_size=3, fmt=fmt) as w:
        w.write(next(build_dataset(DataConfig(), batch_size=6)))
    name = "shard-00001." + fmt
    path = tmp_path / name
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(data[:10] + b"\xff" * 40 + data[50:])
    verify = damage != "corrupt_unchecked"
    d = LatentShardDataset(str(tmp_path), 3, verify=verify)
    next(d)  # first shard is fine
    with pytest.raises(ShardError, match=name):
        next(d)


def test_missing_manifest_named(tmp_path):
    with pytest.raises(ShardError, match="manifest.json"):
        LatentShardDataset(str(tmp_path), 2)
