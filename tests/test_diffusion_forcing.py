"""Diffusion forcing (objective ``diffusion_forcing``): flow matching on the plain block-causal video with a noise
level per chunk, against a hand computation (float64), its causality, and its config/layout rules."""
import pytest
import torch

from megatron_rcm.config.errors import ConfigError
from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.models import build_model
from megatron_rcm.network import Denoiser, StepContext
from megatron_rcm.objectives import DiffusionForcingConfig, DiffusionForcingObjective
from megatron_rcm.ops.masks import block_causal_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(0)
    return build_model(model_preset("tiny", num_layers=2, param_dtype="float64"),
                       CausalConfig(chunk_frames=2, first_chunk_frames=1))


def _batch():
    g = torch.Generator().manual_seed(3)
    return {"latents": torch.randn(2, 3, 5, 8, 8, generator=g, dtype=torch.float64),
            "context": torch.randn(2, 8, 32, generator=g, dtype=torch.float64)}


@pytest.mark.parametrize("chunk_levels", ["independent", "same"])
def test_loss_equals_flow_matching_on_the_block_causal_video_by_hand(chunk_levels):
    model, batch = _model(), _batch()
    obj = DiffusionForcingObjective(DiffusionForcingConfig(shift=2.0, chunk_levels=chunk_levels))
    torch.manual_seed(11)
    loss, metrics = obj.loss(Denoiser(model), batch, StepContext(0))
    # the same draws in the same order: one logit-normal level per chunk (or per sample), then the noise
    torch.manual_seed(11)
    per = 3 if chunk_levels == "independent" else 1
    u = torch.sigmoid(torch.randn(2, per, dtype=torch.float64))
    s_chunk = (2 * u / (1 + u)).expand(2, 3)
    s = torch.cat([s_chunk[:, :1], s_chunk[:, 1:2].expand(2, 2), s_chunk[:, 2:].expand(2, 2)], dim=1)  # 1 + 2 + 2
    x0 = batch["latents"]
    eps = torch.randn_like(x0)
    x_s = (1 - s[:, None, :, None, None]) * x0 + s[:, None, :, None, None] * eps
    mask = block_causal_mask(5, model.tokens_per_frame(8, 8), 2, first_chunk_frames=1)
    v = model(x_s, 1000 * s, batch["context"], mask=mask)
    ref = (v - (eps - x0)).pow(2).mean()
    # the objective takes the squared error in float32 (as flow matching does): float32 rounding only
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6) and metrics["df_loss"] == pytest.approx(float(ref.detach()))
    assert bool((s_chunk[:, 0] != s_chunk[:, 1]).all()) == (chunk_levels == "independent")


def test_a_chunk_never_sees_later_noisy_chunks():
    model, batch = _model(), _batch()
    net = Denoiser(model)
    x = batch["latents"].clone().requires_grad_(True)
    s = torch.rand(2, 5, dtype=torch.float64)
    v, _ = net.velocity(x, s, __import__("megatron_rcm.network", fromlist=["Condition"]).Condition(batch["context"]),
                        attend="block_causal")
    (grad,) = torch.autograd.grad(v[:, :, :3].sum(), x)  # chunks 0 (frame 0) and 1 (frames 1-2)
    assert grad[:, :, 3:].abs().max() == 0 and grad[:, :, :3].abs().max() > 0


def test_config_and_context_parallel_rules():
    from megatron_rcm.config.run import load_config

    df = "phases=[{name: t, kind: teacher, objective: diffusion_forcing, objective_args: {chunk_levels: same}}]"
    load_config(None, [df])
    with pytest.raises(ConfigError, match="chunk_levels"):
        load_config(None, [df.replace("same", "per_frame")])
    with pytest.raises(ConfigError, match="teacher_from"):
        load_config(None, ["phases=[{name: a, kind: teacher, objective: flow_matching}, {name: t, kind: teacher, "
                           "objective: diffusion_forcing, teacher_from: a}]"])
    # the plain video has 3 frames: cp=2 cannot split it (the [clean ; noisy] sequence of TF-FM has 6)
    odd = ["data.num_frames=3", "causal.chunk_frames=1", "parallel.cp=2"]
    load_config(None, odd + [df.replace("diffusion_forcing", "flow_matching").replace(
        ", objective_args: {chunk_levels: same}", "")])
    with pytest.raises(ConfigError, match="parallel.cp"):
        load_config(None, odd + [df])
