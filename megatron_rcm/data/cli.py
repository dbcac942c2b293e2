"""CLI pieces for real-model data: ``generate-data --teacher diffusers:DIR`` and ``encode-data``.

``inference/cli.py`` keeps the ``generate-data RUN_DIR --phase`` form and hands the ``--teacher`` form
here; ``cli.py`` registers ``encode-data``.
"""
from __future__ import annotations

import argparse

from ..config.errors import ConfigError


def add_teacher_data_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the ``--teacher`` form (``--out``, ``--steps``, ``--guidance``, ``--seed``, ``--format``,
    ``--shard-size`` and ``--device`` are shared with the run-folder form)."""
    g = p.add_argument_group("from a diffusers teacher (generate-data --teacher diffusers:DIR --prompts FILE "
                             "--out DIR)")
    g.add_argument("--teacher", default=None, metavar="diffusers:DIR",
                   help="a diffusers Wan pipeline folder (or a transformer folder with --encoders)")
    g.add_argument("--prompts", default=None, metavar="FILE", help="one prompt per line (UTF-8, # comments)")
    g.add_argument("--frames", type=int, default=81, help="video frames, 4k+1 (default 81)")
    g.add_argument("--height", type=int, default=480, help="pixels (default 480)")
    g.add_argument("--width", type=int, default=832, help="pixels (default 832)")
    g.add_argument("--videos-per-prompt", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=1, help="videos per teacher forward")
    g.add_argument("--negative-prompt", default=None, help="default: Wan2.1's default negative prompt")
    g.add_argument("--shift", type=float, default=None, help="flow shift (default: the pipeline scheduler's)")
    g.add_argument("--solver", choices=("multistep2", "euler"), default="multistep2")
    g.add_argument("--encoders", default="", metavar="DIR", help="pipeline folder with tokenizer/, text_encoder/, "
                   "vae/ (default: the teacher's folder)")
    g.add_argument("--text-len", type=int, default=512, help="text tokens per prompt (Wan: 512)")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="teacher + encoders (auto: bfloat16 on CUDA, float32 on CPU)")


def run_teacher_data(args) -> int:
    from .teacher_data import TeacherDataArgs, generate_teacher_data

    if args.run_dir is not None or args.phase is not None:
        raise ConfigError("--teacher", args.teacher, "either --teacher diffusers:DIR (a diffusers teacher) or "
                          "RUN_DIR --phase NAME (a trained phase), not both")
    if not args.prompts:
        raise ConfigError("--prompts", None, "a prompt file (one prompt per line) for --teacher")
    ta = TeacherDataArgs(teacher=args.teacher, prompts=args.prompts, out=args.out,
                         steps=50 if args.steps is None else args.steps,
                         guidance=5.0 if args.guidance is None else args.guidance, shift=args.shift,
                         frames=args.frames, height=args.height, width=args.width, seed=args.seed,
                         videos_per_prompt=args.videos_per_prompt,
                         shard_size=64 if args.shard_size is None else args.shard_size,
                         batch_size=args.batch_size, negative_prompt=args.negative_prompt,
                         encoders_dir=args.encoders, fmt=args.format, solver=args.solver, dtype=args.dtype,
                         text_len=args.text_len, trajectory=args.trajectory, trajectory_shift=args.trajectory_shift)
    from ..inference.cli import _trajectory_levels

    _trajectory_levels(args)  # checks the flags before any work
    manifest = generate_teacher_data(ta, device=args.device)
    if manifest is None:
        print(f"this rank's shards are in {args.out}; the manifest is written when the last rank finishes")
    else:
        print(f"wrote {args.out} ({manifest}); train from it with: data.kind=latent_shards data.shard_dir={args.out} "
              f"encoders.diffusers_dir=<the pipeline folder>")
    return 0


def run_encode_data(args) -> int:
    from .encode_videos import EncodeDataArgs, encode_videos

    frames, height, width, text_len, encoders = args.frames, args.height, args.width, args.text_len, args.encoders
    if args.config:  # sizes and encoders of a run config (its data is in latent units)
        from ..config.run import load_config

        cfg = load_config(args.config)
        frames = frames or 1 + 4 * (cfg.data.num_frames - 1)
        height, width = height or 8 * cfg.data.height, width or 8 * cfg.data.width
        text_len = text_len or cfg.model.text_len
        encoders = encoders or cfg.encoders.diffusers_dir
    if not encoders:
        raise ConfigError("--encoders", None, "a diffusers Wan pipeline folder (tokenizer/, text_encoder/, vae/), "
                          "or --config CONFIG with encoders.diffusers_dir set")
    ea = EncodeDataArgs(videos=args.videos, prompts=args.prompts, out=args.out, encoders=encoders,
                        frames=frames or 81, height=height or 480, width=width or 832, shard_size=args.shard_size,
                        negative_prompt=args.negative_prompt, fmt=args.format, dtype=args.dtype,
                        text_len=text_len or 512)
    manifest = encode_videos(ea, device=args.device)
    if manifest is None:
        print(f"this rank's shards are in {args.out}; the manifest is written when the last rank finishes")
    else:
        print(f"wrote {args.out} ({manifest}); train from it with: data.kind=latent_shards data.shard_dir={args.out}")
    return 0


def add_encode_data_command(sub) -> None:
    p = sub.add_parser("encode-data", help="real clips + prompts -> latent shards (VAE + umT5 encoded)")
    p.add_argument("--videos", required=True, metavar="DIR_OR_LIST", help="a folder of clips (sorted by name) or a "
                   "text file with one clip path per line; clip i goes with prompt i")
    p.add_argument("--prompts", required=True, metavar="FILE", help="one prompt per line (UTF-8, # comments)")
    p.add_argument("--out", required=True, help="shard folder (manifest.json + shards)")
    p.add_argument("--encoders", default="", metavar="DIR", help="a diffusers Wan pipeline folder")
    p.add_argument("--config", default=None, help="a run config: sizes from data.*, encoders from encoders.*")
    p.add_argument("--frames", type=int, default=None, help="video frames kept per clip, 4k+1 (default 81)")
    p.add_argument("--height", type=int, default=None, help="pixels (default 480)")
    p.add_argument("--width", type=int, default=None, help="pixels (default 832)")
    p.add_argument("--text-len", type=int, default=None, help="text tokens per prompt (default 512)")
    p.add_argument("--negative-prompt", default=None, help="default: Wan2.1's default negative prompt")
    p.add_argument("--shard-size", type=int, default=64, help="clips per shard")
    p.add_argument("--format", choices=("safetensors", "tar"), default="safetensors")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run_encode_data)
