"""``generate-data --teacher`` speed: videos/s of the Wan2.1-1.3B-shaped bidirectional teacher on one GPU (issue 17).

    python benchmarks/generate_data.py                   # 480x832x81 (21x60x104 latents), 50 steps, CFG 5
    python benchmarks/generate_data.py --steps 100 --solver euler   # rCM's data recipe (Euler 100 steps)

Random weights (speed does not depend on them), bf16 parameters: the exact call ``generate-data`` makes per
video (``megatron_rcm.inference.bidirectional.bidirectional_sample``: full attention, cond + uncond in one
doubled batch per step) on 512-token contexts. With ``--umt5`` the prompt encoding by a random umT5-XXL
(bf16) is timed as well (once per video; negligible next to the sampling). Reports seconds per video,
videos per second and per hour, transformer forwards per second and peak memory.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def build_teacher(layers: int, device):
    from megatron_rcm.config.model import model_preset
    from megatron_rcm.models import build_model

    torch.manual_seed(0)
    cfg = model_preset("wan2.1-1.3b", num_layers=layers, param_dtype="bfloat16")
    return build_model(cfg).to(device).eval().requires_grad_(False)


def build_umt5(device):
    """umT5-XXL's encoder shape (google/umt5-xxl: 24 layers, d_model 4096, 64 heads x 64, d_ff 10240), random."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                     relative_attention_max_distance=128)
    with torch.device(device):
        model = UMT5EncoderModel(cfg).to(torch.bfloat16)
    return model.eval().requires_grad_(False)


def run(args, device) -> dict:
    from megatron_rcm.inference.bidirectional import bidirectional_sample

    teacher = build_teacher(args.layers, device)
    umt5 = build_umt5(device) if args.umt5 else None
    frames = (args.frames - 1) // 4 + 1
    shape = (1, 16, frames, args.height // 8, args.width // 8)
    ctx = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    uncond = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, 1000, (1, 512), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, text_times = [], []
    for rep in range(args.videos + 1):  # the first video warms up kernels and the allocator
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        if umt5 is not None:
            with torch.no_grad():
                umt5(ids, torch.ones_like(ids)).last_hidden_state
            sync()
        t1 = time.perf_counter()
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(rep)).to(device)
        bidirectional_sample(teacher, noise, ctx, uncond, args.steps, args.guidance, args.shift, args.solver)
        sync()
        if rep > 0:
            times.append(time.perf_counter() - t0)
            text_times.append(t1 - t0)
    per_video = sorted(times)[len(times) // 2]
    forwards = args.steps * (2 if args.guidance != 1.0 else 1)
    return {"layers": args.layers, "steps": args.steps, "solver": args.solver, "guidance": args.guidance,
            "video": f"{args.frames}x{args.height}x{args.width}", "latents": list(shape[1:]),
            "tokens": frames * (args.height // 16) * (args.width // 16), "umt5": args.umt5,
            "s_per_video": per_video, "videos_per_s": 1 / per_video, "videos_per_h": 3600 / per_video,
            "text_s": sorted(text_times)[len(text_times) // 2], "forwards_per_s": forwards / per_video,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--solver", choices=("multistep2", "euler"), default="multistep2")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--frames", type=int, default=81, help="video frames (4k+1)")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--videos", type=int, default=2, help="timed videos (after one warm-up video)")
    ap.add_argument("--umt5", action="store_true", help="also time the prompt encoding by a random umT5-XXL")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only as a smoke check of the script")
    ap.add_argument("--out", default=None, help="append one JSON line")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    r = run(args, device)
    print("| video | latents | tokens | layers | steps | CFG | s / video | videos / s | videos / h | forwards / s | "
          "umT5 s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    umt5 = f"{r['text_s']:.3f}" if r["umt5"] else "-"
    print(f"| {r['video']} | {'x'.join(map(str, r['latents']))} | {r['tokens']} | {r['layers']} | {r['steps']} "
          f"({r['solver']}) | {r['guidance']:g} | {r['s_per_video']:.2f} | {r['videos_per_s']:.4f} | "
          f"{r['videos_per_h']:.1f} | {r['forwards_per_s']:.2f} | {umt5} | {r['peak_gib']:.1f} |", flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
