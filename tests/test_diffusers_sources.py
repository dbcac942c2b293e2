"""diffusers:DIR as init_from / teacher_from (strict, config compared key by key) and one-line refusals."""
import json
import shutil

import pytest
import torch

from fixtures.runs import cli_error
from fixtures.tiny_wan_pipeline import TEXT_LEN, run_overrides
from megatron_rcm.cli import main
from megatron_rcm.config.run import load_config
from megatron_rcm.convert import load_diffusers_state_dict
from megatron_rcm.convert.into_run import DiffusersSourceError, load_diffusers_into
from megatron_rcm.models import build_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Every test here runs single-threaded (see conftest)."""


def _cfg(pipeline, *extra):
    return load_config(None, [*run_overrides(pipeline), "data.kind=latent_shards", "data.shard_dir=unused",
                              "data.channels=4", *extra])


def _shards(pipeline, folder) -> str:
    """A valid two-sample shard folder of the run's shapes (the data check runs before the model checks)."""
    from megatron_rcm.data.shards import ShardWriter

    d = _cfg(pipeline).data
    with ShardWriter(str(folder), shard_size=2) as writer:
        writer.write({"latents": torch.zeros(2, d.channels, d.num_frames, d.height, d.width),
                      "context": torch.zeros(2, d.text_len, d.text_dim)})
    return str(folder)


_error = cli_error


def test_strict_load_copies_every_tensor_and_keeps_our_zero_extras(tiny_wan_pipeline):
    src = load_diffusers_state_dict(tiny_wan_pipeline / "transformer")
    for extra in ([], ["model.interval_embedding=true"]):
        cfg = _cfg(tiny_wan_pipeline, *extra)
        model = load_diffusers_into(build_model(cfg.model, cfg.causal), f"diffusers:{tiny_wan_pipeline}", "k")
        own = model.state_dict()
        assert all(torch.equal(own[k], v) for k, v in src.items())
        assert set(own) - set(src) == ({k for k in own if "interval_embedder" in k} if extra else set())
        if extra:
            assert all(torch.count_nonzero(v) == 0 for k, v in own.items() if "interval_embedder.linear_2" in k)


@pytest.mark.parametrize("overrides,named", [
    (["model.num_layers=3"], ["model.num_layers = 3 (folder: 2)"]),
    (["model.num_layers=1"], ["model.num_layers = 1 (folder: 2)"]),
    (["model.eps=1e-5", "model.cross_attn_norm=false"],
     ["model.cross_attn_norm = False (folder: True)", "model.eps = 1e-05 (folder: 1e-06)"]),
])
def test_a_run_whose_model_differs_from_the_folder_stops_before_training(tiny_wan_pipeline, tmp_path, capsys,
                                                                          overrides, named):
    yaml = tmp_path / "run.yaml"
    yaml.write_text(f'phases:\n  - {{name: t, kind: teacher, objective: flow_matching, steps: 1, '
                    f'init_from: "diffusers:{tiny_wan_pipeline}"}}\n')
    shards = _shards(tiny_wan_pipeline, tmp_path / "shards")
    err = _error(capsys, ["train", str(yaml), *run_overrides(tiny_wan_pipeline), "data.kind=latent_shards",
                          f"data.shard_dir={shards}", "data.channels=4", f"output_dir={tmp_path / 'run'}", *overrides])
    assert "phases.0.init_from: the run's model differs from" in err and "config.json" in err
    assert all(n in err for n in named), err
    assert not (tmp_path / "run" / "phases").exists()


def test_teacher_from_diffusers_is_the_frozen_folder_model(tiny_wan_pipeline, tmp_path):
    from megatron_rcm.training.trainer import Trainer

    cfg = _cfg(tiny_wan_pipeline, f"output_dir={tmp_path}",
               f'phases=[{{name: d, kind: sf_dmd, objective: dmd, teacher_from: "diffusers:{tiny_wan_pipeline}", '
               'objective_args: {score_mask: full}}]')
    teacher = Trainer(cfg)._frozen(cfg.phases[0].teacher_from)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    src = load_diffusers_state_dict(tiny_wan_pipeline / "transformer")
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in src.items())
    bare = tmp_path / "no_transformer"
    shutil.copytree(tiny_wan_pipeline, bare, ignore=shutil.ignore_patterns("transformer"))
    cfg.phases[0].teacher_from = f"diffusers:{bare}"
    with pytest.raises(DiffusersSourceError, match=r"phases.0.teacher_from: .*no transformer/ sub-folder"):
        Trainer(cfg)._frozen(cfg.phases[0].teacher_from)


