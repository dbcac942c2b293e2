"""Per-chunk step schedules (Causal-rCM steps_per_chunk / mid_t_schedules / sigma_max): resolution, validation
naming the key, and the rollout and streaming that use them (one definition for both)."""
import random

import pytest
import torch

from megatron_rcm.config.errors import ConfigError
from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.diffusion.step_schedule import StepScheduleConfig, build_schedule, parse_chunk_schedules
from megatron_rcm.inference.streaming import StreamConfig, stream_video
from megatron_rcm.models import build_model
from megatron_rcm.network import Condition, Denoiser
from megatron_rcm.selfforcing.rollout import RolloutConfig, draw_exit_steps, self_forcing_rollout

pytestmark = pytest.mark.usefixtures("one_thread")

REFERENCE_2STEP = dict(steps_per_chunk=[4, 2], chunk_schedules=[["15/16", "5/6", "5/8"], ["5/6"]], sigma_max=1600.0)


def test_reference_two_step_schedule_expands_over_chunks():
    sched = build_schedule(StepScheduleConfig(**REFERENCE_2STEP))
    first = 1600 / 1601
    assert sched.levels(0) == pytest.approx((first, 15 / 16, 5 / 6, 5 / 8), abs=1e-15)
    for chunk in (1, 2, 20):  # the last entry repeats
        assert sched.levels(chunk) == pytest.approx((first, 5 / 6), abs=1e-15)
    assert [sched.steps(i) for i in range(3)] == [4, 2, 2] and sched.last_level(5) == pytest.approx(5 / 6)
    # no explicit schedules: a k-step chunk takes the first k levels of denoising_steps (the prefix rule)
    prefix = build_schedule(StepScheduleConfig(denoising_steps=[1000, 750, 500, 250], steps_per_chunk=[4, 1]))
    assert prefix.levels(0) == (1.0, 0.75, 0.5, 0.25) and prefix.levels(3) == (1.0,)
    shifted = build_schedule(StepScheduleConfig(denoising_steps=[1000, 500], shift=3.0))
    assert shifted.levels(7) == pytest.approx((1.0, 0.75))  # 3 * 0.5 / (1 + 2 * 0.5)
    assert parse_chunk_schedules("15/16,5/6,5/8;") == [[15 / 16, 5 / 6, 5 / 8], []]


@pytest.mark.parametrize("fields,key", [
    ({"steps_per_chunk": [2, 4]}, "r.steps_per_chunk"),  # increasing
    ({"steps_per_chunk": [0]}, "r.steps_per_chunk"),
    ({"chunk_schedules": [[0.5]]}, "r.chunk_schedules"),  # without steps_per_chunk
    ({"steps_per_chunk": [4, 2], "chunk_schedules": [[0.9, 0.8, 0.6]]}, "r.chunk_schedules"),  # one per entry
    ({"steps_per_chunk": [3], "chunk_schedules": [[0.5]]}, "r.chunk_schedules.0"),  # 2 mid times for 3 steps
    ({"steps_per_chunk": [3], "chunk_schedules": [[0.4, 0.6]]}, "r.chunk_schedules.0"),  # not decreasing
    ({"steps_per_chunk": [2], "chunk_schedules": [["5/0"]]}, "r.chunk_schedules.0"),
    ({"steps_per_chunk": [5]}, "r.steps_per_chunk.0"),  # more than the 4 levels of denoising_steps
    ({"denoising_steps": [1500]}, "r.denoising_steps"),
    ({"sigma_max": -1.0}, "r.sigma_max"),
])
def test_bad_schedules_name_the_key(fields, key):
    with pytest.raises(ConfigError) as e:
        build_schedule(StepScheduleConfig(**fields), "r")
    assert e.value.key == key


def test_shared_exit_step_is_capped_by_each_chunks_step_count():
    cfg = RolloutConfig(**REFERENCE_2STEP)
    seen = {tuple(draw_exit_steps([4, 2, 2], cfg, random.Random(seed))) for seed in range(40)}
    assert seen == {(0, 0, 0), (1, 1, 1), (2, 1, 1), (3, 1, 1)}
    assert draw_exit_steps([4, 2, 2], RolloutConfig(last_step_only=True), random.Random(0)) == [3, 1, 1]
    free = [draw_exit_steps([4, 2, 2], RolloutConfig(sync_exit_across_chunks=False), random.Random(s)) for s in range(40)]
    assert all(e[0] < 4 and e[1] < 2 and e[2] < 2 for e in free) and len({e[0] for e in free}) == 4


def _model(first=1, chunk=2):
    torch.manual_seed(0)
    return build_model(model_preset("tiny", num_layers=1, param_dtype="float64"),
                       CausalConfig(chunk_frames=chunk, first_chunk_frames=first)).eval()


CTX = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_rollout_runs_each_chunks_own_steps_and_streaming_reproduces_it():
    model = _model()
    net, shape = Denoiser(model), (2, 3, 5, 8, 8)  # chunks of 1, 2, 2 frames
    cfg = RolloutConfig(**REFERENCE_2STEP)
    levels_seen = []
    orig = model.forward_chunk

    def spy(x, t, ctx, cache, chunk, **kw):
        if not kw.get("write_cache"):
            levels_seen.append((chunk, round(float(t.flatten()[0]) / 1000, 6)))
        return orig(x, t, ctx, cache, chunk, **kw)

    model.forward_chunk = spy
    res = self_forcing_rollout(net, Condition(CTX), shape, cfg, torch.Generator().manual_seed(4), exit_steps=[3, 1, 1],
                               grad=False)
    model.forward_chunk = orig
    r = lambda v: round(v, 6)  # noqa: E731
    assert levels_seen == [(0, r(1600 / 1601)), (0, r(15 / 16)), (0, r(5 / 6)), (0, 0.625),
                           (1, r(1600 / 1601)), (1, r(5 / 6)), (2, r(1600 / 1601)), (2, r(5 / 6))]
    free = self_forcing_rollout(net, Condition(CTX), shape, cfg, torch.Generator().manual_seed(4),
                                exit_steps=[3, 1, 1], grad=False, use_cache=False)
    torch.testing.assert_close(res.video, free.video, rtol=1e-10, atol=1e-12)
    stream_cfg = StreamConfig(steps=4, timesteps=[1000, 750, 500, 250], **REFERENCE_2STEP)
    outs = list(stream_video(model, CTX, 5, 8, 8, stream_cfg, generator=torch.Generator().manual_seed(4)))
    torch.testing.assert_close(torch.cat([o.frames for o in outs], dim=2), res.video, rtol=1e-10, atol=1e-12)


def test_stream_config_errors_name_the_cli_flags():
    with pytest.raises(ConfigError, match="--steps-per-chunk"):
        StreamConfig(steps_per_chunk=[1, 2]).schedule()
    with pytest.raises(ConfigError, match="--mid-t-schedules"):
        StreamConfig(steps_per_chunk=[3, 2], chunk_schedules=[[0.5], [0.5]]).schedule()


def test_dmd_config_checks_its_rollout_schedule_at_load():
    from megatron_rcm.config.run import load_config

    phases = ("phases=[{name: t, kind: teacher, objective: flow_matching}, {name: d, kind: sf_dmd, objective: dmd, "
              "teacher_from: t, objective_args: {rollout: {steps_per_chunk: [2, 3]}}}]")
    with pytest.raises(ConfigError) as e:
        load_config(None, [phases])
    assert e.value.key == "phases.1.objective_args.rollout.steps_per_chunk"
