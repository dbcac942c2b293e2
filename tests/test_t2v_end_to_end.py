"""The real text-to-video path on a tiny random diffusers Wan pipeline, driven through the CLI:

generate-data --teacher diffusers:DIR (3 prompts) -> causal teacher (TF flow matching, init_from the
folder) -> TF-sCM -> SF-DMD with the bidirectional diffusers teacher as real score -> generate --prompt
(an mp4 of the VAE's pixel size and frame count) -> sample over a prompt file -> convert --pipeline-from
(the exported folder runs in WanPipeline); serve streams a prompt VAE-decoded.
"""
import contextlib
import io

import pytest
import torch

from fixtures.tiny_wan_pipeline import TEXT_LEN, run_overrides
from megatron_rcm.cli import main
from megatron_rcm.utils.video import read_video

PROMPTS = ["a red cat runs across the city", "a small boat in the rain", "a dog jumps over the car"]
PIXEL_FRAMES, LATENT_FRAMES = 13, 4  # Wan's VAE: 1 + 4 * (4 - 1)


def recipe(pipeline, shards) -> str:
    return f"""
data: {{kind: latent_shards, shard_dir: {shards}, num_frames: {LATENT_FRAMES}, height: 4, width: 4, batch_size: 2}}
train: {{log_every: 100, checkpoint_every: 0}}
eval: {{num_videos: 1, teacher_steps: 2, teacher_shift: 3.0, student_steps: [2], cfg_scale: 2.0}}
phases:
  - {{name: causal_teacher, kind: teacher, objective: flow_matching, steps: 2, init_from: "diffusers:{pipeline}",
     optim: {{lr: 1.0e-4}}}}
  - {{name: tf_scm, kind: tf_cm, objective: scm, steps: 2, init_from: causal_teacher, teacher_from: causal_teacher,
     optim: {{lr: 1.0e-5, betas: [0.0, 0.999]}}, objective_args: {{cfg_scale: 2.0, r_warmup_steps: 1}}}}
  - {{name: sf_dmd, kind: sf_dmd, objective: dmd, steps: 2, init_from: tf_scm, teacher_from: "diffusers:{pipeline}",
     optim: {{lr: 1.0e-5, betas: [0.0, 0.999]}},
     objective_args: {{score_mask: full, guidance_scale: 2.0, shift: 5.0, critic_lr: 1.0e-5,
                       rollout: {{denoising_steps: [1000, 500]}}}}}}
"""


