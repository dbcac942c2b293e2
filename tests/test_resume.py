"""Honest resume: every checkpoint corrupt stops with the choices (nothing touched); --from-finished-phases and
--restart; a finished phase whose report crashed is not retrained; changed settings on resume."""
import io
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_rcm.cli import main
from megatron_rcm.config.run import load_config
from megatron_rcm.inference.run_dir import load_run_config
from megatron_rcm.training.logger import RunLogger
from megatron_rcm.training.resume import ResumeError, read_done
from megatron_rcm.training.trainer import Trainer

from fixtures.runs import TWO_PHASES, Crash, CrashingLogger

BASE = ["model.num_layers=1", "data.height=8", "data.width=8", "data.num_frames=4", "data.batch_size=2",
        "causal.chunk_frames=2", "train.checkpoint_every=3", "eval.at_phase_end=false"]
YAML = TWO_PHASES


def _yaml(root):
    path = root / "run.yaml"
    path.write_text(YAML)
    return path


def _cfg(root, name, *extra):
    return load_config(_yaml(root), BASE + [f"output_dir={root / name}", *extra])


def _train(cfg, start="auto", logger=None, log=None):
    logger = logger or RunLogger(cfg.output_dir, tensorboard=False, stream=log)
    return Trainer(cfg, logger=logger, start=start).run()


