"""Whole-video samplers shared by the end-of-phase report and the CLI.

Two ways to sample a trained phase, both chunk by chunk with a KV cache:
  * :func:`student_sample`: the few-step x0 + re-noise sampler the students are distilled for
    (more than 4 steps: an explicit uniform grid of noise levels, same sampler);
  * :func:`teacher_sample`: the teacher's deterministic many-step ODE (2nd-order multistep, CFG),
    the reference the students are compared against.
:func:`prompt_batch` gives the fixed evaluation prompts (disjoint from the first training batches).
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch

from ..config.errors import ConfigError

EVAL_INDEX_OFFSET = 10_000  # prompt batches used for evaluation sit far past the first training batches


def prompt_batch(data_cfg, num_videos: int, seed: int, device, class_id: int | None = None) -> dict:
    """Prompts (context, uncond_context, class_id, actions if any) for ``num_videos`` videos.

    ``class_id`` replaces every prompt by that class's text context (built-in synthetic conditioner only).
    """
    from ..data import TextConditioner, build_dataset

    data = build_dataset(data_cfg, batch_size=num_videos)
    batch = data.batch_at(EVAL_INDEX_OFFSET + seed)
    if class_id is not None:
        if data_cfg.kind != "synthetic":
            raise ConfigError("--class-id", class_id, f"no class id: data.kind={data_cfg.kind!r} has no class table "
                              "(only data.kind=synthetic maps class ids to prompts)")
        if not 0 <= class_id < data_cfg.num_classes:
            raise ConfigError("--class-id", class_id, f"a class in [0, {data_cfg.num_classes}) (data.num_classes)")
        text = TextConditioner(data_cfg.num_classes, data_cfg.text_len, data_cfg.text_dim)
        batch["class_id"] = torch.full((num_videos,), class_id, dtype=torch.long)
        batch["context"] = text(batch["class_id"])
    return {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}


def image_prefix(net, prompts: dict):
    """The known first frames of a model trained for image-to-video (``causal.clean_first_frames``): the prompts'
    own videos' first frames, so its samples (and the report's numbers) are of what it learnt; else None."""
    n = net.clean_first_frames
    return prompts["latents"][:, :, :n].to(net.dtype) if n and "latents" in prompts else None


def _action_fn(prompts, layout):
    """The prompts' per-frame actions served chunk by chunk (world models), or None."""
    actions = prompts.get("actions")
    if actions is None:
        return None
    return lambda chunk, _frames: actions[:, layout.frame_slice(chunk)]


@torch.no_grad()
def student_sample(model, prompts: dict, data_cfg, steps: int, guidance: float = 1.0, seed: int = 0,
                   writer=None, log=None, decode=None, options=None) -> torch.Tensor:
    """Few-step streaming sample of ``data_cfg.num_frames`` frames -> [B, C, F, H, W] (latents).

    ``writer`` receives each chunk as it is made, through ``decode`` (latents -> pixels) when given.
    ``options``: a :class:`~megatron_rcm.inference.streaming.StreamConfig` with per-chunk steps / noisy
    context (``steps`` is then the base grid's step count).
    """
    from ..network import Denoiser
    from .streaming import StreamConfig, generate_video, uniform_timesteps

    if steps < 1:
        raise ConfigError("--steps", steps, "a positive number of sampling steps")
    was_training = model.training
    model.eval()
    # many-step sampling: an explicit uniform grid of noise levels, same x0 + re-noise sampler
    timesteps = None if steps <= 4 else uniform_timesteps(steps)
    d, net = data_cfg, Denoiser.of(model)
    options = replace(options or StreamConfig(), trained_frames=d.num_frames)  # the trained length: in range
    prefix = image_prefix(net, prompts)
    given = 0 if prefix is None else prefix.shape[2]
    video = generate_video(model, prompts["context"], d.num_frames - given, d.height, d.width, steps=steps,
                           timesteps=timesteps, guidance_scale=guidance, uncond_context=prompts["uncond_context"],
                           action_fn=_action_fn(prompts, net.layout(d.num_frames // net.patch_frames)), seed=seed,
                           writer=writer, decode=decode, log=log, options=options, prefix=prefix, show_prefix=True)
    model.train(was_training)
    return video


@torch.no_grad()
def teacher_sample(model, prompts: dict, data_cfg, steps: int, guidance: float, seed: int | None = None,
                   generator: torch.Generator | None = None, shift: float = 1.0) -> torch.Tensor:
    """The teacher's deterministic ``steps``-step ODE sample with CFG, chunk by chunk -> [B, C, F, H, W].

    The noise comes from a CPU generator seeded with ``seed`` (or ``generator``, to continue a stream
    of noise across calls), so the result does not depend on the device's RNG.
    """
    from ..diffusion.samplers import multistep2_fm
    from ..network import Condition, Denoiser
    from .streaming import chunkwise, including_prefix, stream_chunks

    if steps < 1:
        raise ConfigError("--steps", steps, "a positive number of ODE steps")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    d = data_cfg
    net = Denoiser.of(model)
    device = prompts["context"].device
    noise = torch.randn(len(prompts["context"]), d.channels, d.num_frames, d.height, d.width, generator=generator)
    noise = noise.to(device, net.dtype)
    layout = net.layout(noise)
    starts = torch.split(noise, [n * net.patch_frames for n in layout.sizes], dim=2)
    prefix = image_prefix(net, prompts)
    given = 0 if prefix is None else prefix.shape[2]
    cached = 1 if given == layout.first * net.patch_frames else 0  # the held frames fill chunk 0: it is cached
    was_training = net.model.training
    net.model.eval()
    cond = Condition(prompts["context"], prompts["uncond_context"])
    fresh = lambda shape: torch.randn(shape, generator=generator).to(device, net.dtype)  # noqa: E731 (noisy context)
    chunks = stream_chunks(net, cond, d.num_frames - given, d.height, d.width,
                           chunkwise(partial(multistep2_fm, steps=steps, shift=shift)),
                           lambda i, _shape: starts[i + cached], guidance, _action_fn(prompts, layout), prefix=prefix,
                           fresh_noise=fresh)
    chunks = including_prefix(chunks, prefix, net)
    video = torch.cat([c.frames for c in chunks], dim=2)
    net.model.train(was_training)
    return video


def sample_phase(kind: str, model, prompts: dict, data_cfg, steps: int, guidance: float, seed: int = 0,
                 writer=None, teacher_shift: float = 1.0, options=None) -> torch.Tensor:
    """Sample a trained phase the way it is meant to be sampled: the ODE for teachers, few-step otherwise.

    ``writer`` (streamed output) and ``options`` (per-chunk steps, noisy context: a ``StreamConfig``) are only
    used by the few-step sampler; the ODE returns the whole video.
    """
    if kind == "teacher":
        return teacher_sample(model, prompts, data_cfg, steps, guidance, seed=seed, shift=teacher_shift)
    return student_sample(model, prompts, data_cfg, steps, guidance, seed=seed, writer=writer, options=options)
