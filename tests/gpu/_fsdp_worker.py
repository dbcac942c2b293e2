"""One rank of the GPU FSDP2 check (launched by tests/gpu/test_fsdp_gpu.py through tests/parallel/_launch_ranks.py).

NCCL, this rank's GPU, the elementwise chains compiled (``ops/fusion.py``). (1) fp32 (TF32 off, SDPA):
FSDP2 over all ranks equals the plain model on the whole batch - output, JVP tangent, every gradient.
(2) bf16 compute / fp32 reduction (``fsdp_param_dtype``) with the default attention backend (the fused
kernel when built), every block checkpointed with its attention outputs kept: a teacher-forcing JVP under
no_grad, a KV-cached chunk pass and a backward run and stay within bf16 rounding of the fp32 reference.
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
from megatron_rcm.ops import fusion
from megatron_rcm.ops.masks import teacher_forcing_mask
from megatron_rcm.parallel import (ParallelConfig, batch_for_rank, destroy_parallel, initialize_parallel,
                                   parallelize_model)
from megatron_rcm.parallel.fsdp import shard_model

B, C, F, H, W = 4, 3, 4, 16, 16


def rel(a, b):
    a = a.full_tensor() if hasattr(a, "full_tensor") else a
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def run(model, inp, sl, tangent=True):
    mask = teacher_forcing_mask(F, model.tokens_per_frame(H, W), 1)
    with torch.no_grad():
        _, ty = model.forward_teacher_forcing(sl(inp["clean"]), sl(inp["x"]), sl(inp["t"]), sl(inp["ctx"]), mask,
                                              sl(inp["dx"]), sl(inp["dt"]))
    y, _ = model.forward_teacher_forcing(sl(inp["clean"]), sl(inp["x"]), sl(inp["t"]), sl(inp["ctx"]), mask)
    (y.float() * sl(inp["w"])).mean().backward()
    cache = model.new_kv_cache(H, W)
    with torch.no_grad():
        for c in range(F):
            model.forward_chunk(sl(inp["x"])[:, :, c:c + 1], sl(inp["t"])[:, c:c + 1], sl(inp["ctx"]), cache, c,
                                write_cache=True)
    return y.detach(), ty


def main():
    out_dir, errors = sys.argv[-1], []
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        fusion.set_enabled(True)
        groups = initialize_parallel(ParallelConfig(fsdp=True))
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        g = torch.Generator(device="cpu").manual_seed(1)
        r = lambda *s: torch.randn(*s, generator=g).to(dev)  # noqa: E731
        inp = dict(clean=r(B, C, F, H, W), x=r(B, C, F, H, W), t=(torch.rand(B, F, generator=g) * 1000).to(dev),
                   ctx=r(B, 8, 32), dx=r(B, C, F, H, W), dt=r(B, F), w=r(B, C, F, H, W))
        torch.manual_seed(0)
        causal = CausalConfig(chunk_frames=1, attention_backend="sdpa")
        ref = build_model(model_preset("tiny", num_layers=2), causal).to(dev)
        y, ty = run(ref, inp, lambda t: t)
        whole = lambda t: batch_for_rank(t, groups)  # noqa: E731
        for dtype, backend, tol in (("", "sdpa", 1e-4), ("bfloat16", "auto", 3e-2)):
            cfg = dataclasses.replace(groups.cfg, fsdp_param_dtype=dtype, fsdp_reduce_dtype="float32" if dtype else "")
            model = copy.deepcopy(ref)
            model.zero_grad(set_to_none=True)
            model.causal.attention_backend = backend
            # bf16: every block checkpointed, keeping its attention outputs for the recompute (the fused kernels'
            # split forward/backward inside FSDP units)
            model.gradient_checkpointing = model.keep_attention = bool(dtype)
            model = shard_model(parallelize_model(model, groups), dataclasses.replace(groups, cfg=cfg), dev)
            py, pty = run(model, inp, whole)
            checks = [("output", py, whole(y)), ("jvp tangent", pty, whole(ty))]
            rp = dict(ref.named_parameters())
            grads = [(n, p.grad.full_tensor(), rp[n].grad) for n, p in model.named_parameters()]
            if dtype:  # bf16: the whole gradient (single small tensors carry bf16 noise of their own size)
                checks.append(("gradient", torch.cat([a.flatten() for _, a, _ in grads]),
                               torch.cat([b.flatten() for _, _, b in grads])))
            else:
                checks += [(f"grad of {n}", a, b) for n, a, b in grads]
            for what, a, b in checks:
                e = rel(a, b)
                if not e < tol:
                    errors.append(f"FSDP2 ({dtype or 'float32'} compute, {backend}): {what} rel err {e:.3e}")
        destroy_parallel()
    except Exception:
        errors.append(traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(errors, f)


if __name__ == "__main__":
    main()
