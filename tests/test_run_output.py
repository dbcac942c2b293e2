"""What a run tells its user: progress lines with a rate and an ETA, every checkpoint save, every video
written, and a quality table whose columns stay aligned for 4-digit (and larger) FD values."""
import io
import math
import re

import pytest

from megatron_rcm.config.run import load_config
from megatron_rcm.training.logger import RunLogger, format_duration
from megatron_rcm.training.report import format_quality_table
from megatron_rcm.training.trainer import Trainer

TINY = ["model.num_layers=1", "data.height=8", "data.width=8", "data.num_frames=4", "data.batch_size=2",
        "causal.chunk_frames=2", "eval.num_videos=2", "eval.teacher_steps=2", "eval.student_steps=[1,2]",
        "train.log_every=2", "train.checkpoint_every=2",
        "phases=[{name: t, kind: teacher, objective: flow_matching, steps: 4}, "
        "{name: s, kind: tf_cm, objective: scm, steps: 2, init_from: t, teacher_from: t}]"]


def test_progress_checkpoints_and_videos_are_logged(tmp_path, monkeypatch, one_thread):
    from megatron_rcm.evaluation import extractor

    real = extractor.train_feature_extractor
    monkeypatch.setattr("megatron_rcm.evaluation.train_feature_extractor",
                        lambda data, **kw: real(data, **{**kw, "steps": 2}))  # the classifier's quality is moot
    cfg = load_config(None, TINY + [f"output_dir={tmp_path / 'run'}"])
    log = io.StringIO()
    Trainer(cfg, logger=RunLogger(cfg.output_dir, cfg.train.log_every, tensorboard=False, stream=log)).run()
    text = log.getvalue()
    steps = re.findall(r"^\[t\] step (\d+)/4 .* samples/s=[\d.]+ eta (\d+s)$", text, re.M)
    assert [s for s, _ in steps] == ["2", "4"] and steps[-1][1] == "0s"
    saved = re.findall(r"^\[checkpoint\] saved (\S+) \(", text, re.M)
    assert [p.rsplit("/", 1)[1] for p in saved] == ["step_00000002", "step_00000004", "step_00000006"]
    videos = re.findall(r"(/\S+?\.(?:mp4|gif))\b", text)
    assert any("samples/t_2step" in v for v in videos), text  # the teacher's sample video
    assert any("samples/s_2step_streamed" in v for v in videos), text  # the distilled phase's streamed video
    assert all((tmp_path / "run" / "samples" / v.rsplit("/", 1)[1]).is_file() for v in videos)


def test_eta_and_durations():
    assert [format_duration(s) for s in (0.4, 42, 185, 3720, float("nan"))] == ["0s", "42s", "3m05s", "1h02m", "?"]
    logger = RunLogger("unused", tensorboard=False, stream=io.StringIO())
    logger.start_phase("p", 100)
    assert math.isnan(logger.eta(0))
    logger._phase_start = (logger._phase_start[0] - 10.0, 0)  # 10 s for the first 20 steps
    assert logger.eta(20) == pytest.approx(40.0, rel=0.05)


def test_quality_table_columns_stay_aligned():
    rows = [(1, dict(mse=0.4279, psnr=9.71, fd=0.5, motion_acc_student=0.781, motion_acc_teacher=0.906)),
            (2, dict(mse=0.3936, psnr=10.07, fd=1027.123, motion_acc_student=0.844, motion_acc_teacher=0.906)),
            (4, dict(mse=1e-13, psnr=130.0, fd=98765.4321)),
            (16, dict(mse=0.44, psnr=9.56, fd=3.4e11, motion_acc_student=0.875)),
            (32, dict(motion_acc_student=0.5))]
    lines = format_quality_table("s", 16, rows).splitlines()[1:]
    bars = {tuple(i for i, c in enumerate(line) if c == "|") for line in lines}
    assert len(bars) == 1, "\n".join(lines)
    assert "1027.12" in lines[2] and "98765.43" in lines[3] and "e+11" in lines[4] and "nan" in lines[5]
