"""Replayed self-forcing backprop (Causal-rCM replayed_training): the rollout runs without gradients and each
chunk's exit step is recomputed in backward against the cache as it was; gradients equal the direct rollout's
(float64), the forward keeps no activations, and the DMD objective trains the same with it."""
import pytest
import torch

from megatron_rcm.config.errors import ConfigError
from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.models import build_model
from megatron_rcm.network import Condition, Denoiser
from megatron_rcm.selfforcing.rollout import RolloutConfig, self_forcing_rollout

pytestmark = pytest.mark.usefixtures("one_thread")

CTX = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
SCHEDULE = dict(denoising_steps=[1000, 750, 500, 250], steps_per_chunk=[4, 2])


def _model(window=0, sink=0, noisy=False, ckpt=False):
    torch.manual_seed(0)
    causal = CausalConfig(chunk_frames=2, first_chunk_frames=1, window_chunks=window, sink_chunks=sink,
                          context_from_last_step=noisy, context_from_last_step_start_chunk=1)
    model = build_model(model_preset("tiny", num_layers=2, param_dtype="float64"), causal)
    model.gradient_checkpointing = ckpt
    return model


def _grads(model, replay, exits, weight):
    model.zero_grad(set_to_none=True)
    cfg = RolloutConfig(**SCHEDULE, replayed_backprop=replay)
    res = self_forcing_rollout(Denoiser(model), Condition(CTX), (2, 3, 7, 8, 8), cfg, torch.Generator().manual_seed(2),
                               exit_steps=exits)
    (res.video * weight).sum().backward()
    return res.video.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("window,sink,noisy,ckpt,exits", [(0, 0, False, False, [3, 1, 1, 1]),
                                                          (2, 1, False, False, [2, 1, 0, 1]),
                                                          (0, 0, True, True, [1, 1, 0, 1])])
def test_replayed_gradients_equal_the_direct_rollout(window, sink, noisy, ckpt, exits):
    model = _model(window, sink, noisy, ckpt)
    weight = torch.randn(2, 3, 7, 8, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    video_d, direct = _grads(model, False, exits, weight)
    video_r, replayed = _grads(model, True, exits, weight)
    torch.testing.assert_close(video_r, video_d, rtol=1e-12, atol=1e-13)
    assert direct.keys() == replayed.keys() and len(direct) > 10
    for name in direct:
        torch.testing.assert_close(replayed[name], direct[name], rtol=1e-9, atol=1e-12, msg=name)


def test_replayed_rollout_keeps_no_activations_and_recomputes_one_chunk_at_a_time():
    model = _model()
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    def rollout(replay):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            res = self_forcing_rollout(Denoiser(model), Condition(CTX), (2, 3, 7, 8, 8),
                                       RolloutConfig(**SCHEDULE, replayed_backprop=replay),
                                       torch.Generator().manual_seed(2), exit_steps=[3, 1, 1, 1])
        return res, sum(saved)

    direct, direct_bytes = rollout(False)
    replay, replay_bytes = rollout(True)
    assert direct_bytes > 10_000 and replay_bytes == 0  # the direct graph holds every chunk's activations
    per_chunk = []
    orig = model.forward_chunk

    def spy(*a, **k):
        before = len(saved)
        out = orig(*a, **k)
        per_chunk.append(sum(saved[before:]))
        return out

    model.forward_chunk = spy
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        replay.video.sum().backward()
    model.forward_chunk = orig
    assert len(per_chunk) == 4 and max(per_chunk) < direct_bytes / 2  # one chunk's graph at a time


def test_dmd_with_replayed_backprop_gives_the_same_step():
    from megatron_rcm.network import StepContext
    from megatron_rcm.objectives import PhaseModels, SelfForcingDMD

    results = []
    for replay in (False, True):
        model = _model()
        teacher = _model().eval().requires_grad_(False)
        cfg = SelfForcingDMD.parse_config({"rollout": {**SCHEDULE, "replayed_backprop": replay}, "seed": 3}, "a")
        obj = SelfForcingDMD.from_phase(cfg, PhaseModels.local(teacher))
        batch = {"latents": torch.zeros(2, 3, 7, 8, 8, dtype=torch.float64), "context": CTX, "uncond_context": CTX * 0}
        torch.manual_seed(4)
        loss, _ = obj.loss(Denoiser(model), batch, StepContext(0))
        loss.backward()
        results.append((float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12) and results[0][0] > 0
    assert sum(float(g.abs().sum()) for g in results[0][1]) > 0
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-13)


def test_replay_is_refused_under_pipeline_parallelism():
    from megatron_rcm.config.run import load_config

    phases = ("phases=[{name: t, kind: teacher, objective: flow_matching}, {name: d, kind: sf_dmd, objective: dmd, "
              "teacher_from: t, objective_args: {rollout: {replayed_backprop: true}}}]")
    load_config(None, [phases, "parallel.tp=2"])
    with pytest.raises(ConfigError) as e:
        load_config(None, [phases, "parallel.pp=2"])
    assert e.value.key == "phases.1.objective_args.rollout.replayed_backprop"
