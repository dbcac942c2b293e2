"""The Wan image-to-video transformer layout (image_dim / added_kv_proj_dim / pos_embed_seq_len).

Parity with diffusers' WanTransformer3DModel through the converter (float32 and float64), the round trip,
and every other path of our model with the image context present: tangents against torch.func.jvp,
teacher forcing, KV-cached streaming against the full block-causal pass (the image K/V cached like the
text's), the network seam (CFG shares the image between branches) and one loss of every registered objective.
"""
import copy
import json

import pytest
import torch

from conftest import rel_err

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

from megatron_rcm.config.errors import ConfigError  # noqa: E402
from megatron_rcm.config.model import CausalConfig, model_preset  # noqa: E402
from megatron_rcm.convert import export_diffusers, import_diffusers, model_config_from_diffusers  # noqa: E402
from megatron_rcm.convert.diffusers_wan import ConversionError, load_diffusers_state_dict  # noqa: E402
from megatron_rcm.models import build_model  # noqa: E402
from megatron_rcm.network import Condition, Denoiser, StepContext  # noqa: E402
from megatron_rcm.objectives import PhaseModels  # noqa: E402
from megatron_rcm.ops.masks import block_causal_mask, teacher_forcing_mask  # noqa: E402
from megatron_rcm.training.registry import objectives  # noqa: E402

TEXT_LEN = 512  # diffusers' Wan attention splits [image ; text] at len - 512: the text context must be 512 tokens
I2V = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
           text_dim=24, freq_dim=32, ffn_dim=48, num_layers=2, rope_max_seq_len=64, image_dim=20, added_kv_proj_dim=32)
FLF2V = dict(I2V, pos_embed_seq_len=6)  # first + last frame: 2 x 3 image tokens with a learned position table


def _random_diffusers(cfg, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = WanTransformer3DModel(**cfg).to(dtype).eval()
    with torch.no_grad():  # norms, tables and the position embedding too, not their defaults
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 and p.shape[0] in (20, 32) else 0.0))
    return m


def _inputs(cfg, seed=1, b=2, f=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, f, 4, 6, generator=g, dtype=dtype)
    ctx = torch.randn(b, TEXT_LEN, 24, generator=g, dtype=dtype)
    image = torch.randn(b, cfg.get("pos_embed_seq_len") or 5, 20, generator=g, dtype=dtype)
    return x, ctx, image


