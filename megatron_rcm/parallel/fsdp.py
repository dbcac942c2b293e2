"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the DiT, composed with our TP / CP / PP (``parallel.fsdp``).

Units: one per transformer block this rank runs (a pipeline stage owns a run of them) and the root
(patch and condition embeddings, AdaLN tables, head), sharded over the data x context group — where
the gradients of everything TP leaves whole meet — on that group's device mesh.

Why it composes with the hand-made tensor / context / pipeline parallelism (``parallel/model.py``):
FSDP only ever sees this rank's TP-local tensors. It shards them along dim 0 over the data x context
ranks and all-gathers them back right before a unit runs, so the TP/CP collectives inside the forward
(primal and tangent together) see whole TP-local weights, exactly as without FSDP. ``sharding.py``
describes the two-level result (TP outer, FSDP inner) for checkpoints and full-weight gathers.

The model's code paths and what makes each one safe:
  * entry points: ``forward``, ``forward_with_tangent``, ``forward_teacher_forcing`` and ``forward_chunk``
    all run ``forward_segments``, registered with ``register_fsdp_forward_method`` so the root unit is
    all-gathered around it (FSDP hooks only ``__call__``); blocks are called as modules, also inside
    activation checkpointing, whose recomputation in backward FSDP unshards for;
  * every unit, the root included, reshards after its forward: between calls (optimizer step, EMA
    update, checkpoint, the many no-grad calls of the teacher, the JVP and the KV-cached rollout) every
    parameter is its sharded master, so nothing can go stale; the cost is one more all-gather of the
    small root unit per backward. Pipeline stages before the last return no output, so nothing would
    trigger the root's backward all-gather there: the schedule calls :func:`unshard_for_backward`;
  * gradients: each backward reduce-scatters (several backwards per step accumulate: micro-batches,
    one graph per rollout chunk) the sum over data x context ranks divided by ``dp`` (context ranks saw
    other tokens of the same samples: summed; data ranks other samples: averaged), as ``sync_gradients``
    does without FSDP; the pipeline sum of the shared (non-block) weights follows on the shards;
  * mixed precision (``parallel.fsdp_param_dtype`` / ``fsdp_reduce_dtype``): the compute copy and the
    gradient reduction in those dtypes, master weights and optimizer state in ``model.param_dtype``.
    Forward inputs are not cast (timesteps in [0, 1000] must not become bf16): the model casts latents
    itself to the dtype of its (all-gathered) weights.

Runs on CPU / gloo (the tests) and CUDA / NCCL alike; ``torch.compile`` of the elementwise chains
(``ops/fusion.py``) wraps functions inside the blocks, not the FSDP units, so it is unaffected.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..models.causal_wan import DTYPES

# the blocks return flatten() views; nothing modifies them in place (the next block reads them), which is
# the case FSDP's warning is about
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _dtype(name: str):
    return DTYPES[name] if name else None


def compute_dtype(model: nn.Module, cfg) -> torch.dtype:
    """The dtype the model computes in under ``cfg`` (FSDP's param dtype if set, else the parameters')."""
    param = next(model.parameters()).dtype
    return (_dtype(cfg.fsdp_param_dtype) or param) if cfg.fsdp else param


def shard_model(model: nn.Module, groups, device: torch.device) -> nn.Module:
    """Apply FSDP2 in place to a model already split for TP/CP/PP (``parallelize_model``); returns it.

    Call on every rank of the data x context group with identical weights (same seed / same file).
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    cfg = groups.cfg
    mesh = DeviceMesh.from_group(groups.dp_cp_group, device.type)
    policy = MixedPrecisionPolicy(param_dtype=_dtype(cfg.fsdp_param_dtype), reduce_dtype=_dtype(cfg.fsdp_reduce_dtype),
                                  cast_forward_inputs=False)
    kw = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    owns = getattr(model.parallel, "owns_layer", lambda i: True)
    for i, block in enumerate(model.blocks):
        if owns(i):
            fully_shard(block, **kw)
    fully_shard(model, **kw)
    register_fsdp_forward_method(model, "forward_segments")
    # a reentrant recompute runs the block's backward in a nested autograd call, where FSDP2's post-backward hooks
    # never reshard it (the parameters stay unsharded after the step): keep the saved-tensor-hook recompute
    model.reentrant_recompute = False
    if any(p.requires_grad for p in model.parameters()):
        for module in model.modules():
            if is_fsdp(module):  # sum over the data x context ranks / dp: context summed, data averaged
                module.set_gradient_divide_factor(float(cfg.dp))
    if model.parallel is not None:  # pipeline messages carry the compute dtype
        model.parallel.wire_dtype = compute_dtype(model, cfg)
    return model


def unshard_for_backward(model: nn.Module) -> None:
    """All-gather the root unit before a backward that starts inside the blocks (pipeline stages before the
    last, whose forward returned nothing FSDP could hook); FSDP reshards it when the backward ends."""
    if is_fsdp(model):
        model.unshard()
