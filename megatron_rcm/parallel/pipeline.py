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

    Objectives that call the model several times (sCM, dCM, the DMD rollout) run unchanged when their
    calls go through :func:`outputs_on_every_stage` (``TFContext``, the rollout and DMD's score calls
    do); the trainer passes ``objective.loss`` as ``forward_fn``. A micro-batch may run several
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


def outputs_on_every_stage(model, outputs, likes):
    """Make an objective's model call usable on every pipeline stage (no-op without pipeline parallelism).

    ``outputs``: what the model returned (Nones before the last stage); ``likes``: tensors with the
    outputs' shapes (the inputs), None where no output is expected (e.g. no tangent). The last stage
    broadcasts the values (primal and tangent in one message), so outputs that feed a later call's
    INPUTS (teacher velocity -> JVP tangent, a denoising step -> the next step, a generated chunk ->
    the KV cache) exist on stage 0. The last stage keeps its own tensors, so a loss built there
    differentiates through them; the gradient reaches earlier stages through the pipeline's backward.
    """
    ctx = getattr(model, "parallel", None)
    if ctx is None or ctx.pp == 1:
        return outputs
    dtype = model.dtype
    shapes = [like.shape for like in likes if like is not None]
    if ctx.is_last_stage:
        buf = torch.stack([o.detach().to(dtype) for o, like in zip(outputs, likes) if like is not None])
    else:
        buf = torch.empty((len(shapes), *shapes[0]), dtype=dtype, device=next(model.parameters()).device)
    dist.broadcast(buf, src=dist.get_global_rank(ctx.groups.pp_group, ctx.pp - 1), group=ctx.groups.pp_group)
    if ctx.is_last_stage:
        return outputs
    it = iter(buf.unbind(0))
    return tuple(None if like is None else next(it) for like in likes)
