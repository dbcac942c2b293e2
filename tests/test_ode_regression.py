"""ODE-regression initialisation: the teacher's ODE states at a student's levels (exact for Gaussian data, same
noise and end point as the teacher's sampler), and the ``ode_regression`` loss from stored and from on-the-fly
trajectories against hand computations (float64)."""
import pytest
import torch

from megatron_rcm.config.data import DataConfig
from megatron_rcm.config.errors import ConfigError
from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.diffusion.flow_matching import bcast
from megatron_rcm.diffusion.samplers import multistep2_fm, ode_trajectory, trajectory_grid
from megatron_rcm.inference.sampling import teacher_sample
from megatron_rcm.inference.trajectory import sample_trajectory, teacher_trajectory
from megatron_rcm.models import build_model
from megatron_rcm.network import Condition, Denoiser, StepContext
from megatron_rcm.objectives import ODERegressionConfig, ODERegressionObjective
from megatron_rcm.ops.masks import block_causal_mask

pytestmark = pytest.mark.usefixtures("one_thread")
M, Q = 0.3, 0.7  # Gaussian data N(M, Q^2) per element: the FM ODE is affine, x_s = (1 - s) M + sigma(s) eps


def _exact_v(x, s):
    s = bcast(s, x)
    var = (1 - s) ** 2 * Q**2 + s**2
    dev = x - (1 - s) * M
    return s / var * dev - (M + (1 - s) * Q**2 / var * dev)


def test_ode_states_at_off_grid_levels_follow_the_exact_flow():
    eps = torch.randn(2, 3, 4, 2, 2, dtype=torch.float64)
    levels = [1.0, 0.7, 0.37, 0.11]  # 0.37 and 0.11 are not grid points: inserted into the ODE grid
    assert len(trajectory_grid(160, 1.0, levels)) == 161 + 2
    x0, states = ode_trajectory(multistep2_fm, _exact_v, eps, 160, 1.0, levels)
    assert torch.equal(states[0], eps)
    for s, state in zip(levels, states):  # 2nd-order solver error ~1.5e-4 here; one grid step off is ~5e-3
        exact = (1 - s) * M + ((1 - s) ** 2 * Q**2 + s**2) ** 0.5 * eps
        assert (state - exact).abs().max() < 3e-4, s
    assert (x0 - (M + Q * eps)).abs().max() < 1e-3


def _model(dtype="float64"):
    torch.manual_seed(0)
    return build_model(model_preset("tiny", num_layers=1, param_dtype=dtype), CausalConfig(chunk_frames=2,
                                                                                         first_chunk_frames=1))


CTX = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_causal_teacher_trajectory_has_the_teacher_samples_noise_and_end_point():
    model = _model().eval()
    prompts = {"context": CTX, "uncond_context": CTX.flip(0)}
    data = DataConfig(num_frames=5, height=8, width=8)
    got = sample_trajectory(model, prompts, data, 4, 2.0, seed=3, shift=1.0, levels=[1.0, 0.5])  # on the 4-step grid
    ref = teacher_sample(model, prompts, data, 4, 2.0, seed=3)
    torch.testing.assert_close(got["latents"], ref.float(), rtol=0, atol=0)
    noise = torch.randn(2, 3, 5, 8, 8, generator=torch.Generator().manual_seed(3))
    assert got["trajectory"].shape == (2, 2, 3, 5, 8, 8) and torch.equal(got["trajectory"][:, 0], noise)
    assert got["trajectory_levels"].tolist() == [[1.0, 0.5]] * 2


def _loss_by_hand(model, batch, states, levels, target, pick):
    """Every chunk (1 + 2 + 2 frames) at its picked level, the block-causal video, x0 = x - s v vs the ODE's x0."""
    frames = torch.cat([pick[:, :1], pick[:, 1:2].repeat(1, 2), pick[:, 2:].repeat(1, 2)], dim=1)  # [B, 5]
    x = torch.stack([states[b, frames[b, f], :, f] for b in range(2) for f in range(5)]).view(2, 5, 3, 8, 8)
    x = x.permute(0, 2, 1, 3, 4)
    s = torch.stack([levels[b, frames[b]] for b in range(2)])
    v = model(x, 1000 * s, batch["context"], mask=block_causal_mask(5, model.tokens_per_frame(8, 8), 2,
                                                                      first_chunk_frames=1))
    return ((x - s[:, None, :, None, None] * v) - target).pow(2).mean()


def test_loss_from_stored_trajectories_equals_the_hand_computation():
    model = _model()
    g = torch.Generator().manual_seed(4)
    states = torch.randn(2, 3, 3, 5, 8, 8, generator=g, dtype=torch.float64)
    levels = torch.tensor([[1.0, 0.6, 0.2]] * 2, dtype=torch.float64)
    batch = {"latents": torch.randn(2, 3, 5, 8, 8, generator=g, dtype=torch.float64), "context": CTX,
             "trajectory": states, "trajectory_levels": levels}
    torch.manual_seed(8)
    loss, metrics = ODERegressionObjective().loss(Denoiser(model), batch, StepContext(0))
    torch.manual_seed(8)
    pick = torch.randint(0, 3, (2, 3))
    ref = _loss_by_hand(model, batch, states, levels, batch["latents"], pick)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6) and 0.2 < metrics["ode_level"] < 1
    assert len(set(pick.flatten().tolist())) > 1  # chunks at different levels in this draw


def test_on_the_fly_trajectory_equals_the_stored_one_from_the_same_noise():
    model, teacher = _model(), _model().eval().requires_grad_(False)
    cfg = ODERegressionConfig(denoising_steps=[1000, 500], ode_steps=2, guidance_scale=2.0)
    obj = ODERegressionObjective(cfg, Denoiser(teacher))
    batch = {"latents": torch.zeros(2, 3, 5, 8, 8, dtype=torch.float64), "context": CTX, "uncond_context": CTX * 0}
    torch.manual_seed(5)
    loss, _ = obj.loss(Denoiser(model), batch, StepContext(0))
    torch.manual_seed(5)
    noise = torch.randn(2, 3, 5, 8, 8, dtype=torch.float64)
    x0, states = teacher_trajectory(Denoiser(teacher), Condition(CTX, CTX * 0), noise, [1.0, 0.5], 2, 1.0, 2.0)
    pick = torch.randint(0, 2, (2, 3))
    ref = _loss_by_hand(model, batch, states, torch.tensor([[1.0, 0.5]] * 2, dtype=torch.float64), x0, pick)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)


def test_without_trajectories_or_teacher_the_config_says_what_to_do():
    from megatron_rcm.config.run import load_config

    ode = "phases=[{name: t, kind: teacher, objective: flow_matching}, {name: o, kind: tf_cm, objective: ode_regression}]"
    with pytest.raises(ConfigError, match="phases.1.teacher_from"):
        load_config(None, [ode])
    load_config(None, [ode.replace("ode_regression}", "ode_regression, teacher_from: t}")])
    load_config(None, [ode, "data.kind=latent_shards", "data.shard_dir=/nowhere"])
    with pytest.raises(ConfigError, match="teacher_mask"):
        load_config(None, [ode.replace("ode_regression}", "ode_regression, teacher_from: t, "
                                                          "objective_args: {teacher_mask: causal}}")])
    batch = {"latents": torch.zeros(1, 3, 5, 8, 8), "context": CTX[:1].float()}
    with pytest.raises(ConfigError, match="data.shard_dir"):
        ODERegressionObjective().loss(Denoiser(_model("float32")), batch, StepContext(0))
