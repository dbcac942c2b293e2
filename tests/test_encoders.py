"""Frozen Wan encoders: umT5 prompt parity with WanPipeline.encode_prompt, VAE normalisation, streamed decode."""
import shutil

import pytest
import torch

from conftest import rel_err
from megatron_rcm.config.model import ModelConfig
from megatron_rcm.encoders import (DEFAULT_NEGATIVE_PROMPT, EncoderError, EncodersConfig, WanVideoVAE, load_encoders,
                                   transformer_dir)
from fixtures.tiny_wan_pipeline import LATENTS_MEAN, LATENTS_STD, TEXT_LEN, TRANSFORMER

PROMPTS = ["a red cat runs across the city at night", "fish",
           "a big blue car drives fast over a forest and a beach in the rain with the camera zoom on the sun"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Every test here runs single-threaded (see conftest)."""


@pytest.fixture(scope="module")
def pipe(tiny_wan_pipeline):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(str(tiny_wan_pipeline))


def _model_cfg(**kw):
    t = dict(TRANSFORMER, patch_size=list(TRANSFORMER["patch_size"]), text_len=TEXT_LEN)
    t.update(kw)
    return ModelConfig(**t)


def test_prompt_context_equals_wan_pipeline_encode_prompt(tiny_wan_pipeline, pipe):
    enc = load_encoders(EncodersConfig(diffusers_dir=str(tiny_wan_pipeline)), _model_cfg(), vae=False)
    ours = enc.prompt_contexts(PROMPTS)
    with torch.no_grad():  # as inside WanPipeline.__call__ (with autograd on, SDPA picks another kernel)
        ref_c, ref_u = pipe.encode_prompt(PROMPTS, negative_prompt=DEFAULT_NEGATIVE_PROMPT,
                                          max_sequence_length=TEXT_LEN, device=torch.device("cpu"))
    assert ours["context"].shape == (3, TEXT_LEN, TRANSFORMER["text_dim"])
    assert torch.equal(ours["context"], ref_c) and torch.equal(ours["uncond_context"], ref_u)
    # the zeroed tail is exactly each prompt's padding: 9 words + EOS, 1 + EOS, truncated (no zeros)
    nonzero_rows = (ours["context"].abs().sum(-1) > 0).sum(-1).tolist()
    assert nonzero_rows == [10, 2, TEXT_LEN]
    assert rel_err(ours["context"][0], ours["context"][1]) > 0.1  # different prompts, different contexts
    custom = enc.prompt_contexts(PROMPTS[:1], negative_prompt="blurry")["uncond_context"]
    with torch.no_grad():
        ref = pipe.encode_prompt(["x"], negative_prompt="blurry", max_sequence_length=TEXT_LEN,
                                 device=torch.device("cpu"))[1]
    assert torch.equal(custom, ref) and not torch.equal(custom, ours["uncond_context"][:1])


@pytest.fixture(scope="module")
def vae64(tiny_wan_pipeline):
    from diffusers import AutoencoderKLWan

    return WanVideoVAE(AutoencoderKLWan.from_pretrained(str(tiny_wan_pipeline / "vae")).double())


def test_decode_normalises_like_wan_pipeline_and_streamed_chunks_equal_one_decode(vae64):
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 5, 4, 4, generator=g, dtype=torch.float64)
    full = vae64.decode(latents)
    assert full.shape == (1, 3, 1 + 4 * 4, 32, 32)
    # reference: WanPipeline's de-normalisation (latents / (1/std) + mean) and diffusers' own decode
    mean = torch.tensor(LATENTS_MEAN, dtype=torch.float64).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(LATENTS_STD, dtype=torch.float64).view(1, 4, 1, 1, 1)
    ref = vae64.module.decode(latents / inv_std + mean, return_dict=False)[0]
    assert torch.equal(full, ref)
    inside = ((full > -1) & (full < 1)).double().mean()
    assert inside > 0.5, "random VAE saturates: the comparison would be vacuous"
    for sizes in ([3, 2], [1, 2, 2]):
        dec = vae64.stream()
        parts = [dec.decode(c) for c in latents.split(sizes, dim=2)]
        assert [p.shape[2] for p in parts] == [1 + 4 * (sizes[0] - 1)] + [4 * s for s in sizes[1:]]
        assert rel_err(torch.cat(parts, dim=2), full) < 1e-12, sizes
    # a stream is stateful: decoding the second chunk alone (no history) gives other frames
    alone = vae64.stream().decode(latents[:, :, 3:5])
    assert alone.shape[2] == 5 and rel_err(alone[:, :, 1:], full[:, :, 13:17]) > 1e-3  # latent 4 -> frames 13..16


def test_encode_is_the_normalised_posterior_mean_and_needs_4k_plus_1_frames(vae64):
    g = torch.Generator().manual_seed(4)
    pixels = torch.rand(1, 3, 9, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    z = vae64.encode(pixels)
    raw = vae64.module.encode(pixels).latent_dist.mean
    mean = torch.tensor(LATENTS_MEAN, dtype=torch.float64).view(1, 4, 1, 1, 1)
    std = torch.tensor(LATENTS_STD, dtype=torch.float64).view(1, 4, 1, 1, 1)
    assert z.shape == (1, 4, 3, 4, 4) and rel_err(z, (raw - mean) / std) < 1e-14
    assert rel_err(vae64.denormalize(z), raw) < 1e-14
    with pytest.raises(EncoderError, match=r"12 frames; the Wan VAE takes 4k\+1 frames \(e\.g\. 9 or 13\)"):
        vae64.encode(pixels[:, :, :1].expand(-1, -1, 12, -1, -1))


def test_bad_folders_and_mismatched_widths_are_one_line_errors(tiny_wan_pipeline, tmp_path):
    broken = tmp_path / "no_vae"
    shutil.copytree(tiny_wan_pipeline, broken, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(EncoderError, match=r"no_vae has no vae/ sub-folder \(the Wan VAE\)"):
        load_encoders(EncodersConfig(diffusers_dir=str(broken)), text=False)
    with pytest.raises(EncoderError, match=r"does not exist"):
        load_encoders(EncodersConfig(diffusers_dir=str(tmp_path / "missing")))
    with pytest.raises(EncoderError, match=r"is 32 wide \(d_model\) but model.text_dim = 48"):
        load_encoders(EncodersConfig(diffusers_dir=str(tiny_wan_pipeline)), _model_cfg(text_dim=48), vae=False)
    with pytest.raises(EncoderError, match=r"makes 4 latent channels \(z_dim\) but model.in_channels = 16"):
        load_encoders(EncodersConfig(diffusers_dir=str(tiny_wan_pipeline)), _model_cfg(in_channels=16), text=False)
    assert transformer_dir(f"diffusers:{tiny_wan_pipeline}") == tiny_wan_pipeline / "transformer"
    assert transformer_dir(str(tiny_wan_pipeline / "transformer")) == tiny_wan_pipeline / "transformer"
    with pytest.raises(EncoderError, match="no transformer/ sub-folder"):
        shutil.copytree(tiny_wan_pipeline, tmp_path / "no_tr", ignore=shutil.ignore_patterns("transformer"))
        transformer_dir(f"diffusers:{tmp_path / 'no_tr'}")
