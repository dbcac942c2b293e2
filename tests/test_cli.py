"""The run-folder commands (sample, eval, generate-data, generate) on a tiny trained run, in-process."""
import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megatron_rcm.cli import main
from megatron_rcm.config.run import load_config, to_yaml
from megatron_rcm.data.shards import LatentShardDataset
from megatron_rcm.models import build_model
from megatron_rcm.utils.video import read_video

TINY = ["model.num_layers=1", "data.height=8", "data.width=8", "data.num_frames=4", "data.batch_size=2",
        "causal.chunk_frames=2", "train.checkpoint_every=0", "train.log_every=100", "eval.num_videos=2",
        "eval.teacher_steps=2", "eval.student_steps=[1]"]

YAML = """
phases:
  - {name: teacher, kind: teacher, objective: flow_matching, steps: 4, optim: {lr: 1.0e-3}}
  - {name: tf_scm, kind: tf_cm, objective: scm, steps: 2, init_from: teacher, teacher_from: teacher,
     objective_args: {sigma_d: 0.5, cfg_scale: 2.0, r_warmup_steps: 2}}
"""
FRAMES, CHUNK = 4, 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Every test here runs single-threaded (see conftest)."""


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread_module):
    """A trained two-phase run folder (teacher -> tf_scm), made by the train command itself."""
    root = tmp_path_factory.mktemp("cli")
    (root / "run.yaml").write_text(YAML)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert main(["train", str(root / "run.yaml"), *TINY, f"output_dir={root / 'run'}"]) == 0
    (root / "train.log").write_text(log.getvalue())
    return root / "run"


@pytest.fixture(scope="module")
def action_run(tmp_path_factory, one_thread_module):
    """A run folder of an action-conditioned model (untrained weights: only the folder layout matters)."""
    root = tmp_path_factory.mktemp("cli_actions") / "run"
    cfg = load_config(None, TINY + ["data.action_dim=4", "model.action_dim=4", f"output_dir={root}",
                                    "phases=[{name: wm, kind: teacher, objective: flow_matching, steps: 1}]"])
    (root / "phases" / "wm").mkdir(parents=True)
    (root / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.causal)
    torch.nn.init.normal_(model.action_embedder.linear_2.weight, std=0.5)  # zero-initialised: make actions matter
    save_file(model.state_dict(), str(root / "phases" / "wm" / "ema.safetensors"))
    return root


def _error(capsys, argv) -> str:
    """Run a command that must fail cleanly: exit code 2, one message on stderr, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("phase,steps", [("tf_scm", 2), ("teacher", 3)])
