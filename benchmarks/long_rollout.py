"""Streams past the training length: drift per window, motion accuracy and cache memory of each stream-cache policy.

    python benchmarks/long_rollout.py RUN_DIR --phase sf_dmd                # 4x and 8x, 32 prompts, 2 steps
    python benchmarks/long_rollout.py RUN_DIR --phase sf_dmd --lengths 4 --num-videos 8 --policies frame_sink

RUN_DIR is a tiny-recipe run (``megatron-rcm train examples/tiny_recipe.yaml``: synthetic moving shapes, the
run's ``eval/extractor.safetensors`` classifier; trained here with its own recipe when missing). Each video is
cut into windows of the training length; per window: the Frechet distance of the classifier's features to
the *first* window's (drift: 0 = the same statistics as the first window; the floor row gives the FD of two
independent first windows, what sampling noise alone makes), and the motion accuracy (is the prompt's motion
class recognised). Memory: the self-attention KV cache's peak tokens and bytes (``KVCache.nbytes``; fp8
scales included). Every policy sees the same number of chunks (``--visible-chunks``, default: the training
length in chunks), so they differ only in which chunks and at which positions.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

# name -> (sink chunks, rope policy, kv cache dtype); the window is --visible-chunks minus the sink
POLICIES = {
    "unbounded": None,  # the whole history, absolute positions (memory grows with the video)
    "sliding_window": (0, "absolute", "auto"),  # Causal-rCM sliding_window, Self-Forcing local_attn_size
    "frame_sink": (1, "absolute", "auto"),  # LongLive's frame sink (+ short window), Self-Forcing sink_size
    "frame_sink_rebase": (1, "rebase", "auto"),  # ... with the window re-based after the sink (Infinity-RoPE-like)
    "frame_sink_rebase_fp8": (1, "rebase", "fp8_e4m3"),
    "frame_sink_fp8": (1, "absolute", "fp8_e4m3"),
}


def stream_options(name: str, visible: int, steps: int, trained_frames: int):
    from megatron_rcm.inference.streaming import StreamConfig

    if POLICIES[name] is None:
        return StreamConfig(steps=steps, window_chunks=0, sink_chunks=0, rope_policy="absolute")
    sink, rope, dtype = POLICIES[name]
    return StreamConfig(steps=steps, window_chunks=visible - sink, sink_chunks=sink, rope_policy=rope,
                        kv_cache_dtype=dtype, trained_frames=trained_frames)


def extractor_for(cfg, run_dir: Path):
    from megatron_rcm.data import build_dataset
    from megatron_rcm.evaluation import train_feature_extractor

    path = run_dir / "eval" / "extractor.safetensors"  # the end-of-phase report's classifier (same recipe)
    return train_feature_extractor(build_dataset(cfg.data, batch_size=cfg.data.batch_size), steps=120, seed=0,
                                   cache_path=str(path)).eval()


@torch.no_grad()
def stream(model, prompts, frames: int, h: int, w: int, options, seed: int):
    """(video [B, C, frames, H, W], peak cache tokens, peak cache bytes, seconds)."""
    from megatron_rcm.inference.streaming import stream_video

    caches = []
    new = model.new_kv_cache
    model.new_kv_cache = lambda *a, **k: caches.append(new(*a, **k)) or caches[-1]
    g = torch.Generator().manual_seed(seed)
    chunks, tokens, nbytes = [], 0, 0
    t0 = time.perf_counter()
    try:
        for out in stream_video(model, prompts["context"], frames, h, w, options, prompts["uncond_context"],
                                generator=g):
            chunks.append(out.frames)
            tokens, nbytes = max(tokens, out.cache_tokens), max(nbytes, caches[0].nbytes)
    finally:
        model.new_kv_cache = new
    return torch.cat(chunks, 2), tokens, nbytes, time.perf_counter() - t0


@torch.no_grad()
def window_stats(video, class_id, extractor, window: int):
    """Per window of ``window`` frames: (FD to the first window, motion accuracy)."""
    from megatron_rcm.evaluation.metrics import frechet_distance

    feats, accs = [], []
    for start in range(0, video.shape[2] - window + 1, window):
        f, logits = extractor.features_and_logits(video[:, :, start:start + window].float().clamp(-1, 1))
        feats.append(f)
        accs.append(float((logits.argmax(-1) == class_id).float().mean()))
    return [frechet_distance(f, feats[0]) for f in feats], accs


@torch.no_grad()
def fp8_attention_error(model, prompts, video, h: int, w: int, options, level: float = 0.5, seed: int = 0):
    """Every chunk of ``video`` (clean, from a stream) written to a bf16-or-model-dtype cache and to an fp8 one
    (each written through its own cache, as a stream would), then a noisy copy of the next chunk run against
    both: (max abs, relative L2) error of every layer's self-attention output and of the network's output."""
    from megatron_rcm.network import Condition, Denoiser

    net = Denoiser.of(model)
    layout = net.layout(video.shape[2] // net.patch_frames)
    cond = Condition(prompts["context"])
    caches = {k: net.new_cache(h, w, cond, options=replace(options, kv_cache_dtype=k).cache_options())
              for k in ("auto", "fp8_e4m3")}
    record, outputs = [], {}
    originals = [b.attn1.self_attention for b in model.blocks]

    def hooked(orig):
        return lambda *a, **k: (lambda out: (record.append(out[0]), out)[1])(orig(*a, **k))

    for b, orig in zip(model.blocks, originals):
        b.attn1.self_attention = hooked(orig)
    g = torch.Generator().manual_seed(seed)
    worst = {"attn_abs": 0.0, "attn_rel": 0.0, "out_abs": 0.0, "out_rel": 0.0}
    try:
        for chunk in range(layout.n_chunks):
            sl = layout.frame_slice(chunk, net.patch_frames)
            x0 = video[:, :, sl]
            noisy = (1 - level) * x0 + level * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
            for kind, cache in caches.items():
                record.clear()
                v, _ = net.chunk(noisy, level, cond, cache, chunk)
                outputs[kind] = (list(record), v)
            (ra, va), (rq, vq) = outputs["auto"], outputs["fp8_e4m3"]
            for a, q in zip(ra, rq):
                worst["attn_abs"] = max(worst["attn_abs"], float((q - a).abs().max()))
                worst["attn_rel"] = max(worst["attn_rel"], float((q - a).norm() / a.norm()))
            worst["out_abs"] = max(worst["out_abs"], float((vq - va).abs().max()))
            worst["out_rel"] = max(worst["out_rel"], float((vq - va).norm() / va.norm()))
            for cache in caches.values():
                net.write_chunk(x0, cond, cache, chunk)
    finally:
        for b, orig in zip(model.blocks, originals):
            b.attn1.self_attention = orig
    return worst


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--phase", default="sf_dmd")
    p.add_argument("--lengths", type=int, nargs="+", default=[4, 8], help="video lengths in training lengths")
    p.add_argument("--num-videos", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--visible-chunks", type=int, default=None, help="chunks each chunk attends to (default: the "
                   "training length in chunks)")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from megatron_rcm.inference.run_dir import load_phase_model, load_run_config
    from megatron_rcm.inference.sampling import prompt_batch

    run_dir = Path(args.run_dir)
    cfg = load_run_config(run_dir)
    model = load_phase_model(cfg, args.phase)
    d = cfg.data
    net_frames = d.num_frames // model.patch[0]
    train_chunks = model.chunk_layout(net_frames).n_chunks
    visible = args.visible_chunks or train_chunks
    extractor = extractor_for(cfg, run_dir)
    prompts = prompt_batch(d, args.num_videos, cfg.eval.seed, "cpu")
    cls = prompts["class_id"]
    print(f"# {run_dir} phase {args.phase}: training length {d.num_frames} frames = {train_chunks} chunks; "
          f"{args.num_videos} videos, {args.steps} steps, {visible} visible chunks, torch threads {args.threads}")

    floor_opts = stream_options("sliding_window", visible, args.steps, d.num_frames)
    a = stream(model, prompts, d.num_frames, d.height, d.width, floor_opts, args.seed)[0]
    b = stream(model, prompts, d.num_frames, d.height, d.width, floor_opts, args.seed + 1)[0]
    from megatron_rcm.evaluation.metrics import frechet_distance

    fa, la = extractor.features_and_logits(a.float().clamp(-1, 1))
    fb, _ = extractor.features_and_logits(b.float().clamp(-1, 1))
    floor = frechet_distance(fa, fb)
    acc0 = float((la.argmax(-1) == cls).float().mean())
    print(f"# floor: FD of two seeds' first windows {floor:.0f}; first-window motion accuracy {acc0:.2f}")

    rows = []
    for length in args.lengths:
        frames = length * d.num_frames
        print(f"\n## {length}x the training length ({frames} frames, {frames // d.num_frames} windows)\n")
        print("| policy | window+sink | rope | kv dtype | FD to window 1, per window | FD max | motion acc first / "
              "last / min | peak cache tokens | peak cache KiB | s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name in args.policies:
            opts = stream_options(name, visible, args.steps, d.num_frames)
            video, tokens, nbytes, secs = stream(model, prompts, frames, d.height, d.width, opts, args.seed)
            fds, accs = window_stats(video, cls, extractor, d.num_frames)
            row = {"policy": name, "length": length, "window": opts.window_chunks, "sink": opts.sink_chunks,
                   "rope": opts.rope_policy, "kv_dtype": opts.kv_cache_dtype, "fd_per_window": fds,
                   "acc_per_window": accs, "peak_tokens": tokens, "peak_bytes": nbytes, "seconds": secs,
                   "floor_fd": floor}
            rows.append(row)
            vis = "all" if not opts.window_chunks else f"{opts.window_chunks}+{opts.sink_chunks}"
            per = " ".join(f"{f:.0f}" for f in fds[1:])
            print(f"| {name} | {vis} | {opts.rope_policy} | {opts.kv_cache_dtype} | {per} | {max(fds):.0f} | "
                  f"{accs[0]:.2f} / {accs[-1]:.2f} / {min(accs):.2f} | {tokens} | {nbytes / 1024:.0f} | {secs:.1f} |",
                  flush=True)
    if "frame_sink_rebase" in args.policies:
        opts = stream_options("frame_sink_rebase", visible, args.steps, d.num_frames)
        frames = max(args.lengths) * d.num_frames
        video = stream(model, prompts, frames, d.height, d.width, opts, args.seed)[0]
        err = fp8_attention_error(model, prompts, video, d.height, d.width, opts)
        fp8 = stream(model, prompts, frames, d.height, d.width, replace(opts, kv_cache_dtype="fp8_e4m3"), args.seed)[0]
        fd_w = [frechet_distance(*(extractor.features_and_logits(v[:, :, i:i + d.num_frames].float().clamp(-1, 1))[0]
                                   for v in (fp8, video))) for i in range(0, frames, d.num_frames)]
        mse = float(((fp8 - video).double() ** 2).mean())
        print(f"\n## fp8 e4m3 cache vs the {model.dtype} cache: every chunk of a {frames}-frame frame_sink_rebase "
              "video, queried at FM level 0.5 (worst chunk); then the same stream (same noise) with each cache\n")
        print("| self-attention output max abs | relative L2 | network output max abs | relative L2 | "
              "FD fp8 vs unquantised stream, per window | pixel MSE between the streams |")
        print("| --- | --- | --- | --- | --- | --- |")
        print(f"| {err['attn_abs']:.2e} | {err['attn_rel']:.2e} | {err['out_abs']:.2e} | {err['out_rel']:.2e} | "
              f"{' '.join(f'{f:.0f}' for f in fd_w)} | {mse:.4f} |")
        err.update(fd_fp8_vs_auto_per_window=fd_w, mse_fp8_vs_auto=mse)
        rows.append({"fp8_error": err})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
