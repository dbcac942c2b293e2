"""One rank of a multi-process layout check (launched by ``_launch_ranks.py``; env RANK/WORLD_SIZE/MASTER_*).

Every rank builds the same float64 tiny model and inputs from one seed, computes the single-process
reference (outputs, JVP tangent, loss, gradients, parameters after one optimizer step), then shards a
copy for the layout and compares each tensor. Mismatches are written to ``$OUT_DIR/rank{r}.json``.
A layout ending in ``f`` (``1x1x2f``) adds FSDP2 over the data x context ranks (plain AdamW on its shards).
"""
import copy
import dataclasses
import json
import os
import sys
import traceback

import torch

from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.models import build_model
from megatron_rcm.ops.masks import block_causal_mask, teacher_forcing_mask
from megatron_rcm.parallel import (ParallelConfig, batch_for_rank, destroy_parallel, initialize_parallel,
                                   parallelize_model, pipeline_forward_backward, shard_like, sharded_optimizer,
                                   sync_gradients)
from megatron_rcm.parallel.fsdp import shard_model
from megatron_rcm.parallel.sharding import is_fsdp_sharded

B, C, F, H, W = 2, 3, 4, 8, 8
TOL = 1e-9


CHECKED = [0]  # comparisons made: a kind that compared nothing is reported as an error


def rel(a, b):
    CHECKED[0] += 1
    a, b = (t.full_tensor() if is_fsdp_sharded(t) else t for t in (a, b))  # FSDP shards -> TP-local tensors
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


IMAGE_DIM = 24  # ``image`` kind: the image-to-video layout (image tokens [B, 5, IMAGE_DIM]), teacher-forcing mask


