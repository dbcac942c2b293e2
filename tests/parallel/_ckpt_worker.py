"""One rank of the resharding check (2 processes; launched by ``_launch_ranks.py``).

Save under TP2 (steps 1 and 2) and under DP2 (ZeRO-1, step 3), each time recording the FULL weights,
EMA and AdamW states by gathering the shards by hand (independent of DCP); then load each checkpoint
under other layouts (DP2, CP2, PP2, TP2) into a differently initialised model and compare every
local tensor and optimizer state with the matching slice of the record, exactly (``torch.equal``).
Then corrupt one shard of step 2: the ranks (sharing the hashing) report it and load step 1. Layouts
ending in ``f`` add FSDP2 (plain AdamW on the shards): saved under FSDP DP2, loaded under TP2 and ZeRO-1,
and the ZeRO-1 checkpoint loaded under FSDP DP2.
Rank 0 leaves the records in ``<root>/ref_step<N>.pt`` for the single-process checks in the test.
"""
import contextlib
import dataclasses
import io
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from _worker import make_model  # noqa: E402

from torch.distributed.tensor import distribute_tensor  # noqa: E402

from megatron_rcm.parallel import (ParallelConfig, initialize_parallel, parallelize_model, shard_like,  # noqa: E402
                                   sharded_optimizer, tp_shard_dim)
from megatron_rcm.parallel.fsdp import shard_model  # noqa: E402
from megatron_rcm.parallel.sharding import is_fsdp_sharded  # noqa: E402


def whole(t):
    """The TP-local tensor of an FSDP shard (collective over the data x context group), else ``t``."""
    return t.full_tensor() if is_fsdp_sharded(t) else t
from megatron_rcm.training import dist_checkpoint as dck  # noqa: E402


def setup(layout, seed):
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    fsdp = layout.endswith("f")
    tp, cp, dp, pp = (int(v) for v in (layout.rstrip("f") + "x1").split("x")[:4])
    groups = initialize_parallel(ParallelConfig(tp=tp, cp=cp, dp=dp, pp=pp, fsdp=fsdp))
    ref = make_model(1)
    if seed:  # a different starting point, so a load that reads nothing is caught
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(float(seed))
    model = parallelize_model(ref, groups)
    if fsdp:
        model = shard_model(model, groups, torch.device("cpu"))
        return groups, model, torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = sharded_optimizer(model.parameters(), groups, lr=1e-2)
    return groups, model, opt


def train(model, opt, groups, steps):
    """AdamW steps with fixed pseudo-random full gradients, sharded like the parameters."""
    g = torch.Generator().manual_seed(7)
    shapes = {n: p.shape for n, p in make_model(1).named_parameters()}
    for _ in range(steps):
        full = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in sorted(shapes.items())}
        for n, p in model.named_parameters():
            grad = shard_like(n, full[n], groups).clone()
            p.grad = distribute_tensor(grad, p.device_mesh, p.placements) if is_fsdp_sharded(p) else grad
        opt.step()


def ema_of(model):
    return {n: t.detach() * 0.5 + 1.0 for n, t in model.state_dict().items()}


def full_record(model, opt, groups):
    """{key: full tensor} of weights, EMA and optimizer state, gathered from all ranks' pieces."""
    inner = getattr(opt, "optim", opt)
    pieces = {}
    for n, p in model.named_parameters():
        pieces[f"model.{n}"] = whole(p.detach()).clone()
        pieces[f"ema.{n}"] = whole(p.detach()) * 0.5 + 1.0
        for k, v in inner.state.get(p, {}).items():
            pieces[f"optim.state.{n}.{k}"] = whole(v.detach()).clone()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (groups.tp_rank, pieces))
    by_key = {}
    for tp_rank, ps in everyone:
        for key, t in ps.items():
            by_key.setdefault(key, {})[tp_rank] = t
    record = {}
    for key, parts in by_key.items():
        name = key.split(".", 1)[1]
        if key.startswith("optim.state."):
            name = name.split(".", 1)[1].rsplit(".", 1)[0]
        d = tp_shard_dim(name)
        if d is None or len(parts) == 1 or parts[0].dim() == 0:
            record[key] = parts[0]
        else:
            record[key] = torch.cat([parts[r] for r in sorted(parts)], dim=d)
    return record


def save(root, step, model, opt, groups):
    named = dict(model.named_parameters())
    dck.save_distributed(root, step, {"model": model.state_dict(), "ema": ema_of(model)},
                         optimizers={"optim": (opt, named)}, shared={"step": step},
                         rank_state={"rank": dist.get_rank(), "rng": torch.get_rng_state()}, groups=groups,
                         meta={"model_config": dataclasses.asdict(model.cfg)}, keep=5)
    record = full_record(model, opt, groups)
    if dist.get_rank() == 0:
        torch.save(record, Path(root) / f"ref_step{step}.pt")
    dist.barrier()
    return record


