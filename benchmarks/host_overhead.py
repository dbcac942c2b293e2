"""Is the SF-DMD step bound by the GPU or by the host that launches its kernels? (issue 22, item 2)

    python benchmarks/host_overhead.py                      # CPU: host cost of each call (tiny widths), eager
    python benchmarks/host_overhead.py --compile            # the same with the compiled elementwise chains
    python benchmarks/host_overhead.py --recompute reentrant  # checkpointed blocks as one recompute node each
    python benchmarks/host_overhead.py --fusable-call       # one small compiled call against its eager ops (and
                                                            # with the fusion layer's own graphs)
    python benchmarks/host_overhead.py --device cuda        # GPU: host cost (tiny widths, real launches) beside
                                                            # the call's time at the 1.3B widths
    python benchmarks/host_overhead.py --copies 20          # CPU, bf16 autocast: each call's copies (dtype casts,
                                                            # cat, clone) by the line or backward node making them

The SF-DMD step is ~60 network calls, most of them on one chunk (4,680 tokens). For each kind of call it makes
this prints what the host spends to issue it and what the whole call takes:
- ``host ms``: the call on a model of the same structure (30 blocks, the same chunks, cache and masks) but tiny
  widths: its kernels finish at once, so the wall time is Python, dispatch and (on a GPU) kernel launches;
- ``call ms`` (``--device cuda``): the same call at the Wan2.1-1.3B widths; ``host / call`` near 1 means the GPU
  waits for the host (CUDA graphs or fewer, larger kernels help), well below 1 that the kernels are the cost;
- ``ops``: dispatched operators that launch work (views and metadata left out), counted in eager mode;
- ``waits``: host-device synchronisations of one call, found on the meta device (``utils/host_syncs.py``).
On the CPU ``host ms`` (fp32, no autocast) has no launch cost and tiny CPU kernels in it: read it as the Python
side of the GPU's.
Calls: ``chunk, no grad`` = a rollout step before the exit (chunk 4 of 7 against 3 cached chunks); ``chunk, grad``
= the exit step (forward with grad, checkpointed blocks, then its backward, recomputation included); ``score`` =
a teacher/critic forward over the whole video (block-causal, no grad).
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_NO_LAUNCH = frozenset({
    "view", "_unsafe_view", "t", "transpose", "permute", "unsqueeze", "squeeze", "expand", "slice", "select",
    "as_strided", "detach", "alias", "unflatten", "flatten", "reshape", "split", "split_with_sizes", "chunk",
    "unbind", "narrow", "empty", "empty_strided", "empty_like", "lift_fresh", "_reshape_alias", "view_as",
    "promote_types", "result_type", "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
})


class LaunchCount(TorchDispatchMode):
    """Counts dispatched operators that launch work (on a GPU: kernels, or a copy)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in _NO_LAUNCH:
            self.n += 1
        return func(*args, **(kwargs or {}))


_COPIES = frozenset({"_to_copy", "copy_", "cat", "clone"})
_ROUTING = ("ops/fusion.py", "ops/kept_attention.py")  # pass calls through: the line above them made the copy


def _short(dtype) -> str:
    return str(dtype).replace("torch.", "").replace("float", "fp").replace("bfp16", "bf16")


class CopyCount(LaunchCount):
    """Launched operators, and the copies among them by what made them: the innermost megatron_rcm line of a
    forward op (past the wrappers that only route a call), or the backward node of an op autograd runs."""

    def __init__(self):
        super().__init__()
        self.copies: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _COPIES:
            kind = name
            if name == "_to_copy" and (kwargs or {}).get("dtype") is not None:
                kind += f" {_short(args[0].dtype)} -> {_short(kwargs['dtype'])}"
            elif name == "copy_" and args[0].dtype != args[1].dtype:
                kind += f" {_short(args[1].dtype)} -> {_short(args[0].dtype)}"
            self.copies[(kind, copy_source())] += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


def copy_source() -> str:
    node = torch._C._current_autograd_node()
    if node is not None:
        return f"backward of {node.name()}"
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace("\\", "/")
        if "megatron_rcm/" in path and not any(r in path for r in _ROUTING):
            return f"{path.split('megatron_rcm/')[-1]}:{frame.lineno} {frame.name}"
    return "(outside megatron_rcm)"


