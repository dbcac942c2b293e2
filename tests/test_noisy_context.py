"""Noisy context (Causal-rCM context_from_last_step): streaming caches the last denoising forward (N forwards per
chunk), equals the teacher-forcing sequence on the same perturbed context, the rollout follows the same rule
(with the re-noising fallback), and teacher forcing in training perturbs the context the same way."""
import pytest
import torch

from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.inference.streaming import StreamConfig, stream_video
from megatron_rcm.models import build_model
from megatron_rcm.network import BatchNoise, Condition, Denoiser, NoisyContext, StepContext, TeacherForcingContext
from megatron_rcm.selfforcing.rollout import RolloutConfig, self_forcing_rollout

pytestmark = pytest.mark.usefixtures("one_thread")

CTX = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _model(first=1, chunk=2, start=1, level=0.625, on=True, window=0, sink=0, dtype="float64"):
    torch.manual_seed(0)
    causal = CausalConfig(chunk_frames=chunk, first_chunk_frames=first, context_from_last_step=on,
                          context_from_last_step_start_chunk=start, context_noise_level=level,
                          window_chunks=window, sink_chunks=sink)
    return build_model(model_preset("tiny", num_layers=2, param_dtype=dtype), causal).eval()


class Recorder:
    """Every chunk forward of a model: (chunk, latents, FM level, wrote the cache, output)."""

    def __init__(self, model):
        self.calls, self.model, self.orig = [], model, model.forward_chunk
        model.forward_chunk = self

    def __call__(self, x, t, ctx, cache, chunk, write_cache=False, **kw):
        out = self.orig(x, t, ctx, cache, chunk, write_cache=write_cache, **kw)
        self.calls.append((chunk, x.clone(), float(t.flatten()[0]) / 1000, write_cache, out[0].clone()))
        return out

    def close(self):
        self.model.forward_chunk = self.orig