def make_model(chunk, first=0, image=False):
    torch.manual_seed(0)
    extra = dict(image_dim=IMAGE_DIM, added_kv_proj_dim=64) if image else {}
    cfg = model_preset("tiny", num_layers=2, param_dtype="float64", **extra)
    model = build_model(cfg, CausalConfig(chunk_frames=chunk, first_chunk_frames=first, attention_backend="reference"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "scale_shift" in name:
                p.add_(0.3 * torch.randn_like(p))
            if "action" in name:
                p.normal_()
    return model


def make_inputs(F=F):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(clean=r(B, C, F, H, W), x=r(B, C, F, H, W), t=torch.rand(B, F, generator=g, dtype=torch.float64) * 1000,
                ctx=r(B, 8, 32), dx=r(B, C, F, H, W), dt=r(B, F) * 10, w1=r(B, C, F, H, W), w2=r(B, C, F, H, W),
                img=r(B, 5, IMAGE_DIM))


def wrap(model, groups):
    """The layout's model: TP/CP/PP split, then FSDP2 when the layout asks for it."""
    model = parallelize_model(model, groups)
    return shard_model(model, groups, torch.device("cpu")) if groups.cfg.fsdp else model


def optimizer(model, groups):
    if groups.cfg.fsdp:
        return torch.optim.AdamW(model.parameters(), lr=1e-2)
    return sharded_optimizer(model.parameters(), groups, lr=1e-2)


def run(model, kind, inp, sl):
    """Forward (+tangent) for mask ``kind`` on the batch slice ``sl``; loss uses output AND tangent."""
    y, ty = forward(model, kind, inp, sl)
    return y, ty, loss_of(y, ty, inp, sl)


def loss_of(y, ty, inp, sl):
    return (y * sl(inp["w1"])).mean() + (0.0 if ty is None else 0.1 * (ty * sl(inp["w2"])).mean())


def forward(model, kind, inp, sl):
    s = lambda k: sl(inp[k])  # noqa: E731
    tpf = model.tokens_per_frame(H, W)
    image = s("img") if model.cfg.image_dim else None
    if kind in ("tf", "ckpt"):  # ckpt: no tangent (the kept attention outputs serve tangent-free recomputes)
        mask = teacher_forcing_mask(F, tpf, 1)
        dx, dt = (None, None) if kind == "ckpt" else (s("dx"), s("dt"))
        y, ty = model.forward_teacher_forcing(s("clean"), s("x"), s("t"), s("ctx"), mask, dx, dt, image=image)
    else:
        mask = block_causal_mask(F, tpf, 1 if kind == "frame" else 2)
        y, ty = model.forward_with_tangent(s("x"), s("t"), s("ctx"), s("dx"), s("dt"), mask=mask, image=image)
    return y, ty


def check(layout, groups, kind, errors):
    """``kind``: frame / chunk / tf mask; ``accum`` = frame mask over 2 accumulated micro-batches; ``skip`` =
    tf mask after a grad-enabled forward whose loss was dropped (the trainer's non-finite skip); ``ckpt`` = tf mask
    without tangent, the layout's blocks checkpointed and keeping their attention outputs (ops/kept_attention.py)
    against the plain single process."""
    chunk = 2 if kind == "chunk" else 1
    inp = make_inputs()
    ref = make_model(chunk, image=kind == "image")
    par = copy.deepcopy(ref)
    if kind == "ckpt":
        par.gradient_checkpointing = par.keep_attention = True
    par = wrap(par, groups)
    mkind = {"accum": "frame", "image": "tf", "skip": "tf"}.get(kind, kind)
    if kind == "skip":
        forward(par, mkind, inp, lambda t: batch_for_rank(t, groups))  # graph dropped, no backward
    y, ty, loss = run(ref, mkind, inp, lambda t: t)
    loss.backward()
    if kind == "accum" or groups.cfg.pp > 1:  # micro-batches of one sample through the (GPipe) schedule
        local = lambda t: batch_for_rank(t, groups)  # noqa: E731
        micro = lambda m: (lambda t: local(t)[m:m + 1])  # noqa: E731
        outs = []

        def fwd(model, m):
            outs.append(forward(model, mkind, inp, micro(m)))
            return outs[-1]

        ploss = pipeline_forward_backward(par, list(range(B // groups.cfg.dp)), fwd,
                                          lambda o, m: loss_of(o[0], o[1], inp, micro(m)),
                                          schedule=groups.cfg.pp_schedule)
        py = None if outs[0][0] is None else torch.cat([o[0] for o in outs])
        pty = None if outs[0][1] is None else torch.cat([o[1] for o in outs])
    else:
        py, pty, ploss = run(par, mkind, inp, lambda t: batch_for_rank(t, groups))
        ploss.backward()
    sync_gradients(par, groups)
    gl = ploss.detach().clone()
    torch.distributed.all_reduce(gl, group=groups.dp_group)
    gl /= groups.cfg.dp

    def cmp(what, a, b):
        e = rel(a, b)
        if not e < TOL:
            errors.append(f"layout {layout} mask {kind}: {what} differs, rel err {e:.3e}")

    if py is not None:  # (pipeline: only the last stage has the output)
        cmp("output", py, batch_for_rank(y, groups))
        if ty is not None:
            cmp("jvp tangent", pty, batch_for_rank(ty, groups))
    cmp("loss", gl, loss)
    rp = dict(ref.named_parameters())
    for name, p in par.named_parameters():
        cmp(f"grad of {name}", p.grad, shard_like(name, rp[name].grad, groups))
    # one optimizer step (AdamW, state sharded over data x context parallel)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    popt = optimizer(par, groups)
    ropt.step(), popt.step()
    for name, p in par.named_parameters():
        cmp(f"param after step {name}", p, shard_like(name, rp[name], groups))


def check_cache(layout, groups, errors, first=0, chunk=2, frames=F):
    """KV-cached chunk-wise streaming (chunks of ``chunk`` frames after a first of ``first``, with tangent)."""
    inp = make_inputs(frames)
    ref = make_model(chunk, first)
    par = wrap(copy.deepcopy(ref), groups)
    lay = ref.chunk_layout(frames)
    with torch.no_grad():
        for name, model, sl in (("ref", ref, lambda t: t), ("par", par, lambda t: batch_for_rank(t, groups))):
            cache = model.new_kv_cache(H, W)
            outs = []
            for c in range(lay.n_chunks):
                f = lay.frame_slice(c)
                outs.append(model.forward_chunk(sl(inp["x"])[:, :, f], sl(inp["t"])[:, f], sl(inp["ctx"]), cache, c,
                                                write_cache=True, tangent=sl(inp["dx"])[:, :, f],
                                                timestep_tangent=sl(inp["dt"])[:, f]))
            if name == "ref":
                ry = torch.cat([o[0] for o in outs], 2)
                rty = torch.cat([o[1] for o in outs], 2)
            else:
                for what, a, b in (("cached output", torch.cat([o[0] for o in outs], 2), ry),
                                   ("cached jvp tangent", torch.cat([o[1] for o in outs], 2), rty)):
                    e = rel(a, batch_for_rank(b, groups))
                    if not e < TOL:
                        errors.append(f"layout {layout} kv cache: {what} differs, rel err {e:.3e}")


def check_scm(layout, groups, errors):
    """The sCM objective (teacher with CFG, JVP of the student) under the layout (dp = 1: same batch)."""
    from megatron_rcm.network import Denoiser, StepContext
    from megatron_rcm.objectives.scm import SCMConfig, SCMObjective

    inp = make_inputs()
    ref, teacher = make_model(1), make_model(1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    par, pteacher = (wrap(copy.deepcopy(m), groups) for m in (ref, teacher))
    batch = dict(latents=inp["clean"], context=inp["ctx"], uncond_context=0.5 * inp["ctx"])
    cfg = SCMConfig(r_warmup_steps=0, cfg_scale=3.0)
    losses = []
    for student, t in ((ref, teacher), (par, pteacher)):
        torch.manual_seed(5)
        loss, _ = SCMObjective(Denoiser(t), cfg).loss(Denoiser(student), batch, StepContext(1))
        loss.backward()
        losses.append(loss.detach())
    sync_gradients(par, groups)
    rp = dict(ref.named_parameters())
    checks = [("sCM loss", losses[1], losses[0])]
    checks += [(f"sCM grad of {n}", p.grad, shard_like(n, rp[n].grad, groups)) for n, p in par.named_parameters()]
    for what, a, b in checks:
        e = rel(a, b)
        if not e < TOL:
            errors.append(f"layout {layout} sCM (tf mask): {what} differs, rel err {e:.3e}")


def main():
    layout, kinds, out_dir = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
    fsdp, schedule = layout.endswith("f"), "gpipe" if layout.endswith("g") else "1f1b"
    tp, cp, dp, pp = (int(v) for v in (layout.rstrip("fg") + "x1").split("x")[:4])
    torch.set_num_threads(1)
    errors = []
    try:
        groups = initialize_parallel(ParallelConfig(tp=tp, cp=cp, dp=dp, pp=pp, fsdp=fsdp, pp_schedule=schedule))
        for kind in kinds:
            before = CHECKED[0]
            _run_kind(kind, tp, cp, dp, pp, groups, errors)
            if CHECKED[0] == before:
                errors.append(f"kind {kind}: nothing was compared")
        destroy_parallel()
    except Exception:
        errors.append(traceback.format_exc())
    print(f"rank {os.environ['RANK']}: {CHECKED[0]} comparisons, {len(errors)} errors")
    with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(errors, f)


def check_mixed_precision(layout, groups, errors):
    """FSDP2 with bf16 compute and fp32 reduction vs the fp32 model in one process: output, tangent and
    gradients within bf16 rounding (3e-2), which a wrong reduction (x2) or a stale weight would exceed."""
    pgroups = dataclasses.replace(groups, cfg=dataclasses.replace(groups.cfg, fsdp_param_dtype="bfloat16",
                                                                  fsdp_reduce_dtype="float32"))
    inp = {k: v.float() for k, v in make_inputs().items()}
    ref = make_model(1).float()
    par = wrap(copy.deepcopy(ref), pgroups)
    y, ty, loss = run(ref, "tf", inp, lambda t: t)
    loss.backward()
    py, pty, ploss = run(par, "tf", inp, lambda t: batch_for_rank(t, groups))
    ploss.backward()
    sync_gradients(par, groups)
    rp = dict(ref.named_parameters())
    checks = [("output", py, batch_for_rank(y, groups)), ("jvp tangent", pty, batch_for_rank(ty, groups))]
    checks += [(f"grad of {n}", p.grad, shard_like(n, rp[n].grad, groups)) for n, p in par.named_parameters()
               if rp[n].grad.norm() > 1e-3 * loss.abs()]
    if py.dtype != torch.bfloat16 or next(par.parameters()).dtype != torch.float32:
        errors.append(f"layout {layout} bf16: output {py.dtype}, master weights {next(par.parameters()).dtype}")
    for what, a, b in checks:
        e = rel(a, b)
        if not e < 3e-2:
            errors.append(f"layout {layout} bf16 compute: {what} differs, rel err {e:.3e}")


def check_plan(layout, groups, errors):
    """The memory planner on this layout: parameters held by this rank exactly (the planner reports the heaviest
    rank: pipeline stage 0, FSDP rank 0), and one block's saved activations exactly (bf16 autocast, memory-lean
    attention; not under FSDP, whose unsharded weights are freed after each unit but still referenced)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from fixtures.saved_bytes import saved_bytes
    from flash_like_attention import register

    from megatron_rcm.parallel.sharding import local
    from megatron_rcm.training import memory_plan as mp

    CHECKED[0] += 1
    par = groups.cfg
    model = wrap(make_model(1), groups)
    held = sum(local(p).numel() for p in model.parameters())
    plan = mp.param_counts(model.cfg, par, par.fsdp).local
    heaviest = groups.pp_rank == 0 and groups.dp_rank == 0 and groups.cp_rank == 0
    if (held != plan) if heaviest else held > plan:
        errors.append(f"layout {layout} plan: this rank holds {held} parameters, the planner says {plan}")
    if par.fsdp or par.pp > 1:
        return
    backend = register()
    inp = make_inputs()
    saved = []
    for layers in (1, 2):
        torch.manual_seed(0)
        cfg = model_preset("tiny", num_layers=layers)
        m = wrap(build_model(cfg, CausalConfig(chunk_frames=1, attention_backend=backend)), groups)
        sl = lambda t: batch_for_rank(t, groups).float()  # noqa: E731
        mask = teacher_forcing_mask(F, m.tokens_per_frame(H, W), 1)
        saved.append(saved_bytes(m, lambda: m.forward_teacher_forcing(sl(inp["clean"]), sl(inp["x"]), sl(inp["t"]),
                                                                      sl(inp["ctx"]), mask), autocast=True))
    tokens = 2 * F * model.tokens_per_frame(H, W)
    comp = mp.Compute(2, autocast_copies=True)
    want = mp.block_saved(cfg, par, tokens, B // par.dp, comp, 2 * F, inp["ctx"].shape[1])
    if saved[1] - saved[0] != want:
        errors.append(f"layout {layout} plan: one block keeps {saved[1] - saved[0]} bytes, the planner says {want}")


def _run_kind(kind, tp, cp, dp, pp, groups, errors):
    layout = f"tp{tp}-cp{cp}-dp{dp}-pp{pp}" + ("-fsdp" if groups.cfg.fsdp else "")
    if kind == "mp":
        check_mixed_precision(layout, groups, errors)
    elif kind == "plan":
        check_plan(layout, groups, errors)
    elif kind == "scm":
        check_scm(layout, groups, errors)
    elif kind == "cache":
        check_cache(layout, groups, errors)
    elif kind == "cache_first":  # a first chunk of its own size (2 frames, then chunks of 4)
        check_cache(layout, groups, errors, first=2, chunk=4, frames=6)
    else:
        check(layout, groups, kind, errors)


if __name__ == "__main__":
    main()