def copies_per_call(args, top: int) -> str:
    """Each call's launched ops and copies, and its ``top`` copy sources: what a fused store, one dtype, or a
    compiled region would save. CPU bf16 autocast stands in for CUDA's: both run the matmuls in bf16, and the
    model code upcasts its norms and gates itself. Each call runs in an autocast region of its own, as one
    network call of a step does; a backward on the CPU runs inside it, so a recompute finds its weight casts
    cached, where a GPU's autograd thread casts them again (20 per block)."""
    device = torch.device("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fns = calls(*build(args, device, tiny=True), args.chunk_frames)
    out = ["| call | launched ops | copies | copy | made by | count |", "|---|---|---|---|---|---|"]
    for name, fn in fns.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fn()
        with torch.autocast("cpu", dtype=torch.bfloat16), CopyCount() as count:
            fn()
        total = sum(count.copies.values())
        out.append(f"| {name} | {count.n} | {total} ({100 * total / max(count.n, 1):.0f}%) | | | |")
        for (kind, source), n in count.copies.most_common(top):
            out.append(f"| | | | {kind} | {source} | {n} |")
    return "\n".join(out)


def build(args, device, tiny: bool):
    """(student Denoiser, teacher Denoiser, condition, video latents): the train_step benchmark's SF-DMD models at
    the 1.3B widths, or the same structure with tiny widths."""
    from megatron_rcm.config.model import CausalConfig, model_preset
    from megatron_rcm.models import build_model
    from megatron_rcm.network import Condition, Denoiser

    torch.manual_seed(0)
    widths = dict(num_attention_heads=1, attention_head_dim=64, ffn_dim=128, text_dim=64) if tiny else {}
    cfg = model_preset("wan2.1-1.3b", num_layers=args.layers, **widths)
    student = build_model(cfg, CausalConfig(chunk_frames=args.chunk_frames, attention_backend=args.attention))
    student = student.to(device)
    student.gradient_checkpointing, student.reentrant_recompute = True, args.recompute == "reentrant"
    student.keep_attention = args.keep_attention  # (backends with a separate backward: the fused kernels on a GPU)
    teacher = build_model(cfg, CausalConfig(chunk_frames=args.chunk_frames, attention_backend=args.attention))
    teacher = teacher.to(device=device, dtype=torch.bfloat16).requires_grad_(False).eval()
    h, w = (4, 4) if tiny else (args.height, args.width)
    text = torch.randn(1, 512, cfg.text_dim, device=device)
    video = torch.randn(1, 16, args.frames, h, w, device=device)
    return Denoiser(student), Denoiser(teacher), Condition(text), video


def calls(student, teacher, cond, video, chunk_frames: int):
    """name -> a function making one call of the step (the cache filled as chunk 4 of the rollout sees it)."""
    cache = student.new_cache(video.shape[3], video.shape[4])
    x = video[:, :, :chunk_frames]
    for i in range(3):
        student.write_chunk(x, cond, cache, i)

    def chunk_no_grad():
        with torch.no_grad():
            student.chunk(x, 0.5, cond, cache, 3)

    def chunk_grad():
        v, _ = student.chunk(x, 0.5, cond, cache, 3)
        v.float().square().mean().backward()

    def score():
        with torch.no_grad():
            teacher.velocity(video, torch.full((1,), 0.5, device=video.device), cond, attend="block_causal")

    return {"chunk, no grad": chunk_no_grad, "chunk, grad": chunk_grad, "score": score}


def wall_ms(fn, device, reps: int, warmup: int = 2) -> float:
    """Median wall milliseconds of ``fn()``, the device synchronised before and after each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def waits_per_call(args) -> dict[str, int]:
    """Host-device synchronisations of one call of each kind (its second call: masks are packed by then), on the
    meta device with the SDPA backend (the fused kernels need CUDA; their mask packing is audited in tests)."""
    from megatron_rcm.utils.host_syncs import SyncAudit

    meta = argparse.Namespace(**{**vars(args), "attention": "sdpa"})
    student, teacher, cond, video = build(meta, torch.device("meta"), tiny=True)
    out = {}
    with SyncAudit() as audit:
        for name, fn in calls(student, teacher, cond, video, args.chunk_frames).items():
            fn()
            audit.events.clear()
            fn()
            out[name] = audit.total
    return out


def fusable_call_us(device, reps: int = 3000) -> list[tuple[str, float, float, float, float]]:
    """(grad mode, eager µs, compiled µs, compiled with a view argument µs, compiled with own graphs µs) of one small
    fused call (a gated residual over [1, 48, 64]): the host's fixed cost of a compiled call against the eager ops it
    replaces (``--fusable-call``). A view argument is re-aliased first (``ops/fusion._unview``: an autograd Function
    when it carries a gradient); own graphs skip dynamo on each call (``ops/fusion._guards``)."""
    from megatron_rcm.ops import dual, fusion

    x, gate = torch.randn(1, 48, 64, device=device), torch.randn(64, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def per_call(fn):
        for _ in range(50):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return 1e6 * (time.perf_counter() - t0) / reps

    out = []
    for grad in (False, True):
        a = x.clone().requires_grad_(grad)
        view = x.flatten().clone().requires_grad_(grad).view_as(x)
        with torch.set_grad_enabled(grad):
            fusion.set_enabled(True, devices=(device.type,), min_elements=0, guards="dynamo")
            row = [per_call(lambda: dual.gated_residual.eager(a, None, a, None, gate, None)),
                   per_call(lambda: dual.gated_residual(a, None, a, None, gate, None)),
                   per_call(lambda: dual.gated_residual(view, None, view, None, gate, None))]
            fusion.set_enabled(True, devices=(device.type,), min_elements=0, guards="own")
            row.append(per_call(lambda: dual.gated_residual(a, None, a, None, gate, None)))
        out.append(("grad" if grad else "no grad", *row))
    fusion.set_enabled(False, guards="dynamo")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="compiled elementwise chains (megatron_rcm.ops.fusion)")
    ap.add_argument("--compile-guards", choices=("dynamo", "own"), default="dynamo",
                    help="with --compile: dynamo's guards or the fusion layer's own dict of graphs (ops/fusion.py)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--chunk-frames", type=int, default=3)
    ap.add_argument("--height", type=int, default=60)
    ap.add_argument("--width", type=int, default=104)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--recompute", choices=("hooks", "reentrant"), default="hooks",
                    help="how checkpointed blocks recompute (models/causal_wan.py REENTRANT_RECOMPUTE)")
    ap.add_argument("--keep-attention", action=argparse.BooleanOptionalAction, default=True,
                    help="checkpointed blocks keep their self-attention outputs for the recompute "
                    "(train.checkpoint_keep_attention, on by default; the fused kernels only, so a GPU)")
    ap.add_argument("--copies", type=int, default=0, metavar="N",
                    help="instead: each call's copies under CPU bf16 autocast, its N largest sources")
    ap.add_argument("--fusable-call", action="store_true",
                    help="instead: the host cost of one small compiled call against its eager ops")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/host_overhead.py --device cuda needs a CUDA GPU")
    if args.copies:
        print(copies_per_call(args, args.copies))
        return
    if args.fusable_call:
        torch.set_num_threads(1)
        print(f"| gated residual [1, 48, 64], {device.type} | eager µs | compiled µs | compiled / eager | compiled, "
              "a view argument µs | compiled, own graphs µs |")
        print("|---|---|---|---|---|---|")
        for mode, eager, compiled, view, plain in fusable_call_us(device):
            print(f"| {mode} | {eager:.1f} | {compiled:.1f} | {compiled / eager:.1f} | {view:.1f} | {plain:.1f} |")
        return
    from megatron_rcm.ops import fusion

    fusion.set_enabled(args.compile, devices=(device.type,), guards=args.compile_guards)
    torch.set_num_threads(1)  # the host side of a GPU run is one thread
    waits = waits_per_call(args)
    # bf16 autocast as the training step runs on a GPU; on the CPU fp32 (its bf16 kernels would be the cost)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        tiny = calls(*build(args, device, tiny=True), args.chunk_frames)
        host, ops = {}, {}
        for name, fn in tiny.items():
            host[name] = wall_ms(fn, device, args.reps)
            if not args.compile:
                with LaunchCount() as count:
                    fn()
                ops[name] = count.n
        full = {}
        if device.type == "cuda":
            for name, fn in calls(*build(args, device, tiny=False), args.chunk_frames).items():
                full[name] = wall_ms(fn, device, args.reps)
    mode = ("eager" if not args.compile else "compiled, own graphs" if args.compile_guards == "own" else "compiled")
    mode += ", reentrant" if args.recompute == "reentrant" else ""
    print(f"| call ({args.layers} blocks, {device.type}) | elementwise | ops | waits | host ms | call ms | host / call |")
    print("|---|---|---|---|---|---|---|")
    for name in tiny:
        call = f"{full[name]:.1f} | {host[name] / full[name]:.2f}" if name in full else "- | -"
        print(f"| {name} | {mode} | {ops.get(name, '-')} | {waits[name]} | {host[name]:.1f} | {call} |")


if __name__ == "__main__":
    main()
