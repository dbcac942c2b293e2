"""``generate-data --teacher diffusers:DIR``: teacher videos for a prompt file, into resumable latent shards.

Each video is a sample of the bidirectional diffusers teacher (full attention, Wan's shifted
flow-matching ODE, CFG with the negative prompt) from its own noise (seed + video index, drawn on the
CPU), so the data set is the same whatever the batch size, number of ranks or interruptions. Every
shard sample holds the latents, the prompt's context, the negative prompt's context (once per shard)
and the prompt text. Under torchrun each rank writes its share of the shards (see :mod:`.shard_set`).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config.errors import ConfigError
from ..utils.files import sha256_file
from .prompts import read_prompts
from .shard_set import ResumableShards


@dataclass
class TeacherDataArgs:
    teacher: str  # diffusers:DIR (a pipeline folder, or a transformer folder with encoders_dir)
    prompts: str  # prompt file
    out: str
    steps: int = 50
    guidance: float = 5.0
    shift: float | None = None  # None: the pipeline scheduler's flow shift
    frames: int = 81  # video frames (4k + 1)
    height: int = 480  # pixels
    width: int = 832
    seed: int = 0
    videos_per_prompt: int = 1
    shard_size: int = 64
    batch_size: int = 1
    negative_prompt: str | None = None  # None: Wan2.1's default
    encoders_dir: str = ""  # pipeline folder with tokenizer/text_encoder/vae (default: the teacher's folder)
    fmt: str = "safetensors"
    solver: str = "multistep2"
    dtype: str = "auto"  # teacher and encoders: bfloat16 on CUDA, float32 on CPU
    text_len: int = 512
    trajectory: int = 0  # K > 0: also store the ODE states at a K-step student's levels (ode_regression data)
    trajectory_shift: float = 1.0


def _positive(flag: str, value, what: str):
    if value is None or value < 1:
        raise ConfigError(flag, value, what)
    return value


def video_noise(seed: int, index: int, shape) -> torch.Tensor:
    """The starting noise of video ``index``: its own CPU generator, so batching and ranks do not matter."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed + index))


