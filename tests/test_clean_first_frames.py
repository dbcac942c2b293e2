"""``causal.clean_first_frames``: image-to-video training keeps the first frame(s) clean, never noised, loss-free.

Spies on the network calls check what the model is given (the held frame = the clean latents at level 0) and
leaf outputs check what the loss is made of (a reference computed from those same inputs, float64)."""
import pytest
import torch

from megatron_rcm.config.errors import ConfigError
from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.config.run import load_config
from megatron_rcm.models import build_model
from megatron_rcm.network import Condition, Denoiser, StepContext
from megatron_rcm.objectives import DCMConfig, DCMObjective, FMConfig, FlowMatchingObjective
from megatron_rcm.objectives.base import PhaseModels
from megatron_rcm.objectives.dmd import DMDConfig, SelfForcingDMD
from megatron_rcm.selfforcing.rollout import RolloutConfig, self_forcing_rollout

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(held=1, seed=0):
    torch.manual_seed(seed)
    return Denoiser(build_model(model_preset("tiny", num_layers=1, param_dtype="float64"),
                                CausalConfig(chunk_frames=2, clean_first_frames=held)))


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(2, 3, 4, 8, 8, generator=g, dtype=torch.float64),
            "context": torch.randn(2, 8, 32, generator=g, dtype=torch.float64),
            "uncond_context": torch.zeros(2, 8, 32, dtype=torch.float64)}


def _leaf_spy(net, name, seen):
    """Replace ``net.<name>`` by a wrapper recording its inputs and returning its output as a grad-carrying leaf."""
    orig = getattr(net, name)

    def spy(*args, **kw):
        v, dv = orig(*args, **kw)
        v = v.detach().requires_grad_(True)
        seen.append((args, v))
        return v, dv

    setattr(net, name, spy)


def test_flow_matching_holds_the_first_frame_and_leaves_it_out_of_the_loss():
    net, batch = _net(), _batch()
    x0 = batch["latents"]
    seen = []
    _leaf_spy(net, "teacher_forcing", seen)
    torch.manual_seed(4)
    loss, _ = FlowMatchingObjective(FMConfig(shift=1.0)).loss(net, batch, StepContext())
    (_, x, s, _), v = seen[0]
    assert torch.equal(x[:, :, :1], x0[:, :, :1]) and (s[:, :1] == 0).all() and (s[:, 1:] > 0).all()
    sb = s[:, None, :, None, None]
    eps = (x - (1 - sb) * x0)[:, :, 1:] / sb[:, :, 1:]  # the noise the free frames were given
    ref = (v[:, :, 1:] - (eps - x0[:, :, 1:])).pow(2).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-9)  # the loss is taken in float32
    loss.backward()
    assert (v.grad[:, :, :1] == 0).all() and (v.grad[:, :, 1:] != 0).all()

    off, seen_off = _net(held=0), []  # without the option every frame is noised and in the loss
    _leaf_spy(off, "teacher_forcing", seen_off)
    torch.manual_seed(4)
    FlowMatchingObjective(FMConfig(shift=1.0)).loss(off, batch, StepContext())[0].backward()
    (_, x_off, s_off, _), v_off = seen_off[0]
    assert (s_off > 0).all() and (v_off.grad[:, :, :1] != 0).all()


def test_dcm_target_of_the_held_frame_is_the_frame_itself():
    net, batch = _net(), _batch()
    x0 = batch["latents"]
    obj = DCMObjective(_net(seed=3), DCMConfig(num_steps=8, cfg_scale=2.0))
    n = torch.tensor([[3, 5], [0, 7]])
    x_hi, s_hi, f_tgt = obj.target_and_inputs(net, x0, Condition.from_batch(batch), n, torch.randn_like(x0))
    assert torch.equal(x_hi[:, :, :1], x0[:, :, :1]) and (s_hi[:, :1] == 0).all() and (s_hi[:, 1:] > 0).all()
    torch.testing.assert_close(f_tgt[:, :, :1], x0[:, :, :1], rtol=0, atol=1e-12)  # f(x, 0) = x: zero error


