"""DMD: analytic Gaussian gradient, critic training, wiring to the student, rCM weighting."""
import copy

import pytest
import torch

from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.config.errors import ConfigError
from megatron_rcm.models import build_model
from megatron_rcm.network import Denoiser, StepContext, TrainedSideModel
from megatron_rcm.objectives import Objective, PhaseModels
from megatron_rcm.objectives.dmd import DMDConfig, SelfForcingDMD, dmd_gradient, dmd_loss
from megatron_rcm.objectives.rcm import RCMConfig, RCMObjective
from megatron_rcm.selfforcing.rollout import RolloutConfig

SHAPE = (2, 3, 4, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


def _gauss_x0(x_s, s, mu):
    """E[x0 | x_s] for x0 ~ N(mu, I), x_s = (1-s) x0 + s eps."""
    a = (1 - s) / ((1 - s) ** 2 + s**2)
    return mu + a * (x_s - (1 - s) * mu)


class GaussianScore(torch.nn.Module):
    """Exact FM velocity of N(mu, I) data, with the model call signature."""
    patch = (1, 1, 1)

    def __init__(self, mu):
        super().__init__()
        self.mu = mu
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward_with_tangent(self, x, t, context, tangent=None, timestep_tangent=None, mask=None, actions=None,
                             **_):
        s = (t[:, 0] / 1000).view(-1, 1, 1, 1, 1)
        return (x - _gauss_x0(x, s, self.mu)) / s + 0 * self.dummy, None


def _dmd(teacher, cfg: DMDConfig) -> SelfForcingDMD:
    """DMD as the trainer builds it: the critic is a trainable copy of the teacher (one process here)."""
    return SelfForcingDMD.from_phase(cfg, PhaseModels.local(teacher))


def test_dmd_gradient_gaussians_direction_and_scale():
    torch.manual_seed(0)
    mu_r, mu_f, s = 1.0, -0.5, 0.5
    x0 = mu_f + torch.randn(SHAPE, dtype=torch.float64)
    x_s = (1 - s) * x0 + s * torch.randn(SHAPE, dtype=torch.float64)
    real, fake = _gauss_x0(x_s, s, mu_r), _gauss_x0(x_s, s, mu_f)
    g = dmd_gradient(x0, real, fake)
    k = s**2 / ((1 - s) ** 2 + s**2)  # x0_fake - x0_real = k (mu_f - mu_r), a constant field
    norm = (x0 - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(g, (k * (mu_f - mu_r) / norm).expand_as(g))
    x = x0.clone().requires_grad_(True)
    dmd_loss(x, g).backward()
    torch.testing.assert_close(x.grad, g / g.numel())
    assert float(((-x.grad).mean()) * (mu_r - mu_f)) > 0  # descent moves samples from mu_f towards mu_r


def test_selfforcing_dmd_loss_matches_analytic_scores():
    """End-to-end through SelfForcingDMD with analytic teacher (real) and critic (fake) scores."""
    mu_r, mu_f = 1.0, -0.5
    cfg = DMDConfig(guidance_scale=1.0, min_s=0.4, max_s=0.4, score_mask="full")
    obj = SelfForcingDMD(Denoiser(GaussianScore(mu_r)), cfg, TrainedSideModel.local(GaussianScore(mu_f), lr=0.0))
    x0 = (mu_f + torch.randn(SHAPE)).requires_grad_(True)
    batch = {"context": torch.zeros(2, 8, 32), "uncond_context": None}
    loss, m = obj.loss_from_sample(x0, batch)
    loss.backward()
    s = 0.4
    k = s**2 / ((1 - s) ** 2 + s**2)
    step = -x0.grad * x0.numel()  # = -grad
    # -grad = k (mu_r - mu_f) / mean|x0 - x0_real| per sample: positive and constant within a sample
    for b in range(2):
        assert torch.allclose(step[b], step[b].mean().expand_as(step[b]), atol=1e-4)
        assert float(step[b].mean()) > 0
    ratio = step[0].mean() / (k * (mu_r - mu_f))
    assert 0.2 < float(1 / ratio) < 5  # 1/ratio is the normalizer, an O(1) mean |x0 - x0_real|
    assert m["dmd_loss"] > 0


def _tiny(seed=0, chunk_frames=1):
    torch.manual_seed(seed)
    return build_model(model_preset("tiny", num_layers=1), CausalConfig(chunk_frames=chunk_frames))


def _batch():
    g = torch.Generator().manual_seed(3)
    return {"latents": torch.zeros(SHAPE), "context": torch.randn(2, 8, 32, generator=g),
            "uncond_context": torch.zeros(2, 8, 32)}


def test_dmd_grads_reach_student_only_and_state_roundtrip():
    teacher, student = _tiny(0), Denoiser(_tiny(1, chunk_frames=2))
    cfg = DMDConfig(guidance_scale=3.0, rollout=RolloutConfig(denoising_steps=[1000, 500]), critic_ratio=2)
    obj = _dmd(teacher, cfg)
    critic = obj.critic().model
    loss, m = obj.loss(student, _batch(), StepContext(0))
    loss.backward()
    assert torch.isfinite(loss) and m["dmd_loss"] > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.model.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in critic.parameters())
    assert obj.side_modules() == []
    before = copy.deepcopy(critic.state_dict())
    out = obj.after_step(student, _batch(), StepContext(0))
    assert "critic_loss" in out and all(p.grad is None for p in teacher.parameters())
    changed = any(not torch.equal(before[k], v) for k, v in critic.state_dict().items())
    assert changed
    # what a checkpoint holds: the critic's weights + optimizer (the trainer's) and the objective's RNG state
    obj2 = _dmd(_tiny(0), cfg)
    obj2.critic().model.load_state_dict(critic.state_dict())
    obj2.critic().optimizer.load_state_dict(copy.deepcopy(obj.critic().optimizer.state_dict()))
    obj2.load_state_dict(obj.state_dict())
    m1 = obj.critic_step(_batch(), student=student)
    m2 = obj2.critic_step(_batch(), sample=obj._last_sample)
    assert m1["critic_loss"] == pytest.approx(m2["critic_loss"], rel=1e-5)
    for k, v in obj.critic().model.state_dict().items():
        torch.testing.assert_close(v, obj2.critic().model.state_dict()[k])


@pytest.mark.parametrize("mask", ["block_causal", "full"])
def test_critic_loss_decreases(mask):
    teacher, student = _tiny(0), _tiny(1)
    obj = _dmd(teacher, DMDConfig(critic_lr=2e-3, score_mask=mask, rollout=RolloutConfig(denoising_steps=[1000])))
    batch = _batch()
    with torch.no_grad():
        sample = obj.rollout(Denoiser(student), batch, StepContext().noise, grad=False).video
    losses = [obj.critic_step(batch, sample=sample)["critic_loss"] for _ in range(40)]
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)


