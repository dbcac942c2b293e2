"""One TF-sCM training step of a Wan2.1-1.3B-shaped model: 1 GPU vs TP2 vs CP2 (issue 5's GPU check).

    torchrun --nproc_per_node=1 benchmarks/parallel_step.py --layout single --out out/single.json
    torchrun --nproc_per_node=2 benchmarks/parallel_step.py --layout tp2    --out out/tp2.json
    torchrun --nproc_per_node=2 benchmarks/parallel_step.py --layout cp2    --out out/cp2.json
    python benchmarks/parallel_step.py --compare out/single.json out/tp2.json out/cp2.json

Each run builds the same model and teacher (hidden 1536, 12 heads, ffn 8960, text 4096 x 512 tokens;
``--layers`` of the 30), the same teacher-forcing batch and the same noise from one seed, then
(1) computes the sCM loss and its gradient norm in fp32 (TF32 off) - the numbers that must agree
across layouts - and (2) times ``--reps`` full TF-sCM steps in bf16 autocast (teacher CFG forwards,
the JVP pass of the stop-gradient student, the student forward+backward, gradient sync, AdamW) and
reports the median step time and the peak memory per GPU. ``--compare`` prints the table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

LAYOUTS = {"single": dict(tp=1, cp=1), "tp2": dict(tp=2, cp=1), "cp2": dict(tp=1, cp=2)}


def build(args, device):
    from megatron_rcm.config.model import CausalConfig, model_preset
    from megatron_rcm.models import build_model

    torch.manual_seed(0)
    cfg = model_preset("wan2.1-1.3b", num_layers=args.layers)
    student = build_model(cfg, CausalConfig(chunk_frames=args.chunk_frames)).to(device)
    teacher = copy.deepcopy(student)
    with torch.no_grad():  # a teacher that differs from the student (as after distillation steps)
        for p in teacher.parameters():
            p.add_(0.01 * p.std().nan_to_num() * torch.randn_like(p))
    teacher.requires_grad_(False)
    g = torch.Generator(device="cpu").manual_seed(1)
    lat = torch.randn(args.batch, 16, args.frames, args.height, args.width, generator=g)
    ctx = torch.randn(args.batch, 512, 4096, generator=g)
    batch = {"latents": lat.to(device), "context": ctx.to(device), "uncond_context": (0.3 * ctx).to(device)}
    return student, teacher, batch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="single")
    ap.add_argument("--layers", type=int, default=8, help="blocks of the 1.3B model (30 in full)")
    ap.add_argument("--frames", type=int, default=6, help="latent frames of the video (TF sequence: twice)")
    ap.add_argument("--height", type=int, default=60, help="latent height (480p: 60)")
    ap.add_argument("--width", type=int, default=104, help="latent width (832: 104)")
    ap.add_argument("--chunk-frames", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--compare", nargs="+", default=None, help="result JSON files: print the table")
    args = ap.parse_args(argv)
    if args.compare:
        compare(args.compare)
        return 0

    from megatron_rcm.network import Denoiser, StepContext
    from megatron_rcm.objectives.scm import SCMConfig, SCMObjective
    from megatron_rcm.parallel import (ParallelConfig, destroy_parallel, initialize_parallel, parallelize_model,
                                       sharded_optimizer, sync_gradients)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    lay = LAYOUTS[args.layout]
    if lay["tp"] * lay["cp"] != world:
        raise SystemExit(f"--layout {args.layout} needs {lay['tp'] * lay['cp']} processes, torchrun gave {world}")
    groups = initialize_parallel(ParallelConfig(tp=lay["tp"], cp=lay["cp"], dp=1, pp=1))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    rank0 = torch.distributed.get_rank() == 0
    student, teacher, batch = build(args, device)
    if world > 1:
        student, teacher = parallelize_model(student, groups), parallelize_model(teacher, groups)
    obj = SCMObjective(Denoiser(teacher), SCMConfig(sigma_d=1.0, cfg_scale=5.0, r_warmup_steps=0, adaptive_weight=False))
    net, step = Denoiser(student), StepContext(1)
    tokens = args.frames * (args.height // 2) * (args.width // 2)

    # (1) agreement: fp32, TF32 off
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(5)
    loss, metrics = obj.loss(net, batch, step)
    loss.backward()
    sync_gradients(student, groups)
    sq = sum(float(p.grad.double().pow(2).sum()) for n, p in student.named_parameters() if p.grad is not None
             and (groups.tp_rank == 0 or _tp_sharded(n)))
    sq_t = torch.tensor(sq, dtype=torch.float64, device=device)
    if groups.cfg.tp > 1:  # sharded params: sum the shards' squares; replicated ones were counted on tp rank 0
        torch.distributed.all_reduce(sq_t, group=groups.tp_group)
    fp32 = {"loss": float(loss.detach()), "grad_norm": float(sq_t.sqrt()), "scm_g_norm": metrics["scm_g_norm"]}
    student.zero_grad(set_to_none=True)

    # (2) timing: bf16 autocast, full steps with AdamW
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    opt = sharded_optimizer(student.parameters(), groups, lr=1e-6) if world > 1 else torch.optim.AdamW(
        student.parameters(), lr=1e-6)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.reps + 1):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = obj.loss(net, batch, step)
        loss.backward()
        sync_gradients(student, groups)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i > 0:  # the first step warms up allocator and kernels
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    result = {"layout": args.layout, "world": world, "layers": args.layers, "frames": args.frames,
              "tokens_video": tokens, "tokens_tf": 2 * tokens, "batch": args.batch, "fp32": fp32,
              "bf16_loss": float(loss.detach()), "step_s": statistics.median(times), "step_s_all": times,
              "peak_gib": peak, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "attention_bf16": attention_backend_name(device)}
    if rank0:
        print(json.dumps(result))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    destroy_parallel()
    return 0


def attention_backend_name(device) -> str:
    """What ``auto`` resolves to for the bf16 timing ("fused" when the CUDA extension is built)."""
    from megatron_rcm.ops.attention import resolve_backend

    like = torch.zeros(1, 1, 1, 128, device=device, dtype=torch.bfloat16)
    return resolve_backend("auto", like).name


def _tp_sharded(name: str) -> bool:
    from megatron_rcm.parallel.model import tp_shard_dim

    return tp_shard_dim(name) is not None


def compare(paths):
    rows = [json.load(open(p)) for p in paths]
    ref = next((r for r in rows if r["layout"] == "single"), rows[0])
    print(f"{ref['device']}, attention {ref.get('attention_bf16', '?')} (bf16 timing); "
          f"Wan2.1-1.3B-shaped, {ref['layers']} layers, {ref['frames']} latent frames x "
          f"{ref['tokens_video'] // ref['frames']} tokens (TF sequence {ref['tokens_tf']} tokens), batch {ref['batch']}")
    print("| layout | GPUs | fp32 sCM loss | rel. diff vs 1 GPU | fp32 grad norm | rel. diff | bf16 step (s) | "
          "speed-up | peak mem / GPU (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        dl = abs(r["fp32"]["loss"] - ref["fp32"]["loss"]) / abs(ref["fp32"]["loss"])
        dg = abs(r["fp32"]["grad_norm"] - ref["fp32"]["grad_norm"]) / abs(ref["fp32"]["grad_norm"])
        print(f"| {r['layout']} | {r['world']} | {r['fp32']['loss']:.6e} | {dl:.1e} | {r['fp32']['grad_norm']:.6e} | "
              f"{dg:.1e} | {r['step_s']:.3f} | {ref['step_s'] / r['step_s']:.2f}x | {r['peak_gib']:.1f} |")
    return rows


if __name__ == "__main__":
    sys.exit(main())
