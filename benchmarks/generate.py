"""Streaming few-step generation speed of the Wan2.1-1.3B-shaped causal student on one GPU (issue 7).

    python benchmarks/generate.py                       # 2-step, chunk-wise (3 frames) and frame-wise, 480x832
    python benchmarks/generate.py --steps 4 --frames 42 --modes chunk

Weights are random (speed does not depend on them); bf16 parameters, no CFG (a distilled student), the KV
cache of ``megatron_rcm.inference.streaming.stream_video`` (sink + rolling window when ``--window-chunks``
is set). Without ``--vae`` the times are for latents; with ``--vae`` every chunk is also decoded to pixels
as it is produced, by the streaming decoder of the real Wan2.1 VAE architecture (``AutoencoderKLWan()``'s
default config, random weights, ``--vae-dtype``), exactly as ``megatron-rcm generate`` does
(``megatron_rcm.inference.real_video.stream_decoded``) - the way Self-Forcing's 17 fps counts the decode.
Reports time to the first chunk, latent frames per second over the whole video, the equivalent video frames
per second (Wan's VAE makes 4 video frames of each latent frame after the first: 21 latent frames = 81 video
frames), the share of the time spent in the VAE and peak memory.

    python benchmarks/generate.py --vae                 # the same, decode included
    python benchmarks/generate.py --compile --cuda-graphs --modes chunk   # chunk forwards replayed as CUDA graphs

``--cuda-graphs`` replays every chunk forward as a CUDA graph (``megatron_rcm/network/chunk_graphs.py``), captured
during the warm-up pass; ``--noisy-context S`` caches each chunk from its last step at level S (Causal-rCM's
noisy context: 2 forwards a 2-step chunk instead of 3); ``--cudnn-benchmark`` lets cuDNN pick the VAE's
convolution algorithms.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def build(chunk_frames: int, layers: int, window_chunks: int, sink_chunks: int, attention: str, device):
    from megatron_rcm.config.model import CausalConfig, model_preset
    from megatron_rcm.models import build_model

    torch.manual_seed(0)
    cfg = model_preset("wan2.1-1.3b", num_layers=layers, param_dtype="bfloat16")
    causal = CausalConfig(chunk_frames=chunk_frames, window_chunks=window_chunks, sink_chunks=sink_chunks,
                          attention_backend=attention)
    return build_model(cfg, causal).to(device).eval()


def build_vae(device, dtype: str, base_dim: int = 96):
    """The real Wan2.1 VAE architecture (AutoencoderKLWan's default config; ``base_dim`` < 96 only for smoke runs)."""
    from diffusers import AutoencoderKLWan

    from megatron_rcm.encoders import WanVideoVAE

    torch.manual_seed(0)
    vae = AutoencoderKLWan() if base_dim == 96 else AutoencoderKLWan(base_dim=base_dim)
    return WanVideoVAE(torch.nn.Module.to(vae, getattr(torch, dtype)), device)  # (ModelMixin.to warns on casts)


def run(args, mode: str, device) -> dict:
    from megatron_rcm.inference.real_video import stream_decoded
    from megatron_rcm.inference.streaming import StreamConfig
    from megatron_rcm.network import NoisyContext
    from megatron_rcm.network.chunk_graphs import ChunkGraphs

    chunk = args.chunk_frames if mode == "chunk" else 1
    options = StreamConfig(cuda_graphs=args.cuda_graphs,
                           noisy_context=NoisyContext(args.noisy_context, 0) if args.noisy_context else None)
    model = build(chunk, args.layers, args.window_chunks, args.sink_chunks, args.attention, device)
    vae = build_vae(device, args.vae_dtype, args.vae_base_dim) if args.vae else None
    inputs = {"context": torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for rep in range(args.reps + 1):  # the first pass warms up kernels and the allocator
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        first, decode = None, 0.0
        with torch.no_grad():
            for _out, _frames, decode_s in stream_decoded(model, inputs, args.frames, args.height, args.width,
                                                          args.steps, 1.0, rep, vae, sync=sync, options=options):
                decode += decode_s
                if first is None:
                    first = time.perf_counter() - t0
        sync()
        total = time.perf_counter() - t0
        if rep > 0:
            rows.append((first, total, decode))
    first = sorted(r[0] for r in rows)[len(rows) // 2]
    total = sorted(r[1] for r in rows)[len(rows) // 2]
    decode = sorted(r[2] for r in rows)[len(rows) // 2]
    video_frames = 1 + 4 * (args.frames - 1)
    graphs = ChunkGraphs.of(model)
    return {"mode": mode, "compile": args.compile, "cuda_graphs": args.cuda_graphs, "graphs": graphs.captured,
            "replays": graphs.replayed, "noisy_context": args.noisy_context, "chunk_frames": chunk, "steps": args.steps, "layers": args.layers,
            "frames": args.frames, "vae": args.vae, "vae_dtype": args.vae_dtype if args.vae else None,
            "first_chunk_s": first, "total_s": total, "latent_fps": args.frames / total,
            "video_fps": video_frames / total, "vae_share": decode / total,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="chunk,frame")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--frames", type=int, default=21, help="latent frames to generate")
    ap.add_argument("--height", type=int, default=60)
    ap.add_argument("--width", type=int, default=104)
    ap.add_argument("--chunk-frames", type=int, default=3)
    ap.add_argument("--window-chunks", type=int, default=0, help="rolling KV window in chunks (0: unlimited)")
    ap.add_argument("--sink-chunks", type=int, default=0)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only as a smoke check of the script")
    ap.add_argument("--out", default=None, help="append one JSON line per mode")
    ap.add_argument("--compile", action="store_true",
                    help="fuse the elementwise chains with torch.compile (megatron_rcm.ops.fusion)")
    ap.add_argument("--vae", action="store_true", help="decode every chunk with the Wan2.1 VAE as it is produced")
    ap.add_argument("--vae-dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    ap.add_argument("--vae-base-dim", type=int, default=96, help="96 = the real Wan2.1 VAE (smaller: smoke runs)")
    ap.add_argument("--cuda-graphs", action="store_true", help="replay the chunk forwards as CUDA graphs")
    ap.add_argument("--noisy-context", type=float, default=0.0, metavar="S",
                    help="cache each chunk from its last step at FM level S (0: re-run at t = 0, the default)")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark (VAE convs)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    from megatron_rcm.ops import fusion

    fusion.set_enabled(args.compile)
    print("| mode | steps | compiled | CUDA graphs | layers | latent frames | VAE decode | first chunk (s) | total (s) | "
          "latent frames/s | video frames/s | time in VAE | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        r = run(args, mode, device)
        vae = f"yes ({r['vae_dtype']})" if r["vae"] else "no"
        graphs = f"{r['graphs']} ({r['replays']} replays)" if r["cuda_graphs"] else "no"
        print(f"| {mode}-wise ({r['chunk_frames']} frame{'s' if r['chunk_frames'] > 1 else ''}) | {r['steps']} | "
              f"{'yes' if r['compile'] else 'no'} | {graphs} | {r['layers']} | {r['frames']} | {vae} | {r['first_chunk_s']:.3f} | {r['total_s']:.3f} | "
              f"{r['latent_fps']:.1f} | {r['video_fps']:.1f} | {100 * r['vae_share']:.0f}% | {r['peak_gib']:.1f} |",
              flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
