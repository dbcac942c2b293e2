"""One TF-sCM and one SF-DMD training step of the Wan2.1-1.3B-shaped model on one GPU (issue 7).

    python benchmarks/train_step.py                                  # fused kernel, 30 layers, 21 x 1560 tokens
    python benchmarks/train_step.py --attention reference --layers 4  # the reference JVP path
    python benchmarks/train_step.py --no-checkpointing --layers 10
    python benchmarks/train_step.py --kinds dmd --replayed           # SF-DMD with replayed backprop (peak memory)
    python benchmarks/train_step.py --parallel fsdp                 # FSDP2 of size 1 (its overhead vs plain)
    torchrun --nproc_per_node=2 benchmarks/train_step.py --parallel fsdp    # DP2: FSDP2 vs
    torchrun --nproc_per_node=2 benchmarks/train_step.py --parallel zero1   #      ZeRO-1 (batch per GPU)

Reports per step: time (median after one warm-up), tokens/s (video tokens of the batch / step time), model
FLOPs and MFU against the bf16 dense peak, and peak memory. FLOPs are counted per network call while the
step runs (every ``forward_segments`` call: its tokens, whether it carries a tangent, whether it builds a
graph, and the attention mask it uses) - not assumed:
- a forward: 2 x (matmul params touched per token) x tokens + attention 4 * S_q * S_k * D * H * (mask density)
  + cross-attention 4 * S_q * L_text * D * H;
- a JVP pass (primal + tangent): linear x 2, attention x 3 (six products instead of two);
- a graph-building call adds its backward: linear x 2, attention x 2.5 (FlashAttention's convention).
Activation-checkpoint recomputation is not counted (MFU, not HFU). SF-DMD: the KV-cached rollout calls
see ``S_k`` = cached + current tokens.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import time

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(name: str) -> float:
    return next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))


def mask_density(mask, sq: int, sk: int) -> float:
    if mask is None or mask.is_full():
        return 1.0
    g = mask.allow.shape[0]
    n = torch.bincount(mask.q_groups.long().cpu(), minlength=g).double()
    m = torch.bincount(mask.k_groups.long().cpu(), minlength=g).double()
    return float(n @ mask.allow.double().cpu() @ m) / (sq * sk)


class FlopCounter:
    """Wraps ``model.forward_segments`` to price every call (see the module docstring)."""

    def __init__(self, model, text_len: int, label: str | None = None):
        self.model, self.text_len, self.flops, self.calls = model, text_len, 0.0, []
        self.label = label  # name each call in a profile (``--gaps``)
        cfg = model.cfg
        self.h, self.hd, self.ffn, self.layers = cfg.num_attention_heads, cfg.attention_head_dim, cfg.ffn_dim, \
            len(model.blocks)
        self.d = self.h * self.hd
        self._inner = model.forward_segments
        self._own = "forward_segments" in vars(model)  # FSDP2 registers its unsharding wrapper on the instance

    def __enter__(self):
        def counted(segments, context, mask=None, *a, **kw):
            call = self.price(segments, mask, kw.get("cache"))
            if self.label is None:
                return self._inner(segments, context, mask, *a, **kw)
            with torch.profiler.record_function(call_label(self.label, *call)):
                return self._inner(segments, context, mask, *a, **kw)
        self.model.forward_segments = counted
        return self

    def __exit__(self, *exc):
        if self._own:
            self.model.forward_segments = self._inner
        else:
            del self.model.forward_segments

    def price(self, segments, mask, cache):
        b = segments[0].latents.shape[0]
        pt = self.model.patch
        tokens = sum(s.latents.shape[2] // pt[0] * (s.latents.shape[3] // pt[1]) * (s.latents.shape[4] // pt[2])
                     for s in segments)
        tangent = any(s.tangent is not None or s.timestep_tangent is not None for s in segments)
        graph = torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters())
        sk = tokens + (cache.num_tokens if cache is not None else 0)  # a cached chunk sees the whole cache
        density = mask_density(mask, tokens, sk) if mask is not None and cache is None else 1.0
        d, L = self.d, self.layers
        lin = 2 * b * L * (tokens * (4 * d * d + 2 * d * d + 2 * d * self.ffn) + self.text_len * 2 * d * d)
        attn = 4 * b * L * self.h * self.hd * (tokens * sk * density + tokens * self.text_len)
        f = lin * (2 if tangent else 1) + attn * (3 if tangent else 1)
        if graph:
            f += 2 * lin * (2 if tangent else 1) + 2.5 * attn * (3 if tangent else 1)
        self.flops += f
        self.calls.append((tokens, sk, tangent, graph))
        return self.calls[-1]


def call_label(model: str, tokens: int, sk: int, tangent: bool, graph: bool) -> str:
    """A network call's name in a profile: which model, what it builds, its query and key tokens."""
    kind = ("fwd (graph)" if graph else "fwd") + (" +JVP" if tangent else "")
    keys = f" over {sk}" if sk != tokens else ""
    return f"{model}: {kind}, {tokens} tok{keys}"