@pytest.mark.parametrize("window,sink", [(0, 0), (2, 1)])
def test_stream_caches_the_last_step_and_equals_teacher_forcing_on_that_context(window, sink):
    """2 steps whose last runs at the context level 5/8: chunks >= 1 take 2 forwards (the last one writes),
    chunk 0 (clean, before the start chunk) 3. Each last-step output equals the teacher-forcing sequence whose
    context copies are exactly what was cached (chunk 0 clean at 0, later chunks their last-step inputs at 5/8)."""
    model = _model(window=window, sink=sink)
    net = Denoiser(model)
    rec = Recorder(model)
    cfg = StreamConfig(steps=2, steps_per_chunk=[2], chunk_schedules=[["5/8"]], trained_frames=7)  # in range
    outs = list(stream_video(model, CTX, 7, 8, 8, cfg, generator=torch.Generator().manual_seed(2)))
    rec.close()
    per_chunk = [[c for c in rec.calls if c[0] == i] for i in range(4)]
    assert [len(c) for c in per_chunk] == [3, 2, 2, 2]
    assert [c[-1][3] for c in per_chunk] == [True] * 4 and [c[-1][2] for c in per_chunk] == [0.0, .625, .625, .625]
    cached = torch.cat([c[-1][1] for c in per_chunk], dim=2)  # what later chunks attend to
    levels = torch.tensor([0.0] + [0.625] * 6, dtype=torch.float64).expand(2, -1)
    last_in = torch.cat([c[-2][1] if i == 0 else c[-1][1] for i, c in enumerate(per_chunk)], dim=2)
    last_s = torch.tensor([per_chunk[0][-2][2]] + [0.625] * 6, dtype=torch.float64).expand(2, -1)
    with torch.no_grad():
        tf, _ = net.teacher_forcing(TeacherForcingContext(cached, levels), last_in, last_s, Condition(CTX))
    last_v = torch.cat([c[-2][4] if i == 0 else c[-1][4] for i, c in enumerate(per_chunk)], dim=2)
    torch.testing.assert_close(last_v, tf, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(torch.cat([o.frames for o in outs], dim=2)).all()


def test_clean_context_takes_n_plus_one_forwards_and_noisy_context_n():
    counts = {}
    for on in (False, True):
        model = _model(first=2, start=0, on=on)
        rec = Recorder(model)
        list(stream_video(model, CTX, 6, 8, 8, StreamConfig(steps=2, timesteps=[1000, 625]),
                          generator=torch.Generator().manual_seed(0)))
        rec.close()
        counts[on] = len(rec.calls)
    assert counts == {False: 9, True: 6}


@pytest.mark.parametrize("exits", [[1, 1, 1], [1, 0, 1]])
def test_rollout_caches_like_the_stream_and_the_cache_free_reference(exits):
    """Exit at the last step: the cached copy is that step's input (the stream's in-step write, no extra noise);
    an early exit (chunk 1 above) re-noises its output to the context level with a fresh draw."""
    model = _model()
    net, shape = Denoiser(model), (2, 3, 5, 8, 8)
    cfg = RolloutConfig(denoising_steps=[1000, 625])
    res = self_forcing_rollout(net, Condition(CTX), shape, cfg, torch.Generator().manual_seed(3), exit_steps=exits,
                               grad=False)
    free = self_forcing_rollout(net, Condition(CTX), shape, cfg, torch.Generator().manual_seed(3), exit_steps=exits,
                                grad=False, use_cache=False)
    torch.testing.assert_close(res.video, free.video, rtol=1e-10, atol=1e-12)
    if exits == [1, 1, 1]:
        outs = list(stream_video(model, CTX, 5, 8, 8, StreamConfig(steps=2, timesteps=[1000, 625]),
                                 generator=torch.Generator().manual_seed(3)))
        torch.testing.assert_close(torch.cat([o.frames for o in outs], dim=2), res.video, rtol=1e-10, atol=1e-12)
    clean = self_forcing_rollout(Denoiser(_model(on=False)), Condition(CTX), shape, cfg,
                                 torch.Generator().manual_seed(3), exit_steps=exits, grad=False)
    assert (clean.video[:, :, 3:] - res.video[:, :, 3:]).abs().max() > 1e-3  # chunk 2 sees another context


def test_teacher_ode_stream_renoises_to_the_context_level():
    from megatron_rcm.inference.sampling import teacher_sample
    from megatron_rcm.config.data import DataConfig

    model = _model(first=2, start=0)
    rec = Recorder(model)
    data = DataConfig(num_frames=4, height=8, width=8)
    teacher_sample(model, {"context": CTX, "uncond_context": CTX.flip(0)}, data, 3, 1.0, seed=0)
    rec.close()
    writes = [c for c in rec.calls if c[3]]
    assert [c[2] for c in writes] == [0.625, 0.625] and len(rec.calls) == 2 * (3 + 1)


def test_training_context_perturbs_chunks_from_the_start_chunk_for_the_global_batch():
    net = Denoiser(_model(first=1, chunk=2, start=1, level=0.625))
    x0 = torch.randn(4, 3, 5, 8, 8, dtype=torch.float64)
    torch.manual_seed(7)
    ctx = net.training_context(x0, BatchNoise())
    torch.manual_seed(7)
    eps = torch.randn_like(x0)
    assert torch.equal(ctx.x[:, :, :1], x0[:, :, :1]) and (ctx.s[:, :1] == 0).all()
    torch.testing.assert_close(ctx.x[:, :, 1:], 0.375 * x0[:, :, 1:] + 0.625 * eps[:, :, 1:], rtol=0, atol=1e-15)
    assert (ctx.s[:, 1:] == 0.625).all()
    halves = []
    for rank in (0, 1):  # data-parallel ranks draw the global batch and keep their rows
        torch.manual_seed(7)
        halves.append(net.training_context(x0[2 * rank:2 * rank + 2], BatchNoise(rank, 2)).x)
    torch.testing.assert_close(torch.cat(halves), ctx.x, rtol=0, atol=0)
    clean = Denoiser(_model(on=False)).training_context(x0, BatchNoise())
    assert clean.x is x0 and clean.s is None
    with pytest.raises(ValueError, match="level"):
        NoisyContext(1.0)


@pytest.mark.parametrize("objective", ["flow_matching", "dcm", "scm", "meanflow"])
def test_every_teacher_forcing_objective_trains_on_the_noisy_context(objective):
    """Every teacher-forcing call of each TF objective (student, JVP and teacher alike) gets the one perturbed
    context of the step: clean before the start chunk, at the context level from it on."""
    from megatron_rcm.objectives import PhaseModels
    from megatron_rcm.training.registry import objectives

    torch.manual_seed(0)
    causal = CausalConfig(chunk_frames=2, first_chunk_frames=1, context_from_last_step=True,
                          context_from_last_step_start_chunk=1)
    model = build_model(model_preset("tiny", num_layers=1, param_dtype="float64", interval_embedding=True), causal)
    cls = objectives()[objective]
    args = {"dcm": {"num_steps": 4}, "scm": {"r_warmup_steps": 2}}.get(objective, {})
    obj = cls.from_phase(cls.parse_config(args, "a"), PhaseModels.local(model) if cls.teacher_role != "none"
                         else PhaseModels())
    batch = {"latents": torch.randn(2, 3, 5, 8, 8, dtype=torch.float64), "context": CTX}
    seen, orig = [], Denoiser.teacher_forcing

    def spy(self, clean, *a, **k):
        seen.append(clean)
        return orig(self, clean, *a, **k)

    Denoiser.teacher_forcing = spy
    try:
        torch.manual_seed(3)
        loss, _ = obj.loss(Denoiser(model), batch, StepContext(5))
    finally:
        Denoiser.teacher_forcing = orig
    assert seen and all(isinstance(c, TeacherForcingContext) and c.s is not None for c in seen)
    assert all(torch.equal(c.x, seen[0].x) for c in seen)  # one perturbed context per step, shared by all calls
    assert (seen[0].s[:, :1] == 0).all() and (seen[0].s[:, 1:] == 0.625).all()
    assert torch.isfinite(loss)