class _StubLoss(Objective):
    """loss = coef * sum(w . p): a deterministic objective with a known gradient."""

    def __init__(self, coef, tag):
        self.coef, self.tag, self.after = coef, tag, 0

    def loss(self, student, batch, step):
        l = self.coef * sum(p.sum() for p in student.model.parameters())
        return l, {"part": float(l.detach())}

    def after_step(self, student, batch, step):
        self.after += 1
        return {"critic_loss": 1.0}

    def state_dict(self):
        return {"tag": self.tag}

    def load_state_dict(self, st):
        self.tag = st["tag"]


def test_rcm_applies_weights_exactly():
    student = Denoiser(torch.nn.Linear(3, 2))
    cm, dmd = _StubLoss(2.0, "cm"), _StubLoss(-0.5, "dmd")
    obj = RCMObjective(cm, dmd, RCMConfig(cm_weight=0.3, dmd_weight=2.5))
    step = StepContext(0)
    total, m = obj.loss(student, {}, step)
    l_cm, _ = cm.loss(student, {}, step)
    l_dmd, _ = dmd.loss(student, {}, step)
    torch.testing.assert_close(total, 0.3 * l_cm + 2.5 * l_dmd)
    assert m["cm_loss"] == pytest.approx(float(l_cm.detach())) and m["dmd_loss"] == pytest.approx(float(l_dmd.detach()))
    assert m["rcm_loss"] == pytest.approx(float(total.detach()))
    total.backward()
    n = sum(p.numel() for p in student.model.parameters())
    for p in student.model.parameters():  # d total / d p = 0.3 * 2.0 + 2.5 * (-0.5)
        torch.testing.assert_close(p.grad, torch.full_like(p, 0.3 * 2.0 - 2.5 * 0.5))
    assert n > 0
    out = obj.after_step(student, {}, step)
    assert cm.after == 1 and dmd.after == 1 and "critic_loss" in out and "cm/critic_loss" in out
    st = obj.state_dict()
    assert st == {"dmd": {"tag": "dmd"}, "cm": {"tag": "cm"}}
    obj.load_state_dict(st)
    assert obj.side_modules() == []