def build(args, device):
    from megatron_rcm.config.model import CausalConfig, model_preset
    from megatron_rcm.models import build_model

    torch.manual_seed(0)
    cfg = model_preset("wan2.1-1.3b", num_layers=args.layers)
    causal = CausalConfig(chunk_frames=args.chunk_frames, first_chunk_frames=args.first_chunk_frames,
                          attention_backend=args.attention)
    student = build_model(cfg, causal).to(device)
    student.gradient_checkpointing, student.checkpoint_layers = args.checkpointing, args.checkpoint_layers
    student.reentrant_recompute = args.recompute == "reentrant"
    student.keep_attention = args.keep_attention
    teacher = copy.deepcopy(student).requires_grad_(False).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(args.batch, 16, args.frames, args.height, args.width, generator=g)
    ctx = torch.randn(args.batch, 512, 4096, generator=g)
    batch = {"latents": lat.to(device), "context": ctx.to(device), "uncond_context": torch.zeros_like(ctx).to(device)}
    return student, teacher, batch


def run(args, kind: str, device) -> dict:
    from megatron_rcm.network import BatchNoise, Denoiser, StepContext, TrainedSideModel
    from megatron_rcm.objectives.dmd import DMDConfig, SelfForcingDMD
    from megatron_rcm.objectives.scm import SCMConfig, SCMObjective
    from megatron_rcm.selfforcing.rollout import RolloutConfig

    student, teacher, batch = build(args, device)
    critic = None
    if kind == "dmd":
        critic = copy.deepcopy(student)  # (before any sharding: sharded models do not deep-copy)
        critic.gradient_checkpointing, critic.checkpoint_layers = args.checkpointing, args.checkpoint_layers
        critic.keep_attention = args.keep_attention
    par = data_parallel(args, device)
    if par is not None:
        student = par.wrap(student, "student")
        critic = critic if critic is None else par.wrap(critic, "critic")
    net, at = Denoiser(student), StepContext(1, par.batch_noise() if par is not None else BatchNoise())
    if kind == "scm":
        obj = SCMObjective(Denoiser(teacher), SCMConfig(cfg_scale=5.0, r_warmup_steps=0, adaptive_weight=False))
    else:
        rollout = RolloutConfig(denoising_steps=[1000.0, 500.0], last_step_only=True,  # the same graph every rep
                                replayed_backprop=args.replayed)
        cfg = DMDConfig(guidance_scale=3.0, critic_ratio=1, critic_lr=1e-6, rollout=rollout)
        if par is None:
            side = TrainedSideModel.local(critic, cfg.critic_lr, cfg.critic_betas, grad_clip=cfg.critic_grad_clip)
        else:
            side = TrainedSideModel(critic, par.optimizers(list(critic.parameters()), [], lr=cfg.critic_lr,
                                                           betas=cfg.critic_betas)[0], cfg.critic_grad_clip,
                                    backward=par.side_backward, sync_and_clip=par.sync_and_clip)
        obj = SelfForcingDMD(Denoiser(teacher), cfg, side)
    if par is None:
        opt = torch.optim.AdamW(student.parameters(), lr=1e-7, fused=device.type == "cuda")
    else:
        opt = par.optimizers(list(student.parameters()), [], lr=1e-7)[0]
    names = ("student", "teacher", "critic")
    counters = [FlopCounter(m, 512, n if args.gaps else None) for m, n in zip((student, teacher, critic), names)
                if m is not None]
    times, flops = [], []
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    prof, profiled = None, bool(args.profile or args.gaps)
    phase = torch.profiler.record_function if args.gaps else (lambda name: contextlib.nullcontext())
    for i in range(args.reps + 1):
        for c in counters:
            c.flops = 0.0
        sync()
        t0 = time.perf_counter()
        with contextlib.ExitStack() as stack:
            if profiled and i == args.reps:  # the last rep (timing of this rep is skewed)
                acts = [torch.profiler.ProfilerActivity.CUDA] + [torch.profiler.ProfilerActivity.CPU] * bool(args.gaps)
                prof = stack.enter_context(torch.profiler.profile(activities=acts))
            for c in counters:
                stack.enter_context(c)
            with torch.autocast(device.type, dtype=torch.bfloat16), phase("loss"):
                loss, _ = obj.loss(net, batch, at)
            with phase("backward"):
                loss.backward()
            with phase("optimizer"):
                if par is not None:
                    par.sync_and_clip(student, float("inf"))
                opt.step()
                opt.zero_grad(set_to_none=True)
            if kind == "dmd":
                with torch.autocast(device.type, dtype=torch.bfloat16), phase("critic step"):
                    obj.after_step(net, batch, at)
        sync()
        if i > 0 and not (prof is not None and i == args.reps and args.reps > 1):
            times.append(time.perf_counter() - t0)
            flops.append(sum(c.flops for c in counters))
    if prof is not None and args.profile:
        print(kernel_table(prof, args.profile))
    if prof is not None and args.gaps:
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from gpu_idle import idle_table, profile_to_trace

        print(idle_table(profile_to_trace(prof), top=args.gaps))
    step = statistics.median(times)
    tokens = args.batch * args.frames * (args.height // 2) * (args.width // 2)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    return {"kind": kind, "attention": args.attention, "parallel": args.parallel,
            "world": par.world_size if par is not None else 1, "checkpointing": args.checkpointing,
            "replayed": args.replayed, "recompute": args.recompute, "keep_attention": args.keep_attention,
            "compile_min_elements": args.compile_min_elements,
            "compile_guards": args.compile_guards,
            "checkpoint_layers": args.checkpoint_layers, "compile": args.compile, "layers": args.layers,
            "frames": args.frames, "video_tokens": tokens, "batch": args.batch, "step_s": step, "steps_s": times,
            "tokens_per_s": tokens / step, "tflop_per_step": flops[-1] / 1e12,
            "mfu": flops[-1] / step / peak_flops(name),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
            "calls": {n: c.calls[-200:] for n, c in zip(("student", "teacher", "critic"), counters)},
            "device": name, "torch": torch.__version__}


