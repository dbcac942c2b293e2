"""diffusers WanTransformer3DModel <-> CausalWanModel conversion: parity, round trip and error messages."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

from megatron_rcm.config.model import model_preset  # noqa: E402
from megatron_rcm.convert import (diffusers_config_from_model, export_diffusers, import_diffusers,  # noqa: E402
                                  load_diffusers_state_dict, load_model_checkpoint, model_config_from_diffusers,
                                  save_model_checkpoint)
from megatron_rcm.convert.diffusers_wan import ConversionError, add_convert_arguments, run_convert  # noqa: E402
from megatron_rcm.models.causal_wan import build_model  # noqa: E402

CFG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
           text_dim=24, freq_dim=32, ffn_dim=48, num_layers=2, rope_max_seq_len=64)


def _random_diffusers(seed=0):
    torch.manual_seed(seed)
    m = WanTransformer3DModel(**CFG).float().eval()
    with torch.no_grad():
        for p in m.parameters():  # norms and scale_shift_tables too, not their defaults
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 and p.shape[0] == 32 else 0.0))
    return m


@pytest.fixture(scope="module")
def dfolder(tmp_path_factory):
    d = tmp_path_factory.mktemp("wan") / "single"
    _random_diffusers().save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("wan") / "sharded"
    _random_diffusers().save_pretrained(d, safe_serialization=True, max_shard_size="20KB")
    assert (d / "diffusion_pytorch_model.safetensors.index.json").is_file()
    return d


def _from_pretrained(folder):
    """diffusers' own loader, as a user would call it (it needs `accelerate`, a dependency of the export path)."""
    return WanTransformer3DModel.from_pretrained(folder).float().eval()


def _inputs(seed=1, b=2, f=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, f, 4, 6, generator=g)
    ctx = torch.randn(b, 5, 24, generator=g)
    return x, ctx


def _ref(dm, x, t, ctx):
    with torch.no_grad():
        return dm(x, t, ctx, return_dict=False)[0]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("which", ["dfolder", "sharded"])
def test_forward_parity_scalar_timestep(which, request):
    folder = request.getfixturevalue(which)
    ours = import_diffusers(folder).eval()
    dm = _from_pretrained(folder)
    x, ctx = _inputs()
    t = torch.tensor([10.0, 870.0])
    with torch.no_grad():
        y = ours(x, t, ctx, mask=None)
    assert _rel(y, _ref(dm, x, t, ctx)) < 1e-5


