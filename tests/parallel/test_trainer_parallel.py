"""``megatron-rcm train`` under torchrun-style multi-process layouts equals one process with the same
global batch (float64, gloo). Compared: every tensor of the phase outputs (raw and EMA weights,
gathered to full weights by rank 0) of teacher FM -> TF-sCM -> SF-DMD (critic synchronised too).
Layouts: DP2 (ZeRO-1; plus resumes from a mid-phase sharded checkpoint
under DP2 and in one process), PP2 (GPipe, model outputs
broadcast from the last stage), TP2 through the launch path (``megatron-rcm launch`` -> torchrun,
2 CPU processes). Plus gradient accumulation, the non-finite agreement and the layout checks that
run at config load and at init against the world size."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_rcm.config.errors import ConfigError
from megatron_rcm.config.run import load_config, validate_run_parallel
from megatron_rcm.training.logger import RunLogger
from megatron_rcm.training.registry import objectives
from megatron_rcm.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from _launch_ranks import ROOT, free_port, launch  # noqa: E402

# The tiny settings some objectives need to stay fast; every other objective of the registry runs with
# its defaults, so a new objective is covered by these tests without editing them.
FAST_ARGS = {"scm": {"sigma_d": 0.5, "cfg_scale": 2.0, "r_warmup_steps": 2}, "dcm": {"num_steps": 4},
             "ode_regression": {"ode_steps": 2, "denoising_steps": [1000, 500]},
             "dmd": {"guidance_scale": 2.0, "critic_lr": 1.0e-3, "rollout": {"denoising_steps": [1000, 500]}},
             "rcm": {"dmd": {"critic_lr": 1.0e-3, "rollout": {"denoising_steps": [1000, 500]}}}}


def _phase(name, objective, kind, teacher=True, args=None):
    line = f"  - {{name: {name}, kind: {kind}, objective: {objective}, steps: 2, optim: {{grad_clip: 0.5}}"
    if teacher:
        line += ", init_from: teacher, teacher_from: teacher"
    return line + (f", objective_args: {json.dumps(args)}" if args else "") + "}\n"


def registry_phases() -> tuple[str, list[str]]:
    """A causal teacher (flow matching), then one phase per other objective in the registry."""
    text = ("phases:\n  - {name: teacher, kind: teacher, objective: flow_matching, steps: 2, "
            "optim: {lr: 1.0e-3, grad_clip: 0.5}}\n")
    names = ["teacher"]
    for name, cls in objectives().items():
        if name == "flow_matching":
            continue
        text += _phase(name, name, cls.phase_kinds[0], cls.teacher_role != "none", FAST_ARGS.get(name))
        names.append(name)
    return text, names


YAML = """
phases:
  - {name: teacher, kind: teacher, objective: flow_matching, steps: 2, optim: {lr: 1.0e-3, grad_clip: 0.5}}
  - {name: tf_scm, kind: tf_cm, objective: scm, steps: 2, init_from: teacher, teacher_from: teacher,
     optim: {grad_clip: 0.5}, objective_args: {sigma_d: 0.5, cfg_scale: 2.0, r_warmup_steps: 2}}
