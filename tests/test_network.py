"""The network seam (megatron_rcm/network): time scale, time layout, masks, CFG, stream caches, the pipeline
hook and global-batch noise, each against plain model calls in Wan units (float64)."""
from functools import partial
from pathlib import Path

import pytest
import torch

from conftest import rel_err
from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.diffusion.samplers import euler_fm
from megatron_rcm.inference.streaming import chunkwise, stream_chunks
from megatron_rcm.models import build_model
from megatron_rcm.network import BatchNoise, Condition, Denoiser, StepContext
from megatron_rcm.ops.chunks import ChunkLayout
from megatron_rcm.ops.masks import block_causal_mask, teacher_forcing_mask

B, F, H, W = 2, 4, 8, 8


def _model(chunk=2, seed=0):
    torch.manual_seed(seed)
    return build_model(model_preset("tiny", num_layers=1, param_dtype="float64"),
                       CausalConfig(chunk_frames=chunk, attention_backend="reference")).eval()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, F, H, W, generator=g, dtype=torch.float64)
    return x, torch.randn(B, 8, 32, generator=g, dtype=torch.float64), torch.randn(B, 8, 32, generator=g,
                                                                                    dtype=torch.float64)


def test_time_scale_and_layout_equal_plain_wan_calls():
    model = _model()
    net, (x, ctx, _) = Denoiser(model), _inputs()
    s = torch.rand(B, F, dtype=torch.float64)
    mask = block_causal_mask(F, 4, 2)
    ref = model(x, 1000 * s, ctx, mask)
    torch.testing.assert_close(net.velocity(x, s, Condition(ctx), attend="block_causal")[0], ref, rtol=0, atol=0)
    for level, wan in ((0.3, torch.full((B, F), 300.0)), (torch.tensor([0.2, 0.9], dtype=torch.float64), torch.tensor([[200.0] * F,
                                                                                                  [900.0] * F]))):
        torch.testing.assert_close(net.velocity(x, level, Condition(ctx))[0], model(x, wan.double(), ctx))
    with pytest.raises(ValueError, match="ChunkLayout.to_frames"):
        net.velocity(x, torch.rand(B, 2), Condition(ctx))  # per-chunk levels must be spread explicitly
    assert net.mask("block_causal", x) is net.mask("block_causal", x)  # built once per geometry
    assert net.mask("full", x) is None


@pytest.mark.parametrize("call", ["velocity", "teacher_forcing"])
def test_guidance_combines_output_and_tangent_of_one_batched_forward(call):
    model = _model()
    net, (x, ctx, unc) = Denoiser(model), _inputs()
    s, dx, ds = torch.rand(B, F, dtype=torch.float64), torch.randn_like(x), torch.rand(B, F, dtype=torch.float64)
    w = 2.5
    with torch.no_grad():
        if call == "velocity":
            got = net.velocity(x, s, Condition(ctx, unc), guidance=w, tangent=dx, s_tangent=ds)
            run = lambda c: model.forward_with_tangent(x, 1000 * s, c, dx, 1000 * ds)  # noqa: E731
        else:
            clean = torch.randn_like(x)
            got = net.teacher_forcing(clean, x, s, Condition(ctx, unc), guidance=w, tangent=dx, s_tangent=ds)
            mask = teacher_forcing_mask(F, 4, 2)
            run = lambda c: model.forward_teacher_forcing(clean, x, 1000 * s, c, mask, dx, 1000 * ds)  # noqa: E731
        (vc, dvc), (vu, dvu) = run(ctx), run(unc)
    assert rel_err(got[0], vu + w * (vc - vu)) < 1e-12 and rel_err(got[1], dvu + w * (dvc - dvu)) < 1e-12
    plain = net.velocity(x, s, Condition(ctx, unc), guidance=1.0)[0]  # scale 1: the conditional branch alone
    torch.testing.assert_close(plain, model(x, 1000 * s, ctx))


def _stream(net, x_noise, cond, guidance, steps=2):
    starts = iter(torch.split(x_noise, 2, dim=2))
    chunks = stream_chunks(net, cond, F, H, W, chunkwise(partial(euler_fm, steps=steps, shift=3.0)),
                           lambda _c, _s: next(starts), guidance)
    return torch.cat([c.frames for c in chunks], dim=2)


def test_chunk_stream_equals_the_block_causal_forward():
    """An ODE sampled chunk by chunk with the KV cache equals the same ODE on [clean chunk 0 ; chunk 1]."""
    model = _model()
    net, (noise, ctx, _) = Denoiser(model), _inputs()
    out = _stream(net, noise, Condition(ctx), 1.0)
    mask = block_causal_mask(F, 4, 2)

    def fn(x, s):
        seq = torch.cat([out[:, :, :2], x], 2)
        t = torch.cat([torch.zeros(B, 2), torch.full((B, 2), 1000 * s)], 1).double()
        return model(seq, t, ctx, mask)[:, :, 2:]

    assert rel_err(out[:, :, 2:], euler_fm(fn, noise[:, :, 2:], 2, 3.0)) < 1e-10


def test_guided_stream_keeps_one_doubled_cache_per_pair_of_branches():
    model = _model()
    net, (noise, ctx, unc) = Denoiser(model), _inputs()
    plain = _stream(net, noise, Condition(ctx), 1.0, steps=3)
    same = _stream(net, noise, Condition(ctx, ctx), 3.0, steps=3)  # uncond == cond: guidance is a no-op
    assert rel_err(same, plain) < 1e-10
    guided = _stream(net, noise, Condition(ctx, unc), 3.0, steps=3)
    assert rel_err(guided, plain) > 1e-3
    cache = net.new_cache(H, W, Condition(ctx, unc), 3.0)
    assert cache.guided and not net.new_cache(H, W, Condition(ctx), 3.0).guided


