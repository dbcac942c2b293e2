"""``encode-data``: real video clips + their prompts -> latent shards (VAE-encoded video, umT5 contexts).

Clip ``i`` (sorted folder listing, or line ``i`` of a list file) goes with prompt ``i``. Each clip is
decoded with imageio/ffmpeg, its first ``frames`` frames kept (Wan's VAE takes 4k+1), resized so it
covers ``height x width`` and centre-cropped, scaled to [-1, 1] and encoded to normalised latents.
The shards are written by :class:`.shard_set.ResumableShards`: resumable and rank-split like
``generate-data``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..config.errors import ConfigError
from ..utils.files import sha256_file
from .prompts import PromptFileError, parse_prompt_lines, read_prompts
from .shard_set import ResumableShards

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif", ".m4v")


class VideoInputError(ConfigError):
    def __init__(self, message: str):
        self.key, self.value, self.allowed = "--videos", None, message
        ValueError.__init__(self, message)


@dataclass
class EncodeDataArgs:
    videos: str  # a folder of clips or a text file listing them
    prompts: str
    out: str
    encoders: str  # a diffusers Wan pipeline folder (tokenizer/, text_encoder/, vae/)
    frames: int = 81
    height: int = 480
    width: int = 832
    shard_size: int = 64
    negative_prompt: str | None = None
    fmt: str = "safetensors"
    dtype: str = "auto"
    text_len: int = 512


def list_videos(spec) -> list[Path]:
    """The clips of a folder (sorted by name) or of a list file (one path per line, relative to the file)."""
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        if not found:
            raise VideoInputError(f"{path} holds no video files ({', '.join(VIDEO_SUFFIXES)})")
        return found
    if not path.is_file():
        raise VideoInputError(f"--videos {path}: neither a folder of clips nor a list file")
    try:
        lines = parse_prompt_lines(path.read_bytes(), str(path))  # same line rules as prompt files
    except PromptFileError as err:
        raise VideoInputError(str(err).replace("prompts", "video paths")) from None
    clips = [p if p.is_absolute() else path.parent / p for p in map(Path, lines)]
    missing = [str(p) for p in clips if not p.is_file()]
    if missing:
        raise VideoInputError(f"{path} lists {len(missing)} missing file(s): {', '.join(missing[:3])}")
    return clips


def resize_and_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[F, 3, H0, W0] in [0, 1] -> [F, 3, height, width]: scaled to cover (antialiased bilinear), centre crop."""
    h0, w0 = frames.shape[-2:]
    scale = max(height / h0, width / w0)
    size = (max(height, round(h0 * scale)), max(width, round(w0 * scale)))
    if size != (h0, w0):
        frames = F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return frames[..., top:top + height, left:left + width]


def read_clip(path, frames: int, height: int, width: int) -> torch.Tensor:
    """The first ``frames`` frames of a clip as [3, frames, height, width] in [-1, 1]."""
    import imageio.v2 as imageio

    got = []
    try:
        reader = imageio.get_reader(str(path))
        try:
            for frame in reader:
                got.append(np.asarray(frame)[..., :3])
                if len(got) == frames:
                    break
        finally:
            reader.close()
    except Exception as err:  # not a video, unknown codec, truncated file: name it
        first = str(err).splitlines()[0] if str(err) else ""
        raise VideoInputError(f"cannot decode {path}: {type(err).__name__}: {first}") from None
    if len(got) < frames:
        raise VideoInputError(f"{path} has {len(got)} frames; --frames {frames} needs at least {frames}")
    x = torch.from_numpy(np.stack(got)).permute(0, 3, 1, 2).float() / 255.0  # [F, 3, H, W]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (resize_and_crop(x, height, width) * 2 - 1).permute(1, 0, 2, 3).contiguous()


def encode_videos(args: EncodeDataArgs, device="cpu", log: Callable[[str], None] = print) -> str | None:
    """Write this rank's shards of (clip, prompt) pairs; returns the manifest once all shards exist."""
    from tqdm import tqdm

    from ..encoders import EncodersConfig, load_encoders
    from .teacher_data import rank_and_world

    clips = list_videos(args.videos)
    prompts = read_prompts(args.prompts)
    if len(clips) != len(prompts):
        raise VideoInputError(f"{len(clips)} clips in {args.videos} but {len(prompts)} prompts in {args.prompts}: "
                              "give one prompt per clip, in the same order")
    rank, world, local = rank_and_world()
    device = torch.device(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
    enc = load_encoders(EncodersConfig(diffusers_dir=args.encoders, dtype=args.dtype), device=device,
                        text_len=args.text_len)
    lf = enc.vae.latent_frames(args.frames, "--frames")
    s = enc.vae.spatial_factor
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value < s or value % s:
            raise ConfigError(flag, value, f"a multiple of the VAE's spatial factor {s}")
    negative = enc.negative_prompt if args.negative_prompt is None else args.negative_prompt
    plan = {k: v for k, v in asdict(args).items() if k not in ("out", "dtype", "prompts", "videos", "fmt", "encoders")}
    plan.update(negative_prompt=negative, prompts_sha256=sha256_file(args.prompts),
                encoders=str(Path(args.encoders).resolve()), clips=[str(c) for c in clips],
                latent_shape=[enc.vae.z_dim, lf, args.height // s, args.width // s])
    shards = ResumableShards(args.out, len(clips), args.shard_size, args.fmt, plan)
    todo = shards.pending(rank, world)
    uncond = enc.text.encode([negative])
    rows = sum(len(shards.rows(i)) for i in todo)
    log(f"rank {rank}/{world}: {len(todo)} of {shards.num_shards} shards to write ({rows} clips -> "
        f"{args.frames}x{args.height}x{args.width} -> latents {plan['latent_shape']})")
    with tqdm(total=rows, unit="clip", desc=f"encode-data rank {rank}", disable=rank != 0 and world > 1,
              dynamic_ncols=True) as bar:  # closed before an error is printed
        for index in todo:
            samples, texts = [], []
            for i in shards.rows(index):
                pixels = read_clip(clips[i], args.frames, args.height, args.width)
                latents = enc.vae.encode(pixels[None].to(device))[0]
                context = enc.text.encode([prompts[i]])[0]
                samples.append({"latents": latents.float().cpu(), "context": context.cpu()})
                texts.append(prompts[i])
                bar.update(1)
            shards.write(index, samples, uncond[0].cpu(), texts)
    return shards.finalize()