def test_rollout_holds_the_first_frame_and_dmd_leaves_it_out():
    net, batch = _net(), _batch()
    x0, cond = batch["latents"], Condition.from_batch(batch)
    calls = []
    orig = net.chunk
    net.chunk = lambda x, s, cc, cache, index, **kw: (calls.append((index, x, s, kw.get("write", False))),
                                                      orig(x, s, cc, cache, index, **kw))[1]
    cfg = RolloutConfig(denoising_steps=[1000, 500])
    kw = dict(exit_steps=[1, 1], grad=False, held=net.held_frames(x0))
    video = self_forcing_rollout(net, cond, tuple(x0.shape), cfg, torch.Generator().manual_seed(2), **kw).video
    assert torch.equal(video[:, :, :1], x0[:, :, :1])
    denoising = [(x, s) for i, x, s, write in calls if i == 0 and not write]
    assert len(denoising) == 2 and all(torch.equal(x[:, :, :1], x0[:, :, :1]) and (s[:, 0] == 0).all() and
                                       (s[:, 1] > 0).all() for x, s in denoising)
    net.chunk = orig
    ref = self_forcing_rollout(net, cond, tuple(x0.shape), cfg, torch.Generator().manual_seed(2), use_cache=False,
                               **kw).video  # the cache-free full-sequence path holds it the same way
    torch.testing.assert_close(video, ref, rtol=1e-9, atol=1e-10)

    teacher = _net(seed=3)
    obj = SelfForcingDMD(teacher, DMDConfig(guidance_scale=2.0), PhaseModels.local(teacher.model).new_critic(lr=1e-4))
    seen = []
    _leaf_spy(teacher, "velocity", seen)
    x_gen = video.detach().clone().requires_grad_(True)
    loss, _ = obj.loss_from_sample(x_gen, batch, student=net)
    loss.backward()
    (x_s, s, _), _ = seen[0]
    assert torch.equal(x_s[:, :, :1], x_gen[:, :, :1]) and (s[:, 0] == 0).all()  # the score sees it clean
    assert (x_gen.grad[:, :, :1] == 0).all() and x_gen.grad[:, :, 1:].abs().sum() > 0
    grad = x_gen.grad[:, :, 1:] * x_gen[:, :, 1:].numel()  # d loss / d x = grad / numel over the free frames
    assert torch.isfinite(grad).all()
    critic = obj.critic().net
    assert critic.clean_first_frames == 1 and torch.isfinite(obj.critic_loss(critic, video, batch))


I2V_RECIPE = """
causal: {chunk_frames: 2}
data: {num_frames: 4, height: 16, width: 16}
phases:
  - {name: teacher, kind: teacher, objective: flow_matching, steps: 1}
  - {name: tf, kind: tf_cm, objective: %s, steps: 1, init_from: teacher, teacher_from: teacher}
  - {name: sf, kind: sf_dmd, objective: dmd, steps: 1, init_from: tf, teacher_from: teacher}
"""


def test_config_checks_clean_first_frames(tmp_path):
    for objective in ("dcm", "scm", "ode_regression"):
        (tmp_path / f"{objective}.yaml").write_text(I2V_RECIPE % objective)
    cfg = load_config(tmp_path / "dcm.yaml", ["causal.clean_first_frames=1"])
    assert cfg.causal.clean_first_frames == 1
    assert load_config(tmp_path / "scm.yaml", ["causal.clean_first_frames=1"]).causal.clean_first_frames == 1
    assert load_config(tmp_path / "ode_regression.yaml", ["causal.clean_first_frames=1"]).causal.clean_first_frames
    from megatron_rcm.objectives.dcm import DCMObjective as objective  # an objective that would not hold them

    objective.holds_clean_frames = False
    try:
        with pytest.raises(ConfigError, match=r"causal.clean_first_frames.*objective dcm"):
            load_config(tmp_path / "dcm.yaml", ["causal.clean_first_frames=1"])
    finally:
        objective.holds_clean_frames = True
    with pytest.raises(ConfigError, match=r"causal.clean_first_frames.*0\.\.2"):
        load_config(tmp_path / "dcm.yaml", ["causal.clean_first_frames=3"])


