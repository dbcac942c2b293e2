"""``megatron-rcm train`` under torchrun-style multi-process layouts equals one process with the same
global batch (float64, gloo). Compared: every tensor of the phase outputs (raw and EMA weights,
gathered to full weights by rank 0) of teacher FM -> TF-sCM -> SF-DMD (critic synchronised too).
Layouts: DP2 (ZeRO-1; plus resumes from a mid-phase sharded checkpoint
under DP2 and in one process), PP2 (GPipe, model outputs
broadcast from the last stage), TP2 through the launch path (``megatron-rcm launch`` -> torchrun,
2 CPU processes); FSDP2 over DP2 (every objective, activation checkpointing on, plus resumes across
layouts in both directions), FSDP2 x TP2 and FSDP2 x PP2 (4 processes: teacher FM -> TF-sCM -> SF-DMD);
the 1F1B schedule with micro-batches. Plus gradient accumulation, the non-finite agreement and the layout
checks that run at config load and at init against the world size."""
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


HELD = ("causal.clean_first_frames=1",)  # image-to-video training: the first latent frame held clean


@pytest.fixture(scope="module")
def single_held(config_all, tmp_path_factory):
    """The one-process reference of every objective with the first frame held clean."""
    out = tmp_path_factory.mktemp("single_held")
    Trainer(load_config(config_all, ARGS + [f"output_dir={out}", *HELD]), logger=RunLogger(out, tensorboard=False)).run()
    return out


@pytest.mark.parametrize("layout", ["parallel.dp=2", "parallel.pp=2"])
def test_held_first_frames_train_alike_under_data_and_pipeline_parallel(config_all, single_held, single_all, tmp_path,
                                                                       layout):
    """``causal.clean_first_frames`` slices the batch's clean frames into every network call: the same under
    DP2 (each rank's rows) and PP2 (stage outputs broadcast) as in one process, for every objective."""
    with pytest.raises(AssertionError, match="relative error"):  # the option changes what every phase learns
        assert_same_weights(single_all, single_held, ALL_PHASES[1:2])
    out = tmp_path / "held"
    errors = launch("_train_rank.py", 2, [str(config_all), *ARGS, f"output_dir={out}", *HELD, layout], timeout=240)
    assert not errors, "\n".join(errors)
    assert_same_weights(single_held, out, ALL_PHASES)


def _drop(out: Path, *steps: int, phase: str | None = None):
    """Remove checkpoints ``steps`` and a phase's outputs, so the next run resumes from an earlier step."""
    for step in steps:
        shutil.rmtree(out / "checkpoints" / f"step_{step:08d}")
    if phase:
        shutil.rmtree(out / "phases" / phase)


def _train(config, out, nprocs, *extra):
    if nprocs == 1:
        cfg = load_config(config, ARGS + [f"output_dir={out}", *extra])
        Trainer(cfg, logger=RunLogger(out, tensorboard=False)).run()
        return
    errors = launch("_train_rank.py", nprocs, [str(config), *ARGS, f"output_dir={out}", *extra], timeout=300)
    assert not errors, "\n".join(errors)


FSDP = ("parallel.fsdp=true",)


def test_fsdp_data_parallel_training_and_resumes_across_layouts(config_all, single_all, tmp_path):
    """FSDP2 over DP2 with activation checkpointing (the rollout's checkpointed cached passes too) equals one
    process; its mid-phase checkpoint (sharded weights, EMA, critic and their AdamW states) resumes under TP2
    (ZeRO-1 optimizer layout), and a one-process checkpoint resumes under FSDP2."""
    out = tmp_path / "fsdp_dp2"  # (the frozen teacher replicated here; sharded in the tests below)
    fsdp_dp2 = ("parallel.dp=2", *FSDP, "parallel.fsdp_teacher=replicate", "train.activation_checkpointing=true",
                "train.checkpoint_layers=1")
    _train(config_all, out, 2, *fsdp_dp2)
    assert json.loads((out / "checkpoints" / "step_00000001" / "meta.json").read_text())["layout"]["fsdp"]
    assert_same_weights(single_all, out, ALL_PHASES)
    last, n = ALL_PHASES[-1], 2 * len(ALL_PHASES)  # the last phase's checkpoints: steps n - 1 (mid), n (end)
    # the FSDP2 shards read back whole in one process (what `convert --to-diffusers` reads; its export of an
    # FSDP2 checkpoint is checked in test_dist_checkpoint.py: these interval models refuse the export)
    from megatron_rcm.training.dist_checkpoint import read_full_tensors

    ema = load_file(str(out / "phases" / last / "ema.safetensors"))
    whole = read_full_tensors(out / "checkpoints", "ema")
    assert whole.keys() == ema.keys() and all(torch.equal(whole[k], ema[k]) for k in ema)
    _drop(out, n, phase=last)
    _train(config_all, out, 2, "parallel.tp=2")  # FSDP2 DP2 -> TP2
    assert_same_weights(single_all, out, ALL_PHASES)
    _drop(out, n - 1, n, phase=last)
    _train(config_all, out, 1)  # the last phase again in one process: writes a one-process step n - 1
    _drop(out, n, phase=last)
    _train(config_all, out, 2, *fsdp_dp2)  # one process -> FSDP2 DP2
    assert_same_weights(single_all, out, ALL_PHASES)


