"""generate-data --teacher diffusers:DIR and encode-data: contents against references, resume, ranks, errors."""
import json

import numpy as np
import pytest
import torch

from conftest import rel_err
from fixtures.runs import cli_error
from fixtures.tiny_wan_pipeline import SHIFT, TEXT_LEN
from megatron_rcm.cli import main
from megatron_rcm.data.encode_videos import resize_and_crop
from megatron_rcm.data.shards import LatentShardDataset, read_shard_prompts

PROMPTS = ["a red cat runs", "fish swims in the rain", "a dog jumps over the car"]
GEO = ["--frames", "13", "--height", "32", "--width", "32", "--text-len", str(TEXT_LEN)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Every test here runs single-threaded (see conftest)."""


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("# three prompts\n" + "\n".join(PROMPTS) + "\n")
    return path


def _generate(pipeline, prompts, out, *extra):
    return main(["generate-data", "--teacher", f"diffusers:{pipeline}", "--prompts", str(prompts), "--out", str(out),
                 "--steps", "3", "--shard-size", "2", "--solver", "euler", "--seed", "7", *GEO, *extra])


def _reference_video(pipeline, prompt_ctx, uncond_ctx, index, steps=3, guidance=5.0):
    """Euler on Wan's shifted grid with diffusers' own transformer and CFG: the teacher data of video ``index``."""
    from diffusers import WanTransformer3DModel

    dm = WanTransformer3DModel.from_pretrained(str(pipeline / "transformer")).eval()
    x = torch.randn((4, 4, 4, 4), generator=torch.Generator().manual_seed(7 + index))[None]
    s = [1 - i / steps for i in range(steps + 1)]
    s = [SHIFT * v / (1 + (SHIFT - 1) * v) for v in s]
    with torch.no_grad():
        for i in range(steps):
            t = torch.tensor([1000.0 * s[i]])
            vc = dm(x, t, prompt_ctx[None], return_dict=False)[0]
            vu = dm(x, t, uncond_ctx[None], return_dict=False)[0]
            x = x + (s[i + 1] - s[i]) * (vu + guidance * (vc - vu))
    return x[0]


def test_generate_data_from_a_diffusers_teacher(tiny_wan_pipeline, prompt_file, tmp_path, capsys):
    out = tmp_path / "shards"
    assert _generate(tiny_wan_pipeline, prompt_file, out) == 0
    assert "data.kind=latent_shards" in capsys.readouterr().out
    data = LatentShardDataset(str(out), batch_size=3)
    assert data.total == 3 and [e["count"] for e in data.entries] == [2, 1]
    batch = next(data)
    assert batch["latents"].shape == (3, 4, 4, 4, 4) and batch["context"].shape == (3, TEXT_LEN, 32)
    assert read_shard_prompts(str(out / "shard-00000.safetensors")) == PROMPTS[:2]
    assert read_shard_prompts(str(out / "shard-00001.safetensors")) == PROMPTS[2:]
    from megatron_rcm.encoders import EncodersConfig, load_encoders

    enc = load_encoders(EncodersConfig(diffusers_dir=str(tiny_wan_pipeline)), vae=False, text_len=TEXT_LEN)
    ctx = enc.prompt_contexts(PROMPTS)
    assert torch.equal(batch["context"], ctx["context"]) and torch.equal(batch["uncond_context"], ctx["uncond_context"])
    for i in range(3):
        ref = _reference_video(tiny_wan_pipeline, ctx["context"][i], ctx["uncond_context"][i], i)
        assert rel_err(batch["latents"][i], ref) < 1e-4, i
    assert rel_err(batch["latents"][0], batch["latents"][1]) > 0.1


def test_generate_data_trajectory_from_a_diffusers_teacher(tiny_wan_pipeline, prompt_file, tmp_path, capsys):
    """--trajectory 3 with --trajectory-shift = the teacher's shift puts the student's levels on the teacher's own
    3-step Euler grid: the same end point as without it, and the states the reference Euler steps pass through."""
    from diffusers import WanTransformer3DModel

    from megatron_rcm.encoders import EncodersConfig, load_encoders

    out = tmp_path / "traj"
    assert _generate(tiny_wan_pipeline, prompt_file, out, "--trajectory", "3", "--trajectory-shift", str(SHIFT)) == 0
    batch = next(LatentShardDataset(str(out), batch_size=3))
    assert batch["trajectory"].shape == (3, 3, 4, 4, 4, 4)
    levels = [SHIFT * v / (1 + (SHIFT - 1) * v) for v in (1.0, 2 / 3, 1 / 3)]
    torch.testing.assert_close(batch["trajectory_levels"], torch.tensor([levels] * 3), rtol=0, atol=1e-6)
    enc = load_encoders(EncodersConfig(diffusers_dir=str(tiny_wan_pipeline)), vae=False, text_len=TEXT_LEN)
    ctx = enc.prompt_contexts(PROMPTS)
    dm = WanTransformer3DModel.from_pretrained(str(tiny_wan_pipeline / "transformer")).eval()
    x = torch.randn((4, 4, 4, 4), generator=torch.Generator().manual_seed(7 + 1))[None]  # video 1
    grid = levels + [0.0]
    with torch.no_grad():
        for i in range(3):
            assert rel_err(batch["trajectory"][1, i], x[0]) < 1e-4, i
            t = torch.tensor([1000.0 * grid[i]])
            vc = dm(x, t, ctx["context"][1][None], return_dict=False)[0]
            vu = dm(x, t, ctx["uncond_context"][1][None], return_dict=False)[0]
            x = x + (grid[i + 1] - grid[i]) * (vu + 5.0 * (vc - vu))
    assert rel_err(batch["latents"][1], x[0]) < 1e-4
    assert "shard" in capsys.readouterr().out


def test_interrupted_generate_data_resumes_without_rewriting_a_finished_shard(tiny_wan_pipeline, prompt_file,
                                                                              tmp_path, monkeypatch, capsys):
    import megatron_rcm.inference.bidirectional as bidir

    out = tmp_path / "shards"
    real, calls = bidir.bidirectional_sample, []

    def dies_on_the_third_video(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the machine goes away in the middle of shard 1
        return real(*a, **k)

    monkeypatch.setattr(bidir, "bidirectional_sample", dies_on_the_third_video)
    with pytest.raises(KeyboardInterrupt):
        _generate(tiny_wan_pipeline, prompt_file, out)
    monkeypatch.setattr(bidir, "bidirectional_sample", real)
    first = out / "shard-00000.safetensors"
    stamp = first.stat().st_mtime_ns
    assert not (out / "manifest.json").exists() and not (out / "shard-00001.safetensors").exists()
    (out / "shard-00001.safetensors.tmp-999").write_bytes(b"half a shard")  # a crash inside the write
    with pytest.raises(Exception, match="manifest"):
        LatentShardDataset(str(out), batch_size=1)  # a partial folder is not a data set
    err = _error(capsys, ["generate-data", "--teacher", f"diffusers:{tiny_wan_pipeline}", "--prompts",
                          str(prompt_file), "--out", str(out), "--steps", "4", "--shard-size", "2", "--solver",
                          "euler", "--seed", "7", *GEO])
    assert "started with other arguments (steps: 3 -> 4)" in err
    assert _generate(tiny_wan_pipeline, prompt_file, out) == 0
    assert "1 of 2 shards to write" in capsys.readouterr().out
    assert first.stat().st_mtime_ns == stamp and not list(out.glob("*.tmp-*"))
    again = tmp_path / "again"
    assert _generate(tiny_wan_pipeline, prompt_file, again) == 0  # uninterrupted: the same bytes
    for name in ("shard-00000.safetensors", "shard-00001.safetensors"):
        assert (out / name).read_bytes() == (again / name).read_bytes()
    assert json.loads((out / "manifest.json").read_text()) == json.loads((again / "manifest.json").read_text())


def test_ranks_split_the_shards_and_the_last_one_writes_the_manifest(tiny_wan_pipeline, prompt_file, tmp_path,
                                                                     monkeypatch, capsys):
    out = tmp_path / "shards"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _generate(tiny_wan_pipeline, prompt_file, out, "--format", "tar") == 0
    assert "1 of 2 shards" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00001.tar"] and not (out / "manifest.json").exists()
    monkeypatch.setenv("RANK", "0")
    assert _generate(tiny_wan_pipeline, prompt_file, out, "--format", "tar") == 0
    data = LatentShardDataset(str(out), batch_size=3)
    assert data.total == 3 and read_shard_prompts(str(out / "shard-00001.tar")) == PROMPTS[2:]


_error = cli_error


def test_generate_data_input_errors(tiny_wan_pipeline, prompt_file, tmp_path, capsys):
    base = ["generate-data", "--teacher", f"diffusers:{tiny_wan_pipeline}", "--prompts", str(prompt_file),
            "--out", str(tmp_path / "x")]
    geo = ["--height", "32", "--width", "32", "--text-len", str(TEXT_LEN)]
    assert "4k+1 frames (e.g. 9 or 13)" in _error(capsys, base + ["--frames", "12", *geo])
    assert "'--height'" in _error(capsys, base + ["--frames", "9", "--height", "20", "--width", "32"])
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    assert "holds no prompts" in _error(capsys, [*base[:4], str(empty), *base[5:], "--frames", "9", *geo])
    assert "no vae/ sub-folder" in _error(capsys, ["generate-data", "--teacher",
                                                   f"diffusers:{tiny_wan_pipeline / 'transformer'}", "--prompts",
                                                   str(prompt_file), "--out", str(tmp_path / "y"), "--frames", "9",
                                                   *geo])
    assert "RUN_DIR --phase NAME" in _error(capsys, ["generate-data", "--out", str(tmp_path / "z")])


def test_resize_and_crop_keeps_the_centre():
    wide = torch.zeros(2, 3, 32, 96)
    wide[..., 32:64] = 1.0  # only the middle third survives a centre crop to 32x32 (no resize needed)
    assert torch.equal(resize_and_crop(wide, 32, 32), torch.ones(2, 3, 32, 32))
    flat = torch.full((1, 3, 64, 80), 0.25)
    out = resize_and_crop(flat, 32, 32)  # scaled by 1/2 to 32x40, then cropped
    assert out.shape == (1, 3, 32, 32) and torch.allclose(out, torch.full_like(out, 0.25), atol=1e-6)
    x = torch.rand(1, 3, 16, 24)
    assert torch.equal(resize_and_crop(x, 16, 24), x)


def _write_clip(path, frames, h, w, seed):
    import imageio.v2 as imageio

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    imageio.mimwrite(str(path), [np.roll(base, 2 * k, axis=1) for k in range(frames)], duration=100, loop=0)


def test_encode_data_encodes_clips_and_prompts(tiny_wan_pipeline, prompt_file, tmp_path, capsys):
    from megatron_rcm.data.encode_videos import read_clip
    from megatron_rcm.encoders import EncodersConfig, load_encoders

    clips = tmp_path / "clips"
    clips.mkdir()
    for i, size in enumerate([(40, 48), (32, 32), (64, 32)]):
        _write_clip(clips / f"clip{i}.gif", 10, *size, seed=i)
    def argv(out, frames=9):
        return ["encode-data", "--videos", str(clips), "--prompts", str(prompt_file), "--out", str(out),
                "--encoders", str(tiny_wan_pipeline), "--frames", str(frames), "--height", "32", "--width", "32",
                "--text-len", str(TEXT_LEN), "--shard-size", "2"]

    out = tmp_path / "shards"
    assert main(argv(out)) == 0
    data = LatentShardDataset(str(out), batch_size=3)
    batch = next(data)
    assert batch["latents"].shape == (3, 4, 3, 4, 4)
    enc = load_encoders(EncodersConfig(diffusers_dir=str(tiny_wan_pipeline)), text_len=TEXT_LEN)
    for i in range(3):
        pixels = read_clip(clips / f"clip{i}.gif", 9, 32, 32)
        assert pixels.shape == (3, 9, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
        assert rel_err(batch["latents"][i], enc.vae.encode(pixels[None])[0]) < 1e-6
    assert torch.equal(batch["context"], enc.prompt_contexts(PROMPTS)["context"])
    assert read_shard_prompts(str(out / "shard-00000.safetensors")) == PROMPTS[:2]
    assert "4k+1 frames" in _error(capsys, argv(tmp_path / "a", frames=8))
    assert "has 10 frames; --frames 13 needs at least 13" in _error(capsys, argv(tmp_path / "b", frames=13))
    (clips / "clip3.gif").write_bytes((clips / "clip0.gif").read_bytes())
    assert "4 clips in" in _error(capsys, argv(tmp_path / "c"))
