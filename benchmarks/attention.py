"""Benchmark the fused attention kernels against SDPA flash, FlexAttention, math-SDPA jvp, reference.

python benchmarks/attention.py   (one CUDA GPU; B=1, 12 heads, dim 128, bf16). Prints a markdown table.
TFLOP/s count only non-skipped 64x64 tiles: fwd 4*Sq*Sk*D*H*density, fwd+JVP 12*..., bwd 2.5x fwd.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

os.environ.setdefault("MEGATRON_RCM_JIT_BUILD", "1")
from megatron_rcm.ops import fused_attention as fa  # noqa: E402
from megatron_rcm.ops import masks as M  # noqa: E402
from megatron_rcm.ops.attention_reference import attention_reference, attention_reference_jvp  # noqa: E402
from megatron_rcm.utils.cuda_timing import median_ms  # noqa: E402

H, D, DT, TPF = 12, 128, torch.bfloat16, 1560


def tile_density(mask):
    t = mask.tile_summary(64, 64)
    sq, sk = mask.shape
    rows = torch.full((t.shape[0],), 64.0); rows[-1] = sq - 64 * (t.shape[0] - 1)
    cols = torch.full((t.shape[1],), 64.0); cols[-1] = sk - 64 * (t.shape[1] - 1)
    area = rows[:, None] * cols[None, :]
    return float((area * (t != M.TILE_SKIP)).sum() / area.sum())


def flex_forward(mask, q, k, v):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    qg, kg = mask.q_groups.cuda(), mask.k_groups.cuda()
    allow = mask.allow.cuda()
    def mask_mod(b, h, qi, ki):
        return allow[qg[qi], kg[ki]]
    bm = create_block_mask(mask_mod, None, None, mask.shape[0], mask.shape[1], device="cuda")
    fl = torch.compile(flex_attention)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    return lambda: fl(qt, kt, vt, block_mask=bm)


def cases(max_s):
    out = []
    for frames in (6, 21):
        s = frames * TPF
        if s <= max_s:
            out.append((f"full S={s}", M.full_mask(s)))
            out.append((f"block-causal S={s}", M.block_causal_mask(frames, TPF, 1)))
    if 2 * 21 * TPF <= max_s:
        out.append((f"teacher-forcing S={2 * 21 * TPF}", M.teacher_forcing_mask(21, TPF, 1)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-s", type=int, default=65520)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    assert fa._C is not None, "fused extension not available"
    rows = []
    for name, mask in cases(args.max_s):
        sq, sk = mask.shape
        dens = tile_density(mask)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, tq, tk, tv, do = (torch.randn(1, sq, H, D, device="cuda", generator=g, dtype=DT) for _ in range(7))
        f1 = 4.0 * sq * sk * D * H
        r = {"case": name, "density": dens}
        r["fwd_ms"] = median_ms(lambda: fa.fused_forward_lse(q, k, v, mask), reps=args.reps)
        r["jvp_ms"] = median_ms(lambda: fa.fused_forward_jvp(q, k, v, tq, tk, tv, mask), reps=args.reps)
        if fa.use_sm90(q):  # the same calls on the mma.sync kernels, for the A/B column
            os.environ[fa.SM90_ENV] = "0"
            r["fwd_mma_ms"] = median_ms(lambda: fa.fused_forward_lse(q, k, v, mask), reps=args.reps)
            r["jvp_mma_ms"] = median_ms(lambda: fa.fused_forward_jvp(q, k, v, tq, tk, tv, mask), reps=args.reps)
            del os.environ[fa.SM90_ENV]
        qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
        o = fa.fused_forward(qr, kr, vr, mask)
        r["bwd_ms"] = median_ms(lambda: torch.autograd.grad(o, (qr, kr, vr), do, retain_graph=True), reps=args.reps)
        if fa.use_sm90(q):
            os.environ[fa.SM90_ENV] = "0"
            r["bwd_mma_ms"] = median_ms(lambda: torch.autograd.grad(o, (qr, kr, vr), do, retain_graph=True), reps=args.reps)
            del os.environ[fa.SM90_ENV]
        del o
        qt_, kt_, vt_ = (x.transpose(1, 2) for x in (q, k, v))
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            r["sdpa_fwd_ms"] = median_ms(lambda: F.scaled_dot_product_attention(qt_, kt_, vt_), reps=args.reps)
            qs, ks, vs = (x.clone().requires_grad_() for x in (qt_, kt_, vt_))
            os_ = F.scaled_dot_product_attention(qs, ks, vs)
            dot = do.transpose(1, 2)
            r["sdpa_bwd_ms"] = median_ms(lambda: torch.autograd.grad(os_, (qs, ks, vs), dot, retain_graph=True), reps=args.reps)
            del os_
        try:
            r["flex_fwd_ms"] = median_ms(flex_forward(mask, q, k, v), reps=args.reps)
        except Exception as e:  # noqa: BLE001
            print("flex failed:", type(e).__name__, str(e)[:200])
        if sq <= 9360:
            try:
                from torch.func import jvp
                with sdpa_kernel(SDPBackend.MATH):
                    am = None if mask.is_full() else mask.dense().cuda()
                    fn = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=am)
                    tt = tuple(x.transpose(1, 2) for x in (tq, tk, tv))
                    r["funcjvp_ms"] = median_ms(lambda: jvp(fn, (qt_, kt_, vt_), tt), warmup=1, reps=3)
            except torch.OutOfMemoryError:
                print("func.jvp math SDPA: OOM")
            torch.cuda.empty_cache()
            r["ref_jvp_ms"] = median_ms(lambda: attention_reference_jvp(q, k, v, tq, tk, tv, mask=mask.to("cuda")), warmup=1, reps=3)
        r["fwd_tf"] = f1 * dens / r["fwd_ms"] / 1e9
        r["jvp_tf"] = 3 * f1 * dens / r["jvp_ms"] / 1e9
        if "jvp_mma_ms" in r:
            r["fwd_mma_tf"] = f1 * dens / r["fwd_mma_ms"] / 1e9
            r["jvp_mma_tf"] = 3 * f1 * dens / r["jvp_mma_ms"] / 1e9
            r["bwd_mma_tf"] = 2.5 * f1 * dens / r["bwd_mma_ms"] / 1e9
        r["bwd_tf"] = 2.5 * f1 * dens / r["bwd_ms"] / 1e9
        r["sdpa_fwd_tf"] = f1 / r["sdpa_fwd_ms"] / 1e9
        r["sdpa_bwd_tf"] = 2.5 * f1 / r["sdpa_bwd_ms"] / 1e9
        rows.append(r)
        print(r, flush=True)
        del q, k, v, tq, tk, tv, do, qr, kr, vr
        torch.cuda.empty_cache()

    def fmt(x, p=1):
        return "-" if x is None else f"{x:.{p}f}"
    print(f"\n{torch.cuda.get_device_name()} | B=1 H={H} D={D} bf16 | times ms (median), TFLOP/s on unmasked 64x64 tiles"
          f" | kernels: {'sm_90a wgmma' if rows and 'jvp_mma_ms' in rows[0] else 'mma.sync'} (mma.sync column when both)")
    print("| case | dens | fwd ms | fwd TF/s | mma.sync fwd TF/s | SDPA fwd ms (TF/s) | Flex fwd ms | fwd+JVP ms | JVP TF/s | "
          "mma.sync JVP TF/s | bwd ms | bwd TF/s | mma.sync bwd TF/s | SDPA bwd ms (TF/s) | func.jvp ms | ref JVP ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = r.get
        print(f"| {r['case']} | {r['density']:.3f} | {fmt(g('fwd_ms'),2)} | {fmt(g('fwd_tf'),0)} | {fmt(g('fwd_mma_tf'),0)} | "
              f"{fmt(g('sdpa_fwd_ms'),2)} ({fmt(g('sdpa_fwd_tf'),0)}) | "
              f"{fmt(g('flex_fwd_ms'),2)} | {fmt(g('jvp_ms'),2)} | {fmt(g('jvp_tf'),0)} | {fmt(g('jvp_mma_tf'),0)} | "
              f"{fmt(g('bwd_ms'),2)} | {fmt(g('bwd_tf'),0)} | {fmt(g('bwd_mma_tf'),0)} | "
              f"{fmt(g('sdpa_bwd_ms'),2)} ({fmt(g('sdpa_bwd_tf'),0)}) | {fmt(g('funcjvp_ms'),1)} | {fmt(g('ref_jvp_ms'),1)} |")


if __name__ == "__main__":
    main()