SF_PHASES = ("teacher", "scm", "dmd")


@pytest.fixture(scope="module")
def config_sf(tmp_path_factory):
    """Teacher FM -> TF-sCM -> SF-DMD (the registry's phases for those three objectives)."""
    path = tmp_path_factory.mktemp("cfg") / "run_sf.yaml"
    lines = registry_phases()[0].splitlines()
    path.write_text("\n".join(line for line in lines if not line.startswith("  - {name: ")
                              or line.split(",")[0].split(": ")[-1] in SF_PHASES) + "\n")
    return path


@pytest.fixture(scope="module")
def single_sf(config_sf, tmp_path_factory):
    out = tmp_path_factory.mktemp("single_sf")
    _train(config_sf, out, 1)
    return out


REPLAYED = (f"phases.{SF_PHASES.index('dmd')}.objective_args.rollout.replayed_backprop=true",)


@pytest.mark.parametrize("layout", [("parallel.dp=2", *FSDP, "train.activation_checkpointing=true"), ("parallel.tp=2",)],
                         ids=["fsdp-dp2-ckpt", "tp2"])
def test_replayed_self_forcing_backprop_under_fsdp_and_tensor_parallel(config_sf, tmp_path, layout):
    """The replayed rollout's backward runs each chunk's exit step inside autograd's backward: under FSDP2 (blocks
    unsharded by their hooks there, activation checkpointing on) and TP2 it equals one process."""
    single = tmp_path / "single"
    _train(config_sf, single, 1, *REPLAYED)
    out = tmp_path / "replayed"
    _train(config_sf, out, 2, *REPLAYED, *layout)
    assert_same_weights(single, out, SF_PHASES)


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2"], ids=["fsdp-dp2-tp2", "fsdp-dp2-pp2"])
def test_fsdp_composes_with_tensor_and_pipeline_parallel(config_sf, single_sf, tmp_path, layout):
    """4 processes: FSDP2 over DP2 on top of TP2 (2-D: TP shards, then FSDP shards of them) or PP2 (each
    stage's blocks); the nested shards of the mid-phase checkpoint resume in one process."""
    assert sorted(p.split(",")[0] for p in config_sf.read_text().splitlines()[1:]) == \
        sorted(f"  - {{name: {n}" for n in SF_PHASES)
    out = tmp_path / "run"
    _train(config_sf, out, 4, "parallel.dp=2", layout, *FSDP)
    assert_same_weights(single_sf, out, SF_PHASES)
    _drop(out, 2 * len(SF_PHASES), phase=SF_PHASES[-1])
    _train(config_sf, out, 1)
    assert_same_weights(single_sf, out, SF_PHASES)


def test_fsdp_shards_a_diffusers_teacher_of_its_own_size(tmp_path):
    """SF-DMD from a diffusers teacher wider and deeper than the student: teacher and critic are built and
    FSDP2-sharded with the folder's sizes; DP2 equals one process."""
    from fixtures.tiny_wan_pipeline import WIDE_TEACHER, save_transformer_folder

    wide = save_transformer_folder(tmp_path / "wide", **WIDE_TEACHER)
    config = tmp_path / "wide.yaml"
    config.write_text("phases:\n" + _phase("dmd", "dmd", "sf_dmd", False, {**FAST_ARGS["dmd"], "score_mask": "full"})
                      .replace("}\n", f', teacher_from: "diffusers:{wide}"}}\n'))
    _train(config, tmp_path / "single", 1)
    _train(config, tmp_path / "fsdp", 2, "parallel.dp=2", *FSDP)
    assert_same_weights(tmp_path / "single", tmp_path / "fsdp", ["dmd"])


def test_one_f_one_b_with_micro_batches_matches_one_process(config, tmp_path):
    """PP2 x 2 micro-batches per step under 1F1B (stage 0: F0 F1 B0 B1, stage 1: F0 B0 F1 B1; GPipe is
    checked in test_layouts.py)."""
    ref, out = tmp_path / "single", tmp_path / "1f1b"
    _train(config, ref, 1, "train.checkpoint_every=0")
    _train(config, out, 2, "parallel.pp=2", "train.grad_accum=2", "parallel.pp_schedule=1f1b",
           "train.checkpoint_every=0")
    assert_same_weights(ref, out, TF_PHASES)


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