def test_convert_refusals_are_one_line(tiny_wan_pipeline, tmp_path, capsys):
    bad = tmp_path / "i2v"
    shutil.copytree(tiny_wan_pipeline / "transformer", bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "image_dim": 1280}))  # half of the I2V layout
    assert "'config.json.added_kv_proj_dim'" in _error(capsys, ["convert", "--from-diffusers", str(bad), "--out",
                                                                str(tmp_path / "m")])
    assert "checkpoint file not found" in _error(capsys, ["convert", "--to-diffusers", str(tmp_path / "no.safetensors"),
                                                          "--out", str(tmp_path / "d")])
    lone = tmp_path / "lone.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(lone))
    assert "run's config.yaml" in _error(capsys, ["convert", "--to-diffusers", str(lone), "--out", str(tmp_path / "d")])
    # a pipeline export from an imported checkpoint: the source must hold every part, and fit the model
    ckpt = tmp_path / "m.safetensors"
    assert main(["convert", "--from-diffusers", f"diffusers:{tiny_wan_pipeline}", "--out", str(ckpt)]) == 0
    partial = tmp_path / "partial"
    shutil.copytree(tiny_wan_pipeline, partial, ignore=shutil.ignore_patterns("scheduler"))
    err = _error(capsys, ["convert", "--to-diffusers", str(ckpt), "--out", str(tmp_path / "p"), "--pipeline-from",
                          str(partial)])
    assert "has no scheduler/ sub-folder" in err and not (tmp_path / "p").exists()
    wide = tmp_path / "wide"
    shutil.copytree(tiny_wan_pipeline, wide)
    vae_cfg = json.loads((wide / "vae" / "config.json").read_text())
    (wide / "vae" / "config.json").write_text(json.dumps({**vae_cfg, "z_dim": 16}))
    err = _error(capsys, ["convert", "--to-diffusers", str(ckpt), "--out", str(tmp_path / "p"), "--pipeline-from",
                          str(wide)])
    assert "makes 16 latent channels but the model's in_channels = 4" in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".p.")]  # no temporary folder left behind


def test_prompts_need_a_run_with_encoders(tmp_path, capsys):
    from megatron_rcm.config.run import to_yaml

    run = tmp_path / "run"
    cfg = load_config(None, ["model.num_layers=1", "data.height=8", "data.width=8", "data.num_frames=2",
                             f"output_dir={run}", "phases=[{name: t, kind: teacher, objective: flow_matching}]"])
    (run / "phases" / "t").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    from safetensors.torch import save_file
    save_file(build_model(cfg.model, cfg.causal).state_dict(), str(run / "phases" / "t" / "ema.safetensors"))
    err = _error(capsys, ["generate", str(run), "--phase", "t", "--prompt", "a cat", "--out", str(tmp_path / "x.gif")])
    assert "encoders.diffusers_dir" in err
    assert TEXT_LEN  # the fixture module's constants stay importable from here


def test_the_wan_1_3b_example_resolves_and_info_counts_on_the_meta_device(capsys):
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "wan2.1_t2v_1.3b.yaml"
    for extra in ([], ["causal.chunk_frames=1"]):  # chunk-wise (3 frames) and frame-wise
        cfg = load_config(example, ["encoders.diffusers_dir=/data/wan", *extra])
        assert (cfg.data.num_frames, cfg.data.height, cfg.data.width) == (21, 60, 104)
        assert cfg.phases[0].init_from == cfg.phases[2].teacher_from == "diffusers:/data/wan"
        assert cfg.phases[2].objective_args["score_mask"] == "full"
        capsys.readouterr()
        assert main(["info", str(example), *extra]) == 0
        assert "parameters: 1,418,996,800 (1.419 B)" in capsys.readouterr().out


