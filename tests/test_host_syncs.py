"""Host-device waits of the training steps and the stream, audited on the CPU (megatron_rcm/utils/host_syncs.py).

The meta device stands in for the GPU. A steady-state training step may wait for the GPU only where it reads its
metrics back; the self-forcing rollout, the scores, the backward passes and a stream's chunks never wait.
"""
import copy

import pytest
import torch

from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.models import build_model
from megatron_rcm.network import BatchNoise, Condition, Denoiser, StepContext, TrainedSideModel
from megatron_rcm.objectives.dmd import DMDConfig, SelfForcingDMD
from megatron_rcm.objectives.scm import SCMConfig, SCMObjective
from megatron_rcm.ops import fused_attention
from megatron_rcm.ops.attention import AttentionBackend, register_backend
from megatron_rcm.ops.masks import block_causal_mask
from megatron_rcm.selfforcing.rollout import RolloutConfig
from megatron_rcm.utils.host_syncs import SyncAudit

META = torch.device("meta")
PACKING = "fused_packing_standin"  # the fused backend's mask packing, with empty kernels (no CUDA here)


class _PackingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        fused_attention.kernel_and_mask("fwd", mask, q, k, v)
        ctx.mask = mask
        ctx.save_for_backward(q, k, v)
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        fused_attention.kernel_and_mask("bwd", ctx.mask, q, k, v, do)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None, None


def _packing_jvp(q, k, v, tq, tk, tv, mask=None, scale=None):
    fused_attention.kernel_and_mask("jvp", mask, q, k, v, tq, tk, tv)
    return torch.empty_like(q), torch.empty_like(q)


register_backend(AttentionBackend(PACKING, lambda q, k, v, mask=None, scale=None: _PackingAttention.apply(
    q, k, v, mask, scale), _packing_jvp, lambda t: True, jvp_differentiable=False))


def _model(backend: str, **causal):
    cfg = model_preset("tiny", num_layers=2, patch_size=[1, 2, 2])
    model = build_model(cfg, CausalConfig(chunk_frames=2, attention_backend=backend, **causal)).to(META)
    model.gradient_checkpointing = True
    return model


def _batch(frames: int = 8):
    ctx = torch.empty(1, 8, 32, device=META)
    return {"latents": torch.empty(1, 3, frames, 8, 8, device=META), "context": ctx, "uncond_context": ctx}


def _second_step_audit(objective, student) -> SyncAudit:
    """The waits of a training step's second run (masks are packed by then): loss, backward, the student's AdamW
    step, then the objective's ``after_step`` (the critic's update)."""
    net, batch = Denoiser(student), _batch()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-7, foreach=True)

    def step():
        loss, _ = objective.loss(net, batch, StepContext(1, BatchNoise()))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        objective.after_step(net, batch, StepContext(1, BatchNoise()))

    with SyncAudit() as audit:
        step()
        audit.events.clear()
        step()
    return audit


def _metric_waits_only(audit: SyncAudit, objective_files: tuple[str, ...], most: int) -> None:
    """Every wait is a scalar read in one of ``objective_files`` (the metrics dict), at most ``most`` of them."""
    others = {(kind, site): n for (kind, site), n in audit.events.items()
              if kind != "_local_scalar_dense" or not site.startswith(objective_files)}
    assert not others, "the step waits for the GPU outside its metrics:\n" + audit.table()
    assert audit.total <= most, audit.table()


def test_audit_sees_every_kind_of_wait():
    x = torch.empty(4, 4, device=META)
    host = torch.arange(4.0)
    with SyncAudit() as audit:
        y = x @ x + torch.full((4, 4), 2.0, device=META)  # device work, no wait
        float(host.sum()), host[host > 1], torch.tensor([1.0])  # host work, no wait
    assert audit.total == 0, audit.table()
    assert y.device == META
    with SyncAudit() as audit:
        x.sum().item()
        bool(x.sum() > 0)
        torch.tensor([1.0, 2.0], device=META)
        torch.as_tensor(0.5, device=META)
        torch.arange(3).to(META)
        x[x > 0]
        x.nonzero()
        torch.arange(3, device=META).repeat_interleave(torch.ones(3, dtype=torch.long, device=META))
        x.cpu()
    kinds = {kind for kind, _ in audit.events}
    assert kinds == {"_local_scalar_dense", "h2d", "d2h", "bool index", "nonzero", "repeat_interleave"}, audit.table()
    assert sum(n for (kind, _), n in audit.events.items() if kind == "h2d") == 3
    assert all(site.startswith("test_host_syncs.py:") for _, site in audit.events), audit.table()


