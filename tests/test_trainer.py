"""Trainer: bitwise-exact resume after a crash, NaN guard, phase chaining, config errors."""
import pytest
import torch
from safetensors.torch import load_file

from megatron_rcm.config.errors import ConfigError
from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.models import build_model
from megatron_rcm.config.run import load_config
from megatron_rcm.training.logger import RunLogger
from megatron_rcm.training.trainer import Trainer, TrainingError

from fixtures.runs import TWO_PHASES, Crash, CrashingLogger

BASE = ["model.num_layers=1", "data.height=8", "data.width=8", "data.num_frames=4", "data.batch_size=2",
        "causal.chunk_frames=2", "train.checkpoint_every=3", "eval.num_videos=2", "eval.teacher_steps=2",
        "eval.student_steps=[1]"]

YAML = TWO_PHASES


def _cfg(tmp_path, name, extra=()):
    (tmp_path / "run.yaml").write_text(YAML)
    return load_config(tmp_path / "run.yaml", BASE + [f"output_dir={tmp_path / name}", *extra])


def _weights(cfg, phase):
    return load_file(str(tmp_path_dir(cfg) / "phases" / phase / "model.safetensors"))


def tmp_path_dir(cfg):
    from pathlib import Path
    return Path(cfg.output_dir)


@pytest.mark.parametrize("crash_at", [4, 8])  # mid teacher phase; mid sCM phase (sCM's adaptive weight too)
def test_kill_and_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, crash_at):
    straight = _cfg(tmp_path, "straight")
    Trainer(straight, logger=RunLogger(straight.output_dir, tensorboard=False)).run()
    crashed = _cfg(tmp_path, "crashed")
    with pytest.raises(Crash):
        Trainer(crashed, logger=CrashingLogger(crashed.output_dir, crash_at)).run()
    Trainer(crashed, logger=RunLogger(crashed.output_dir, tensorboard=False)).run()
    for phase in ("teacher", "tf_scm"):
        a, b = _weights(straight, phase), _weights(crashed, phase)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{phase}/{k} differs after resume"


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    from megatron_rcm.objectives import FlowMatchingObjective

    monkeypatch.setattr(FlowMatchingObjective, "loss",
                        lambda self, student, batch, step: (torch.tensor(float("nan")), {}))
    cfg = _cfg(tmp_path, "nan", ["train.max_bad_steps=3"])
    with pytest.raises(TrainingError, match="3 consecutive non-finite losses"):
        Trainer(cfg, logger=RunLogger(cfg.output_dir, tensorboard=False)).run()


@pytest.mark.parametrize("override,key", [
    ("model.num_layers=zero", "model.num_layers"),
    ("model.nope=1", "model.nope"),
    ("causal.chunk_frames=3", "causal.chunk_frames"),
    ("phases.1.teacher_from=missing", "phases.1.teacher_from"),
    ("phases.0.objective=scm", "phases.0.kind"),
    ("phases.1.objective_args.sigma=1", "phases.1.objective_args.sigma"),
    ("data.text_dim=16", "data.text_dim"),
    ("model.preset=huge", "model.preset"),
    ("train.checkpoint_layers=-1", "train.checkpoint_layers"),
    ("train.compile_min_elements=-5", "train.compile_min_elements"),
    ("train.compile_guards=fast", "train.compile_guards"),
])
def test_bad_config_names_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, "bad", [override])
    assert f"'{key}'" in str(err.value)


def test_objective_args_the_yaml_left_at_default_can_be_overridden(tmp_path):
    cfg = _cfg(tmp_path, "args", ["phases.1.objective_args.tangent_norm_c=0.25"])
    assert cfg.phases[1].objective_args["tangent_norm_c"] == 0.25


def test_objective_contract_exposes_side_modules_and_critic_of_composites():
    """The trainer trains/moves/checkpoints what the contract hooks return; rCM must forward its parts'."""
    from megatron_rcm.config.run import PhaseConfig
    from megatron_rcm.objectives import PhaseModels
    from megatron_rcm.training.registry import build_objective

    teacher = build_model(model_preset("tiny", num_layers=1), CausalConfig(chunk_frames=2))
    phase = PhaseConfig(name="rcm", kind="sf_dmd", objective="rcm", teacher_from="t",
                        objective_args={"scm": {"cfg_scale": 2.0}, "dmd": {"critic_lr": 1e-3}})
    rcm = build_objective(phase, PhaseModels.local(teacher))
    assert rcm.side_modules() == [rcm.cm.weighting] and rcm.critic() is rcm.dmd.critic()
    critic = rcm.critic()
    assert critic.model is not teacher and critic.optimizer.param_groups[0]["lr"] == 1e-3
    assert all(torch.equal(a, b) for a, b in zip(critic.model.state_dict().values(), teacher.state_dict().values()))
    fm = build_objective(PhaseConfig(name="t", kind="teacher", objective="flow_matching"), PhaseModels.local())
    assert fm.side_modules() == [] and fm.critic() is None and fm.state_dict() == {}

@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_after_step_hook_computes_in_the_steps_precision(tmp_path, monkeypatch, precision):
    """A critic's step (``after_step``) runs under the same autocast as the student's loss: under bf16 it would
    otherwise compute (and hold its graph) in fp32."""
    from megatron_rcm.objectives import FlowMatchingObjective

    seen = []
    monkeypatch.setattr(FlowMatchingObjective, "after_step", lambda self, student, batch, step: seen.append(
        (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))) or {})
    (tmp_path / "run.yaml").write_text("phases:\n  - {name: t, kind: teacher, objective: flow_matching, steps: 2}\n")
    cfg = load_config(tmp_path / "run.yaml", BASE + [f"output_dir={tmp_path / 'run'}", f"train.precision={precision}",
                                                     "eval.at_phase_end=false"])
    Trainer(cfg, logger=RunLogger(cfg.output_dir, tensorboard=False)).run()
    assert seen == [(True, torch.bfloat16)] * 2 if precision == "bf16" else [s[0] for s in seen] == [False] * 2
