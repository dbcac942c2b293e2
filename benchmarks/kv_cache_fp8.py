"""Chunk latency and memory of a bf16 vs an fp8 (e4m3) stream KV cache, Wan2.1-1.3B shape, one GPU (issue 23).

    python benchmarks/kv_cache_fp8.py                          # 30 layers, 480x832, chunks of 3 latent frames
    python benchmarks/kv_cache_fp8.py --window-chunks 4 --sink-chunks 1 --steps 4
    python benchmarks/kv_cache_fp8.py --device cpu --layers 1 --height 8 --width 8   # smoke run

Random bf16 weights (speed does not depend on them), no CFG, the streaming path of ``megatron-rcm generate``
(``stream_video``) with ``kv_cache_dtype`` auto (bf16) and fp8_e4m3. The video is long enough for the rolling
cache to be full (sink + window) for ``--timed-chunks`` chunks; their median latency (the chunk's denoising
steps + its cache write) is reported, with the self-attention cache's bytes (``KVCache.nbytes``, fp8 scales
included) and the peak GPU memory. The fp8 cache is dequantised on read (the attention backends take bf16),
so it saves memory, and costs a dequantisation of the cache per forward.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics

import torch


def run(args, kv_dtype: str, device) -> dict:
    from megatron_rcm.config.model import CausalConfig, model_preset
    from megatron_rcm.inference.streaming import StreamConfig, stream_video
    from megatron_rcm.models import build_model

    gc.collect()  # the previous run's model and cache are gone before this run's peak is measured
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    cfg = model_preset("wan2.1-1.3b", num_layers=args.layers, param_dtype="bfloat16")
    causal = CausalConfig(chunk_frames=args.chunk_frames, attention_backend=args.attention)
    model = build_model(cfg, causal).to(device).eval()
    caches = []
    new = model.new_kv_cache
    model.new_kv_cache = lambda *a, **k: caches.append(new(*a, **k)) or caches[-1]
    context = torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=torch.bfloat16)
    chunks = args.sink_chunks + args.window_chunks + args.timed_chunks
    options = StreamConfig(steps=args.steps, window_chunks=args.window_chunks, sink_chunks=args.sink_chunks,
                           rope_policy="rebase", kv_cache_dtype=kv_dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    lat, nbytes = [], 0
    with torch.no_grad():
        for out in stream_video(model, context, chunks * args.chunk_frames, args.height, args.width, options,
                                generator=torch.Generator(device=device).manual_seed(0)):
            nbytes = max(nbytes, caches[-1].nbytes)
            if out.index >= chunks - args.timed_chunks:
                lat.append(out.latency_s)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del model.new_kv_cache  # the wrapper closes a reference cycle (model -> wrapper -> bound method -> model)
    return {"kv_dtype": kv_dtype, "chunk_ms": 1e3 * statistics.median(lat), "cache_mib": nbytes / 2**20,
            "peak_gib": peak, "layers": args.layers, "tokens_per_chunk": caches[-1].chunk_tokens[-1],
            "cached_chunks": len(caches[-1])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--height", type=int, default=60, help="latent height (480 / 8)")
    p.add_argument("--width", type=int, default=104, help="latent width (832 / 8)")
    p.add_argument("--chunk-frames", type=int, default=3)
    p.add_argument("--window-chunks", type=int, default=6, help="chunks attended, the current one included")
    p.add_argument("--sink-chunks", type=int, default=1)
    p.add_argument("--timed-chunks", type=int, default=5, help="chunks timed once the cache is full")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--attention", default="auto")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    run(args, "auto", device)  # warm-up: kernels, allocator
    rows = [run(args, dtype, device) for dtype in ("auto", "fp8_e4m3")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# {name}, Wan2.1-1.3B shape ({args.layers} layers), latent {args.height}x{args.width}, "
          f"{rows[0]['tokens_per_chunk']} tokens per chunk, {rows[0]['cached_chunks']} chunks cached "
          f"({args.sink_chunks} sink + window {args.window_chunks}), {args.steps} steps per chunk")
    print("| kv cache | chunk latency ms (median) | self-attn cache MiB | peak GiB |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        label = "bf16" if r["kv_dtype"] == "auto" else r["kv_dtype"]
        print(f"| {label} | {r['chunk_ms']:.1f} | {r['cache_mib']:.0f} | {r['peak_gib']:.2f} |")
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
