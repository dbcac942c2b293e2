"""How a rank's local tensor relates to the global (one-process) tensor, answered in one place.

Checkpoints (DCP stores every tensor under its global shape with the chunks each rank wrote), phase
outputs (full weights on rank 0) and the global gradient norm all need it. Two layers of sharding,
the outer one first:

1. tensor parallel: parameters named in :func:`~megatron_rcm.parallel.model.tp_shard_dim` are split
   along dim 0 (column-parallel) or 1 (row-parallel) over the TP group; the rest are replicated;
2. FSDP2 (``parallel.fsdp``): the TP-local tensor is split along dim 0 over the data x context group
   (``torch.chunk`` sizes: the last pieces may be smaller or empty). Such a parameter is a DTensor
   over that group whose "global" shape is the TP-local shape.

Pipeline stages hold different ``blocks.<i>`` and identical copies of everything else, and data /
context ranks without FSDP hold replicas: nothing to describe (DCP writes identical chunks once).
Descriptions use CPU meshes built from the existing groups (no new process groups): they only carry
offsets, the tensors they wrap are CPU copies (the checkpoint stages everything to CPU first).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DeviceMesh, DTensor, Shard

from .model import tp_shard_dim


def local(x: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (an FSDP shard for a DTensor, ``x`` itself otherwise)."""
    return x.to_local() if isinstance(x, DTensor) else x


def is_fsdp_sharded(x) -> bool:
    return isinstance(x, DTensor)


@dataclass(frozen=True)
class Placement:
    """Where a local tensor sits in its global tensor."""

    tp_dim: int | None  # dim split over the TP group; None = replicated over TP
    fsdp: bool  # dim 0 of the TP-local tensor split over the data x context group
    shape: tuple[int, ...]  # the global (one-process) shape


class TensorLayout:
    """Describes local tensors of a layout (``groups`` None = one process: everything is global)."""

    def __init__(self, groups=None):
        self.groups = groups
        self.tp = groups.cfg.tp if groups is not None else 1
        self._meshes: dict[str, DeviceMesh] = {}

    # ---------------------------------------------------------------- what a tensor is
    def placement(self, name: str, t: torch.Tensor, tp_sharded: bool = True) -> Placement:
        """The placement of ``t`` (a parameter, buffer, gradient or optimizer state of parameter ``name``).

        ``tp_sharded=False`` for tensors kept whole on every TP rank despite their name (e.g. groups saved
        replicated)."""
        d = tp_shard_dim(name) if tp_sharded and self.tp > 1 and t.dim() > 0 else None
        shape = list(t.shape)  # a DTensor's shape is its TP-local (FSDP-global) shape
        if d is not None:
            shape[d] *= self.tp
        return Placement(d, is_fsdp_sharded(t), tuple(shape))

    # ---------------------------------------------------------------- DCP descriptions
    def describe(self, local_cpu: torch.Tensor, placement: Placement):
        """``local_cpu`` (this rank's piece, on CPU) as a DTensor of the global tensor, or itself if whole."""
        if placement.tp_dim is None and not placement.fsdp:
            return local_cpu
        if placement.fsdp and placement.tp_dim is not None:
            mesh, places = self._mesh("tp_fsdp"), [Shard(placement.tp_dim), Shard(0)]
        elif placement.fsdp:
            mesh, places = self._mesh("fsdp"), [Shard(0)]
        else:
            mesh, places = self._mesh("tp"), [Shard(placement.tp_dim)]
        shape = torch.Size(placement.shape)
        return DTensor.from_local(local_cpu, mesh, places, run_check=False, shape=shape,
                                  stride=_contiguous_stride(shape))

    def _mesh(self, kind: str) -> DeviceMesh:
        if kind not in self._meshes:
            g = self.groups
            if kind == "tp":
                self._meshes[kind] = DeviceMesh.from_group(g.tp_group, "cpu")
            elif kind == "fsdp":
                self._meshes[kind] = DeviceMesh.from_group(g.dp_cp_group, "cpu")
            else:  # (tp, fsdp): TP the outer split, FSDP the inner one, as they were applied
                self._meshes[kind] = DeviceMesh.from_group([g.tp_group, g.dp_cp_group], "cpu",
                                                           mesh=stage_mesh(g), mesh_dim_names=("tp", "fsdp"))
        return self._meshes[kind]


def stage_mesh(groups) -> torch.Tensor:
    """Global ranks of this pipeline stage as [tp index, data x context index] (megatron's order
    ``tp-cp-dp-pp``: TP ranks adjacent, then CP, then DP), checked against the actual groups."""
    c = groups.cfg
    n = c.dp * c.cp
    base = groups.pp_rank * n * c.tp
    mesh = torch.tensor([[base + t + c.tp * j for j in range(n)] for t in range(c.tp)])
    if dist.get_process_group_ranks(groups.dp_cp_group) != mesh[groups.tp_rank].tolist() or \
            dist.get_process_group_ranks(groups.tp_group) != mesh[:, _index(groups)].tolist():
        raise RuntimeError("unexpected rank order of the tensor / data x context groups (megatron-core changed?)")
    return mesh


def _index(groups) -> int:
    """This rank's index in the data x context group (cp fastest)."""
    return groups.cp_rank + groups.cfg.cp * groups.dp_rank


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(int(n), 1)
    return tuple(reversed(stride))
