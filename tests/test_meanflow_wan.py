"""MeanFlow on the causal Wan model: interval embedding tangents, zero init, the production target, wiring."""
import copy
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import rel_err
from megatron_rcm.config.errors import ConfigError
from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.config.run import load_config
from megatron_rcm.convert.diffusers_wan import ConversionError, export_diffusers
from megatron_rcm.diffusion.flow_matching import bcast, fm_noise
from megatron_rcm.models import build_model
from megatron_rcm.network import Denoiser, StepContext
from megatron_rcm.objectives import MeanFlowConfig, MeanFlowObjective, PhaseModels, TFMeanFlowNet
from megatron_rcm.ops.masks import block_causal_mask, full_mask, teacher_forcing_mask
from megatron_rcm.training.logger import RunLogger
from megatron_rcm.training.registry import build_objective
from megatron_rcm.training.trainer import Trainer

B, F, H, W = 2, 4, 8, 8
INTERVAL_KEYS = ("condition_embedder.interval_embedder.",)


def _model(interval=True, chunk=2, dtype="float64", seed=0, perturb=True, backend="reference"):
    torch.manual_seed(seed)
    cfg = model_preset("tiny", param_dtype=dtype, num_layers=1, interval_embedding=interval)
    model = build_model(cfg, CausalConfig(chunk_frames=chunk, attention_backend=backend))
    if perturb:  # non-trivial norms/modulation and a live (non-zero) interval embedder
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or "scale_shift" in name or "interval_embedder.linear_2" in name:
                    p.add_(0.3 * torch.randn_like(p))
    return model


def _inputs(dtype=torch.float64):
    x = torch.randn(B, 3, F, H, W, dtype=dtype)
    t = torch.rand(B, F, dtype=dtype) * 1000
    d = t * torch.rand(B, F, dtype=dtype)  # interval in [0, t]
    return x, t, d, torch.randn(B, 8, 32, dtype=dtype)


def _batch(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(B, 3, F, H, W, generator=g, dtype=dtype),
            "context": torch.randn(B, 8, 32, generator=g, dtype=dtype),
            "uncond_context": torch.zeros(B, 8, 32, dtype=dtype)}


# ---------------------------------------------------------------------- model
@pytest.mark.parametrize("kind", ["full", "chunk", "tf"])
def test_interval_tangent_equals_torch_func_jvp(kind):
    model = _model()
    x, t, d, ctx = _inputs()
    tx, tt, td = torch.randn_like(x), torch.randn_like(t), torch.randn_like(d)
    tpf = model.tokens_per_frame(H, W)
    if kind == "tf":
        clean = torch.randn_like(x)
        mask = teacher_forcing_mask(F, tpf, 2)
        fwd = lambda a, b, c: model.forward_teacher_forcing(clean, a, b, ctx, mask, interval=c)[0]  # noqa: E731
        y, ty = model.forward_teacher_forcing(clean, x, t, ctx, mask, tx, tt, interval=d, interval_tangent=td)
        y0, ty0 = model.forward_teacher_forcing(clean, x, t, ctx, mask, tx, tt)
    else:
        mask = full_mask(F * tpf) if kind == "full" else block_causal_mask(F, tpf, 2)
        fwd = lambda a, b, c: model(a, b, ctx, mask, interval=c)  # noqa: E731
        y, ty = model.forward_with_tangent(x, t, ctx, tx, tt, mask, interval=d, interval_tangent=td)
        y0, ty0 = model.forward_with_tangent(x, t, ctx, tx, tt, mask)
    ry, rty = torch.func.jvp(fwd, (x, t, d), (tx, tt, td))
    assert rel_err(y, ry) < 1e-12 and rel_err(ty, rty) < 1e-9
    # the interval really enters (non-zero embedder) and the default interval is the timestep (r = 0)
    assert rel_err(y0, ry) > 1e-6
    ry0, rty0 = torch.func.jvp(lambda a, b: fwd(a, b, b), (x, t), (tx, tt))
    assert rel_err(y0, ry0) < 1e-12 and rel_err(ty0, rty0) < 1e-9


def test_interval_tangent_through_the_kv_cache_equals_torch_func_jvp():
    model = _model()
    x, t, d, ctx = _inputs()
    cache = model.new_kv_cache(H, W)
    model.forward_chunk(x[:, :, :2], t[:, :2], ctx, cache, 0, write_cache=True, interval=d[:, :2])
    xs, ts, ds = x[:, :, 2:], t[:, 2:], d[:, 2:]
    tx, tt, td = torch.randn_like(xs), torch.randn_like(ts), torch.randn_like(ds)
    y, ty = model.forward_chunk(xs, ts, ctx, cache, 1, tangent=tx, timestep_tangent=tt, interval=ds,
                                interval_tangent=td)
    fn = lambda a, b, c: model.forward_chunk(a, b, ctx, cache, 1, interval=c)[0]  # noqa: E731
    ry, rty = torch.func.jvp(fn, (xs, ts, ds), (tx, tt, td))
    assert rel_err(y, ry) < 1e-12 and rel_err(ty, rty) < 1e-9