@pytest.fixture(scope="module")
def trained(tiny_wan_pipeline, tmp_path_factory):
    """(pipeline, root, run folder, train log) after generate-data and the three training phases."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("t2v")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert main(["generate-data", "--teacher", f"diffusers:{tiny_wan_pipeline}", "--prompts",
                     str(root / "prompts.txt"), "--out", str(root / "shards"), "--frames", str(PIXEL_FRAMES),
                     "--height", "32", "--width", "32", "--steps", "2", "--text-len", str(TEXT_LEN)]) == 0
        (root / "run.yaml").write_text(recipe(tiny_wan_pipeline, root / "shards"))
        assert main(["train", str(root / "run.yaml"), *run_overrides(tiny_wan_pipeline),
                     f"output_dir={root / 'run'}"]) == 0
    yield tiny_wan_pipeline, root, root / "run", log.getvalue()
    torch.set_num_threads(n)


def test_three_phases_train_from_the_diffusers_teacher_and_write_decoded_samples(trained):
    _, _, run, log = trained
    for name in ("causal_teacher", "tf_scm", "sf_dmd"):
        assert f"phase {name}: 2 steps" in log
        assert (run / "phases" / name / "ema.safetensors").is_file()
    teacher_video = read_video(str(next((run / "samples").glob("causal_teacher_2step.*"))))
    assert teacher_video.shape == (PIXEL_FRAMES, 32, 32, 3)  # VAE-decoded, not latents
    streamed = read_video(str(next((run / "samples").glob("sf_dmd_2step_streamed.*"))))
    assert streamed.shape == (PIXEL_FRAMES, 32, 32, 3)
    assert "[sf_dmd] quality vs the teacher's 2-step samples" in log
    assert list((run / "eval").glob("diffusers_teacher_*/eval_teacher_samples.safetensors"))  # bidirectional refs
    # the frozen encoders never enter our weights: the phase files hold exactly the transformer
    from safetensors import safe_open
    from megatron_rcm.inference.run_dir import load_run_config
    from megatron_rcm.models import build_model
    cfg = load_run_config(run)
    with safe_open(str(run / "phases" / "sf_dmd" / "ema.safetensors"), "pt") as f:
        assert set(f.keys()) == set(build_model(cfg.model, cfg.causal).state_dict())


def test_generate_streams_a_prompt_into_a_decoded_mp4(trained, tmp_path, capsys):
    _, _, run, _ = trained
    out = tmp_path / "cat.mp4"
    assert main(["generate", str(run), "--phase", "sf_dmd", "--prompt", "a red cat runs", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    chunks = [line for line in lines if line.startswith("chunk ")]
    assert len(chunks) == 2 and all("VAE decode" in line for line in chunks)
    assert chunks[0].startswith("chunk 0: 2 latent -> 5 video frames") and "-> 8 video frames" in chunks[1]
    video = read_video(str(next(tmp_path.glob("cat.*"))))
    assert video.shape == (PIXEL_FRAMES, 32, 32, 3)
    other = tmp_path / "dog.mp4"
    assert main(["generate", str(run), "--phase", "sf_dmd", "--prompt", "a dog jumps", "--out", str(other)]) == 0
    assert not (read_video(str(next(tmp_path.glob("dog.*")))) == video).all()  # the prompt conditions the video


def test_eval_and_sample_decode_on_a_run_with_a_vae(trained, tmp_path, capsys):
    _, _, run, _ = trained
    assert main(["eval", str(run), "--phase", "sf_dmd", "--steps", "1"]) == 0  # vs the bidirectional teacher
    table = capsys.readouterr().out
    assert "[sf_dmd] quality vs the teacher's 2-step samples" in table and "nan / nan" in table  # no classifier
    assert main(["sample", str(run), "--phase", "causal_teacher", "--num-videos", "1", "--steps", "2", "--out",
                 str(tmp_path / "grid.mp4")]) == 0
    assert read_video(str(next(tmp_path.glob("grid.*")))).shape[0] == PIXEL_FRAMES  # decoded: 13 video frames


def test_sample_writes_one_file_per_prompt_and_seed(trained, tmp_path):
    _, root, run, _ = trained
    out = tmp_path / "vbench"
    assert main(["sample", str(run), "--phase", "sf_dmd", "--prompts", str(root / "prompts.txt"), "--num-seeds", "2",
                 "--out", str(out)]) == 0
    names = sorted(p.stem for p in out.iterdir())
    assert names == sorted(f"{p}-{i}" for p in PROMPTS for i in range(2))
    assert read_video(str(next(out.glob(f"{PROMPTS[0]}-0.*")))).shape == (PIXEL_FRAMES, 32, 32, 3)


def test_convert_exports_a_pipeline_that_wan_pipeline_runs(trained, tmp_path):
    from diffusers import WanPipeline

    pipeline, _, run, _ = trained
    out = tmp_path / "exported"
    assert main(["convert", "--to-diffusers", str(run / "phases" / "sf_dmd" / "ema.safetensors"), "--out", str(out),
                 "--pipeline-from", str(pipeline)]) == 0
    pipe = WanPipeline.from_pretrained(str(out))
    frames = pipe("a red cat runs", height=32, width=32, num_frames=PIXEL_FRAMES, num_inference_steps=2,
                  output_type="np", max_sequence_length=TEXT_LEN).frames
    assert frames.shape == (1, PIXEL_FRAMES, 32, 32, 3)
    # the exported transformer is the trained student, not the source pipeline's
    from megatron_rcm.convert import load_diffusers_state_dict
    ours, src = load_diffusers_state_dict(out / "transformer"), load_diffusers_state_dict(pipeline / "transformer")
    assert ours.keys() == src.keys() and any(not torch.equal(ours[k], src[k]) for k in ours)


def test_serve_streams_a_prompt_vae_decoded(trained):
    """The text-to-video page's path: a prompt in, each chunk VAE-decoded out, equal to the streamed decode."""
    import asyncio

    import aiohttp

    from fixtures.serve_client import next_text, receive, serving
    from megatron_rcm.inference.real_video import prompt_inputs, run_encoders, stream_decoded
    from megatron_rcm.inference.run_dir import load_phase_model, load_run_config
    from megatron_rcm.inference.serve_session import to_rgba

    _, _, run, _ = trained

    async def play(url):
        async with aiohttp.ClientSession() as http, http.ws_connect(url + "ws") as ws:
            hello = await next_text(ws)
            assert hello["prompt"] == "text" and hello["action_dim"] == 0 and (hello["height"], hello["width"]) == (32, 32)
            await ws.send_json({"type": "start"})
            refused = await next_text(ws)
            assert refused["type"] == "error" and "prompt" in refused["message"]
            await ws.send_json({"type": "start", "prompt": "a red cat runs", "seed": 3})
            _, chunks = await receive(ws, 2)
            return chunks, await next_text(ws)

    with serving(run, phase="sf_dmd", steps=2, fps=0) as (url, _):
        chunks, end = asyncio.run(play(url))
    assert [h["frames"] for h, _ in chunks] == [5, 8] and end["type"] == "end"  # 13 video frames, then the end
    cfg = load_run_config(run)
    encoders = run_encoders(cfg, "cpu")
    inputs = prompt_inputs(encoders, ["a red cat runs"], None, "cpu")
    ref = stream_decoded(load_phase_model(cfg, "sf_dmd"), inputs, LATENT_FRAMES, 4, 4, 2, 1.0, 3, encoders.vae)
    for (header, rgba), (_, frames, _) in zip(chunks, ref):
        assert rgba.numpy().tobytes() == to_rgba(frames[0]), header


