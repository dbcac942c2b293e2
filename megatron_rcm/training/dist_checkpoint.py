"""Sharded training checkpoints that load under any other parallel layout (torch.distributed.checkpoint).

Format: torch DCP, not megatron-core ``dist_checkpointing``. Why:
- DCP stores every tensor under its GLOBAL name with its GLOBAL shape plus the chunks (offsets,
  sizes) that were written; a load asks for whatever chunks the new layout needs and DCP plans the
  reads. Resharding TP2 -> TP1 x DP2 / CP2 / PP2 / one process is therefore a read-planning
  problem it already solves, and replicas (DP/CP copies, the embeddings every PP stage holds, the
  ZeRO-1 state of those embeddings on every stage) are written once (its save planner dedups).
- It runs on gloo/CPU (our tests) and NCCL, and reads back in ONE process without
  torch.distributed (``no_dist``): the diffusers export reads a checkpoint of any layout that way.
- megatron-core's ``dist_checkpointing`` wants ``sharded_state_dict()`` from megatron-core/TE
  layers and its optimizer path expects its DistributedOptimizer; our model is plain torch with
  hand-made TP shards and torch's ZeroRedundancyOptimizer, so we would re-describe every tensor
  in its ShardedTensor terms for no gain. (It can itself write through a torch DCP backend.)

Keys: ``<group>.<param name>`` (groups e.g. model / ema / critic), each sharded tensor described
as a DTensor of its global tensor by :class:`~megatron_rcm.parallel.sharding.TensorLayout`
(``Shard(tp_shard_dim(name))`` over the TP group; under FSDP2 also ``Shard(0)`` of the TP-local
tensor over the data x context group), everything else a plain tensor. Optimizer state is saved PER
PARAMETER, keyed like it (``<optim>.state.<param name>.<key>``, same sharding as the parameter) by the
rank whose ZeRO-1 partition holds it (every rank, for its FSDP shards), so it reshards like the
weights whatever the new layout is: FSDP2 <-> ZeRO-1 <-> TP / PP <-> one process. Beside DCP's files
(``__<rank>_0.distcp``,
``.metadata``): ``shared.pt`` (rank 0: scheduler, counters, optimizer hyper-parameters),
``rank_<r>.pt`` (per rank: RNG, data position; given back only under the same layout) and
``meta.json`` (layout, model config). Atomicity, manifest (sizes + sha256), ``latest``, keep-N and
verification with fallback are :mod:`.checkpoint`'s: all ranks write into one temporary folder,
rank 0 commits it after a barrier.

Asynchronous save: tensors are copied to CPU at the call, the files are written by a background
thread over a dedicated gloo group (so its collectives never interleave with training's). The
flush point is :func:`wait_for_pending_save`, called by every save/load and by the trainer at exit.
"""
from __future__ import annotations

import copy
import json
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor

from ..parallel.sharding import TensorLayout, local
from . import checkpoint as ckpt
from .faults import maybe_fail

FORMAT = "megatron-rcm-dcp-1"
SHARED = "shared.pt"
META = "meta.json"
DCP_METADATA = ".metadata"


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


_CKPT_GROUPS: dict[int, object] = {}


def _ckpt_group():
    """A gloo group of all ranks for the checkpoint's own collectives (created once, collectively)."""
    if not _distributed() or dist.get_world_size() == 1:
        return None
    key = id(dist.group.WORLD)
    if key not in _CKPT_GROUPS:
        _CKPT_GROUPS[key] = dist.new_group(backend="gloo")
    return _CKPT_GROUPS[key]


def _barrier(pg) -> None:
    if pg is not None:
        dist.barrier(group=pg)


def _layout_of(groups) -> dict:
    world = _rank_world()[1]
    if groups is None:
        return {"world": world, "tp": 1, "cp": 1, "pp": 1, "dp": world, "fsdp": False}
    c = groups.cfg
    return {"world": world, "tp": c.tp, "cp": c.cp, "pp": c.pp, "dp": c.dp, "fsdp": bool(c.fsdp)}


def _inner_optimizer(opt):
    """The optimizer that holds this rank's state: ZeRO-1's local one, else ``opt`` itself."""
    return opt.optim if isinstance(opt, ZeroRedundancyOptimizer) else opt