def test_forward_parity_per_frame_timestep(dfolder):
    ours = import_diffusers(dfolder).eval()
    dm = _from_pretrained(dfolder)
    x, ctx = _inputs()
    t = torch.tensor([[0.0, 300.0, 999.0], [500.0, 20.0, 700.0]])
    tokens_per_frame = (4 // 2) * (6 // 2)
    t_tok = t.repeat_interleave(tokens_per_frame, dim=1)  # diffusers: per-token [B, seq_len]
    with torch.no_grad():
        y = ours(x, t, ctx)
    assert _rel(y, _ref(dm, x, t_tok, ctx)) < 1e-5


def test_sharded_equals_single(dfolder, sharded):
    a, b = load_diffusers_state_dict(dfolder), load_diffusers_state_dict(sharded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_round_trip(dfolder):
    cfg = model_config_from_diffusers(json.loads((dfolder / "config.json").read_text()))
    back = diffusers_config_from_model(cfg)
    assert back["_class_name"] == "WanTransformer3DModel" and "_diffusers_version" in back
    for k, v in CFG.items():
        assert back[k] == (list(v) if isinstance(v, tuple) else v), k


@pytest.mark.parametrize("shard", [10**9, 30_000])
def test_round_trip_bit_exact_and_diffusers_loads(dfolder, tmp_path, shard):
    ours = import_diffusers(dfolder).eval()
    out = export_diffusers(ours, tmp_path / "exp", max_shard_size=shard)
    assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file() == (shard < 10**6)
    if shard < 10**6:
        index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
        assert set(index) == {"metadata", "weight_map"} and index["metadata"]["total_size"] > 0
        assert all(n.endswith(".safetensors") and "-of-" in n for n in index["weight_map"].values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp folders cleaned up
    again = import_diffusers(out)
    s1, s2 = ours.state_dict(), again.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    dm = _from_pretrained(out)
    x, ctx = _inputs(seed=3)
    t = torch.tensor([250.0, 640.0])
    with torch.no_grad():
        y = ours(x, t, ctx)
    assert _rel(y, _ref(dm, x, t, ctx)) < 1e-5


def test_native_checkpoint_and_cli(dfolder, tmp_path):
    p = add_convert_arguments(__import__("argparse").ArgumentParser())
    ckpt = tmp_path / "m.safetensors"
    run_convert(p.parse_args(["--from-diffusers", str(dfolder), "--out", str(ckpt)]))
    m = load_model_checkpoint(ckpt)
    run_convert(p.parse_args(["--to-diffusers", str(ckpt), "--out", str(tmp_path / "d")]))
    a, b = load_diffusers_state_dict(dfolder), load_diffusers_state_dict(tmp_path / "d")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    save_model_checkpoint(m, tmp_path / "m2.safetensors")
    assert load_model_checkpoint(tmp_path / "m2.safetensors").cfg == m.cfg


def test_action_embedder(dfolder, tmp_path):
    m = import_diffusers(dfolder, action_dim=3)
    assert m.action_embedder is not None and torch.all(m.action_embedder.linear_2.weight == 0)
    with pytest.raises(ConversionError, match="action_dim"):
        export_diffusers(m, tmp_path / "x")
    out = export_diffusers(m, tmp_path / "x", drop_action_embedder=True)
    assert not any(k.startswith("action_embedder") for k in load_diffusers_state_dict(out))


# ---------------------------------------------------------------------- errors name the key
def _copy_with(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = load_file(str(src / "diffusion_pytorch_model.safetensors"))
    edit(state)
    save_file(state, str(dst / "diffusion_pytorch_model.safetensors"))
    return dst


def test_error_missing_key(dfolder, tmp_path):
    d = _copy_with(dfolder, tmp_path / "d", lambda s: s.pop("blocks.1.attn2.norm_k.weight"))
    with pytest.raises(ConversionError, match=r"missing 1 key\(s\): blocks\.1\.attn2\.norm_k\.weight"):
        import_diffusers(d)


def test_error_unexpected_key(dfolder, tmp_path):
    d = _copy_with(dfolder, tmp_path / "d", lambda s: s.update({"blocks.0.attn1.add_k_proj.weight": torch.zeros(2)}))
    with pytest.raises(ConversionError, match=r"unexpected .*blocks\.0\.attn1\.add_k_proj\.weight"):
        import_diffusers(d)


def test_error_wrong_shape(dfolder, tmp_path):
    d = _copy_with(dfolder, tmp_path / "d", lambda s: s.update({"proj_out.bias": torch.zeros(7)}))
    with pytest.raises(ConversionError, match=r"shape mismatch .*proj_out\.bias"):
        import_diffusers(d)


def test_error_bad_dtype(dfolder, tmp_path):
    d = _copy_with(dfolder, tmp_path / "d", lambda s: s.update({"proj_out.bias": s["proj_out.bias"].to(torch.int32)}))
    with pytest.raises(ConversionError, match=r"dtype .*proj_out\.bias"):
        import_diffusers(d)


@pytest.mark.parametrize("key,value,named", [("qk_norm", "rms_norm", "qk_norm"), ("window_size", [4, 4], "window_size"),
                                             ("image_dim", 1280, "added_kv_proj_dim"),  # half of the I2V layout
                                             ("pos_embed_seq_len", 514, "pos_embed_seq_len")])
def test_error_unsupported_config(dfolder, key, value, named):
    cfg = json.loads((dfolder / "config.json").read_text())
    cfg[key] = value
    with pytest.raises(ConversionError, match=named):
        model_config_from_diffusers(cfg)


def test_error_missing_files(dfolder, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_diffusers(tmp_path)
    (tmp_path / "config.json").write_text((dfolder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        import_diffusers(tmp_path)


def test_error_missing_shard(sharded, tmp_path):
    import shutil
    d = tmp_path / "s"
    shutil.copytree(sharded, d)
    victim = sorted(d.glob("*-of-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        import_diffusers(d)


def test_export_refuses_nothing_silently_for_presets(tmp_path):
    cfg = diffusers_config_from_model(model_preset("wan2.1-1.3b"))
    assert cfg["num_layers"] == 30 and cfg["ffn_dim"] == 8960
    assert model_config_from_diffusers(cfg).num_attention_heads == 12
