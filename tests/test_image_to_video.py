"""``generate --image`` and ``--prompts-at`` on a trained tiny class-conditioned teacher (``class_model_run``).

Image-to-video: the image (a first frame of unseen data-set videos, written as PNG) is the first output frame, and
the shape then moves on from where the image has it, in the prompt's direction; the same noise without the image
starts the shape elsewhere. Prompt switching: "right" for chunks 0-3, then "left": the frames after the switch
move left, without the switch they keep moving right. Motion is the torus centroid's displacement
(tests/fixtures/world_model.py).
"""
import numpy as np
import pytest
import torch

from fixtures.class_model import LEFT, RIGHT
from fixtures.runs import cli_error
from fixtures.world_model import SIZE, frame_displacements, torus_centroids
from megatron_rcm.data import TextConditioner, build_dataset
from megatron_rcm.inference.image_input import image_latents
from megatron_rcm.inference.prompt_switch import ConditionSchedule
from megatron_rcm.inference.run_dir import load_phase_model, load_run_config
from megatron_rcm.inference.streaming import generate_video
from megatron_rcm.network import Condition

pytestmark = pytest.mark.usefixtures("one_thread")
FRAMES = 8  # 2x the training length


def _write_png(path, frame):
    """[3, H, W] in [-1, 1] -> an 8-bit PNG; returns the frame as the PNG holds it."""
    import imageio.v2 as imageio

    pixels = ((frame.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    imageio.imwrite(path, pixels)
    return torch.from_numpy(pixels.astype(np.float32) / 255 * 2 - 1).permute(2, 0, 1)


def _setup(run):
    cfg = load_run_config(run)
    model = load_phase_model(cfg, "teacher", "model")
    batch = build_dataset(cfg.data, batch_size=8).batch_at(50_000)  # start frames unseen in training
    text = TextConditioner(cfg.data.num_classes, cfg.data.text_len, cfg.data.text_dim)
    return cfg, model, batch, text


def _wrapped(d):
    return torch.remainder(d + SIZE / 2, SIZE) - SIZE / 2


def test_image_is_the_first_frame_and_the_motion_continues_from_it(class_model_run, tmp_path):
    cfg, model, batch, text = _setup(class_model_run)
    images = batch["latents"][:, :, :1]
    png = _write_png(tmp_path / "first.png", images[0, :, 0])
    latents, note = image_latents(str(tmp_path / "first.png"), cfg.data, 3)
    assert note is None and torch.allclose(latents[0, :, 0], png, atol=1e-6)  # the PNG's pixels, [-1, 1]

    ctx = text(torch.full((8,), RIGHT))
    video = generate_video(model, ctx, FRAMES - 1, SIZE, SIZE, steps=1, seed=0, log=None, prefix=images,
                           show_prefix=True)
    assert video.shape[2] == FRAMES and torch.equal(video[:, :, :1], images)  # the first frame IS the image
    start = torus_centroids(images)[:, 0]
    d1 = _wrapped(torus_centroids(video[:, :, 1:2])[:, 0] - start).norm(dim=-1)
    motion = frame_displacements(video).mean((0, 1))  # (y, x) px per frame
    report = f"frame-1 offset from the image's shape {d1.tolist()}, motion {motion.tolist()}"
    assert d1.median() < 3.0 and motion[1] > 0.7 and motion[1] > 2 * motion[0].abs(), report  # continues, moving right

    free = generate_video(model, ctx, FRAMES, SIZE, SIZE, steps=1, seed=0, log=None)  # the image ignored
    d_free = _wrapped(torus_centroids(free[:, :, :1])[:, 0] - start).norm(dim=-1)
    assert d_free.median() > 2 * d1.median() + 1.0, (d_free.tolist(), d1.tolist())


@pytest.mark.parametrize("recache", [True, False])
def test_prompt_switch_turns_the_motion(class_model_run, recache):
    cfg, model, batch, text = _setup(class_model_run)
    images = batch["latents"][:, :, :1]
    right, left = Condition(text(torch.full((8,), RIGHT))), Condition(text(torch.full((8,), LEFT)))
    kw = dict(steps=1, seed=0, log=None, prefix=images, show_prefix=True)
    switched = generate_video(model, right.context, FRAMES - 1, SIZE, SIZE, **kw,
                              condition_at=ConditionSchedule((0, 4), (right, left)), recache=recache)
    kept = generate_video(model, right.context, FRAMES - 1, SIZE, SIZE, **kw)
    x_after = frame_displacements(switched[:, :, 4:]).mean((0, 1))[1]
    x_before = frame_displacements(switched[:, :, :4]).mean((0, 1))[1]
    x_kept = frame_displacements(kept[:, :, 4:]).mean((0, 1))[1]
    assert x_before > 0.7 and x_kept > 0.5 and x_after < -0.5, (x_before, x_after, x_kept)


def test_generate_cli_image_and_prompts_at(class_model_run, tmp_path, capsys):
    from megatron_rcm.cli import main

    cfg, _, batch, _ = _setup(class_model_run)
    big = torch.nn.functional.interpolate(batch["latents"][:1, :, 0], size=(24, 40), mode="bilinear")[0]
    _write_png(tmp_path / "big.png", big)
    out = tmp_path / "v.gif"
    argv = ["generate", str(class_model_run), "--phase", "teacher", "--frames", "5", "--steps", "1", "--image",
            str(tmp_path / "big.png"), "--prompts-at", "0:class=0;2:class=4", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "image 40x24 scaled to cover 16x16 and centre-cropped" in printed and "5 frames" in printed and out.is_file()

    (tmp_path / "bad.png").write_bytes(b"not an image")
    base = ["generate", str(class_model_run), "--phase", "teacher", "--out", str(tmp_path / "x.gif")]
    line = cli_error(capsys, base + ["--image", str(tmp_path / "bad.png")])
    assert "--image" in line and "bad.png" in line
    assert "--image" in cli_error(capsys, base + ["--image", str(tmp_path / "missing.png")])
    for bad in ["1:class=0", "0:class=0;0:class=1", "0:class=99", "0:red", "0:class=1;9:class=2", "nonsense"]:
        line = cli_error(capsys, base + ["--prompts-at", bad])
        assert "--prompts-at" in line and ("CHUNK:PROMPT" in line or "chunk indices below" in line), line
    assert "--class-id" in cli_error(capsys, base + ["--prompts-at", "0:class=1", "--class-id", "2"])
    assert "--frames" in cli_error(capsys, base + ["--image", str(tmp_path / "big.png"), "--frames", "1"])
