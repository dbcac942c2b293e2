"""Pipeline schedules over p2p send/recv (primal AND tangent travel between stages): 1F1B and GPipe.

``parallel.pp_schedule``: ``1f1b`` (default) runs each micro-batch's backward as soon as the schedule
allows, so a stage holds at most ``pp - stage`` micro-batches' activations; ``gpipe`` runs all forwards,
then all backwards in reverse (every micro-batch's activations at once). Both give the same numbers.

Why not megatron-core's ``get_forward_backward_func`` (1F1B / interleaved): its schedules run ONE
model call per micro-batch whose single stage-boundary tensor (pre-declared shape, ``set_input_tensor``)
is consumed only by the loss on the last stage. Our objectives call the network several times per
micro-batch and feed each call's output into the next call's input - sCM's teacher CFG velocity is
the student's JVP tangent, each rollout step feeds the next, a finished chunk enters the KV cache -
so every call's output must reach stage 0 *inside* the forward step (``share_stage_outputs``, a
broadcast over the pipeline group). Under megatron's 1F1B the stages run different micro-batches'
forwards and backwards at the same moment, so that broadcast would wait for a stage that is busy with
another micro-batch: a deadlock, not a slowdown. (Its p2p buffers are also allocated on
``torch.cuda.current_device()``, so it cannot run the CPU/gloo tests.)

Our 1F1B therefore keeps every micro-batch's forward in lockstep over the stages (the calls inside it
need all of them) and interleaves the backwards: stage s runs ``w = pp - 1 - s`` warm-up forwards, then
alternates forward i + w / backward i, then drains. Input gradients go to the previous stage with
``isend`` (kept alive until the end), so the last stages can run the next forward while earlier ones
have not yet taken their gradients; output gradients are received where the backward needs them. The
order of messages between two stages is the same on both sides, so blocking receives cannot deadlock.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .fsdp import unshard_for_backward

SCHEDULES = ("1f1b", "gpipe")


def schedule_order(schedule: str, micro: int, pp: int, stage: int) -> list[tuple[str, int]]:
    """The ("F" | "B", micro-batch index) steps of ``stage``; every stage runs the forwards in the same order."""
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "gpipe":
        return [("F", i) for i in range(micro)] + [("B", i) for i in reversed(range(micro))]
    warmup = min(pp - 1 - stage, micro)
    steps = [("F", i) for i in range(warmup)]
    for i in range(warmup, micro):
        steps += [("F", i), ("B", i - warmup)]
    return steps + [("B", i) for i in range(micro - warmup, micro)]


def pipeline_forward_backward(model, microbatches, forward_fn, loss_fn, schedule: str = "1f1b"):
    """Run forward + backward of every micro-batch; returns the mean loss (same value on all stages).

    ``forward_fn(model, mb)`` runs the model (it returns None outputs on stages before the last);
    ``loss_fn(outputs, mb)`` gives the micro-batch loss on the last stage. Gradients accumulate in
    ``.grad`` (scaled by 1/len(microbatches)); call ``sync_gradients`` afterwards. Also valid with
    pp = 1 (plain gradient accumulation).

    Objectives that call the model several times (sCM, dCM, the DMD rollout) run unchanged because
    every call goes through :class:`~megatron_rcm.network.Denoiser`, which makes outputs available on
    every stage (:meth:`ParallelContext.share_stage_outputs`); the trainer passes ``objective.loss``
    as ``forward_fn``. A micro-batch may run several grad-enabled forwards (the rollout: one per chunk,
    independent graphs since the KV cache is written without grad); their gradients travel back in
    reverse order.
    """
    ctx = model.parallel
    n = len(microbatches)
    runs: dict[int, tuple[list, torch.Tensor | None]] = {}
    losses, sends = [], []

    def forward(i):
        ctx.pp_records = []
        out = forward_fn(model, microbatches[i])
        loss = loss_fn(out, microbatches[i]) / n if ctx.is_last_stage else None
        if ctx.pp > 1 and not ctx.pp_records:
            raise RuntimeError("a pipeline micro-batch ran no grad-enabled model forward")
        runs[i] = (ctx.pp_records, loss)
        ctx.pp_records = []
        if loss is not None:
            losses.append(loss.detach())

    def backward(i):
        records, loss = runs.pop(i)  # the micro-batch's graph is freed after this
        if loss is not None:
            loss.backward()
        if ctx.pp == 1:
            return
        for rec in reversed(records):
            if not ctx.is_last_stage:
                out = rec["outputs"]
                grad = torch.empty_like(out)
                dist.recv(grad, src=ctx.groups.pp_next)
                unshard_for_backward(model)
                torch.autograd.backward(out, grad)
            if not ctx.is_first_stage:
                inp = rec["inputs"]
                grad = (inp.grad if inp.grad is not None else torch.zeros_like(inp)).contiguous()
                sends.append((dist.isend(grad, dst=ctx.groups.pp_prev), grad))

    for kind, i in schedule_order(schedule, n, ctx.pp, ctx.pp_rank):
        forward(i) if kind == "F" else backward(i)
    for work, _ in sends:
        work.wait()
    device = next(model.parameters()).device  # NCCL reduces CUDA tensors only
    total = sum(losses) if losses else torch.zeros((), device=device)
    total = total.to(device=device, dtype=torch.float64).reshape(())
    if ctx.pp > 1:
        dist.all_reduce(total, group=ctx.groups.pp_group)  # only the last stage holds a non-zero loss
    return total