def planned_gib(args, kind: str) -> float:
    """The memory planner's peak for exactly this benchmark's step (megatron_rcm/training/memory_plan.py): fp32
    student + fused AdamW, bf16 frozen teacher, fp32 critic + foreach AdamW (SF-DMD), bf16 autocast (the critic
    step too), gradients zeroed right after the student's step, no EMA, one GPU. Printed next to the measured
    peak (the planner's target: within 15%)."""
    from dataclasses import replace

    from megatron_rcm.config.model import model_preset
    from megatron_rcm.parallel.config import ParallelConfig
    from megatron_rcm.training import memory_plan as mp

    cfg = model_preset("wan2.1-1.3b", num_layers=args.layers)
    geo = mp.Geometry(args.frames, (args.height // 2) * (args.width // 2), args.chunk_frames, 512)
    shape = mp.phase_shape(kind, {"rollout": {"replayed_backprop": args.replayed}})
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = ParallelConfig(dp=world if args.parallel != "none" else 1, fsdp=args.parallel == "fsdp",
                            fsdp_teacher="replicate", fsdp_param_dtype=args.fsdp_param_dtype,
                            fsdp_reduce_dtype="float32" if args.fsdp_param_dtype else "")
    plan = mp.plan_phase(kind, kind, shape, cfg, replace(cfg, param_dtype="bfloat16"), layout, geo,
                         args.batch, precision="bf16", compiled=args.compile, checkpointing=args.checkpointing,
                         checkpoint_layers=args.checkpoint_layers, keep_attention=args.keep_attention,
                         critic_in_autocast=True, ema=False,
                         fused_adam=(True, False), grads_live_in_critic_step=False, critic_cfg=cfg)
    return plan.peak / mp.GIB


_PARALLEL = []


def data_parallel(args, device):
    """``--parallel fsdp|zero1``: the trainer's layout object over all ranks as data parallel (torchrun, or one
    process as a world of 1: FSDP2 of size 1), created once; None for the plain single-GPU step."""
    if args.parallel == "none":
        return None
    if not _PARALLEL:
        from megatron_rcm.parallel import ParallelConfig, initialize_parallel
        from megatron_rcm.training.distributed import TrainerParallel

        cfg = ParallelConfig(dp=-1, fsdp=args.parallel == "fsdp", fsdp_param_dtype=args.fsdp_param_dtype,
                             fsdp_reduce_dtype="float32" if args.fsdp_param_dtype else "")
        _PARALLEL.append(TrainerParallel(initialize_parallel(cfg, backend="nccl" if device.type == "cuda" else "gloo")))
    return _PARALLEL[0]


def compiled_label(args) -> str:
    if not args.compile:
        return "eager"
    extra = [f">= {args.compile_min_elements:,} el." if args.compile_min_elements else "",
             "own graphs" if args.compile_guards == "own" else ""]
    return "compiled" + "".join(f", {e}" for e in extra if e)


def ckpt_label(r) -> str:
    if not r["checkpointing"]:
        return "off"
    label = f"first {r['checkpoint_layers']}" if 0 < r["checkpoint_layers"] < r["layers"] else "on"
    return label + (", reentrant" if r.get("recompute") == "reentrant" else "") + (
        ", keeps attention" if r.get("keep_attention") else "")


def kernel_table(prof, top: int) -> str:
    """The ``top`` kernels by GPU time in one profiled step, with their share: what to fuse or speed up."""
    rows = [(e.key, e.self_device_time_total, e.count) for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(t for _, t, _ in rows) or 1.0
    rows.sort(key=lambda r: -r[1])
    out = ["| kernel | calls | GPU ms | share |", "|---|---|---|---|"]
    for name, t, n in rows[:top]:
        out.append(f"| {name[:90].replace('|', '/')} | {n} | {t / 1e3:.1f} | {100 * t / total:.1f}% |")
    out.append(f"| (all {len(rows)} kernels) | | {total / 1e3:.1f} | 100% |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default="scm,dmd", help="scm (TF-sCM step) and/or dmd (SF-DMD step)")
    ap.add_argument("--attention", default="auto", help="auto (fused when built) | fused | sdpa | reference")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--height", type=int, default=60)
    ap.add_argument("--width", type=int, default=104)
    ap.add_argument("--chunk-frames", type=int, default=3)
    ap.add_argument("--first-chunk-frames", type=int, default=0, help="0: like --chunk-frames (1 with --chunk-frames 4: "
                    "Causal-rCM's c1-4)")
    ap.add_argument("--replayed", action="store_true", help="SF-DMD: replayed backprop (rollout without grad, each "
                    "chunk's exit step recomputed in backward: one chunk's graph at a time)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--checkpoint-layers", type=int, default=0, metavar="N",
                    help="with checkpointing: recompute only the first N blocks (0 = all; train.checkpoint_layers)")
    ap.add_argument("--recompute", choices=("hooks", "reentrant"), default="hooks",
                    help="with checkpointing: saved-tensor hooks (torch's non-reentrant checkpoint) or one reentrant "
                    "recompute node per block (less host time per call; models/causal_wan.py)")
    ap.add_argument("--keep-attention", action=argparse.BooleanOptionalAction, default=True,
                    help="with checkpointing: checkpointed blocks keep their self-attention outputs for the recompute, "
                    "which skips the attention kernel (train.checkpoint_keep_attention, on by default; "
                    "ops/kept_attention.py); --no-keep-attention: recompute them")
    ap.add_argument("--compile", action="store_true",
                    help="fuse the elementwise chains with torch.compile (megatron_rcm.ops.fusion)")
    ap.add_argument("--compile-min-elements", type=int, default=0, metavar="N",
                    help="with --compile: calls on tensors of fewer than N elements stay eager (e.g. 10000000: the "
                    "rollout's 4,680-token chunks eager, teacher forcing's 65,520 tokens compiled)")
    ap.add_argument("--compile-guards", choices=("dynamo", "own"), default="dynamo",
                    help="with --compile: how a call finds its compiled graph, dynamo's guards or the fusion layer's "
                    "own dict of graphs (ops/fusion.py _guards)")
    ap.add_argument("--out", default=None, help="append one JSON line per kind")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile the last rep and print its N most expensive GPU kernels")
    ap.add_argument("--gaps", type=int, default=0, metavar="N",
                    help="profile the last rep (host and GPU) and print the N host labels (network calls, backward, "
                    "optimizer, critic step) under which the GPU sat idle longest (benchmarks/gpu_idle.py)")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only as a smoke check of the script")
    ap.add_argument("--parallel", choices=("none", "fsdp", "zero1"), default="none",
                    help="data parallel over the torchrun world (or a world of 1): FSDP2 of student and critic, or "
                    "ZeRO-1 optimizer states (the teacher stays whole)")
    ap.add_argument("--fsdp-param-dtype", default="", choices=("", "bfloat16"),
                    help="with --parallel fsdp: FSDP2's compute dtype (bfloat16: no autocast weight copies)")
    ap.add_argument("--plan", action="store_true",
                    help="also print the memory planner's estimate of the peak (megatron-rcm info --gpus) and the "
                    "relative difference to the measured one")
    ap.add_argument("--plan-only", action="store_true", help="print the planner's estimates without running (no GPU)")
    args = ap.parse_args(argv)
    if args.plan_only:
        print("| step | act. ckpt | elementwise | layers | planned peak GiB |")
        print("|---|---|---|---|---|")
        for kind in args.kinds.split(","):
            label = ckpt_label(vars(args))
            print(f"| {'TF-sCM' if kind == 'scm' else 'SF-DMD'} | {label} | {compiled_label(args)} "
                  f"| {args.layers} | {planned_gib(args, kind):.1f} |")
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/train_step.py needs a CUDA GPU (--device cpu: smoke check only)")
    from megatron_rcm.ops import fusion
    from megatron_rcm.ops.attention import resolve_backend

    fusion.set_enabled(args.compile, min_elements=args.compile_min_elements, guards=args.compile_guards)

    par = data_parallel(args, device)  # (sets this rank's GPU before anything is built)
    if par is not None and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    like = torch.zeros(1, 1, 1, 128, device=device, dtype=torch.bfloat16)
    used = resolve_backend(args.attention, like).name
    main_rank = par is None or par.is_main
    say = print if main_rank else (lambda *a, **k: None)
    plan_cols = " planned GiB | plan vs peak |" if args.plan else ""
    say("| step | layout | attention | act. ckpt | fused elementwise | layers | video tokens | step (s) | tokens/s | "
        "TFLOP/step | MFU | peak GiB |" + plan_cols)
    say("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.plan else ""))
    replayed = " (replayed)" if args.replayed else ""
    for kind in args.kinds.split(","):
        r = run(args, kind, device)
        r["attention"] = used
        if args.plan:
            r["planned_gib"] = planned_gib(args, kind)
        layout = "plain" if par is None else f"{args.parallel} x {par.world_size}" + (
            f" ({args.fsdp_param_dtype})" if args.fsdp_param_dtype else "")
        say(f"| {'TF-sCM' if kind == 'scm' else 'SF-DMD' + replayed} | {layout} | {used} | {ckpt_label(r)} | "
            f"{compiled_label(args)} | "
            f"{r['layers']} | {r['video_tokens']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{r['tflop_per_step']:.1f} | {100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} |" +
            (f" {r['planned_gib']:.1f} | {100 * (r['planned_gib'] / r['peak_gib'] - 1):+.0f}% |" if args.plan else ""),
            flush=True)
        if args.out and main_rank:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