@pytest.mark.parametrize("held,chunk_frames", [(1, 2), (1, 1)])
def test_samplers_start_an_image_to_video_model_from_the_prompts_first_frames(held, chunk_frames):
    """The report's samplers give a model trained with clean_first_frames its prompts' own first frames (held in
    chunk 0, or the whole chunk 0 when it is that short), for the few-step student and the teacher's ODE alike."""
    from megatron_rcm.data import DataConfig
    from megatron_rcm.inference.sampling import prompt_batch, student_sample, teacher_sample

    torch.manual_seed(0)
    model = build_model(model_preset("tiny", num_layers=1), CausalConfig(chunk_frames=chunk_frames,
                                                                         clean_first_frames=held)).eval()
    data = DataConfig(num_frames=4, height=8, width=8)
    prompts = prompt_batch(data, 2, 0, "cpu")
    for video in (student_sample(model, prompts, data, 2), teacher_sample(model, prompts, data, 3, 2.0, seed=1)):
        assert video.shape == (2, 3, 4, 8, 8) and torch.equal(video[:, :, :held], prompts["latents"][:, :, :held])


def test_free_chunk_mean_leaves_the_held_frames_out():
    from megatron_rcm.network.clean_frames import free_chunk_mean
    from megatron_rcm.ops.chunks import ChunkLayout

    e = torch.rand(2, 3, 5, 2, 2, dtype=torch.float64)
    mean, has = free_chunk_mean(e, ChunkLayout(5, 2, 3), 1)  # chunks of 3 and 2 frames
    torch.testing.assert_close(mean[:, 0], e[:, :, 1:3].flatten(1).mean(1))
    torch.testing.assert_close(mean[:, 1], e[:, :, 3:5].flatten(1).mean(1))
    assert has.all()
    e = torch.rand(2, 3, 6, 2, 2, dtype=torch.float64)
    mean, has = free_chunk_mean(e, ChunkLayout(6, 2, 2), 2)  # the held frames fill chunk 0
    assert has.tolist() == [False, True, True] and torch.equal(mean[:, 0], torch.zeros(2, dtype=e.dtype))


def test_scm_tangent_holds_the_first_frame_fixed():
    """With a held first frame the sCM tangent g is cos t * d f^-/dt with that frame fixed: a central finite
    difference of the stop-grad student along (dx_t/dt on the free frames, dt = 1 on them), float64; g is zero on
    the held frame, and the student's output there gets no gradient."""
    from megatron_rcm.diffusion.flow_matching import bcast
    from megatron_rcm.diffusion.trigflow import fm_from_trig, trig_F_from_v
    from megatron_rcm.objectives import SCMConfig, SCMObjective

    net, batch, sd = _net(), _batch(), 1.0
    x0, cond = batch["latents"], Condition.from_batch(batch)
    obj = SCMObjective(_net(seed=3), SCMConfig(sigma_d=sd, cfg_scale=2.0))
    t = net.layout(x0).to_frames(torch.tensor([[0.4, 1.1], [0.9, 0.6]], dtype=torch.float64))
    x_t = torch.cos(bcast(t, x0)) * x0 + torch.sin(bcast(t, x0)) * sd * torch.randn_like(x0)
    x_t, t = net.hold_clean(x_t, t, x0)
    F_m, g, dxdt = obj.tangent(net, x0, cond, x_t, t, r=1.0)
    moves, moves_t = net.free_mask(x_t)
    assert (g[:, :, :1] == 0).all() and (dxdt[:, :, :1] == 0).all()

    def f(h):  # F^- at (x_t + h dx/dt, t + h) on the free frames, the held frame fixed
        xt, tt = x_t + h * dxdt, t + h * moves_t
        D = bcast(torch.cos(tt) + sd * torch.sin(tt), xt)
        with torch.no_grad():
            v, _ = net.teacher_forcing(x0, xt / D, fm_from_trig(tt, sd), cond)
        return trig_F_from_v(xt, v, tt, sd)

    def diff(h):
        return (f(h) - f(-h)) / (2 * h)

    dF = (4 * diff(5e-6) - diff(1e-5)) / 3  # Richardson: the central difference's h^2 error cancels
    cos, sin = torch.cos(bcast(t, x_t)), torch.sin(bcast(t, x_t))
    g_ref = (-cos**2 * (sd * f(0.0) - dxdt) - cos * sin * (x_t + sd * dF)) * moves
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-8)

    seen = []
    _leaf_spy(net, "teacher_forcing", seen)
    loss, _ = obj.loss(net, batch, StepContext())
    loss.backward()
    (_, x_in, s_in, _), v = seen[-1]  # the student's graph-carrying call
    assert torch.equal(x_in[:, :, :1], x0[:, :, :1]) and (s_in[:, :1] == 0).all()
    assert (v.grad[:, :, :1] == 0).all() and (v.grad[:, :, 1:] != 0).any()


