"""Sharded checkpoints (training/dist_checkpoint.py): saved under TP2 (and DP2 with ZeRO-1, and FSDP2 DP2),
loaded under DP2 / CP2 / PP2 / TP2 / FSDP2 / one process, every weight, EMA and AdamW state equal to the saved one
bit for bit; a corrupt shard is named and the previous checkpoint used; a save that dies midway
leaves ``latest`` on the previous one; the diffusers export reads the sharded checkpoint directly."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from _launch_ranks import launch  # noqa: E402
from _worker import make_model  # noqa: E402

from megatron_rcm.training import checkpoint as ckpt  # noqa: E402
from megatron_rcm.training import dist_checkpoint as dck  # noqa: E402


@pytest.fixture(scope="module")
def tp2_root(tmp_path_factory):
    """Checkpoints of steps 1, 2 saved under TP2 (+ the reference records), checked under 4 other layouts."""
    root = tmp_path_factory.mktemp("dist_ckpt")
    errors = launch("_ckpt_worker.py", 2, [str(root)], timeout=240)
    assert not errors, "\n".join(errors[:30])
    return root


def test_reshards_across_layouts(tp2_root):
    assert (tp2_root / "latest").read_text().strip() == "step_00000002"
    assert {p.name for p in tp2_root.glob("step_*")} == {"step_00000001", "step_00000002"}
    manifest = json.loads((tp2_root / "step_00000002" / ckpt.MANIFEST).read_text())
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "shared.pt", "meta.json"} <= set(manifest["files"])


def _load_single(root):
    model = make_model(1)
    ema = {n: torch.zeros_like(t) for n, t in model.state_dict().items()}
    named = dict(model.named_parameters())
    opt = torch.optim.AdamW(named.values(), lr=0.5)
    res = dck.load_distributed(root, {"model": model.state_dict(), "ema": ema}, {"optim": (opt, named)})
    return res, model, ema, opt


def _assert_equal_to_record(root, step, model, ema, opt):
    record = torch.load(root / f"ref_step{step}.pt")
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), record[f"model.{n}"]), n
        assert torch.equal(ema[n], record[f"ema.{n}"]), n
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], record[f"optim.state.{n}.{k}"]), (n, k)
    assert opt.param_groups[0]["lr"] == 1e-2


def test_tp2_checkpoint_loads_in_one_process(tp2_root):
    res, model, ema, opt = _load_single(tp2_root)
    assert res.step == 2 and res.rank_state is None and res.saved_layout["tp"] == 2
    _assert_equal_to_record(tp2_root, 2, model, ema, opt)


def test_corrupt_shard_is_named_and_previous_checkpoint_used(tp2_root, tmp_path, capsys):
    root = tmp_path / "ck"
    shutil.copytree(tp2_root, root)
    with open(root / "step_00000002" / "__1_0.distcp", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00corrupt\x00")
    res, model, ema, opt = _load_single(root)
    assert res.step == 1
    assert "step_00000002/__1_0.distcp fails its sha256" in capsys.readouterr().out
    _assert_equal_to_record(root, 1, model, ema, opt)
    # a truncated shard is reported by its size
    shutil.rmtree(root / "step_00000002")
    with open(root / "step_00000001" / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ckpt.CheckpointError, match="__0_0.distcp has 100 bytes"):
        ckpt.verify_checkpoint(root / "step_00000001")


def test_save_dying_midway_keeps_latest_on_previous(tp2_root, tmp_path, monkeypatch):
    root = tmp_path / "ck"
    shutil.copytree(tp2_root, root)
    _, model, ema, opt = _load_single(root)

    def die(point, step):
        raise RuntimeError(f"killed during {point} {step}")

    monkeypatch.setattr(dck, "maybe_fail", die)
    named = dict(model.named_parameters())
    with pytest.raises(RuntimeError, match="killed during save 3"):
        dck.save_distributed(root, 3, {"model": model.state_dict(), "ema": ema}, {"optim": (opt, named)})
    assert any(p.name.startswith(".step_00000003") for p in root.iterdir())  # the half-written folder
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert _load_single(root)[0].step == 2


def test_async_save_single_process(tmp_path):
    model = make_model(1)
    pending = dck.save_distributed(tmp_path, 5, {"model": model.state_dict()}, shared={"k": 1},
                                   rank_state={"r": 0}, async_save=True)
    with torch.no_grad():  # changing the weights right after the call does not leak into the checkpoint
        for p in model.parameters():
            p.add_(1.0)
    assert dck.wait_for_pending_save() == tmp_path / "step_00000005"
    assert pending.path == tmp_path / "step_00000005"
    fresh = make_model(1)
    res = dck.load_distributed(tmp_path, {"model": fresh.state_dict()})
    assert res.step == 5 and res.shared == {"k": 1} and res.rank_state == {"r": 0}
    for (n, a), b in zip(fresh.named_parameters(), model.parameters()):
        assert torch.equal(a + 1.0, b), n


def test_export_from_sharded_checkpoint_equals_single_process_export(tp2_root, tmp_path):
    pytest.importorskip("diffusers")
    from megatron_rcm.cli import main
    from megatron_rcm.convert import export_diffusers, load_diffusers_state_dict
    from megatron_rcm.convert.native import load_sharded_checkpoint_model

    assert main(["convert", "--to-diffusers", str(tp2_root), "--out", str(tmp_path / "from_tp2"),
                 "--weights", "ema", "--max-shard-size", "40KB"]) == 0
    out = tmp_path / "from_tp2"
    assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file()
    record = torch.load(tp2_root / "ref_step2.pt")
    model = make_model(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(record[f"ema.{n}"])
    export_diffusers(model, tmp_path / "single", max_shard_size="40KB")
    a, b = load_diffusers_state_dict(out), load_diffusers_state_dict(tmp_path / "single")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    single_config = json.loads((tmp_path / "single" / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == single_config
    raw = load_sharded_checkpoint_model(tp2_root / "step_00000001", weights="model")  # raw weights, a step folder
    record1 = torch.load(tp2_root / "ref_step1.pt")
    assert all(torch.equal(p, record1[f"model.{n}"]) for n, p in raw.named_parameters())
    with pytest.raises(ckpt.CheckpointError, match="no tensors of group 'critic'"):
        dck.read_full_tensors(tp2_root, "critic")
    # the FSDP2 (DP2) checkpoint exports in one process too
    assert main(["convert", "--to-diffusers", str(tp2_root / "fsdp"), "--out", str(tmp_path / "from_fsdp"),
                 "--weights", "model"]) == 0
    record4 = torch.load(tp2_root / "fsdp" / "ref_step4.pt")
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(record4[f"model.{n}"])
    export_diffusers(model, tmp_path / "single4")
    a, b = load_diffusers_state_dict(tmp_path / "from_fsdp"), load_diffusers_state_dict(tmp_path / "single4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_single_process_format_is_refused_with_a_clear_message(tmp_path):
    tmp = ckpt.fresh_temp_dir(tmp_path, 1, "tmp-old")  # the old single-process layout: tensors + state.pt
    save_file({"w": torch.zeros(3)}, str(tmp / "student.safetensors"))
    torch.save({"step": 1}, tmp / "state.pt")
    ckpt.commit_checkpoint(tmp_path, tmp, 1, keep=2)
    path = dck.choose_checkpoint(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="not a sharded checkpoint"):
        dck.read_shared_state(path)


def test_checkpoint_saved_on_eight_ranks_resumes_on_two(tmp_path):
    """TP2 x CP2 x PP2 (8 gloo processes) -> DP2 and TP2: every weight, EMA and AdamW state bit for bit."""
    errors = launch("_ckpt_worker.py", 8, [str(tmp_path), "save"], timeout=240)
    assert not errors, "\n".join(errors[:30])
    layout = json.loads((tmp_path / "step_00000002" / "meta.json").read_text())["layout"]
    assert (layout["tp"], layout["cp"], layout["pp"], layout["world"]) == (2, 2, 2, 8), layout
    errors = launch("_ckpt_worker.py", 2, [str(tmp_path), "load"], timeout=240)
    assert not errors, "\n".join(errors[:30])