def test_zero_initialised_interval_model_is_the_plain_model():
    plain, fresh = _model(interval=False, perturb=False), _model(interval=True, seed=5, perturb=False)
    sd = fresh.state_dict()
    extra = {k for k in sd if k.startswith(INTERVAL_KEYS)}
    assert extra and set(sd) - extra == set(plain.state_dict())
    x, t, d, ctx = _inputs()
    mask = teacher_forcing_mask(F, plain.tokens_per_frame(H, W), 2)
    clean, tx, tt = torch.randn_like(x), torch.randn_like(x), torch.randn_like(t)
    # at init: the plain model with the fresh model's shared weights computes exactly the same
    plain.load_state_dict({k: v for k, v in sd.items() if k not in extra})
    for interval in (None, d):
        a = fresh.forward_teacher_forcing(clean, x, t, ctx, mask, tx, tt, interval=interval)
        b = plain.forward_teacher_forcing(clean, x, t, ctx, mask, tx, tt)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # a teacher's (plain) weights load into an interval model, interval part at zero
    teacher = _model(interval=False, seed=7)
    student = _model(interval=True, seed=8, perturb=False)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert set(missing) == extra and not unexpected
    assert torch.equal(student(x, t, ctx, mask=None, interval=d), teacher(x, t, ctx))


def test_interval_errors_and_diffusers_export(tmp_path):
    plain, model = _model(interval=False), _model(interval=True, perturb=False)
    x, t, d, ctx = _inputs()
    with pytest.raises(ValueError, match="model.interval_embedding"):
        plain(x, t, ctx, interval=d)
    export_diffusers(model, tmp_path / "zero")  # exactly-zero interval output layer: dropped losslessly
    keys = load_file(str(tmp_path / "zero" / "diffusion_pytorch_model.safetensors")).keys()
    assert keys == plain.state_dict().keys()
    live = _model(interval=True)
    with pytest.raises(ConversionError, match="interval_embedder.linear_2.weight"):
        export_diffusers(live, tmp_path / "live")


# ---------------------------------------------------------------------- objective
@pytest.mark.parametrize("with_teacher", [False, True])
def test_production_meanflow_target_equals_func_jvp_of_forward(with_teacher):
    student, teacher = _model(seed=0), _model(seed=3)
    batch = _batch()
    obj = MeanFlowObjective(MeanFlowConfig(cfg_scale=2.5), teacher=Denoiser(teacher) if with_teacher else None)
    net = Denoiser(student)
    x0, ctx = batch["latents"], batch["context"]
    mask = teacher_forcing_mask(x0.shape[2], student.tokens_per_frame(*x0.shape[3:]), student.causal.chunk_frames)
    to_frames = net.layout(x0).to_frames
    t = to_frames(torch.tensor([[0.7, 0.45], [0.9, 0.3]], dtype=torch.float64))
    r = to_frames(torch.tensor([[0.2, 0.45], [0.35, 0.05]], dtype=torch.float64))  # one chunk r = t
    eps = torch.randn_like(x0)
    z = fm_noise(x0, eps, t)
    v = obj.velocity(batch, z, t, x0, eps)
    u_tgt = obj.target(TFMeanFlowNet(net, batch), z, r, t, v, batch)

    with torch.no_grad():  # independent: v from plain forwards, du/dt from func.jvp of a closure over forward
        if with_teacher:
            run = lambda c: teacher.forward_teacher_forcing(x0, z, 1000 * t, c, mask)[0]  # noqa: E731
            v_ref = run(batch["uncond_context"]) + 2.5 * (run(ctx) - run(batch["uncond_context"]))
        else:
            v_ref = eps - x0
        assert rel_err(v, v_ref) < 1e-12

        def u_of_h(h):
            th = t + h
            return student.forward_teacher_forcing(x0, z + h * v_ref, 1000 * th, ctx, mask,
                                                   interval=1000 * (th - r))[0]

        h0 = torch.zeros((), dtype=torch.float64)
        _, dudt = torch.func.jvp(u_of_h, (h0,), (torch.ones_like(h0),))
    u_ref = v_ref - bcast(t - r, z) * dudt
    assert rel_err(u_tgt, u_ref) < 1e-9
    assert rel_err(u_tgt, v_ref) > 1e-4  # the correction term is really there