def check_load(root, layout, record, step, same_layout, errors):
    groups, model, opt = setup(layout, seed=3)
    ema = {n: torch.zeros_like(t) for n, t in model.state_dict().items()}
    named = dict(model.named_parameters())
    res = dck.load_distributed(root, {"model": model.state_dict(), "ema": ema}, {"optim": (opt, named)}, groups)
    where = f"load of step {step} under {layout}"
    if res is None or res.step != step or res.shared != {"step": step}:
        errors.append(f"{where}: resumed {res and (res.step, res.shared)}")
        return
    if (res.rank_state is not None) != same_layout:
        errors.append(f"{where}: rank_state given back = {res.rank_state is not None}, same layout = {same_layout}")
    inner = getattr(opt, "optim", opt)
    owned = [p for g in inner.param_groups for p in g["params"]]
    compared = 0
    for n, p in named.items():
        pairs = [(f"model.{n}", p), (f"ema.{n}", ema[n])]
        if any(p is q for q in owned):
            st = inner.state.get(p, {})
            if sorted(st) != ["exp_avg", "exp_avg_sq", "step"]:
                errors.append(f"{where}: optimizer state of {n} has keys {sorted(st)}")
                continue
            pairs += [(f"optim.state.{n}.{k}", st[k]) for k in ("exp_avg", "exp_avg_sq", "step")]
        for key, got in pairs:
            got = whole(got)
            want = record[key] if got.dim() == 0 else shard_like(n, record[key], groups)
            compared += 1
            if not torch.equal(got, want):
                errors.append(f"{where}: {key} differs (max abs {float((got - want).abs().max()):.3e})")
    if compared < 2 * len(named):
        errors.append(f"{where}: only {compared} tensors compared")
    lr = [g["lr"] for g in opt.param_groups]
    if lr != [1e-2] * len(lr):
        errors.append(f"{where}: lr {lr}")


def three_d(root, mode, errors):
    """``save``: 8 ranks, TP2 x CP2 x PP2, two AdamW steps, checkpoint + record of step 2.
    ``load``: 2 ranks load that checkpoint under DP2 and under TP2 (the issue's "saved on 8, resumed on 2")."""
    if mode == "save":
        groups, model, opt = setup("2x2x1x2", seed=0)
        train(model, opt, groups, 2)
        save(root, 2, model, opt, groups)
    else:
        rec = torch.load(Path(root) / "ref_step2.pt")
        for layout in ("1x1x2", "2x1x1"):
            check_load(root, layout, rec, 2, False, errors)


def main():
    root, out_dir = sys.argv[1], sys.argv[-1]
    torch.set_num_threads(1)
    errors = []
    if len(sys.argv) == 4:  # root, mode, out_dir
        try:
            three_d(root, sys.argv[2], errors)
        except Exception:
            errors.append(traceback.format_exc())
        with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
            json.dump(errors, f)
        return
    try:
        groups, model, opt = setup("2x1x1", seed=0)
        train(model, opt, groups, 1)
        rec1 = save(root, 1, model, opt, groups)
        train(model, opt, groups, 1)
        rec2 = save(root, 2, model, opt, groups)
        if torch.equal(rec1["model.blocks.0.attn1.to_q.weight"], rec2["model.blocks.0.attn1.to_q.weight"]):
            errors.append("steps 1 and 2 saved equal weights: the check could not tell them apart")
        for layout in ("1x1x2", "1x2x1", "1x1x1x2", "2x1x1"):
            check_load(root, layout, rec2, 2, layout == "2x1x1", errors)
        # a corrupt shard of step 2 (found by whichever rank hashes it) -> both ranks fall back to step 1
        croot = Path(root) / "corrupt"
        if dist.get_rank() == 0:
            for name in ("step_00000001", "step_00000002", "latest"):
                copy = shutil.copytree if name.startswith("step") else shutil.copy
                copy(Path(root) / name, croot / name)
            with open(croot / "step_00000002" / "__1_0.distcp", "r+b") as f:
                f.seek(500)
                f.write(b"\x00corrupt\x00")
        dist.barrier()
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            check_load(croot, "1x1x2", rec1, 1, False, errors)
        if dist.get_rank() == 0 and "step_00000002/__1_0.distcp fails its sha256" not in printed.getvalue():
            errors.append(f"corrupt shard not reported by name: {printed.getvalue()!r}")
        # ZeRO-1 partitions (DP2) -> TP2
        zroot = os.path.join(root, "zero")
        groups, model, opt = setup("1x1x2", seed=0)
        train(model, opt, groups, 3)
        rec3 = save(zroot, 3, model, opt, groups)
        check_load(zroot, "2x1x1", rec3, 3, False, errors)
        check_load(zroot, "1x1x2f", rec3, 3, False, errors)  # ZeRO-1 -> FSDP2
        # FSDP2 shards (DP2) -> TP2, ZeRO-1 DP2, FSDP2 DP2
        froot = os.path.join(root, "fsdp")
        groups, model, opt = setup("1x1x2f", seed=0)
        train(model, opt, groups, 2)
        rec4 = save(froot, 4, model, opt, groups)
        for layout in ("2x1x1", "1x1x2", "1x1x2f"):
            check_load(froot, layout, rec4, 4, layout == "1x1x2f", errors)
    except Exception:
        errors.append(traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(errors, f)


if __name__ == "__main__":
    main()