def _weights(run, phase, which="model"):
    return load_file(str(Path(run) / "phases" / phase / f"{which}.safetensors"))


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _snapshot(root):
    """Every file under root with its size and mtime (the lock file's content does not count)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if p.name != ".lock":
                st = p.stat()
                out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted two-phase run (the reference weights)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("straight")
    cfg = _cfg(root, "run")
    _train(cfg)
    return Path(cfg.output_dir)


def test_all_checkpoints_corrupt_stops_with_the_choices_then_continues_from_finished_phases(
        tmp_path, straight, capsys, one_thread):
    cfg = _cfg(tmp_path, "run")
    with pytest.raises(Crash):  # mid tf_scm: checkpoints step 3 (teacher) and 6 (teacher finished)
        _train(cfg, logger=CrashingLogger(cfg.output_dir, 8))
    run = Path(cfg.output_dir)
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_00000003", "step_00000006"]
    for p in ckpts:
        _corrupt(next(p.glob("__0_*.distcp")))
    before = _snapshot(run)
    capsys.readouterr()
    argv = ["train", str(_yaml(tmp_path)), *BASE, f"output_dir={run}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no checkpoint in")
    assert "step_00000003/__0_0.distcp" in err and "step_00000006/__0_0.distcp" in err
    assert "--from-finished-phases" in err and "continues at phase 'tf_scm'" in err and "--restart" in err
    assert _snapshot(run) == before, "a refused start must not touch the folder"

    log = io.StringIO()
    _train(cfg, start="finished_phases", log=log)
    assert "continuing at phase 'tf_scm' from the finished phase(s) teacher" in log.getvalue()
    assert sorted(p.name for p in (run / "previous-1" / "checkpoints").glob("step_*")) == [p.name for p in ckpts]
    for phase in ("teacher", "tf_scm"):
        _assert_same(_weights(run, phase), _weights(straight, phase))
    assert read_done(run / "phases" / "tf_scm")["report"] == "skipped"


def test_restart_sets_everything_aside_and_may_change_the_architecture(tmp_path, capsys, one_thread):
    one = ["phases=[{name: t, kind: teacher, objective: flow_matching, steps: 2}]"]
    cfg = _cfg(tmp_path, "run", *one)
    _train(cfg)
    run = Path(cfg.output_dir)
    old = _weights(run, "t")
    bigger = _cfg(tmp_path, "run", *one, "model.num_layers=2")
    with pytest.raises(ResumeError, match=r"model.num_layers 1 -> 2 \(the architecture\)"):
        _train(bigger)
    log = io.StringIO()
    _train(bigger, start="restart", log=log)
    assert "moved checkpoints, phases, config.yaml to" in log.getvalue()
    _assert_same(_weights(run / "previous-1", "t"), old)
    assert load_config(run / "previous-1" / "config.yaml").model.num_layers == 1
    assert load_config(run / "config.yaml").model.num_layers == 2
    assert len(_weights(run, "t")) > len(old)


def test_resume_with_changes_keeps_config_yaml_and_refuses_architecture_data_and_finished_phases(
        tmp_path, capsys, one_thread):
    one = ["phases=[{name: t, kind: teacher, objective: flow_matching, steps: 4}]", "train.checkpoint_every=2"]
    cfg = _cfg(tmp_path, "run", *one)
    with pytest.raises(Crash):
        _train(cfg, logger=CrashingLogger(cfg.output_dir, 3))
    run = Path(cfg.output_dir)
    original = (run / "config.yaml").read_text()
    for change, refused in (("model.num_layers=2", "model.num_layers 1 -> 2 (the architecture)"),
                            ("data.height=16", "data.height 8 -> 16 (the data)"),
                            ("causal.chunk_frames=1", "causal.chunk_frames 2 -> 1 (the architecture)"),
                            ("phases.0.name=t9", "phases.0.name t -> t9 (phase 't' is in progress)")):
        with pytest.raises(ResumeError) as err:
            _train(_cfg(tmp_path, "run", *one, change))
        assert refused in str(err.value), str(err.value)
    log = io.StringIO()
    _train(_cfg(tmp_path, "run", *one, "train.log_every=1", "eval.num_videos=3", "phases.0.optim.lr=5e-4"), log=log)
    text = log.getvalue()
    assert "[resume] changed settings: " in text
    for change in ("train.log_every 10 -> 1", "eval.num_videos 16 -> 3", "phases.0.optim.lr 0.001 -> 0.0005"):
        assert change in text
    assert "config.resume-1.yaml" in text and (run / "config.yaml").read_text() == original
    assert load_config(run / "config.resume-1.yaml").eval.num_videos == 3
    assert load_run_config(run).eval.num_videos == 3  # the commands read the newest config
    # the phase is finished now: its settings are part of its weights
    with pytest.raises(ResumeError, match=r"phases.0.steps 4 -> 8 \(phase 't' is finished\)"):
        _train(_cfg(tmp_path, "run", *one, "phases.0.steps=8", "train.log_every=1", "eval.num_videos=3",
                    "phases.0.optim.lr=5e-4"))
    # a new phase may be added; the same settings again write nothing new
    more = ["phases=[{name: t, kind: teacher, objective: flow_matching, steps: 4, optim: {lr: 5e-4}}, "
            "{name: t2, kind: teacher, objective: flow_matching, steps: 1}]", "train.checkpoint_every=2",
            "train.log_every=1", "eval.num_videos=3"]
    results = _train(_cfg(tmp_path, "run", *more))
    assert [r.name for r in results] == ["t", "t2"] and (run / "config.resume-2.yaml").is_file()
    log = io.StringIO()
    assert [r.name for r in _train(_cfg(tmp_path, "run", *more), log=log)] == ["t", "t2"]
    assert not (run / "config.resume-3.yaml").exists() and "changed settings" not in log.getvalue()


def test_a_phase_whose_report_crashed_is_not_retrained(tmp_path, straight, monkeypatch, one_thread):
    calls = []

    def report(self, phase, ema_model, teacher):
        calls.append(phase.name)
        if len(calls) == 1:
            raise Crash("report failed")
        return {"probe": 1.0}

    monkeypatch.setattr(Trainer, "_phase_report", report)
    cfg = _cfg(tmp_path, "run", "eval.at_phase_end=true")
    with pytest.raises(Crash):
        _train(cfg)
    run = Path(cfg.output_dir)
    assert read_done(run / "phases" / "teacher")["report"] == "pending"
    weights = (run / "phases" / "teacher" / "model.safetensors").stat().st_mtime_ns
    log = io.StringIO()
    results = _train(cfg, log=log)
    assert "[teacher] training had finished; running its end-of-phase report" in log.getvalue()
    assert "[teacher] steps" not in log.getvalue(), "the teacher phase was trained again"
    assert (run / "phases" / "teacher" / "model.safetensors").stat().st_mtime_ns == weights
    assert calls == ["teacher", "teacher", "tf_scm"] and results[0].metrics == {"probe": 1.0}
    assert read_done(run / "phases" / "teacher")["report"] == "done"
    _assert_same(_weights(run, "tf_scm"), _weights(straight, "tf_scm"))


def test_no_checkpoints_left_continues_from_finished_phases_and_none_finished_offers_restart(tmp_path, one_thread):
    import shutil

    one = ["phases=[{name: t, kind: teacher, objective: flow_matching, steps: 2}]", "train.checkpoint_every=1"]
    cfg = _cfg(tmp_path, "run", *one)
    _train(cfg)
    run = Path(cfg.output_dir)
    shutil.rmtree(run / "checkpoints")  # e.g. deleted to save space: the finished phase still counts
    log = io.StringIO()
    two = ["phases=[{name: t, kind: teacher, objective: flow_matching, steps: 2}, "
           "{name: t2, kind: teacher, objective: flow_matching, steps: 1}]", "train.checkpoint_every=1"]
    assert [r.name for r in _train(_cfg(tmp_path, "run", *two), log=log)] == ["t", "t2"]
    assert "continuing at phase 't2' from the finished phase(s) t" in log.getvalue()
    _corrupt(run / "phases" / "t2" / "model.safetensors")  # same size: only the sha256 can tell
    log = io.StringIO()
    _train(_cfg(tmp_path, "run", *two), start="finished_phases", log=log)
    assert "t2/model.safetensors does not match" in log.getvalue() and "continuing at phase 't2'" in log.getvalue()
    assert read_done(run / "phases" / "t2")["result"]["steps"] == 1

    cfg = _cfg(tmp_path, "early", *one)
    with pytest.raises(Crash):
        _train(cfg, logger=CrashingLogger(cfg.output_dir, 2))  # after the step-1 checkpoint
    early = Path(cfg.output_dir)
    _corrupt(next((early / "checkpoints" / "step_00000001").glob("__0_*.distcp")))
    with pytest.raises(ResumeError, match="no phase has finished"):
        _train(cfg)
    with pytest.raises(ResumeError, match="--from-finished-phases: no phase of .* has finished"):
        _train(cfg, start="finished_phases")
    _train(cfg, start="restart")
    assert (early / "previous-1" / "checkpoints" / "step_00000001").is_dir()
    assert read_done(early / "phases" / "t")["result"]["steps"] == 2