def test_rcm_with_real_dmd_reports_both_parts():
    teacher, student = _tiny(0), Denoiser(_tiny(1))
    dmd = _dmd(teacher, DMDConfig(rollout=RolloutConfig(denoising_steps=[1000, 500])))
    obj = RCMObjective(_StubLoss(1.0, "cm"), dmd, RCMConfig(cm_weight=1.0, dmd_weight=0.25))
    total, m = obj.loss(student, _batch(), StepContext(0))
    assert total.item() == pytest.approx(m["cm_loss"] + 0.25 * m["dmd_loss"], rel=1e-5)
    assert "dmd/dmd_grad_norm" in m and "dmd/sf_exit_step" in m


def test_dmd_with_actions_and_cfg():
    torch.manual_seed(0)
    cfg_m = model_preset("tiny", num_layers=1, action_dim=3)
    teacher = build_model(cfg_m, CausalConfig(chunk_frames=2))
    student = Denoiser(build_model(cfg_m, CausalConfig(chunk_frames=2)))
    batch = {**_batch(), "actions": torch.nn.functional.one_hot(torch.randint(3, (2, 4)), 3).float()}
    obj = _dmd(teacher, DMDConfig(guidance_scale=2.0, rollout=RolloutConfig(denoising_steps=[1000, 500])))
    loss, _ = obj.loss(student, batch, StepContext(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert "critic_loss" in obj.after_step(student, batch, StepContext(0))


def test_rcm_with_scm_and_dmd():
    """The real sCM objective + self-forcing DMD: weights exact, adaptive weight trained and checkpointed."""
    from megatron_rcm.objectives.scm import SCMConfig, SCMObjective

    teacher, student = _tiny(0), Denoiser(_tiny(1))
    scm = SCMObjective(Denoiser(teacher), SCMConfig(cfg_scale=2.0))
    dmd = _dmd(teacher, DMDConfig(rollout=RolloutConfig(denoising_steps=[1000, 500])))
    obj = RCMObjective(scm, dmd, RCMConfig(cm_weight=0.7, dmd_weight=0.25))
    batch = {**_batch(), "latents": torch.randn(SHAPE)}
    total, m = obj.loss(student, batch, StepContext(5))
    assert total.item() == pytest.approx(0.7 * m["cm_loss"] + 0.25 * m["dmd_loss"], rel=1e-5)
    assert any(k.startswith("cm/") for k in m) and any(k.startswith("dmd/") for k in m)
    total.backward()
    assert any(p.grad is not None for p in student.model.parameters())
    assert obj.side_modules() == [scm.weighting] and scm.weighting.linear.weight.grad is not None
    assert "critic_loss" in obj.after_step(student, batch, StepContext(5))


def test_dmd_config_from_dict():
    c = SelfForcingDMD.parse_config({"critic_ratio": 5, "rollout": {"denoising_steps": [1000, 500], "shift": 5.0},
                                     "critic_betas": [0.0, 0.99]}, "phases.2.objective_args")
    assert c.critic_ratio == 5 and c.rollout.denoising_steps == [1000, 500] and c.critic_betas == (0.0, 0.99)
    with pytest.raises(ConfigError, match=r"phases.2.objective_args.critic_rate"):
        SelfForcingDMD.parse_config({"critic_rate": 1}, "phases.2.objective_args")
    with pytest.raises(ConfigError, match=r"objective_args.rollout.steps"):
        SelfForcingDMD.parse_config({"rollout": {"steps": [1]}}, "phases.2.objective_args")
    with pytest.raises(ConfigError, match=r"objective_args.score_mask"):
        SelfForcingDMD.parse_config({"score_mask": "diagonal"}, "phases.2.objective_args")