def test_meanflow_training_on_wan_improves_one_step_samples(one_thread):
    """A fixed batch whose contexts identify the samples: the one-step map x0 = z_1 - u(z_1, 0, 1) must
    approach the data. (The MeanFlow MSE itself is not monotone on a random init: its target contains the
    net's own d_t u, which grows while the Wan-scale time embedding learns; see the report.)"""
    torch.manual_seed(0)
    model = _model(dtype="float32", perturb=False, backend="auto")
    obj = MeanFlowObjective(MeanFlowConfig(ratio_r_neq_t=0.25))
    batch = _batch(torch.float32)
    eps = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(9))

    def one_step_error():
        with torch.no_grad():
            ones = torch.ones(B, F)
            u, _ = TFMeanFlowNet(Denoiser(model), batch)(eps, 0 * ones, ones)
            return float((eps - u - batch["latents"]).pow(2).mean())

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first, start = one_step_error(), time.time()
    net = Denoiser(model)
    for step in range(250):
        loss, logs = obj.loss(net, batch, StepContext(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss) and logs["meanflow_mse"] == logs["meanflow_mse"]
    last = one_step_error()
    assert last < 0.8 * first, (first, last)
    assert time.time() - start < 60


# ---------------------------------------------------------------------- config and trainer
BASE = ["model.num_layers=1", "data.height=8", "data.width=8", "data.num_frames=4", "data.batch_size=2",
        "causal.chunk_frames=2", "train.checkpoint_every=0", "eval.num_videos=2", "eval.teacher_steps=2",
        "eval.student_steps=[1]", "model.interval_embedding=true"]
YAML = """
phases:
  - {name: teacher, kind: teacher, objective: flow_matching, steps: 3, optim: {lr: 1.0e-3}}
  - {name: mf, kind: tf_cm, objective: meanflow, steps: 2, init_from: teacher, teacher_from: teacher,
     objective_args: {cfg_scale: 2.0, ratio_r_neq_t: 0.5}}
  - {name: mf_data, kind: tf_cm, objective: meanflow, steps: 2, init_from: teacher}
"""
RCM_YAML = """
phases:
  - {name: teacher, kind: teacher, objective: flow_matching, steps: 1}
  - {name: rcm, kind: sf_dmd, objective: rcm, steps: 1, init_from: teacher, teacher_from: teacher,
     objective_args: {cm: meanflow, meanflow: {cfg_scale: 2.0}, dmd: {rollout: {denoising_steps: [1000, 500]}},
                      rcm: {dmd_weight: 0.5}}}
"""


def _cfg(tmp_path, yaml, extra=()):
    (tmp_path / "run.yaml").write_text(yaml)
    return load_config(tmp_path / "run.yaml", BASE + [f"output_dir={tmp_path / 'out'}", *extra])


@pytest.mark.parametrize("yaml", [YAML, RCM_YAML], ids=["meanflow", "rcm"])
def test_meanflow_phases_need_the_interval_embedding(tmp_path, yaml):
    _cfg(tmp_path, yaml)  # loads with the flag
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, yaml, ["model.interval_embedding=false"])
    assert "'model.interval_embedding'" in str(err.value) and "interval_embedding=true" in str(err.value)


@pytest.mark.parametrize("override,key", [
    ("phases.1.objective_args.cm=dcm", "phases.1.objective_args.cm"),
    ("phases.1.objective_args.cm=scm", "phases.1.objective_args.meanflow"),  # args of the CM part not chosen
])
def test_bad_rcm_cm_names_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, RCM_YAML, [override])
    assert f"'{key}'" in str(err.value)


def test_rcm_defaults_to_scm_without_the_interval_embedding(tmp_path):
    yaml = RCM_YAML.replace("cm: meanflow, meanflow: {cfg_scale: 2.0}, ", "")
    cfg = _cfg(tmp_path, yaml, ["model.interval_embedding=false"])
    assert "cm" not in cfg.phases[1].objective_args


def test_trainer_runs_teacher_then_meanflow(tmp_path, one_thread):
    cfg = _cfg(tmp_path, YAML)
    results = Trainer(cfg, logger=RunLogger(cfg.output_dir, tensorboard=False)).run()
    assert [r.name for r in results] == ["teacher", "mf", "mf_data"]
    for r in results:
        assert r.steps == 3 if r.name == "teacher" else r.steps == 2
        assert r.final_loss == r.final_loss  # finite, not NaN
    out = tmp_path / "out"
    for phase in ("teacher", "mf", "mf_data"):
        sd = load_file(str(out / "phases" / phase / "ema.safetensors"))
        assert any(k.startswith(INTERVAL_KEYS) for k in sd)
    assert "1step_mse" in results[1].metrics and "1step_motion_acc_student" in results[2].metrics


def test_rcm_with_meanflow_cm_takes_a_step(tmp_path):
    cfg = _cfg(tmp_path, RCM_YAML)
    teacher = build_model(cfg.model, cfg.causal).requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    models = PhaseModels.local(teacher)
    obj = build_objective(cfg.phases[1], models)
    assert type(obj.cm).__name__ == "MeanFlowObjective" and obj.cm.teacher is models.teacher
    batch = _batch(torch.float32)
    loss, metrics = obj.loss(Denoiser(student), batch, StepContext(0))
    loss.backward()
    assert torch.isfinite(loss) and "cm/meanflow_loss" in metrics and "dmd_loss" in metrics
    grad = student.condition_embedder.interval_embedder.linear_2.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    obj.after_step(Denoiser(student), batch, StepContext(0))