def test_sample_writes_a_video_with_the_training_length(run, tmp_path, capsys, phase, steps):
    out = tmp_path / f"{phase}.gif"
    assert main(["sample", str(run), "--phase", phase, "--steps", str(steps), "--num-videos", "2",
                 "--class-id", "3", "--seed", "5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{steps}-step" in text and ("ODE" in text) == (phase == "teacher")
    frames = read_video(str(out))
    assert frames.shape[0] == FRAMES and frames.std() > 0


def test_eval_prints_a_row_per_requested_step_count(run, capsys):
    assert main(["eval", str(run), "--phase", "tf_scm", "--steps", "1", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = [i for i, line in enumerate(lines) if "quality vs the teacher's 2-step samples" in line]
    assert len(head) == 1, lines
    rows = [line.split("|") for line in lines[head[0] + 2:head[0] + 4]]
    assert [int(r[0]) for r in rows] == [1, 3]
    assert all(float(r[1]) >= 0 and float(r[2]) > 0 for r in rows)  # mse, psnr
    # same EMA weights, prompts, seeds and cached reference: the 1-step row equals the trainer's own report
    trained = (run.parent / "train.log").read_text().splitlines()
    assert lines[head[0] + 2] in trained
    # a different number of prompts recomputes the reference instead of reusing (or clobbering) the cache
    cache = run / "phases" / "teacher" / "eval_teacher_samples.safetensors"
    before = cache.read_bytes()
    assert main(["eval", str(run), "--phase", "tf_scm", "--steps", "1", "--num-videos", "3"]) == 0
    assert "quality vs" in capsys.readouterr().out and cache.read_bytes() == before


@pytest.mark.parametrize("fmt", ["safetensors", "tar"])
def test_generate_data_writes_shards_a_later_run_trains_from(run, tmp_path, capsys, fmt):
    shards = tmp_path / "shards"
    assert main(["generate-data", str(run), "--phase", "teacher", "--num-videos", "3", "--shard-size", "2",
                 "--steps", "2", "--format", fmt, "--out", str(shards)]) == 0
    assert "data.kind=latent_shards" in capsys.readouterr().out
    data = LatentShardDataset(str(shards), batch_size=3)
    assert data.total == 3 and len(data.entries) == 2
    batch = next(data)
    assert batch["latents"].shape == (3, 3, FRAMES, 8, 8) and torch.isfinite(batch["latents"]).all()
    assert batch["context"].shape[0] == 3 and (batch["class_id"] >= 0).all()
    if fmt == "tar":
        return  # one training run is enough to show the trainer accepts the shards
    yaml = tmp_path / "again.yaml"
    yaml.write_text("phases:\n  - {name: t2, kind: teacher, objective: flow_matching, steps: 2}\n")
    assert main(["train", str(yaml), *TINY, "data.kind=latent_shards", f"data.shard_dir={shards}",
                 f"output_dir={tmp_path / 'again'}"]) == 0
    assert "phase t2: 2 steps" in capsys.readouterr().out
    assert (tmp_path / "again" / "phases" / "t2" / "ema.safetensors").exists()


def test_generate_streams_past_the_training_length(run, tmp_path, capsys):
    out = tmp_path / "long.gif"
    frames = 4 * FRAMES
    assert main(["generate", str(run), "--phase", "tf_scm", "--frames", str(frames), "--class-id", "1",
                 "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    latency = [line for line in lines if line.startswith("chunk ") and " ms " in line]
    assert [int(line.split()[1].rstrip(":")) for line in latency] == list(range(frames // CHUNK))
    assert read_video(str(out)).shape[0] == frames
    # the run has no window: past its training length the stream rolls one over the training length's chunks
    assert any("rolling window" in line for line in lines)
    tokens = [int(line.split("kv cache ")[1].split()[0]) for line in latency]  # after each chunk
    assert max(tokens) == tokens[-1] == (FRAMES // CHUNK - 1) * tokens[0]  # what the next chunk may see
    assert main(["generate", str(run), "--phase", "tf_scm", "--frames", str(frames), "--class-id", "1", "--out",
                 str(out), "--sink-chunks", "1", "--rope-policy", "rebase", "--kv-cache-dtype", "fp8_e4m3"]) == 0
    assert read_video(str(out)).shape[0] == frames


def test_generate_with_actions_and_interactive_stdin(action_run, tmp_path, capsys, monkeypatch):
    given, typed = tmp_path / "given.gif", tmp_path / "typed.gif"
    assert main(["generate", str(action_run), "--phase", "wm", "--frames", "4", "--actions", "1,2",
                 "--out", str(given)]) == 0
    assert read_video(str(given)).shape[0] == 4
    capsys.readouterr()
    stdin = io.StringIO("1\n2\n0\n")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["generate", str(action_run), "--phase", "wm", "--frames", "4", "--interactive",
                 "--out", str(typed)]) == 0
    assert stdin.readline() == "0\n", "one line per chunk: 2 chunks consume exactly 2 lines"
    assert capsys.readouterr().err.count("action ids") == 2
    # the typed actions are the ones used: same video as giving them up front, another video for others
    assert (read_video(str(typed)) == read_video(str(given))).all()
    other = tmp_path / "other.gif"
    assert main(["generate", str(action_run), "--phase", "wm", "--frames", "4", "--actions", "3,0",
                 "--out", str(other)]) == 0
    assert not (read_video(str(other)) == read_video(str(given))).all()


def test_generate_data_trajectory_feeds_ode_regression(run, tmp_path, capsys):
    shards = tmp_path / "ode"
    assert main(["generate-data", str(run), "--phase", "teacher", "--num-videos", "2", "--steps", "2",
                 "--trajectory", "2", "--out", str(shards)]) == 0
    assert "ODE states at 2 levels" in capsys.readouterr().out
    batch = next(LatentShardDataset(str(shards), batch_size=2))
    assert batch["trajectory"].shape == (2, 2, 3, FRAMES, 8, 8)
    assert batch["trajectory_levels"].tolist() == [[1.0, 0.5]] * 2
    assert torch.isfinite(batch["trajectory"]).all() and not torch.equal(batch["trajectory"][:, 1], batch["latents"])
    yaml = tmp_path / "ode.yaml"
    yaml.write_text("phases:\n  - {name: ode, kind: tf_cm, objective: ode_regression, steps: 2}\n")
    assert main(["train", str(yaml), *TINY, "data.kind=latent_shards", f"data.shard_dir={shards}",
                 "eval.at_phase_end=false", f"output_dir={tmp_path / 'ode_run'}"]) == 0
    assert "phase ode: 2 steps" in capsys.readouterr().out


def test_per_chunk_steps_and_noisy_context_flags(run, tmp_path, capsys):
    out = tmp_path / "per_chunk.gif"
    assert main(["generate", str(run), "--phase", "tf_scm", "--frames", "6", "--class-id", "1", "--steps-per-chunk",
                 "2", "1", "--mid-t-schedules", "5/8;", "--context-from-last-step", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 1 steps per chunk" in text and read_video(str(out)).shape[0] == 6
    assert main(["eval", str(run), "--phase", "tf_scm", "--steps-per-chunk", "2", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("2,1 |")]
    assert len(rows) == 1
    assert main(["sample", str(run), "--phase", "tf_scm", "--steps-per-chunk", "2", "1", "--num-videos", "1",
                 "--out", str(tmp_path / "s.gif")]) == 0


def test_errors_name_the_problem_and_exit_2(run, action_run, tmp_path, capsys):
    out = str(tmp_path / "x.gif")
    assert "does not exist" in _error(capsys, ["sample", str(tmp_path / "nope"), "--phase", "teacher", "--out", out])
    (tmp_path / "empty").mkdir()
    assert "config.yaml" in _error(capsys, ["eval", str(tmp_path / "empty"), "--phase", "tf_scm"])
    (tmp_path / "empty" / "config.yaml").write_text("phases: [\n")
    assert "cannot read" in _error(capsys, ["eval", str(tmp_path / "empty"), "--phase", "tf_scm"])
    err = _error(capsys, ["generate", str(run), "--phase", "student", "--out", out])
    assert "unknown phase 'student'" in err and "['teacher', 'tf_scm']" in err
    moved = run / "phases" / "tf_scm" / "model.safetensors"
    os.rename(moved, moved.with_suffix(".bak"))
    try:
        err = _error(capsys, ["sample", str(run), "--phase", "tf_scm", "--weights", "model", "--out", out])
    finally:
        os.rename(moved.with_suffix(".bak"), moved)
    assert "model.safetensors is missing" in err and "megatron-rcm train" in err
    assert "'--steps'" in _error(capsys, ["sample", str(run), "--phase", "tf_scm", "--steps", "0", "--out", out])
    assert "'--steps'" in _error(capsys, ["eval", str(run), "--phase", "tf_scm", "--steps", "2", "-1"])
    assert "'--steps'" in _error(capsys, ["generate", str(run), "--phase", "tf_scm", "--steps", "9"])
    assert "'--frames'" in _error(capsys, ["generate", str(run), "--phase", "tf_scm", "--frames", "3"])
    assert "teacher_from" in _error(capsys, ["eval", str(run), "--phase", "teacher"])
    assert "'--out'" in _error(capsys, ["sample", str(run), "--phase", "tf_scm", "--out", "x.avi"])
    assert "'--class-id'" in _error(capsys, ["sample", str(run), "--phase", "tf_scm", "--class-id", "99",
                                             "--out", out])
    assert "action-conditioned" in _error(capsys, ["generate", str(action_run), "--phase", "wm"])
    assert "one action id per chunk" in _error(capsys, ["generate", str(action_run), "--phase", "wm",
                                                        "--actions", "0,1,2"])
    assert "takes no actions" in _error(capsys, ["generate", str(run), "--phase", "tf_scm", "--actions", "0,1,2"])
    assert "takes no actions" in _error(capsys, ["generate", str(run), "--phase", "tf_scm", "--interactive"])
    assert "--format" in _error(capsys, ["generate-data", str(run), "--phase", "teacher", "--num-videos", "1",
                                         "--out", out, "--format", "zip"])
    assert "'--trajectory'" in _error(capsys, ["generate-data", str(run), "--phase", "tf_scm", "--num-videos", "1",
                                               "--trajectory", "2", "--out", str(tmp_path / "t")])
    assert "'--steps-per-chunk'" in _error(capsys, ["generate", str(run), "--phase", "tf_scm",
                                                    "--steps-per-chunk", "1", "2"])
    assert "'--mid-t-schedules'" in _error(capsys, ["generate", str(run), "--phase", "tf_scm", "--steps-per-chunk",
                                                    "3", "--mid-t-schedules", "1/2"])
    assert "'--window-chunks'" in _error(capsys, ["generate", str(run), "--phase", "tf_scm", "--window-chunks", "-1"])
    assert "'--cuda-graphs'" in _error(capsys, ["generate", str(run), "--phase", "tf_scm", "--cuda-graphs"])


def test_console_entry_point_runs_the_new_commands(run, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    exe = shutil.which("megatron-rcm")  # the installed console script; this checkout first on the path
    cmd = [exe] if exe else [sys.executable, "-m", "megatron_rcm.cli"]
    res = subprocess.run([*cmd, "eval", str(run), "--phase", "missing"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 2 and "unknown phase 'missing'" in res.stderr and "Traceback" not in res.stderr