def _diffusers_image(image, cfg):
    """FLF2V: diffusers takes the two frames' tokens as [2B, L/2, D] (it views them back to [B, L, D])."""
    return image.reshape(-1, image.shape[1] // 2, image.shape[2]) if cfg.get("pos_embed_seq_len") else image


@pytest.fixture(scope="module", params=["i2v", "flf2v"])
def layout(request, tmp_path_factory):
    cfg = I2V if request.param == "i2v" else FLF2V
    folder = tmp_path_factory.mktemp(request.param) / "transformer"
    _random_diffusers(cfg).save_pretrained(folder, safe_serialization=True)
    return cfg, folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_parity_with_diffusers(layout, dtype):
    cfg, folder = layout
    ours = import_diffusers(folder, dtype=dtype).eval()
    assert ours.cfg.image_dim == 20 and ours.cfg.added_kv_proj_dim == 32
    assert ours.cfg.pos_embed_seq_len == cfg.get("pos_embed_seq_len")
    dm = WanTransformer3DModel.from_pretrained(folder).to(dtype).eval()
    x, ctx, image = _inputs(cfg, dtype=dtype)
    t = torch.tensor([[0.0, 300.0, 999.0], [500.0, 20.0, 700.0]], dtype=dtype)
    with torch.no_grad():
        y = ours(x, t, ctx, image=image)
        ref = dm(x, t.repeat_interleave(6, dim=1), ctx, encoder_hidden_states_image=_diffusers_image(image, cfg),
                 return_dict=False)[0]
        y_other = ours(x, t, ctx, image=torch.randn_like(image))
    # diffusers runs its norms in float32 even for a float64 model, so float64 agrees to float32 precision
    assert rel_err(y, ref) < 1e-5
    assert rel_err(y_other, ref) > 1e-2  # the image branch is live: another image gives another output


def test_round_trip_and_config(layout, tmp_path):
    cfg, folder = layout
    ours = import_diffusers(folder)
    out = export_diffusers(ours, tmp_path / "exp")
    written = json.loads((out / "config.json").read_text())
    for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        assert written[key] == cfg.get(key), key
    a, b = load_diffusers_state_dict(folder), load_diffusers_state_dict(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("attn2.add_k_proj.weight") for k in a) and "condition_embedder.image_embedder.ff.net.2.weight" in a
    dm = WanTransformer3DModel.from_pretrained(out).float().eval()
    x, ctx, image = _inputs(cfg, seed=4)
    t = torch.tensor([250.0, 640.0])
    with torch.no_grad():
        ref = dm(x, t, ctx, encoder_hidden_states_image=_diffusers_image(image, cfg), return_dict=False)[0]
        assert rel_err(ours(x, t, ctx, image=image), ref) < 1e-5


def test_norm_added_q_is_ignored_like_diffusers_does(layout, tmp_path):
    from safetensors.torch import load_file, save_file

    cfg, folder = layout
    d = tmp_path / "with_q"
    d.mkdir()
    (d / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    state["blocks.0.attn2.norm_added_q.weight"] = torch.ones(32)
    save_file(state, str(d / "diffusion_pytorch_model.safetensors"))
    assert "blocks.0.attn2.norm_added_q.weight" not in load_diffusers_state_dict(d)
    import_diffusers(d)  # strict load still passes


@pytest.mark.parametrize("edit,key", [({"added_kv_proj_dim": None}, "added_kv_proj_dim"),
                                      ({"image_dim": None}, "image_dim"),
                                      ({"added_kv_proj_dim": 48}, "added_kv_proj_dim"),
                                      ({"image_dim": None, "added_kv_proj_dim": None, "pos_embed_seq_len": 6},
                                       "pos_embed_seq_len")])
def test_inconsistent_image_keys_name_the_key(edit, key):
    cfg = {**I2V, "patch_size": [1, 2, 2], **edit}
    with pytest.raises(ConversionError, match=f"config.json.{key}"):
        model_config_from_diffusers(cfg)


# ---------------------------------------------------------------------- our other paths, image present
B, F, H, W = 2, 4, 8, 8
IMAGE_TOKENS = 5


def _model(chunk=1, **kw):
    cfg = model_preset("tiny", param_dtype="float64", num_layers=2, image_dim=12, added_kv_proj_dim=64, **kw)
    model = build_model(cfg, CausalConfig(chunk_frames=chunk, attention_backend="reference"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "scale_shift" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _data():
    x = torch.randn(B, 3, F, H, W, dtype=torch.float64)
    t = torch.rand(B, F, dtype=torch.float64) * 1000
    ctx = torch.randn(B, 8, 32, dtype=torch.float64)
    image = torch.randn(B, IMAGE_TOKENS, 12, dtype=torch.float64)
    return x, t, ctx, image


@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_tangent_with_image_equals_torch_func_jvp(chunk):
    model = _model()
    mask = None if chunk is None else block_causal_mask(F, model.tokens_per_frame(H, W), chunk)
    x, t, ctx, image = _data()
    tx, tt = torch.randn_like(x), torch.randn_like(t)
    y, ty = model.forward_with_tangent(x, t, ctx, tx, tt, mask, image=image)
    ry, rty = torch.func.jvp(lambda a, b: model(a, b, ctx, mask, image=image), (x, t), (tx, tt))
    assert rel_err(y, ry) < 1e-12 and rel_err(ty, rty) < 1e-9


def test_teacher_forcing_with_image_equals_torch_func_jvp():
    model = _model(chunk=2)
    mask = teacher_forcing_mask(F, model.tokens_per_frame(H, W), 2)
    x, t, ctx, image = _data()
    clean, tx, tt = torch.randn_like(x), torch.randn_like(x), torch.randn_like(t)
    y, ty = model.forward_teacher_forcing(clean, x, t, ctx, mask, tx, tt, image=image)
    ry, rty = torch.func.jvp(lambda a, b: model.forward_teacher_forcing(clean, a, b, ctx, mask, image=image)[0],
                             (x, t), (tx, tt))
    assert rel_err(y, ry) < 1e-12 and rel_err(ty, rty) < 1e-9


@pytest.mark.parametrize("chunk", [1, 2])
def test_kv_cache_with_image_equals_the_block_causal_pass(chunk):
    model = _model(chunk=chunk)
    x, t, ctx, image = _data()
    full = model(x, t, ctx, block_causal_mask(F, model.tokens_per_frame(H, W), chunk), image=image)
    cache = model.new_kv_cache(H, W)
    outs = []
    for c in range(F // chunk):
        f = slice(c * chunk, (c + 1) * chunk)
        outs.append(model.forward_chunk(x[:, :, f], t[:, f], ctx, cache, c, image=image)[0])
        model.forward_chunk(x[:, :, f], t[:, f], ctx, cache, c, write_cache=True, image=image)
        if c == 0:  # the image K/V are computed once and kept per layer, like the text's
            kept = [(layer.image_k, layer.image_v) for layer in cache.layers]
            assert all(k is not None and k.shape == (B, IMAGE_TOKENS, 4, 16) for k, _ in kept)
    assert all(layer.image_k is k for layer, (k, _) in zip(cache.layers, kept))
    assert rel_err(torch.cat(outs, 2), full) < 1e-10


def test_image_is_required_by_the_layout_and_refused_without_it():
    x, t, ctx, image = _data()
    with pytest.raises(ValueError, match="image-to-video layout"):
        _model()(x, t, ctx)
    plain = build_model(model_preset("tiny", param_dtype="float64", num_layers=1))
    with pytest.raises(ValueError, match="model.image_dim is null"):
        plain(x, t, ctx, image=image)
    flf = _model(pos_embed_seq_len=6)
    with pytest.raises(ValueError, match="pos_embed_seq_len = 6"):
        flf(x, t, ctx, image=image)


def test_gradient_checkpointing_with_image_gives_identical_gradients():
    x, t, ctx, image = _data()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = _model()
        model.gradient_checkpointing = ckpt
        model(x, t, ctx, image=image).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0]["blocks.1.attn2.add_v_proj.weight"].abs().sum() > 0
    for name in grads[0]:  # the embedded condition feeds every block: recomputed blocks sum its gradient in another order
        if name.startswith("condition_embedder."):
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-12, atol=0)
        else:
            assert torch.equal(grads[0][name], grads[1][name]), name


def test_condition_carries_the_image_through_the_seam():
    model = _model(chunk=2)
    net = Denoiser(model)
    x, t, ctx, image = _data()
    uncond = torch.randn_like(ctx)
    cond = Condition.from_batch({"context": ctx, "uncond_context": uncond, "image_context": image})
    assert cond.image is image and cond.frames(slice(0, 2)).image is image
    s = t / 1000
    v, _ = net.velocity(x, s, cond, attend="block_causal", guidance=3.0)
    mask = net.mask("block_causal", x)
    vc, vu = (model(x, t, c, mask, image=image) for c in (ctx, uncond))  # Wan's pipeline: one image, both branches
    assert rel_err(v, vu + 3.0 * (vc - vu)) < 1e-12
    clean = torch.randn_like(x)
    v_tf, _ = net.teacher_forcing(clean, x, s, cond)
    ref = model.forward_teacher_forcing(clean, x, t, ctx, teacher_forcing_mask(F, 4, 2), image=image)[0]
    assert rel_err(v_tf, ref) < 1e-12
    cache = net.new_cache(H, W, cond, guidance=3.0)
    vch, _ = net.chunk(x[:, :, :2], s[:, :2], cond, cache, 0)
    assert rel_err(vch, v[:, :, :2]) < 1e-10


FAST_ARGS = {"scm": {"sigma_d": 0.5, "cfg_scale": 2.0}, "dcm": {"num_steps": 4}, "meanflow": {"cfg_scale": 2.0},
             "dmd": {"guidance_scale": 2.0, "rollout": {"denoising_steps": [1000, 500]}},
             "rcm": {"dmd": {"rollout": {"denoising_steps": [1000, 500]}}}}


@pytest.mark.parametrize("name", sorted(objectives()))
def test_every_objective_trains_the_image_branch(name):
    """One loss per registered objective on an I2V model: the loss changes with the image (it reaches student and
    teacher, sCM/MeanFlow's tangents included) and trains the student's added K/V like the text's: teacher-forcing
    objectives do, and so does DMD: its rollout's gradient step projects the context K/V afresh instead of reusing
    the detached ones its no-grad steps cached."""
    cls = objectives()[name]
    torch.manual_seed(0)
    student = _model(chunk=2, interval_embedding=True)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    obj = cls.from_phase(cls.parse_config(FAST_ARGS.get(name, {}), name), PhaseModels.local(teacher))
    x, _, ctx, image = _data()
    losses = []
    for img in (image, torch.randn_like(image)):
        batch = {"latents": x, "context": ctx, "uncond_context": torch.zeros_like(ctx), "image_context": img}
        torch.manual_seed(5)
        loss, _ = obj.loss(Denoiser(student), batch, StepContext(3))
        losses.append(loss)
    losses[0].backward()
    attn2 = student.blocks[0].attn2
    image_grad, text_grad = attn2.add_k_proj.weight.grad, attn2.to_k.weight.grad
    assert torch.isfinite(losses[0]) and image_grad is not None and text_grad is not None
    assert image_grad.abs().sum() > 0 and text_grad.abs().sum() > 0
    assert abs(float(losses[0].detach() - losses[1].detach())) > 1e-9 * abs(float(losses[0].detach()))


def test_runs_refuse_what_cannot_feed_the_image_yet(tmp_path):
    from megatron_rcm.config.run import load_config
    from megatron_rcm.inference.run_dir import RunDirError, load_phase_model

    (tmp_path / "r.yaml").write_text("phases:\n  - {name: t, kind: teacher, objective: flow_matching, steps: 1}\n")
    i2v = ["model.image_dim=12", "model.added_kv_proj_dim=64"]
    with pytest.raises(ConfigError, match="model.image_dim"):  # the synthetic set has no image tokens
        load_config(tmp_path / "r.yaml", i2v)
    shards = ["data.kind=latent_shards", f"data.shard_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="eval.at_phase_end"):  # the end-of-phase samplers pass no image
        load_config(tmp_path / "r.yaml", i2v + shards)
    cfg = load_config(tmp_path / "r.yaml", i2v + shards + ["eval.at_phase_end=false", f"output_dir={tmp_path}"])
    with pytest.raises(RunDirError, match="image-to-video layout"):  # sample / generate / serve: one line, exit 2
        load_phase_model(cfg, "t")


def test_run_sources_compare_the_image_layout_and_teacher_data_refuses_it(layout):
    from megatron_rcm.convert.into_run import DiffusersSourceError, check_diffusers_source
    from megatron_rcm.data.teacher_data import teacher_config
    from megatron_rcm.encoders import EncoderError

    cfg, folder = layout
    folder_cfg = import_diffusers(folder).cfg
    assert check_diffusers_source(f"diffusers:{folder}", folder_cfg, "phases.0.teacher_from") == folder
    t2v = copy.deepcopy(folder_cfg)
    t2v.image_dim = t2v.added_kv_proj_dim = t2v.pos_embed_seq_len = None
    with pytest.raises(DiffusersSourceError, match=r"model.image_dim = None \(folder: 20\)"):
        check_diffusers_source(f"diffusers:{folder}", t2v, "phases.0.teacher_from")
    with pytest.raises(EncoderError, match="image_dim = 20: an image-to-video transformer"):
        teacher_config(f"diffusers:{folder}")