def rank_and_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (0, 1, 0 when run directly)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def load_teacher(spec: str, dtype: torch.dtype, device):
    """Our model from a diffusers transformer (``diffusers:DIR``), frozen, on ``device``."""
    from ..convert.diffusers_wan import import_diffusers
    from ..encoders import transformer_dir

    model = import_diffusers(transformer_dir(spec), dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def teacher_config(spec: str):
    """The teacher's ModelConfig from its config.json (nothing loaded), to check shapes before the heavy work."""
    import json

    from ..convert.diffusers_wan import ConversionError, model_config_from_diffusers
    from ..encoders import EncoderError, transformer_dir

    path = transformer_dir(spec) / "config.json"
    try:
        cfg = model_config_from_diffusers(json.loads(path.read_text()))
    except (ValueError, ConversionError) as err:
        raise EncoderError(f"{path}: {err}") from None
    if cfg.image_dim is not None:
        raise EncoderError(f"{path}: image_dim = {cfg.image_dim}: an image-to-video transformer needs image-encoder "
                           "tokens per video, which generate-data --teacher does not produce; give a text-to-video "
                           "Wan pipeline")
    return cfg


def latent_geometry(args: TeacherDataArgs, vae, patch) -> tuple[int, int, int]:
    """Latent (frames, height, width) of the requested video size, or an error naming the flag."""
    frames = vae.latent_frames(args.frames, "--frames")
    step = vae.spatial_factor * int(patch[1]), vae.spatial_factor * int(patch[2])
    for flag, value, m in (("--height", args.height, step[0]), ("--width", args.width, step[1])):
        if value < m or value % m:
            raise ConfigError(flag, value, f"a multiple of {m} pixels (VAE factor {vae.spatial_factor} x patch)")
    return frames, args.height // vae.spatial_factor, args.width // vae.spatial_factor


def negative_or_default(negative_prompt: str | None) -> str:
    from ..encoders import DEFAULT_NEGATIVE_PROMPT

    return DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt


def generate_teacher_data(args: TeacherDataArgs, device="cpu", log: Callable[[str], None] = print) -> str | None:
    """Write this rank's shards; returns the manifest path once every shard exists (else None)."""
    from ..encoders import (EncodersConfig, check_latent_channels, check_text_width, load_encoders, scheduler_shift,
                            transformer_dir)
    from ..encoders.device import encoder_dtype
    from ..encoders.folder import strip_prefix
    from ..inference.bidirectional import bidirectional_sample
    from ..inference.trajectory import teacher_trajectory, trajectory_levels
    from ..network import Condition, Denoiser

    for flag, value in (("--steps", args.steps), ("--videos-per-prompt", args.videos_per_prompt),
                        ("--shard-size", args.shard_size), ("--batch-size", args.batch_size)):
        _positive(flag, value, "a positive integer")
    prompts = read_prompts(args.prompts)
    rank, world, local = rank_and_world()
    device = torch.device(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
    root = args.encoders_dir or strip_prefix(args.teacher)
    enc_cfg = EncodersConfig(diffusers_dir=root, dtype=args.dtype)
    # the VAE's config (loaded on the CPU, small) and the teacher's config.json: check shapes before loading
    vae = load_encoders(EncodersConfig(diffusers_dir=root, dtype="float32"), text=False).vae
    tcfg = teacher_config(args.teacher)
    check_latent_channels(vae, tcfg.in_channels, key="the teacher's in_channels")
    lf, lh, lw = latent_geometry(args, vae, tcfg.patch_size)
    shift = scheduler_shift(root) if args.shift is None else args.shift
    levels = trajectory_levels(args.trajectory, args.trajectory_shift) if args.trajectory else []
    negative = negative_or_default(args.negative_prompt)
    skip = ("out", "batch_size", "dtype", "prompts", "fmt")
    skip += () if args.trajectory else ("trajectory", "trajectory_shift")
    plan = {k: v for k, v in asdict(args).items() if k not in skip}  # (folders made before --trajectory resume too)
    plan.update(teacher=str(transformer_dir(args.teacher).resolve()), encoders_dir=str(Path(root).resolve()),
                shift=shift, negative_prompt=negative, prompts_sha256=sha256_file(args.prompts),
                latent_shape=[tcfg.in_channels, lf, lh, lw])
    shards = ResumableShards(args.out, len(prompts) * args.videos_per_prompt, args.shard_size, args.fmt, plan)
    todo = shards.pending(rank, world)
    rows = sum(len(shards.rows(i)) for i in todo)
    log(f"rank {rank}/{world}: {len(todo)} of {shards.num_shards} shards to write ({rows} videos of "
        f"{args.frames}x{args.height}x{args.width}: latents {tcfg.in_channels}x{lf}x{lh}x{lw}), "
        f"{args.steps} {args.solver} steps, shift {shift:g}, CFG {args.guidance:g}")
    if not todo:
        return shards.finalize()
    text = load_encoders(enc_cfg, device=device, vae=False, text_len=args.text_len).text
    check_text_width(text, tcfg.text_dim, key="the teacher's text_dim")
    teacher = load_teacher(args.teacher, encoder_dtype(args.dtype, device), device)
    uncond = text.encode([negative])
    from tqdm import tqdm

    with tqdm(total=rows, unit="video", desc=f"generate-data rank {rank}", disable=rank != 0 and world > 1,
              dynamic_ncols=True) as bar:  # closed before an error is printed
        for index in todo:
            samples, texts = [], []
            rows_of = list(shards.rows(index))
            for start in range(0, len(rows_of), args.batch_size):
                batch = rows_of[start:start + args.batch_size]
                texts_b = [prompts[i // args.videos_per_prompt] for i in batch]
                context = text.encode(texts_b)
                noise = torch.stack([video_noise(args.seed, i, (teacher.cfg.in_channels, lf, lh, lw)) for i in batch])
                negative = uncond.expand(len(batch), -1, -1)
                if levels:  # the same ODE with the student's levels in its grid, keeping the states there
                    latents, states = teacher_trajectory(Denoiser(teacher), Condition(context, negative),
                                                         noise.to(device), levels, args.steps, shift, args.guidance,
                                                         "full", args.solver)
                else:
                    latents = bidirectional_sample(teacher, noise.to(device), context, negative, args.steps,
                                                   args.guidance, shift, args.solver)
                for j in range(len(batch)):
                    sample = {"latents": latents[j].float().cpu(), "context": context[j].cpu()}
                    if levels:
                        sample.update(trajectory=states[j].float().cpu(),
                                      trajectory_levels=torch.tensor(levels, dtype=torch.float32))
                    samples.append(sample)
                texts += texts_b
                bar.update(len(batch))
            shards.write(index, samples, uncond[0].cpu(), texts)
    return shards.finalize()