def test_every_objective_call_goes_through_the_pipeline_hook():
    """The layout installs ``model.parallel.share_stage_outputs``; the seam calls it once per network call
    (the cache writes excepted: their output is not used)."""
    from megatron_rcm.objectives.dmd import DMDConfig, SelfForcingDMD
    from megatron_rcm.objectives import PhaseModels
    from megatron_rcm.selfforcing.rollout import RolloutConfig

    class Hook:  # what parallelize_model installs (here: no collectives, one stage)
        pp, cp, calls = 1, 1, 0

        @staticmethod
        def owns_layer(i):
            return True

        def share_stage_outputs(self, outputs, likes):
            Hook.calls += 1
            assert len(outputs) == len(likes) == 2 and outputs[0].shape == likes[0].shape
            return outputs

    teacher, student = _model(seed=3), _model()
    for m in (teacher, student):
        m.parallel = Hook()
    x, ctx, unc = _inputs()
    models = PhaseModels.local(teacher)
    dmd = SelfForcingDMD.from_phase(DMDConfig(rollout=RolloutConfig(denoising_steps=[1000, 500])), models)
    dmd.critic().model.parallel = Hook()
    batch = {"latents": x, "context": ctx, "uncond_context": unc}
    _, metrics = dmd.loss(Denoiser(student), batch, StepContext(0))
    exit_step = int(metrics["sf_exit_step"])  # both chunks exit at the same step (denoising calls: exit + 1)
    assert Hook.calls == 2 * (exit_step + 1) + 2  # 2 chunks' denoising calls + the real and the fake score


def test_batch_noise_ranks_partition_the_one_process_draw():
    ref = BatchNoise().randn((6, 3), generator=torch.Generator().manual_seed(0))
    parts = [BatchNoise(r, 3).randn((2, 3), generator=torch.Generator().manual_seed(0)) for r in range(3)]
    torch.testing.assert_close(torch.cat(parts), ref, rtol=0, atol=0)
    ints = [BatchNoise(r, 2).randint(7, (3,), generator=torch.Generator().manual_seed(4)) for r in range(2)]
    torch.testing.assert_close(torch.cat(ints), BatchNoise().randint(7, (6,), generator=torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match="rank"):
        BatchNoise(2, 2)


def test_chunk_layout_with_a_first_chunk_of_its_own():
    lay = ChunkLayout(9, 4, first_chunk_frames=1)
    assert lay.sizes == (1, 4, 4) and lay.start(3) == 9 and lay.frame_slice(1) == slice(1, 5)
    per_chunk = torch.tensor([[1.0, 2.0, 3.0]])
    assert lay.to_frames(per_chunk).tolist() == [[1.0] + [2.0] * 4 + [3.0] * 4]
    e = torch.arange(9.0).view(1, 1, 9, 1, 1)
    assert lay.chunk_mean(e).tolist() == [[0.0, 2.5, 6.5]]
    assert lay.chunks_before(5) == 2
    with pytest.raises(ValueError, match="whole number of chunks"):
        ChunkLayout(8, 4, first_chunk_frames=1)


def test_objectives_and_rollout_reach_the_layout_only_through_the_seam():
    root = Path(__file__).resolve().parents[1] / "megatron_rcm"
    offenders = [str(p.relative_to(root)) for sub in ("objectives", "selfforcing") for p in (root / sub).rglob("*.py")
                 if any(line.lstrip().startswith(("from ", "import ")) and "parallel" in line
                        for line in p.read_text().splitlines())]
    assert not offenders, offenders


def test_a_gradient_step_against_the_stream_cache_trains_the_cross_attention_projections():
    """A self-forcing gradient step reads a cache whose text K/V were projected by an earlier no-grad step:
    the last block's cross-attention K/V projections (and only under grad) must get the gradient of the
    block-causal full-sequence call, not silently none (cached tensors are detached)."""
    torch.manual_seed(0)
    model = build_model(model_preset("tiny", num_layers=2, param_dtype="float64"),
                        CausalConfig(chunk_frames=2, attention_backend="reference"))
    net, (x, ctx, _) = Denoiser(model), _inputs()
    clean, noisy, s = x[:, :, :2], torch.randn_like(x[:, :, 2:]), 0.625  # exact in binary: one time value both ways
    weight = torch.randn_like(noisy)
    last = model.blocks[-1].attn2
    params = [last.to_k.weight, last.to_v.weight, last.to_k.bias]

    cache = net.new_cache(H, W, Condition(ctx))
    with torch.no_grad():
        net.write_chunk(clean, Condition(ctx), cache, 0)  # projects and caches the text K/V (detached)
    assert cache.kv.layers[-1].cross_k is not None and not cache.kv.layers[-1].cross_k.requires_grad
    got = torch.autograd.grad((net.chunk(noisy, s, Condition(ctx), cache, 1)[0] * weight).sum(), params)

    t = torch.cat([torch.zeros(B, 2), torch.full((B, 2), s)], 1).double()
    full = net.velocity(torch.cat([clean, noisy], 2), t, Condition(ctx), attend="block_causal")[0][:, :, 2:]
    want = torch.autograd.grad((full * weight).sum(), params)
    for g, w in zip(got, want):
        assert w.abs().max() > 0 and rel_err(g, w) < 1e-10