def test_generate_image_to_video_starts_from_the_images_reconstruction(trained, tmp_path, capsys):
    """--image on the VAE path: the image is VAE-encoded into one latent frame (held clean in the first chunk of
    2), and the stream's first video frame is decode(encode(image)); --prompts-at switches the text prompt."""
    import imageio.v2 as imageio

    from megatron_rcm.inference.image_input import image_latents
    from megatron_rcm.inference.real_video import prompt_inputs, run_encoders, stream_decoded
    from megatron_rcm.inference.run_dir import load_phase_model, load_run_config

    _, _, run, _ = trained
    g = torch.Generator().manual_seed(0)
    imageio.imwrite(tmp_path / "img.png", (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy())
    cfg = load_run_config(run)
    encoders = run_encoders(cfg, "cpu")
    latents, note = image_latents(str(tmp_path / "img.png"), cfg.data, cfg.model.in_channels, encoders.vae)
    assert latents.shape == (1, cfg.model.in_channels, 1, 4, 4) and "48x40 scaled to cover 32x32" in note
    inputs = prompt_inputs(encoders, ["a red cat runs"], None, "cpu")
    chunks = list(stream_decoded(load_phase_model(cfg, "sf_dmd"), inputs, LATENT_FRAMES - 1, 4, 4, 2, 1.0, 3,
                                 encoders.vae, prefix=latents))
    assert [c[1].shape[2] for c in chunks] == [5, 8]  # 13 video frames, the image's first
    torch.testing.assert_close(chunks[0][0].frames[:, :, :1], latents, rtol=0, atol=0)
    reconstruction = encoders.vae.decode(latents).float()
    torch.testing.assert_close(chunks[0][1][:, :, :1].float(), reconstruction, atol=1e-5, rtol=1e-4)

    out = tmp_path / "i2v.mp4"
    assert main(["generate", str(run), "--phase", "sf_dmd", "--image", str(tmp_path / "img.png"), "--prompts-at",
                 "0:a red cat runs;1:a small boat in the rain", "--out", str(out)]) == 0
    assert "centre-cropped" in capsys.readouterr().out
    assert read_video(str(out)).shape == (PIXEL_FRAMES, 32, 32, 3)
