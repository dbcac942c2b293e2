"""A simple, correct GPipe schedule over p2p send/recv (primal AND tangent travel between stages).

Why our own and not megatron-core's ``get_forward_backward_func``: megatron-core's p2p layer
ships exactly one activation tensor of a pre-declared shape per micro-batch and its schedules
assume CUDA streams/NCCL batched p2p; our stages exchange the packed (x, tx) pair (tangent
optional) and must run on gloo/CPU for the tests. GPipe (all forwards, then all backwards in
reverse) keeps the code tiny; 1F1B only changes the order and can reuse ``pp_records``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def pipeline_forward_backward(model, microbatches, forward_fn, loss_fn):
    """Run forward + backward of every micro-batch; returns the mean loss (same value on all stages).

    ``forward_fn(model, mb)`` runs the model (it returns None outputs on stages before the last);
    ``loss_fn(outputs, mb)`` gives the micro-batch loss on the last stage. Gradients accumulate in
    ``.grad`` (scaled by 1/len(microbatches)); call ``sync_gradients`` afterwards. Also valid with
    pp = 1 (plain gradient accumulation).

    Objectives that call the model several times (sCM, dCM, the DMD rollout) run unchanged because
    every call goes through :class:`~megatron_rcm.network.Denoiser`, which makes outputs available on
    every stage (:meth:`ParallelContext.share_stage_outputs`); the trainer passes ``objective.loss``
    as ``forward_fn``. A micro-batch may run several
    grad-enabled forwards (the rollout: one per chunk, independent graphs since the KV cache is
    written without grad); their gradients travel back in reverse order.
    """
    ctx = model.parallel
    n = len(microbatches)
    ctx.pp_records = []
    losses = []
    for mb in microbatches:
        out = forward_fn(model, mb)
        if ctx.is_last_stage:
            losses.append(loss_fn(out, mb) / n)
    records = ctx.pp_records
    if ctx.pp > 1 and (not records or len(records) % n):
        raise RuntimeError(f"expected the same number (>= 1) of grad-enabled model forwards per micro-batch, "
                           f"saw {len(records)} for {n} micro-batches")
    k = len(records) // n if ctx.pp > 1 else 0
    for i in reversed(range(n)):
        if ctx.is_last_stage:
            losses[i].backward()
        for rec in reversed(records[i * k:(i + 1) * k]):
            if not ctx.is_last_stage:
                out = rec["outputs"]
                grad = torch.empty_like(out)
                dist.recv(grad, src=ctx.groups.pp_next)
                torch.autograd.backward(out, grad)
            if not ctx.is_first_stage:
                inp = rec["inputs"]
                grad = inp.grad if inp.grad is not None else torch.zeros_like(inp)
                dist.send(grad.contiguous(), dst=ctx.groups.pp_prev)
    ctx.pp_records = []
    device = next(model.parameters()).device  # NCCL reduces CUDA tensors only
    total = sum(loss.detach() for loss in losses) if losses else torch.zeros((), device=device)
    total = total.to(device=device, dtype=torch.float64).reshape(())
    if ctx.pp > 1:
        dist.all_reduce(total, group=ctx.groups.pp_group)  # only the last stage holds a non-zero loss
    return total