def test_meanflow_holds_the_first_frame():
    from megatron_rcm.objectives import MeanFlowConfig, MeanFlowObjective

    torch.manual_seed(0)
    net = Denoiser(build_model(model_preset("tiny", num_layers=1, param_dtype="float64", interval_embedding=True),
                               CausalConfig(chunk_frames=2, clean_first_frames=1)))
    batch = _batch()
    x0 = batch["latents"]
    calls = []
    orig = net.teacher_forcing

    def spy(clean, z, t, cond, **kw):
        v, dv = orig(clean, z, t, cond, **kw)
        v = v.detach().requires_grad_(True) if kw.get("tangent") is None else v
        calls.append((z, t, kw, v))
        return v, dv

    net.teacher_forcing = spy
    loss, _ = MeanFlowObjective(MeanFlowConfig(ratio_r_neq_t=1.0)).loss(net, batch, StepContext())
    loss.backward()
    (z_j, t_j, kw_j, _), (z, t, kw, v) = calls
    for zz, tt, k in ((z_j, t_j, kw_j), (z, t, kw)):
        assert torch.equal(zz[:, :, :1], x0[:, :, :1]) and (tt[:, :1] == 0).all() and (k["interval"][:, :1] == 0).all()
    assert (kw_j["tangent"][:, :, :1] == 0).all() and (kw_j["s_tangent"][:, :1] == 0).all()
    assert (kw_j["s_tangent"][:, 1:] == 1).all() and (kw_j["tangent"][:, :, 1:] != 0).any()
    assert (v.grad[:, :, :1] == 0).all() and (v.grad[:, :, 1:] != 0).any()


def test_ode_regression_holds_the_odes_first_frame():
    from megatron_rcm.objectives.ode_regression import ODERegressionObjective

    net, batch = _net(), _batch()
    g = torch.Generator().manual_seed(5)
    batch["trajectory"] = torch.randn(2, 3, 3, 4, 8, 8, generator=g, dtype=torch.float64)
    batch["trajectory_levels"] = torch.tensor([[1.0, 0.75, 0.5]] * 2, dtype=torch.float64)
    seen = []
    _leaf_spy(net, "velocity", seen)
    loss, _ = ODERegressionObjective().loss(net, batch, StepContext())
    loss.backward()
    (x, s, _), v = seen[0]
    assert torch.equal(x[:, :, :1], batch["latents"][:, :, :1]) and (s[:, 0] == 0).all() and (s[:, 1:] > 0).all()
    assert (v.grad[:, :, :1] == 0).all() and (v.grad[:, :, 1:] != 0).any()


def test_replayed_rollout_holds_the_first_frame_with_the_direct_gradients():
    """Replayed backprop with a held frame (first chunk of 3, chunks of 2): the video and the parameter gradients
    equal the direct rollout's (float64)."""
    torch.manual_seed(0)
    model = build_model(model_preset("tiny", num_layers=2, param_dtype="float64"),
                        CausalConfig(chunk_frames=2, first_chunk_frames=3, clean_first_frames=1))
    net, batch = Denoiser(model), _batch()
    x0 = torch.randn(2, 3, 7, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    weight = torch.randn(2, 3, 7, 8, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    out = []
    for replay in (False, True):
        model.zero_grad(set_to_none=True)
        cfg = RolloutConfig(denoising_steps=[1000, 750, 500], replayed_backprop=replay)
        res = self_forcing_rollout(net, Condition.from_batch(batch), (2, 3, 7, 8, 8), cfg,
                                   torch.Generator().manual_seed(2), exit_steps=[2, 1, 0], held=net.held_frames(x0))
        (res.video * weight).sum().backward()
        out.append((res.video.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (video_d, direct), (video_r, replayed) = out
    assert torch.equal(video_d[:, :, :1], x0[:, :, :1])
    torch.testing.assert_close(video_r, video_d, rtol=1e-12, atol=1e-13)
    assert direct.keys() == replayed.keys() and len(direct) > 10
    for name in direct:
        torch.testing.assert_close(replayed[name], direct[name], rtol=1e-9, atol=1e-12, msg=name)