"""
ARGS = ["model.num_layers=2", "model.param_dtype=float64", "model.interval_embedding=true", "data.height=8",
        "data.width=8", "data.num_frames=4", "data.batch_size=2", "causal.chunk_frames=2", "train.checkpoint_every=1",
        "train.keep_checkpoints=20", "eval.at_phase_end=false"]
TF_PHASES = ("teacher", "tf_scm")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """Teacher FM -> TF-sCM (runs under every layout, pipeline included)."""
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    path.write_text(YAML)
    return path


@pytest.fixture(scope="module")
def config_all(tmp_path_factory):
    """Teacher FM -> every other objective of the registry (dCM, sCM, MeanFlow, DMD, rCM, ...)."""
    path = tmp_path_factory.mktemp("cfg") / "run_all.yaml"
    path.write_text(registry_phases()[0])
    return path


ALL_PHASES = tuple(registry_phases()[1])


@pytest.fixture(scope="module")
def single_all(config_all, tmp_path_factory):
    """The one-process reference run (global batch 2)."""
    out = tmp_path_factory.mktemp("single_all")
    Trainer(load_config(config_all, ARGS + [f"output_dir={out}"]), logger=RunLogger(out, tensorboard=False)).run()
    return out


def test_every_registered_objective_is_covered():
    assert {"dcm", "scm", "meanflow", "dmd", "rcm"} <= set(ALL_PHASES) and ALL_PHASES[0] == "teacher"


def assert_same_weights(ref: Path, got: Path, phases):
    """Whole-model relative error <= 1e-9 and every tensor <= 1e-7 (Adam turns rounding-level noise in
    near-zero gradients into ~1e-9 relative on single small tensors; a real bug is O(1e-3) or worse)."""
    for phase in phases:
        for which in ("model", "ema"):
            a = load_file(str(ref / "phases" / phase / f"{which}.safetensors"))
            b = load_file(str(got / "phases" / phase / f"{which}.safetensors"))
            assert a.keys() == b.keys(), f"{phase}/{which}: different tensor names"
            diff = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a) ** 0.5
            norm = sum(float(a[k].double().pow(2).sum()) for k in a) ** 0.5
            assert diff / norm < 1e-9, f"{phase}/{which}: relative error {diff / norm:.3g}"
            for k in a:
                r = float((a[k] - b[k]).double().norm() / a[k].double().norm().clamp_min(1e-300))
                assert r < 1e-7, f"{phase}/{which}/{k}: relative error {r:.3g}"


def test_data_parallel_training_and_resume_match_one_process(config_all, single_all, tmp_path):
    out = tmp_path / "dp2"
    args = [str(config_all), *ARGS, f"output_dir={out}", "parallel.dp=2"]
    errors = launch("_train_rank.py", 2, args, timeout=240)
    assert not errors, "\n".join(errors)
    assert_same_weights(single_all, out, ALL_PHASES)
    # the sharded checkpoint (ZeRO-1 partitions, DMD critic + its optimizer, sCM's adaptive weight) of the
    # last phase's (rCM's) first step resumes bitwise under the same layout ...
    last, last_ckpt = ALL_PHASES[-1], f"step_{2 * len(ALL_PHASES):08d}"
    final = {w: load_file(str(out / "phases" / last / f"{w}.safetensors")) for w in ("model", "ema")}
    shutil.rmtree(out / "checkpoints" / last_ckpt)
    shutil.rmtree(out / "phases" / last)
    errors = launch("_train_rank.py", 2, args, timeout=240)
    assert not errors, "\n".join(errors)
    for w, ref in final.items():
        got = load_file(str(out / "phases" / last / f"{w}.safetensors"))
        assert all(torch.equal(ref[k], got[k]) for k in ref), f"resumed {w} weights differ"
    # ... and in ONE process (resharded), where it finishes like the one-process run
    shutil.rmtree(out / "checkpoints" / last_ckpt)
    shutil.rmtree(out / "phases" / last)
    Trainer(load_config(config_all, ARGS + [f"output_dir={out}"]), logger=RunLogger(out, tensorboard=False)).run()
    assert_same_weights(single_all, out, ALL_PHASES)


def test_pipeline_parallel_training_matches_one_process(config_all, single_all, tmp_path):
    """GPipe: sCM's teacher and JVP outputs and every rollout step's output are broadcast from the last
    stage; the rollout runs one grad-enabled forward per chunk; the critic trains through its own stages."""
    out = tmp_path / "pp2"
    errors = launch("_train_rank.py", 2, [str(config_all), *ARGS, f"output_dir={out}", "parallel.pp=2"], timeout=240)
    assert not errors, "\n".join(errors)
    assert_same_weights(single_all, out, ALL_PHASES)


def test_launch_runs_tensor_parallel_training_on_two_processes(config_all, single_all, tmp_path):
    """`megatron-rcm launch` -> torchrun -> 2 CPU ranks with TP2; the result equals one process."""
    out = tmp_path / "tp2"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "megatron_rcm.cli", "launch", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "--", "train", str(config_all), *ARGS, f"output_dir={out}", "parallel.tp=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(f"phase {ALL_PHASES[-1]}: 2 steps") == 1, proc.stdout[-2000:]  # rank 0 alone reports
    assert_same_weights(single_all, out, ALL_PHASES)


def test_a_non_finite_loss_on_one_rank_is_seen_by_all():
    """So every rank skips the step together instead of one waiting in a collective forever."""
    errors = launch("_agree_rank.py", 2, [], timeout=120)
    assert not errors, "\n".join(errors)


def test_gradient_accumulation_matches_the_whole_batch(config, tmp_path):
    """One process, 2 micro-batches per step: same noise, same result as the whole batch at once."""
    runs = {}
    for accum in (1, 2):
        out = runs[accum] = tmp_path / f"accum{accum}"
        cfg = load_config(config, ARGS + [f"output_dir={out}", f"train.grad_accum={accum}", "train.checkpoint_every=0"])
        Trainer(cfg, logger=RunLogger(out, tensorboard=False)).run()
    assert_same_weights(runs[1], runs[2], TF_PHASES)


def test_layout_errors_name_the_key(config, tmp_path):
    with pytest.raises(ConfigError, match=r"parallel.tp\*cp"):
        load_config(config, ARGS + ["parallel.tp=3"])  # 4 heads
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(config, ARGS + ["parallel.dp=4"])  # global batch 2
    dmd = tmp_path / "dmd.yaml"
    dmd.write_text(YAML.split("  - {name: tf_scm")[0]
                   + "  - {name: dmd, kind: sf_dmd, objective: dmd, teacher_from: teacher}\n")
    load_config(dmd, ARGS + ["parallel.tp=2"])
    with pytest.raises(ConfigError, match="train.grad_accum") as e:
        load_config(dmd, ARGS + ["train.grad_accum=2"])  # self-forcing generators: whole batches only
    assert "phases.1" in str(e.value)
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(config, ARGS + ["parallel.dp=2", "train.grad_accum=2"])  # 2 samples, 4 micro-batches
    with pytest.raises(ConfigError, match="parallel.pp"):
        load_config(config, ARGS + ["parallel.pp=3"])  # 2 layers
    with pytest.raises(ConfigError, match="parallel.cp"):
        load_config(config, ARGS + ["data.num_frames=3", "causal.chunk_frames=1", "parallel.cp=4", "parallel.tp=1"])
    cfg = load_config(config, ARGS + ["parallel.tp=2"])
    with pytest.raises(ConfigError, match=r"parallel.tp\*cp\*pp"):
        validate_run_parallel(cfg, world_size=3)  # checked at init, before any process group
    cfg = load_config(config, ARGS)
    with pytest.raises(ConfigError, match="data.batch_size"):
        validate_run_parallel(cfg, world_size=4)  # dp = 4 does not divide the global batch 2
