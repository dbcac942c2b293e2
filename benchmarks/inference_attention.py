"""Full-mask attention forwards of inference (streaming chunks against their cache, the teacher's bidirectional
sampling) on one GPU: the fused kernel vs cuDNN's and flash SDPA, side by side in one run.

    python benchmarks/inference_attention.py
    python benchmarks/inference_attention.py --training   # forward and backward of the calls autograd records

Why: ``attention(..., backend="auto")`` sends full-mask forwards that autograd does not record to cuDNN on Hopper,
except those from ``INFERENCE_FUSED_FROM`` (queries, keys) on, where the fused kernel is faster
(``megatron_rcm/ops/attention.py``); this table is the reason and the check. Shapes of the Wan2.1-1.3B student at
480x832 (1,560 tokens a latent frame, 12 heads x 128): a 3-frame chunk (4,680 queries) against 1-7 chunks of
keys, and the teacher's 21 frames (32,760 tokens) both ways. TFLOP/s count 4 * Sq * Sk * H * D.

``--training``: the full-mask calls of an SF-DMD step that autograd records (``MEGATRON_RCM_TRAINING_SDPA=cudnn``
sends them to cuDNN): an exit chunk's self-attention against 1-7 chunks of keys (batch 1 and 2), and the text
cross-attention (512 keys) of a chunk and of the whole video. Forward and backward (dQ, dK, dV from dO; TFLOP/s
count 2.5 times the forward's).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def bench(fn, warmup=3, reps=20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def training(reps: int) -> None:
    """Forward and backward of the fused kernels, cuDNN's and flash SDPA at the recorded full-mask shapes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_rcm.ops import fused_attention as fa

    h, d, chunk = 12, 128, 3 * 1560
    cases = [(1, chunk, 512), (1, 7 * chunk, 512), (2, 7 * chunk, 512)]
    cases += [(1, chunk, k * chunk) for k in (1, 3, 5, 7)] + [(2, chunk, 7 * chunk)]
    print("| batch | queries | keys | fused fwd ms (TF/s) | cuDNN fwd | flash fwd | fused bwd ms (TF/s) | cuDNN bwd | "
          "flash bwd |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b, sq, sk in cases:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(b, sk, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        do = torch.randn_like(q)
        flops = 4.0 * b * sq * sk * h * d
        ms = {"fused fwd": bench(lambda: fa.fused_forward_lse(q, k, v), reps=reps)}
        qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
        o = fa.fused_forward(qr, kr, vr)
        ms["fused bwd"] = bench(lambda: torch.autograd.grad(o, (qr, kr, vr), do, retain_graph=True), reps=reps)
        del o
        for name, kind in (("cuDNN", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            qs, ks, vs = (x.transpose(1, 2).clone().requires_grad_() for x in (q, k, v))
            with sdpa_kernel(kind):
                ms[f"{name} fwd"] = bench(lambda: F.scaled_dot_product_attention(qs.detach(), ks.detach(),
                                                                                 vs.detach()), reps=reps)
                o = F.scaled_dot_product_attention(qs, ks, vs)
                ms[f"{name} bwd"] = bench(lambda: torch.autograd.grad(o, (qs, ks, vs), do.transpose(1, 2),
                                                                      retain_graph=True), reps=reps)
            del o
        cell = lambda key: f"{ms[key]:.3f} ({(2.5 if 'bwd' in key else 1) * flops / ms[key] / 1e9:.0f})"  # noqa: E731
        print(f"| {b} | {sq} | {sk} | " + " | ".join(cell(f"{n} {p}") for p in ("fwd", "bwd")
                                                      for n in ("fused", "cuDNN", "flash")) + " |", flush=True)
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--training", action="store_true", help="forward and backward of the recorded full-mask calls")
    args = ap.parse_args(argv)
    if args.training:
        return training(args.reps)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_rcm.ops import fused_attention as fa

    h, d, tpf = 12, 128, 1560
    cases = [(3 * tpf, k * 3 * tpf) for k in (1, 3, 5, 7)] + [(21 * tpf, 21 * tpf)]
    print("| queries | keys | fused ms (TF/s) | cuDNN SDPA ms (TF/s) | flash SDPA ms (TF/s) | fused ms / cuDNN ms |")
    print("|---|---|---|---|---|---|")
    for sq, sk in cases:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, sq, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, sk, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, sk, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
        flops = 4 * sq * sk * h * d
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        fused = bench(lambda: fa.fused_forward_lse(q, k, v), reps=args.reps)
        times = {}
        for name, kind in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            with sdpa_kernel(kind):
                times[name] = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt), reps=args.reps)
        tf = lambda ms: flops / ms / 1e9  # noqa: E731
        print(f"| {sq} | {sk} | {fused:.3f} ({tf(fused):.0f}) | {times['cudnn']:.3f} ({tf(times['cudnn']):.0f}) | "
              f"{times['flash']:.3f} ({tf(times['flash']):.0f}) | {fused / times['cudnn']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