def test_teacher_reference_ode_uses_eval_teacher_shift():
    from functools import partial

    from megatron_rcm.config.model import CausalConfig, model_preset
    from megatron_rcm.diffusion.samplers import multistep2_fm
    from megatron_rcm.inference.sampling import teacher_sample
    from megatron_rcm.inference.streaming import chunkwise, stream_chunks
    from megatron_rcm.network import Condition, Denoiser

    cfg = load_config(None, ["model.num_layers=1", "data.height=8", "data.width=8", "data.num_frames=2",
                             "causal.chunk_frames=1"])
    torch.manual_seed(0)
    model = build_model(model_preset("tiny", num_layers=1), CausalConfig(chunk_frames=1)).double()
    g = torch.Generator().manual_seed(5)
    prompts = {"context": torch.randn(1, 8, 32, generator=g, dtype=torch.float64),
               "uncond_context": torch.randn(1, 8, 32, generator=g, dtype=torch.float64)}
    shifted = teacher_sample(model, prompts, cfg.data, 3, 2.0, seed=1, shift=3.0)
    noise = torch.randn(1, 3, 2, 8, 8, generator=torch.Generator().manual_seed(1)).double()
    starts = iter(torch.split(noise, 1, dim=2))
    ref = torch.cat([c.frames for c in stream_chunks(
        Denoiser(model), Condition(prompts["context"], prompts["uncond_context"]), 2, 8, 8,
        chunkwise(partial(multistep2_fm, steps=3, shift=3.0)), lambda _c, _s: next(starts), 2.0)], dim=2)
    assert torch.allclose(shifted, ref, rtol=0, atol=1e-12)
    assert (shifted - teacher_sample(model, prompts, cfg.data, 3, 2.0, seed=1)).abs().max() > 1e-3


def test_a_diffusers_teacher_keeps_its_own_size(tmp_path, capsys):
    """A wider, deeper teacher folder than the student: teacher and DMD critic take the folder's architecture
    (weights loaded strictly), the phase trains; a folder that does not share channels / patch / text width
    with the student is refused naming each difference, before training."""
    from fixtures.tiny_wan_pipeline import WIDE_TEACHER, save_transformer_folder
    from megatron_rcm.training.trainer import Trainer

    wide = save_transformer_folder(tmp_path / "wide", **WIDE_TEACHER)
    yaml = tmp_path / "run.yaml"
    yaml.write_text('phases:\n  - {name: d, kind: sf_dmd, objective: dmd, steps: 1, '
                    f'teacher_from: "diffusers:{wide}", '
                    'objective_args: {score_mask: full, critic_lr: 1.0e-3, rollout: {denoising_steps: [1000, 500]}}}\n')
    args = ["model.num_layers=2", "data.height=8", "data.width=8", "data.num_frames=4", "data.batch_size=1",
            "causal.chunk_frames=2", "eval.at_phase_end=false", "train.checkpoint_every=0"]
    cfg = load_config(yaml, [*args, f"output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    teacher = trainer._frozen(cfg.phases[0].teacher_from)
    assert (len(teacher.blocks), teacher.cfg.hidden_size, teacher.cfg.ffn_dim) == (3, 96, 384)
    assert cfg.model.num_layers == 2 and cfg.model.hidden_size == 64
    src = load_diffusers_state_dict(wide)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in src.items())
    critic = trainer._new_critic(cfg.phases[0], lr=1e-3).model
    assert len(critic.blocks) == 3 and all(p.requires_grad for p in critic.parameters())
    results = trainer.run()
    assert results[0].steps == 1 and results[0].final_loss == results[0].final_loss  # trained, finite
    # only what student and teacher exchange must agree; every difference is named, one line, exit 2
    odd = save_transformer_folder(tmp_path / "odd", **{**WIDE_TEACHER, "in_channels": 4, "out_channels": 4,
                                                       "text_dim": 48})
    yaml.write_text(yaml.read_text().replace(str(wide), str(odd)))
    err = _error(capsys, ["train", str(yaml), *args, f"output_dir={tmp_path / 'run2'}"])
    assert "phases.0.teacher_from: the run's model differs from" in err, err
    for named in ("model.in_channels = 3 (folder: 4)", "model.out_channels = 3 (folder: 4)",
                  "model.text_dim = 32 (folder: 48)"):
        assert named in err, err
    assert "num_layers" not in err and not (tmp_path / "run2" / "phases").exists()


def test_the_teacher_must_split_under_the_layout():
    from megatron_rcm.config.errors import ConfigError
    from megatron_rcm.config.model import model_preset
    from megatron_rcm.parallel.config import ParallelConfig, validate_teacher_layout

    wide = model_preset("tiny", num_attention_heads=6, num_layers=3)
    validate_teacher_layout(ParallelConfig(tp=2, dp=1), wide, "phases.1.teacher_from")
    with pytest.raises(ConfigError, match=r"parallel.tp\*cp.*num_attention_heads = 6.*phases.1.teacher_from"):
        validate_teacher_layout(ParallelConfig(tp=4, dp=1), wide, "phases.1.teacher_from")
    with pytest.raises(ConfigError, match=r"parallel.pp.*num_layers = 3.*phases.1.teacher_from"):
        validate_teacher_layout(ParallelConfig(pp=2, dp=1), wide, "phases.1.teacher_from")