def _owned(opt, named_params: dict) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, param) of the parameters whose optimizer state lives on this rank."""
    inner = _inner_optimizer(opt)
    by_id = {id(p): n for n, p in named_params.items()}
    owned = []
    for group in inner.param_groups:
        for p in group["params"]:
            if id(p) not in by_id:
                raise ckpt.CheckpointError(f"an optimizer parameter of shape {tuple(p.shape)} is missing from "
                                           "named_params: pass every optimized parameter with its global name")
            owned.append((by_id[id(p)], p))
    return owned


def _pairs(optimizers: dict | None):
    """(name, optimizer, named params) for each optimizer; a name may hold a list of (opt, named) pairs."""
    for oname, spec in (optimizers or {}).items():
        for opt, named in (spec if isinstance(spec, list) else [spec]):
            yield oname, opt, named


def _stage(t: torch.Tensor, copy_now: bool) -> torch.Tensor:
    t = t.detach()
    return t.to("cpu", copy=True) if copy_now else t.cpu()


# ---------------------------------------------------------------------------------------------- save
_PENDING: list["PendingSave"] = []


class PendingSave:
    """A save running in a background thread; :meth:`wait` joins it and re-raises its error."""

    def __init__(self, job):
        self.path: Path | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(job,), name="dist-checkpoint-save", daemon=True)
        self._thread.start()

    def _run(self, job):
        try:
            self.path = job()
        except BaseException as e:  # re-raised in the training thread by wait()
            self._error = e

    def wait(self) -> Path:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.path


def wait_for_pending_save() -> Path | None:
    """Flush point: block until the previous asynchronous save is committed (re-raising its error)."""
    path = None
    while _PENDING:
        path = _PENDING.pop(0).wait()
    return path


def save_distributed(root, step: int, tensors: dict[str, dict[str, torch.Tensor]],
                     optimizers: dict[str, tuple] | None = None, shared: dict | None = None,
                     rank_state: dict | None = None, groups=None, meta: dict | None = None, keep: int = 2,
                     async_save: bool = False, replicated: tuple[str, ...] = ()):
    """Collectively write checkpoint ``root/step_XXXXXXXX`` (call on every rank with its local state).

    ``tensors``: group -> this rank's state dict (parameter names as in the unsharded model; TP-sharded
    per :func:`tp_shard_dim`, except groups listed in ``replicated``). ``optimizers``: name ->
    (optimizer, {global param name: param}), or a list of such pairs. ``shared``: picklable state,
    identical on all ranks (rank 0's is kept). ``rank_state``: this rank's own state (RNG, data
    position). ``meta``: JSON (e.g. the model config, read by the diffusers export). Returns the committed path, or a
    :class:`PendingSave` when ``async_save``.
    """
    wait_for_pending_save()
    root = Path(root)
    rank, world = _rank_world()
    layout = TensorLayout(groups)
    state: dict = {}
    for group, sd in tensors.items():
        for name, t in sd.items():
            where = layout.placement(name, t, group not in replicated)
            state[f"{group}.{name}"] = layout.describe(_stage(local(t), async_save), where)
    hyper: dict[str, list] = {}
    for oname, opt, named in _pairs(optimizers):
        inner = _inner_optimizer(opt)
        for name, p in _owned(opt, named):
            for k, v in inner.state.get(p, {}).items():
                key = f"{oname}.state.{name}.{k}"
                if torch.is_tensor(v):
                    staged = _stage(local(v), async_save)
                    state[key] = layout.describe(staged, layout.placement(name, v)) if v.shape == p.shape else staged
                else:
                    state[key] = copy.deepcopy(v)
        hyper.setdefault(oname, []).append([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    files = {}
    if rank_state is not None:
        files[_rank_file(rank)] = copy.deepcopy(rank_state) if async_save else rank_state
    info = {"format": FORMAT, "step": step, "layout": _layout_of(groups), "groups": sorted(tensors),
            "optimizers": sorted(optimizers or {}), **(meta or {})}
    if rank == 0:
        files[SHARED] = copy.deepcopy({"state": shared or {}, "param_groups": hyper})
    pg = _ckpt_group()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        ckpt.fresh_temp_dir(root, step, "tmp-dist")
    _barrier(pg)
    tmp = root / f".{ckpt.checkpoint_name(step)}.tmp-dist"

    def job() -> Path:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # DCP's "assuming single process" note
            dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp), process_group=pg, no_dist=pg is None)
        for name, obj in files.items():
            torch.save(obj, tmp / name)
        if rank == 0:
            (tmp / META).write_text(json.dumps(info, indent=1, default=str))
        # each rank hashes what it wrote (DCP names its files __<rank>_<n>.distcp); rank 0 the rest
        mine = {p.name: ckpt.file_digest(p) for p in tmp.iterdir()
                if p.name.startswith(f"__{rank}_") or p.name == _rank_file(rank)}
        maybe_fail("save", step)  # fault-tolerance tests: die with the folder half written
        digests = [mine]
        if pg is not None:
            digests = [None] * world
            dist.all_gather_object(digests, mine, group=pg)
        if rank == 0:
            ckpt.commit_checkpoint(root, tmp, step, keep, info={"format": FORMAT, "world_size": world},
                                   digests={k: v for d in digests for k, v in d.items()})
        _barrier(pg)  # nobody reads 'latest' before it moved
        return root / ckpt.checkpoint_name(step)

    if async_save:
        pending = PendingSave(job)
        _PENDING.append(pending)
        return pending
    return job()


# ---------------------------------------------------------------------------------------------- load
@dataclass
class Resumed:
    path: Path
    step: int
    shared: dict
    rank_state: dict | None  # None when the layout differs from the saved one (then re-derive RNG etc.)
    saved_layout: dict


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / DCP_METADATA).is_file()


def _broadcast(obj, pg):
    if pg is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=pg)
    return box[0]


def _storage_metadata(path: Path) -> dict:
    if not is_sharded_checkpoint(path):
        raise ckpt.CheckpointError(f"{path} is not a sharded checkpoint (no {DCP_METADATA}): it is in the "
                                   "single-process format of training/checkpoint.py (older versions of the trainer); "
                                   "resume it with that version or start a new output_dir")
    return dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata


def _load_targets(md: dict, tensors, optimizers, layout: TensorLayout, replicated) -> tuple[dict, list, list[str]]:
    """The state dict to read into (this rank's slices), what to copy back, and keys the checkpoint lacks."""
    state, missing, optim_targets = {}, [], []
    for group, sd in tensors.items():
        for name, t in sd.items():
            key = f"{group}.{name}"
            if key not in md:
                missing.append(key)
                continue
            where = layout.placement(name, t, group not in replicated)
            state[key] = layout.describe(torch.empty(local(t).shape, dtype=t.dtype), where)
    for oname, opt, named in _pairs(optimizers):
        for name, p in _owned(opt, named):
            prefix = f"{oname}.state.{name}."
            keys = [k for k in md if k.startswith(prefix) and "." not in k[len(prefix):]]
            where = layout.placement(name, p)
            for key in keys:
                m = md[key]
                if isinstance(m, dcp.TensorStorageMetadata):
                    if tuple(m.size) == where.shape:
                        state[key] = layout.describe(torch.empty(local(p).shape, dtype=m.properties.dtype), where)
                    else:
                        state[key] = torch.empty(tuple(m.size), dtype=m.properties.dtype)
                else:
                    state[key] = None  # a pickled object: DCP replaces the value
            optim_targets.append((opt, p, prefix, keys))
    return state, optim_targets, missing


def _like_param(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A loaded optimizer-state piece in the parameter's form: on its device, a DTensor like an FSDP shard."""
    v = v.to(local(p).device)
    if isinstance(p, DTensor):
        return DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    return v


def choose_checkpoint(root, bad: list | None = None) -> Path | None:
    """Collectively: the checkpoint to resume from, the same on every rank.

    ``latest`` if it verifies, else the newest older one that does (the ranks share the hashing); each
    bad one is reported (rank 0) with the offending file, and its message appended to ``bad``. None when
    there is no usable checkpoint."""
    wait_for_pending_save()
    pg = _ckpt_group()
    if pg is None:
        return next(ckpt.valid_checkpoints(root, bad), None)
    rank, world = _rank_world()
    candidates = _broadcast([str(p) for p in ckpt.candidate_checkpoints(root)] if rank == 0 else None, pg)
    for path in map(Path, candidates):
        error = None
        try:
            ckpt.verify_checkpoint(path, part=(rank, world))  # every rank hashes its share of the files
        except (ckpt.CheckpointError, OSError) as e:
            error = str(e)
        errors = [None] * world
        dist.all_gather_object(errors, error, group=pg)
        errors = [e for e in errors if e]
        if not errors:
            return path
        if rank == 0:
            ckpt.report_unusable(ckpt.CheckpointError("; ".join(errors)))
        if bad is not None:
            bad.append("; ".join(errors))
    return None


def read_shared_state(path) -> dict:
    """The ``shared`` dict saved with checkpoint ``path`` (cheap: no tensors are read)."""
    _storage_metadata(Path(path))  # a clear error for a folder in the single-process format
    return torch.load(Path(path) / SHARED, map_location="cpu", weights_only=False)["state"]


def load_distributed(root, tensors: dict[str, dict[str, torch.Tensor]], optimizers: dict[str, tuple] | None = None,
                     groups=None, replicated: tuple[str, ...] = (), path=None) -> Resumed | None:
    """Collectively load the newest complete checkpoint under ``root`` (or ``path``, chosen before by
    :func:`choose_checkpoint`) into this rank's tensors and optimizers.

    The layout may differ from the saved one: each rank reads exactly its slices. ``optimizers``:
    name -> (optimizer, {global param name: param}) or a list of such pairs (e.g. ZeRO-1 for the
    model plus a plain AdamW for small side modules: state is keyed by parameter name, so the split
    may differ from the saved one). Returns None when there is no usable checkpoint.
    """
    wait_for_pending_save()
    rank, world = _rank_world()
    pg = _ckpt_group()
    path = choose_checkpoint(root) if path is None else Path(path)
    if path is None:
        return None
    md = _storage_metadata(path)
    state, optim_targets, missing = _load_targets(md, tensors, optimizers, TensorLayout(groups), replicated)
    all_missing = missing
    if pg is not None:
        gathered = [None] * world
        dist.all_gather_object(gathered, missing, group=pg)
        all_missing = sorted({k for m in gathered for k in m})
    if all_missing:
        head = ", ".join(all_missing[:5]) + (", ..." if len(all_missing) > 5 else "")
        raise ckpt.CheckpointError(f"{path} lacks {len(all_missing)} tensor(s) this run needs: {head} "
                                   "(a different model or optimizer?)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)), process_group=pg, no_dist=pg is None)
    with torch.no_grad():
        for group, sd in tensors.items():
            for name, t in sd.items():
                local(t).copy_(local(state[f"{group}.{name}"]))
    for opt, p, prefix, keys in optim_targets:
        loaded = {}
        for key in keys:
            v = local(state[key])
            loaded[key[len(prefix):]] = _like_param(v, p) if torch.is_tensor(v) and v.shape == local(p).shape \
                and v.dim() > 0 else v
        inner = _inner_optimizer(opt)
        if loaded:
            inner.state[p] = loaded
        else:
            inner.state.pop(p, None)
    shared = torch.load(path / SHARED, map_location="cpu", weights_only=False)
    index: dict[str, int] = {}
    for oname, opt, _ in _pairs(optimizers):
        saved = shared["param_groups"].get(oname) or [[]]
        i = index[oname] = index.get(oname, -1) + 1
        _set_hyperparameters(opt, saved[min(i, len(saved) - 1)], oname)
    info = json.loads((path / META).read_text())
    rank_state = None
    if info["layout"] == _layout_of(groups) and (path / _rank_file(rank)).is_file():
        rank_state = torch.load(path / _rank_file(rank), map_location="cpu", weights_only=False)
    _barrier(pg)
    return Resumed(path, int(info["step"]), shared["state"], rank_state, info["layout"])


def _set_hyperparameters(opt, saved: list[dict], name: str) -> None:
    targets = [opt.param_groups]
    if _inner_optimizer(opt) is not opt:
        targets.append(_inner_optimizer(opt).param_groups)
    for groups in targets:
        if len(saved) == 1:  # one saved group (the usual case) fits any split into optimizers / groups
            saved = saved * len(groups)
        if len(groups) != len(saved):
            raise ckpt.CheckpointError(f"optimizer '{name}' has {len(groups)} param groups, the checkpoint "
                                       f"{len(saved)}")
        for g, s in zip(groups, saved):
            g.update(s)


# ---------------------------------------------------------------------------------------------- offline
def resolve_checkpoint(path) -> Path:
    """A checkpoint folder (verified) from either itself or a root holding ``step_*`` folders."""
    path = Path(path)
    if (path / ckpt.MANIFEST).is_file():
        ckpt.verify_checkpoint(path)
        return path
    found = next(ckpt.valid_checkpoints(path), None)
    if found is None:
        raise ckpt.CheckpointError(f"no complete checkpoint in {path} (expected a step_* folder with "
                                   f"{ckpt.MANIFEST}, or a folder of them)")
    return found


def read_checkpoint_meta(path) -> dict:
    return json.loads((Path(path) / META).read_text())


def read_full_tensors(path, group: str) -> dict[str, torch.Tensor]:
    """The full (unsharded) tensors of ``group`` from a sharded checkpoint of any layout, in ONE process."""
    path = resolve_checkpoint(path)
    md = _storage_metadata(path)
    prefix = f"{group}."
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in md.items()
             if k.startswith(prefix) and isinstance(m, dcp.TensorStorageMetadata)}
    if not state:
        have = read_checkpoint_meta(path).get("groups", [])
        raise ckpt.CheckpointError(f"{path} holds no tensors of group '{group}'; it has {have}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
    return {k[len(prefix):]: v for k, v in state.items()}