def test_a_device_mask_is_copied_and_packed_once():
    """The mask a layer stack shares: one host-to-device copy per device, summaries made on the host."""
    mask = block_causal_mask(4, 16, 2)
    with SyncAudit() as audit:
        on = mask.to(META)
        assert mask.to(META) is on and on.to(META) is on and on.host() is mask
        assert not on.is_full()
        first = fused_attention.pack_mask(on, 64, 64, (32, 32), META)
    assert sum(audit.events.values()) == 3 + 1, audit.table()  # ids, ids, allow; the tile summary and bitmaps
    with SyncAudit() as audit:
        assert fused_attention.pack_mask(mask, 64, 64, (32, 32), META) is first
        assert fused_attention.pack_mask(mask.to(META), 64, 64, (32, 32), META) is first
    assert audit.total == 0, audit.table()


@pytest.mark.parametrize("backend,causal", [(PACKING, {}), ("sdpa", {"window_chunks": 2}),
                                            (PACKING, {"window_chunks": 2, "sink_chunks": 1})])
def test_self_forcing_dmd_step_waits_only_for_its_metrics(backend, causal):
    """Rollout (KV cache, windowed masks), both scores (block-causal), the backward, the student's and the critic's
    updates: a second step, once masks are packed, waits for the GPU only to read the loss metrics."""
    torch.manual_seed(0)
    student = _model(backend, **causal)
    teacher = copy.deepcopy(student).requires_grad_(False)
    critic = copy.deepcopy(student)
    cfg = DMDConfig(guidance_scale=3.0, rollout=RolloutConfig(denoising_steps=[1000.0, 500.0]))
    obj = SelfForcingDMD(Denoiser(teacher), cfg, TrainedSideModel.local(critic, 1e-6, (0.0, 0.999), grad_clip=1.0))
    obj._generator = lambda device: None  # the meta device has no generator; noise order is not audited here
    audit = _second_step_audit(obj, student)
    _metric_waits_only(audit, ("objectives/dmd.py", "network/side_model.py"), most=5)


@pytest.mark.parametrize("causal", [{}, {"context_from_last_step": True, "clean_first_frames": 2}])
def test_teacher_forcing_scm_step_waits_only_for_its_metrics(causal):
    """TF-sCM: the teacher-forcing mask's packing, the JVP pass, noisy context and held first frames."""
    torch.manual_seed(0)
    student = _model(PACKING, **causal)
    teacher = copy.deepcopy(student).requires_grad_(False)
    obj = SCMObjective(Denoiser(teacher), SCMConfig(cfg_scale=5.0, r_warmup_steps=0, adaptive_weight=False))
    _metric_waits_only(_second_step_audit(obj, student), ("objectives/scm.py",), most=3)


@pytest.mark.parametrize("causal", [{}, {"window_chunks": 2, "sink_chunks": 1}])
def test_stream_chunks_never_wait(causal):
    """A stream's chunk loop (few steps, the cache write, a rolling window) issues no wait after its first chunks."""
    from megatron_rcm.inference.streaming import StreamConfig, stream_video

    model = _model(PACKING, **causal).eval().requires_grad_(False)
    ctx = torch.empty(1, 8, 32, device=META)
    with torch.no_grad(), SyncAudit() as audit:
        chunks = stream_video(model, ctx, 16, 8, 8, StreamConfig(steps=2))
        for i, _ in enumerate(chunks):
            if i == 3:  # the window is full: from here on every chunk looks the same
                audit.events.clear()
    assert audit.total == 0, audit.table()


def test_condition_frames_and_levels_stay_on_the_device():
    """The per-chunk helpers the objectives call make their tensors on the device, without copies."""
    from megatron_rcm.ops.chunks import ChunkLayout

    layout, net = ChunkLayout(7, 3, 1), Denoiser(_model("sdpa"))  # chunks of 1, 3, 3 frames
    with SyncAudit() as audit:
        f = layout.to_frames(torch.empty(2, 3, device=META), 2)
        g = layout.fill_frames([0.0, 0.5, 0.25], (2,), 2, device=META)
        net.wan_time(0.5, torch.empty(2, 3, 4, 8, 8, device=META))
        Condition(torch.empty(1, 8, 32, device=META)).frames(slice(0, 2))
    assert f.shape == g.shape == (2, 14) and audit.total == 0, audit.table()
    host = layout.fill_frames([0.0, 0.5, 0.25], (1,), 2)
    assert host.tolist() == [[0.0] * 2 + [0.5] * 6 + [0.25] * 6]
    expected = torch.tensor([[1.0] * 2 + [2.0] * 6 + [3.0] * 6])
    assert torch.equal(layout.to_frames(torch.tensor([[1.0, 2.0, 3.0]]), 2), expected)
