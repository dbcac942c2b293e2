"""Wrapping a :class:`CausalWanModel` for tensor and context parallelism (``parallelize_model``).

Design: the model keeps ONE code path; ``Attention``/``FeedForward``/``CausalWanModel`` consult an
optional ``parallel`` attribute (a :class:`ParallelContext`) at the few places where a collective
is needed. Every collective handles the (primal, tangent) pair in one call, so the JVP pass is
exact under every layout.

Tensor parallel (Megatron): to_q/to_k/to_v and ffn.net.0 are column-parallel (rows of the weight
split, ``heads/tp`` local heads), to_out and ffn.net.2 row-parallel (partial sums all-reduced,
bias added once after). q/k RMSNorm is across ALL heads in Wan, so each rank computes its local
mean(x^2) - and for the tangent mean(x dx) - and one all-reduce combines both. Everything else
(embeddings, AdaLN tables, LayerNorms, head) is replicated; its gradient is complete on every TP
rank thanks to the identity/all-reduce pair of ``copy_to``/``reduce_from``.

Context parallel (Ulysses): the token sequence is split by contiguous runs of latent frames
(per-frame AdaLN modulation then stays local; the number of frames of the sequence must be
divisible by cp - for teacher forcing that is 2x the video's frames). Around self-attention one
all-to-all turns [local tokens x local heads] into [all tokens x local heads / cp] for q, k, v and
their tangents (6 tensors, one call) and one turns the output (and tangent) back. RoPE is applied
after the all-to-all with the GLOBAL positions and the mask is the global GroupMask, so frame-wise,
chunk-wise and teacher-forcing masks need nothing special. A KV cache then stores all tokens of a
chunk for the local heads (consistent across ranks); a KV-cached chunk must have cp | chunk_frames.
Ring attention would replace ``seq_to_heads``/``heads_to_seq`` + the attention call by a
``ContextAttention`` with the same (q, k, v, tangents, mask) -> (o, to) contract.

Pipeline parallel: stage s owns blocks [s*L/pp, (s+1)*L/pp) (the others are replaced by
``nn.Identity``); embeddings, AdaLN tables and head stay on every stage (cheap; every block needs
the per-frame modulation). Stage s > 0 receives the packed (x, tx) from stage s-1 right before the
blocks, stage s < pp-1 sends its (x, tx) after them and returns (None, None); the last stage runs
the head. Teacher and critic are separate models: wrap each with the same groups (each gets its
own stage split); the sCM teacher's outputs then appear on the last stage like the student's.
The schedule is :func:`megatron_rcm.parallel.pipeline.pipeline_forward_backward`.

Gradients: params see partial gradients on each CP rank (different tokens) and each DP rank
(different samples) -> ``sync_gradients`` sums over CP and averages over DP, in one collective.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..ops import dual
from . import comm
from .config import validate_parallel
from .state import ParallelGroups

# parameter-name suffix -> dimension along which tensor parallelism shards it
_COLUMN = ("to_q.weight", "to_q.bias", "to_k.weight", "to_k.bias", "to_v.weight", "to_v.bias",
           "norm_q.weight", "norm_k.weight", "ffn.net.0.proj.weight", "ffn.net.0.proj.bias",
           "add_k_proj.weight", "add_k_proj.bias", "add_v_proj.weight", "add_v_proj.bias", "norm_added_k.weight")
_ROW = ("to_out.0.weight", "ffn.net.2.weight")


def tp_shard_dim(name: str) -> int | None:
    """The dim along which TP shards parameter ``name`` (0 column, 1 row), or None if replicated."""
    if name.endswith(_COLUMN):
        return 0
    if name.endswith(_ROW):
        return 1
    return None


class ParallelContext:
    """The collectives the model calls; sizes 1 make each one a no-op.

    It holds process groups, so a wrapped model is not deep-copyable: copy (e.g. for EMA or a
    teacher) BEFORE ``parallelize_model`` and wrap each copy.
    """

    def __init__(self, groups: ParallelGroups):
        self.groups = groups
        self.tp, self.cp = groups.cfg.tp, groups.cfg.cp
        self.tp_group, self.cp_group = groups.tp_group, groups.cp_group
        self.cp_rank = groups.cp_rank
        self.pp, self.pp_rank = groups.cfg.pp, groups.pp_rank
        self.layer_range = (0, 1 << 30)
        # dtype of the (x, tx) messages between stages: the model's parameter dtype, so both sides agree
        # under autocast (where the residual stream's dtype differs between embedding and blocks)
        self.wire_dtype: torch.dtype | None = None
        self.pp_records: list[dict] = []  # per micro-batch: received input / sent output (for backward)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    # ---------------------------------------------------------------- pipeline parallel
    def owns_layer(self, i: int) -> bool:
        return self.layer_range[0] <= i < self.layer_range[1]

    def pipeline_recv(self, x, tx):
        """Stage > 0: replace (x, tx) - computed locally only for their shapes - by the previous stage's."""
        rec = {"inputs": None, "outputs": None}
        if torch.is_grad_enabled():
            self.pp_records.append(rec)
        if self.is_first_stage:
            return x, tx
        packed, present = comm.pack(x, tx)
        buf = torch.empty_like(packed, dtype=self.wire_dtype or packed.dtype)
        dist.recv(buf, src=self.groups.pp_prev)
        if torch.is_grad_enabled():
            buf.requires_grad_(True)
            rec["inputs"] = buf
        return tuple(comm.unpack(buf, present))

    def pipeline_send(self, x, tx) -> bool:
        """Send (x, tx) on (one message); True on the last stage (nothing sent, head runs here)."""
        if self.is_last_stage:
            return True
        packed, _ = comm.pack(x, tx)
        packed = packed.to(self.wire_dtype or packed.dtype)  # differentiable: the backward's grad has this dtype
        dist.send(packed.detach().contiguous(), dst=self.groups.pp_next)
        if torch.is_grad_enabled():
            self.pp_records[-1]["outputs"] = packed
        return False

    def share_stage_outputs(self, outputs, likes):
        """Make a model call's outputs usable on every pipeline stage (the network seam calls this).

        ``outputs``: what the model returned (Nones before the last stage); ``likes``: tensors with the
        outputs' shapes (the inputs), None where no output is expected (no tangent). The last stage
        broadcasts the values (primal and tangent in one message), so outputs that feed a later call's
        INPUTS (teacher velocity -> JVP tangent, a denoising step -> the next step, a generated chunk ->
        the KV cache) exist on stage 0. The last stage keeps its own tensors, so a loss built there
        differentiates through them; the gradient reaches earlier stages through the pipeline's backward.
        """
        if self.pp == 1:
            return outputs
        present = [like for like in likes if like is not None]
        dtype, device = self.wire_dtype or present[0].dtype, present[0].device
        if self.is_last_stage:
            buf = torch.stack([o.detach().to(dtype) for o, like in zip(outputs, likes) if like is not None])
        else:
            buf = torch.empty((len(present), *present[0].shape), dtype=dtype, device=device)
        dist.broadcast(buf, src=dist.get_global_rank(self.groups.pp_group, self.pp - 1), group=self.groups.pp_group)
        if self.is_last_stage:
            return outputs
        it = iter(buf.unbind(0))
        return tuple(None if like is None else next(it) for like in likes)

    # ---------------------------------------------------------------- tensor parallel
    def norm_reduce(self, ms, mxd):
        """Global mean(x^2) and mean(x dx) from the per-shard ones (equal shards -> mean of means)."""
        if self.tp == 1:
            return ms, mxd
        packed = ms if mxd is None else torch.cat([ms, mxd], dim=-1)
        packed = comm.all_reduce_sum(packed, self.tp_group) / self.tp
        return (packed, None) if mxd is None else (packed[..., :1], packed[..., 1:])

    def column_input(self, x, tx):
        if self.tp == 1:
            return x, tx
        packed, present = comm.pack(x, tx)
        return tuple(comm.unpack(comm.copy_to(packed, self.tp_group), present))

    def row_linear(self, x, tx, weight, bias):
        """Row-parallel linear: partial sums all-reduced, the bias added once after, in the output's dtype
        (as ``F.linear`` under autocast, so a TP model computes in the dtypes of the single-process one)."""
        if self.tp == 1:
            return dual.linear(x, tx, weight, bias)
        y = F.linear(x, weight)
        ty = None if tx is None else F.linear(tx, weight)
        packed, present = comm.pack(y, ty)
        y, ty = comm.unpack(comm.reduce_from(packed, self.tp_group), present)
        return (y if bias is None else y + bias.to(y.dtype)), ty

    # ---------------------------------------------------------------- context parallel
    def seq_to_heads(self, *ts):
        """[B, S/cp, H, D] x n -> [B, S, H/cp, D] x n (Nones pass through), one all-to-all."""
        packed, present = comm.pack(*ts)  # [n, B, Sl, H, D]
        n, b, sl, h, d = packed.shape
        x = packed.reshape(n, b, sl, self.cp, h // self.cp, d).permute(3, 0, 1, 2, 4, 5)
        x = comm.all_to_all(x.contiguous(), self.cp_group)  # [cp(src = seq block), n, B, Sl, Hc, D]
        x = x.permute(1, 2, 0, 3, 4, 5).reshape(n, b, self.cp * sl, h // self.cp, d)
        return comm.unpack(x, present)

    def heads_to_seq(self, *ts):
        """Inverse of :meth:`seq_to_heads`: [B, S, H/cp, D] -> [B, S/cp, H, D]."""
        packed, present = comm.pack(*ts)
        n, b, s, hc, d = packed.shape
        x = packed.reshape(n, b, self.cp, s // self.cp, hc, d).permute(2, 0, 1, 3, 4, 5)
        x = comm.all_to_all(x.contiguous(), self.cp_group)  # [cp(src = head block), n, B, Sl, Hc, D]
        x = x.permute(1, 2, 3, 0, 4, 5).reshape(n, b, s // self.cp, self.cp * hc, d)
        return comm.unpack(x, present)

    def scatter_frames(self, x, tx, mod, tmod, e, te):
        """Keep this rank's contiguous frames of tokens [B, S, D] and per-frame tensors [B, F, ...]."""
        frames = e.shape[1]
        if frames % self.cp:
            raise ValueError(f"context parallel size {self.cp} must divide the sequence's {frames} latent frames")
        fl = frames // self.cp
        lo = self.cp_rank * fl

        def tok(t):
            return None if t is None else t.unflatten(1, (frames, -1))[:, lo:lo + fl].flatten(1, 2)

        def frm(t):
            return None if t is None else t[:, lo:lo + fl]

        return tok(x), tok(tx), frm(mod), frm(tmod), frm(e), frm(te)

    def gather_frames(self, y, ty):
        packed, present = comm.pack(y, ty)
        return tuple(comm.unpack(comm.gather(packed, self.cp_group, dim=2), present))


def _shard_(module: nn.Module, name: str, dim: int, tp: int, rank: int) -> None:
    p = getattr(module, name)
    if p is None:
        return
    size = p.shape[dim] // tp
    setattr(module, name, nn.Parameter(p.detach().narrow(dim, rank * size, size).clone(),
                                       requires_grad=p.requires_grad))


def parallelize_model(model: nn.Module, groups: ParallelGroups) -> nn.Module:
    """Shard ``model`` in place for ``groups`` (TP weights, CP hooks) and return it.

    Build the full model identically on every rank (same seed or the same checkpoint) first;
    parameter names are unchanged, only TP-sharded tensors shrink (see :func:`tp_shard_dim`).
    """
    cfg = groups.cfg
    mcfg = model.cfg
    validate_parallel(cfg, mcfg)  # heads by tp*cp, ffn by tp, layers by pp (ConfigError)
    ctx = ParallelContext(groups)
    ctx.wire_dtype = next(model.parameters()).dtype
    tp, r = cfg.tp, groups.tp_rank
    per_stage = mcfg.num_layers // cfg.pp
    ctx.layer_range = (groups.pp_rank * per_stage, (groups.pp_rank + 1) * per_stage)
    for i in range(mcfg.num_layers):
        if not ctx.owns_layer(i):
            model.blocks[i] = nn.Identity()  # names of owned blocks (blocks.<global index>) unchanged
    for i, block in enumerate(model.blocks):
        if not ctx.owns_layer(i):
            continue
        for attn in (block.attn1, block.attn2):
            if tp > 1:
                for lin in (attn.to_q, attn.to_k, attn.to_v):
                    _shard_(lin, "weight", 0, tp, r), _shard_(lin, "bias", 0, tp, r)
                _shard_(attn.norm_q, "weight", 0, tp, r), _shard_(attn.norm_k, "weight", 0, tp, r)
                if attn.add_k_proj is not None:  # image-to-video layout: the image K/V heads split like the text's
                    for lin in (attn.add_k_proj, attn.add_v_proj):
                        _shard_(lin, "weight", 0, tp, r), _shard_(lin, "bias", 0, tp, r)
                    _shard_(attn.norm_added_k, "weight", 0, tp, r)
                _shard_(attn.to_out[0], "weight", 1, tp, r)
                attn.heads //= tp
            attn.parallel = ctx
        if tp > 1:
            _shard_(block.ffn.net[0].proj, "weight", 0, tp, r), _shard_(block.ffn.net[0].proj, "bias", 0, tp, r)
            _shard_(block.ffn.net[2], "weight", 1, tp, r)
        block.ffn.parallel = ctx
    model.parallel = ctx
    return model


def shard_like(name: str, full: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """This rank's TP shard of a full (single-process) tensor of parameter ``name``."""
    dim = tp_shard_dim(name)
    if dim is None or groups.cfg.tp == 1:
        return full
    size = full.shape[dim] // groups.cfg.tp
    return full.narrow(dim, groups.tp_rank * size, size)


def sync_gradients(model: nn.Module, groups: ParallelGroups) -> None:
    """Sum gradients over context parallel, average over data parallel: one flat all-reduce per dtype.

    Under pipeline parallelism the parameters outside ``blocks`` (on every stage) are then summed
    over the pipeline group. An FSDP2 model (``parallel/fsdp.py``) has reduce-scattered its gradients
    over data x context ranks in backward already; only the pipeline sum remains, on the shards.

    Call once per optimizer step, after all micro-batches' backward (gradient accumulation just lets
    ``.grad`` accumulate; scale each micro-batch loss by 1/num_micro_batches).
    """
    from .fsdp import is_fsdp
    from .sharding import local

    cfg = groups.cfg
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    if cfg.dp * cfg.cp > 1 and not is_fsdp(model):
        _all_reduce_flat([p.grad for p in model.parameters() if p.requires_grad], groups.dp_cp_group, 1.0 / cfg.dp)
    if cfg.pp > 1:
        shared = [local(p.grad) for n, p in model.named_parameters() if p.requires_grad and not n.startswith("blocks.")]
        _all_reduce_flat(shared, groups.pp_group, 1.0)


def _all_reduce_flat(grads, group, scale: float) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for gs in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in gs])
        dist.all_reduce(flat, group=group)
        if scale != 1.0:
            flat *= scale
        offset = 0
        for g in gs:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
