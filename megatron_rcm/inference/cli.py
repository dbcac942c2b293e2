"""The run-folder subcommands of ``megatron-rcm``: sample, eval, generate-data, generate.

Each one opens a training run folder (:mod:`.run_dir`), loads one phase's weights and hands them to
a library function (:mod:`.sampling`, :mod:`.streaming`, :mod:`megatron_rcm.training.report`,
:mod:`megatron_rcm.data.shards`). Bad arguments are :class:`ConfigError` s naming the flag.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config.errors import ConfigError
from ..config.stream_cache import KV_CACHE_DTYPES, ROPE_POLICIES
from .run_dir import WEIGHTS, find_phase, load_phase_model, load_run_config, load_teacher_model

VIDEO_SUFFIXES = (".mp4", ".gif")


def _open(args):
    """(cfg, phase, model) for ``args.run_dir`` / ``args.phase`` / ``args.weights``."""
    cfg = load_run_config(args.run_dir)
    phase = find_phase(cfg, args.phase)
    model = load_phase_model(cfg, phase.name, args.weights, args.device)
    return cfg, phase, model


def _positive(flag: str, value: int, what: str) -> int:
    if value < 1:
        raise ConfigError(flag, value, what)
    return value


def _steps_for(phase, cfg, steps: int | None) -> int:
    """Default: the eval ODE step count for teachers, 2 for distilled students."""
    if steps is None:
        return cfg.eval.teacher_steps if phase.kind == "teacher" else 2
    return _positive("--steps", steps, "a positive number of sampling steps")


def _guidance_for(phase, cfg, guidance: float | None) -> float:
    """Default: the eval CFG scale for teachers; none (1.0) for students, which are distilled with it."""
    if guidance is not None:
        return guidance
    return cfg.eval.cfg_scale if phase.kind == "teacher" else 1.0


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    """Per-chunk schedules and noisy context of the few-step sampler (Causal-rCM's inference flags)."""
    g = p.add_argument_group("few-step sampler (distilled students)")
    g.add_argument("--steps-per-chunk", type=int, nargs="+", default=None, metavar="K",
                   help="steps of each chunk, the last repeated, non-increasing, e.g. 4 2 "
                   "(Causal-rCM --steps_per_chunk)")
    g.add_argument("--mid-t-schedules", default=None, metavar="T,T;T",
                   help="intermediate FM times per --steps-per-chunk entry, ';'-separated, fractions allowed, e.g. "
                   "'15/16,5/6,5/8;5/6' (Causal-rCM --mid_t_schedules); default: the first K of the evenly spaced grid")
    g.add_argument("--sigma-max", type=float, default=0.0, help="first level sigma_max / (sigma_max + 1), e.g. 1600 "
                   "(Causal-rCM --sigma_max); default 0: level 1")
    g.add_argument("--context-from-last-step", action=argparse.BooleanOptionalAction, default=None,
                   help="cache each chunk from its last denoising step (noisy context; default: the run's "
                   "causal.context_from_last_step)")
    g.add_argument("--context-from-last-step-start-chunk", type=int, default=None, metavar="N",
                   help="first chunk with noisy context (default: causal.context_from_last_step_start_chunk)")
    g.add_argument("--context-noise-level", type=float, default=None, metavar="S",
                   help="FM level of the noisy context (default: causal.context_noise_level)")


def add_long_video_arguments(p: argparse.ArgumentParser) -> None:
    """The stream cache past the training length: rolling window/sink, RoPE policy, fp8 K/V (models/kv_cache.py)."""
    g = p.add_argument_group("long videos (stream cache)")
    g.add_argument("--window-chunks", type=int, default=None, metavar="W", help="chunks a chunk attends to, itself "
                   "included (Self-Forcing local_attn_size; 0 = all; default: the run's causal.window_chunks)")
    g.add_argument("--sink-chunks", type=int, default=None, metavar="S", help="first chunks always attended (LongLive's "
                   "frame sink, Self-Forcing sink_size; 0 = a plain sliding window; default: causal.sink_chunks)")
    g.add_argument("--rope-policy", choices=ROPE_POLICIES, default=None, help="positions past the window: absolute "
                   "(keep increasing) or rebase (the window placed right after the sink chunks); default: "
                   "StreamConfig's (see benchmarks/RESULTS.md, 'Long rollouts')")
    g.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=None, help="self-attention K/V of the "
                   "cache: auto (the model's dtype) or fp8_e4m3 (per chunk and head scales, half of bf16's memory)")
    g.add_argument("--cuda-graphs", action="store_true", default=None, help="replay each chunk's forward as a CUDA "
                   "graph (captured on the first video, reused by the next ones of its size; one GPU, no fp8 cache)")


def _long_video_options(args) -> dict:
    """The StreamConfig fields the long-video flags set (absent flags keep StreamConfig's defaults)."""
    names = ("window_chunks", "sink_chunks", "rope_policy", "kv_cache_dtype", "cuda_graphs")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def long_stream_options(options, cfg, model, frames: int):
    """``options`` for a stream of ``frames`` latent frames of the run ``cfg``: the training length (the cap of
    ``rope_policy=rebase``) and, for a run trained without a window, a rolling window that attends to as many
    chunks as the training videos hold (sinks included) once the stream is longer (the whole history drifts and
    grows: benchmarks/RESULTS.md, "Long rollouts")."""
    from dataclasses import replace

    trained = cfg.data.num_frames
    options = replace(options, trained_frames=options.trained_frames or trained)
    if frames > trained and options.window_chunks is None and not cfg.causal.window_chunks:
        sink = cfg.causal.sink_chunks if options.sink_chunks is None else options.sink_chunks
        chunks = max(1, model.chunk_layout(trained // model.patch[0]).n_chunks - sink)
        print(f"streaming past the training length ({trained} frames) with a rolling window of {chunks} chunks "
              f"+ {sink} sink (--window-chunks 0 keeps every chunk)")
        options = replace(options, window_chunks=chunks)
    return options


def stream_options(args, causal, steps: int = 2):
    """The ``StreamConfig`` of the sampler flags (validated: errors name the flag); ``causal``: the run's config."""
    from ..diffusion.step_schedule import parse_chunk_schedules
    from ..network import NoisyContext
    from .streaming import StreamConfig

    schedules = None if args.mid_t_schedules is None else parse_chunk_schedules(args.mid_t_schedules)
    on = causal.context_from_last_step if args.context_from_last_step is None else args.context_from_last_step
    start = args.context_from_last_step_start_chunk
    start = causal.context_from_last_step_start_chunk if start is None else start
    level = causal.context_noise_level if args.context_noise_level is None else args.context_noise_level
    if start < 0:
        raise ConfigError("--context-from-last-step-start-chunk", start, "a chunk index >= 0")
    if not 0.0 < level < 1.0:
        raise ConfigError("--context-noise-level", level, "a flow-matching level in (0, 1), e.g. 0.625")
    opts = StreamConfig(steps=steps, steps_per_chunk=args.steps_per_chunk, chunk_schedules=schedules,
                        sigma_max=args.sigma_max, noisy_context=NoisyContext(level if on else 0.0, start),
                        **_long_video_options(args))
    opts.schedule()  # fail now, naming the flag
    opts.cache_options()
    if opts.cuda_graphs:
        import torch

        from ..network.chunk_graphs import ChunkGraphs

        ChunkGraphs.require(None, torch.device(getattr(args, "device", "cpu")), opts.kv_cache_dtype)
    return opts


def _video_out(path: str) -> str:
    if Path(path).suffix.lower() not in VIDEO_SUFFIXES:
        raise ConfigError("--out", path, f"a video file ending in one of {VIDEO_SUFFIXES}")
    return path


# ---------------------------------------------------------------------------------------------- sample
def run_sample(args) -> int:
    from ..utils.video import write_video
    from .sampling import prompt_batch, sample_phase

    if args.prompt is not None or args.prompts is not None:  # text prompts: one file per (prompt, seed)
        from .real_video import sample_files

        if args.class_id is not None:
            raise ConfigError("--class-id", args.class_id, "absent with --prompt/--prompts (text prompts)")
        cfg, phase, model = _open(args)
        return sample_files(args, cfg, phase, model)
    out = _video_out(args.out)
    num_videos = _positive("--num-videos", args.num_videos, "at least 1 video")
    cfg, phase, model = _open(args)
    steps, guidance = _steps_for(phase, cfg, args.steps), _guidance_for(phase, cfg, args.guidance)
    seed = cfg.eval.seed if args.seed is None else args.seed
    prompts = prompt_batch(cfg.data, num_videos, seed, args.device, args.class_id)
    video = sample_phase(phase.kind, model, prompts, cfg.data, steps, guidance, seed=seed,
                         teacher_shift=cfg.eval.teacher_shift, options=stream_options(args, cfg.causal, steps))
    kw = {}
    if cfg.encoders.has_vae:  # a run with a VAE: decode the latents to pixels
        from .real_video import DECODED_FPS, run_encoders

        video = run_encoders(cfg, args.device, text=False).vae.decode(video).float()
        kw = {"fps": DECODED_FPS, "scale": 1}
    path = write_video(out, video, **kw)
    sampler = "ODE (teacher)" if phase.kind == "teacher" else "few-step"
    print(f"wrote {path}: {num_videos} video(s) x {video.shape[2]} frames, {steps}-step {sampler} sampling of "
          f"phase '{phase.name}' ({args.weights} weights), guidance {guidance:g}, seed {seed}")
    return 0


# ---------------------------------------------------------------------------------------------- eval
def run_eval(args) -> int:
    import torch

    from ..training.report import ReportContext, format_quality_table, quality_rows

    cfg = load_run_config(args.run_dir)
    options = stream_options(args, cfg.causal)
    default_steps = [] if args.steps_per_chunk else [1, 2, 4]  # --steps-per-chunk alone: just that schedule's row
    steps = [_positive("--steps", k, "positive step counts, e.g. --steps 1 2 4")
             for k in (default_steps if args.steps is None else args.steps)]
    if args.steps_per_chunk:
        from dataclasses import replace

        steps.append(replace(options, steps=max(args.steps_per_chunk)))
    phase = find_phase(cfg, args.phase)
    if not phase.teacher_from:
        students = [p.name for p in cfg.phases if p.teacher_from]
        raise ConfigError("--phase", phase.name, f"a phase with teacher_from set (it is compared with that teacher "
                          f"phase's many-step samples): one of {students}")
    if args.num_videos is not None:
        cfg.eval.num_videos = _positive("--num-videos", args.num_videos, "at least 1 video (2+ for the FD column)")
    model = load_phase_model(cfg, phase.name, args.weights, args.device)
    teacher = load_teacher_model(cfg, phase.teacher_from, args.device)
    ctx = ReportContext(cfg, Path(cfg.output_dir), torch.device(args.device), print)
    rows, _ = quality_rows(ctx, phase, model, teacher, steps, options=options)
    print(format_quality_table(phase.name, cfg.eval.teacher_steps, rows))
    return 0


# ---------------------------------------------------------------------------------------------- generate-data
def run_generate_data(args) -> int:
    from ..data import build_dataset
    from ..data.shards import write_teacher_shards
    from .sampling import sample_phase

    if args.teacher is not None:  # generate-data --teacher diffusers:DIR --prompts FILE (data/cli.py)
        from ..data.cli import run_teacher_data

        return run_teacher_data(args)
    if args.run_dir is None or args.phase is None:
        raise ConfigError("RUN_DIR/--phase", args.run_dir, "RUN_DIR --phase NAME (a trained teacher phase), or "
                          "--teacher diffusers:DIR --prompts FILE (a diffusers Wan teacher)")
    num_videos = _positive("--num-videos", 0 if args.num_videos is None else args.num_videos, "at least 1 video")
    shard_size = _positive("--shard-size", 256 if args.shard_size is None else args.shard_size,
                           "at least 1 video per shard")
    cfg, phase, model = _open(args)
    steps, guidance = _steps_for(phase, cfg, args.steps), _guidance_for(phase, cfg, args.guidance)
    levels = _trajectory_levels(args, phase)
    dataset = build_dataset(cfg.data, batch_size=min(num_videos, cfg.data.batch_size))
    calls = [0]

    def sample_fn(batch):
        prompts = {k: v.to(args.device) for k, v in batch.items() if hasattr(v, "to")}
        seed = args.seed + calls[0]  # fresh noise per batch, reproducible from --seed
        calls[0] += 1
        if levels:  # the teacher's ODE states at the student's K levels too (ODE-regression data)
            from .trajectory import sample_trajectory

            return sample_trajectory(model, prompts, cfg.data, steps, guidance, seed, cfg.eval.teacher_shift, levels)
        return sample_phase(phase.kind, model, prompts, cfg.data, steps, guidance, seed=seed,
                            teacher_shift=cfg.eval.teacher_shift).float().cpu()

    manifest = write_teacher_shards(sample_fn, dataset, args.out, num_videos, shard_size, args.format)
    with_traj = f" with their ODE states at {len(levels)} levels" if levels else ""
    print(f"wrote {num_videos} {steps}-step samples of phase '{phase.name}'{with_traj} to {args.out} ({manifest}); "
          f"train from them with: data.kind=latent_shards data.shard_dir={args.out}")
    return 0


def _trajectory_levels(args, phase=None) -> list[float]:
    """The student levels of ``--trajectory K`` ([] without it); only a teacher's ODE has a trajectory."""
    if not args.trajectory:
        return []
    if args.trajectory < 1 or args.trajectory > 8:
        raise ConfigError("--trajectory", args.trajectory, "1..8 student sampling levels (K of a K-step student)")
    if phase is not None and phase.kind != "teacher":
        raise ConfigError("--trajectory", args.trajectory, f"a teacher phase's ODE: phase '{phase.name}' is a "
                          f"{phase.kind} phase (a few-step student has no ODE trajectory)")
    if args.trajectory_shift <= 0:
        raise ConfigError("--trajectory-shift", args.trajectory_shift, "a positive time shift (1 = none)")
    from .trajectory import trajectory_levels

    return trajectory_levels(args.trajectory, args.trajectory_shift)


# ---------------------------------------------------------------------------------------------- generate
def _stream_layout(model, frames: int):
    """The chunk layout of ``--frames`` latent frames, or an error naming the flag and the frame counts that fit."""
    pt, c = model.patch[0], model.causal
    first, chunk = (c.first_chunk_frames or c.chunk_frames) * pt, c.chunk_frames * pt
    if frames < first or frames % pt or (frames - first) % chunk:
        fits = ", ".join(str(first + k * chunk) for k in range(4))
        raise ConfigError("--frames", frames, f"whole chunks: the first chunk of {first} latent frames plus any number "
                          f"of chunks of {chunk} ({fits}, ...)")
    return model.chunk_layout(frames // pt)


def _parse_action_ids(text: str, num_chunks: int, action_dim: int) -> list[int]:
    try:
        ids = [int(tok) for tok in text.replace(",", " ").split()]
    except ValueError:
        raise ConfigError("--actions", text, "integer action ids separated by commas, e.g. 0,1,2") from None
    if len(ids) != num_chunks:
        raise ConfigError("--actions", text, f"one action id per chunk: {num_chunks} ids for this --frames")
    if any(not 0 <= i < action_dim for i in ids):
        raise ConfigError("--actions", text, f"ids in [0, {action_dim}) (model.action_dim = {action_dim})")
    return ids


def _action_fn(args, cfg, model, layout):
    """None, a fixed per-chunk list (--actions) or stdin (--interactive), matched against model.action_dim;
    each chunk's actions cover its own frames (``layout``: a first chunk may have its own size)."""
    from .streaming import one_hot_actions, stdin_action_reader

    action_dim, num_chunks = cfg.model.action_dim, layout.n_chunks
    given = args.actions is not None or args.interactive
    if action_dim and not given:
        raise ConfigError("--actions", None, f"--actions ID,ID,... (one per chunk) or --interactive: this model is "
                          f"action-conditioned (model.action_dim = {action_dim})")
    if not action_dim and given:
        raise ConfigError("--actions/--interactive", args.actions or "--interactive",
                          "neither: this model takes no actions (model.action_dim = 0)")
    if not action_dim:
        return None
    if args.interactive:
        return stdin_action_reader(action_dim, layout.size)
    ids = _parse_action_ids(args.actions, num_chunks, action_dim)
    return lambda index, _frames: one_hot_actions([ids[index]], action_dim, layout.size(index))


def _image_prefix(args, cfg, model, frames: int, vae=None, device="cpu"):
    """``--image``: the image's latent frame [1, C, 1, h, w] (VAE-encoded with ``vae``), or None without the flag;
    ``frames``: the video's latent frames (the image's one among them)."""
    if args.image is None:
        return None
    from .image_input import image_latents

    if frames < 2:
        raise ConfigError("--frames", frames, "at least 2 latent frames with --image (the image is the first)")

    latents, note = image_latents(args.image, cfg.data, model.cfg.in_channels, vae, device)
    if note:
        print(f"--image: {note}")
    return latents


def _prompt_schedule(args, cfg, layout, uncond, encode=None):
    """``--prompts-at``: a :class:`ConditionSchedule` over the stream's chunks, or None without the flag.

    ``encode(text) -> {"context", "uncond_context"}`` for text prompts (runs with a text encoder); without it the
    prompts are the synthetic set's classes (``class=K``) and ``uncond`` is the unconditional context."""
    if args.prompts_at is None:
        return None
    import torch

    from ..network import Condition
    from .prompt_switch import FLAG, ConditionSchedule, parse_prompts_at

    for flag, value in (("--class-id", args.class_id), ("--prompt", args.prompt), ("--prompts", args.prompts)):
        if value is not None:
            raise ConfigError(flag, value, f"absent with {FLAG} (it gives the prompts)")
    d = cfg.data
    if encode is not None:
        entries = parse_prompts_at(args.prompts_at, layout.n_chunks)
        conds = [Condition(c["context"], c["uncond_context"]) for c in (encode(text) for _, text in entries)]
    elif d.kind == "synthetic":
        from ..data import TextConditioner

        entries = parse_prompts_at(args.prompts_at, layout.n_chunks, classes=d.num_classes)
        text = TextConditioner(d.num_classes, d.text_len, d.text_dim)
        conds = [Condition(text(torch.tensor([k])).to(uncond), uncond) for _, k in entries]
    else:
        raise ConfigError(FLAG, args.prompts_at, "a run with class prompts (data.kind=synthetic) or text prompts "
                          "(encoders.diffusers_dir)")
    return ConditionSchedule(tuple(c for c, _ in entries), tuple(conds))


def run_generate(args) -> int:
    from ..utils.video import StreamingVideoWriter
    from .sampling import prompt_batch
    from .streaming import generate_video

    if not 1 <= args.steps <= 8:
        raise ConfigError("--steps", args.steps, "1..8 few-step streaming steps")
    if args.out is not None:
        _video_out(args.out)
    cfg, phase, model = _open(args)
    d = cfg.data
    frames = d.num_frames if args.frames is None else args.frames
    layout = _stream_layout(model, frames)
    action_fn = _action_fn(args, cfg, model, layout)
    text_prompts = args.prompt is not None or args.prompts is not None or (args.prompts_at and cfg.encoders.has_text)
    if text_prompts or cfg.encoders.has_vae:  # text prompts / VAE decode
        from .real_video import generate_files

        if args.class_id is not None:
            raise ConfigError("--class-id", args.class_id, "absent with --prompt/--prompts or a run with a VAE")
        return generate_files(args, cfg, phase, model, frames, action_fn)
    seed = cfg.eval.seed if args.seed is None else args.seed
    prefix = _image_prefix(args, cfg, model, frames, device=args.device)
    prompts = prompt_batch(d, 1, seed, args.device, args.class_id)
    schedule = _prompt_schedule(args, cfg, layout, prompts["uncond_context"])
    context = prompts["context"] if schedule is None else schedule(0).context
    out = args.out or str(Path(cfg.output_dir) / "samples" / f"generate_{phase.name}.mp4")
    pattern = (f"{layout.n_chunks} chunks of {layout.chunk_frames}" if layout.first == layout.chunk_frames else
               f"a chunk of {layout.first} + {layout.n_chunks - 1} of {layout.chunk_frames}")
    options = long_stream_options(stream_options(args, cfg.causal, args.steps), cfg, model, frames)
    per_chunk = " ".join(map(str, args.steps_per_chunk)) if args.steps_per_chunk else str(args.steps)
    print(f"streaming {frames} frames ({pattern}) from phase '{phase.name}', "
          f"{per_chunk} steps per chunk, to {out}")
    writer = StreamingVideoWriter(out)
    try:
        generate_video(model, context, frames - _frames_of(prefix), d.height, d.width, steps=args.steps,
                       guidance_scale=args.guidance, uncond_context=prompts["uncond_context"], action_fn=action_fn,
                       seed=seed, writer=writer, log=print, options=options, prefix=prefix, show_prefix=True,
                       condition_at=schedule, recache=args.recache)
    finally:
        path = writer.close()
    print(f"wrote {path}: {writer.frames_written} frames")
    return 0


def _frames_of(prefix) -> int:
    return 0 if prefix is None else prefix.shape[2]


def add_stream_input_arguments(p: argparse.ArgumentParser) -> None:
    """generate's inputs besides the prompt: a first image, a prompt schedule."""
    p.add_argument("--image", default=None, metavar="PATH", help="image-to-video: the image is the first latent "
                   "frame (VAE-encoded on runs with a VAE), scaled to cover the run's size and centre-cropped; "
                   "the rest streams from it")
    p.add_argument("--prompts-at", default=None, metavar="CHUNK:PROMPT;...", help="switch the prompt at chunk "
                   "indices, e.g. '0:a red disk moving right;8:a blue square moving left' (synthetic runs: "
                   "'0:class=1;8:class=3'); the kept context is re-cached under each new prompt")
    p.add_argument("--recache", action=argparse.BooleanOptionalAction, default=True,
                   help="with --prompts-at: re-compute the cached chunks' K/V under the new prompt (default; LongLive "
                   "KV re-cache); --no-recache only swaps the text the next chunks attend to")


# ---------------------------------------------------------------------------------------------- parser
def _run_args(p: argparse.ArgumentParser, phase_help: str) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training output_dir (holds config.yaml and phases/)")
    p.add_argument("--phase", required=True, help=phase_help)
    p.add_argument("--weights", choices=WEIGHTS, default="ema", help="the phase's EMA (default) or raw weights")
    p.add_argument("--device", default="cpu")


def _prompt_args(p: argparse.ArgumentParser) -> None:
    """Text prompts (runs with encoders.diffusers_dir: umT5-encoded, the video VAE-decoded)."""
    p.add_argument("--prompt", default=None, help="a text prompt (needs encoders.diffusers_dir in the run)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="a prompt file: one video per prompt")
    p.add_argument("--negative-prompt", default=None, help="CFG's negative prompt (default: encoders.negative_prompt, "
                   "else Wan2.1's default)")


def add_run_dir_commands(sub) -> None:
    """Register sample / eval / generate-data / generate on an argparse subparsers object."""
    p = sub.add_parser("sample", help="sample a trained phase to a video file (ODE for teachers, few-step otherwise)")
    _run_args(p, "the phase to sample")
    p.add_argument("--steps", type=int, default=None, help="default: eval.teacher_steps for teachers, 2 otherwise")
    p.add_argument("--num-videos", type=int, default=4, help="videos in the grid (default 4)")
    p.add_argument("--class-id", type=int, default=None, help="prompt class for every video (synthetic data)")
    p.add_argument("--seed", type=int, default=None, help="prompts and noise (default eval.seed)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: eval.cfg_scale for "
                   "teachers, 1 for students)")
    p.add_argument("--out", required=True, help="FILE.mp4 or FILE.gif; with --prompt/--prompts a folder")
    _prompt_args(p)
    p.add_argument("--num-seeds", type=int, default=1, help="with --prompt/--prompts: videos per prompt (seeds "
                   "seed..seed+N-1), files <prompt>-<i>.mp4 as VBench reads them")
    add_sampler_arguments(p)
    p.set_defaults(func=run_sample)

    p = sub.add_parser("eval", help="quality table of a distilled phase vs its teacher's many-step samples")
    _run_args(p, "a phase with teacher_from (it is compared with that teacher)")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="student step counts (default 1 2 4; with "
                   "--steps-per-chunk only that schedule's row)")
    p.add_argument("--num-videos", type=int, default=None, help="prompts compared (default eval.num_videos)")
    add_sampler_arguments(p)
    p.set_defaults(func=run_eval)

    p = sub.add_parser("generate-data", help="teacher samples into latent shards: of a trained phase (RUN_DIR "
                       "--phase) or of a diffusers Wan teacher (--teacher diffusers:DIR --prompts FILE)")
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?", default=None,
                   help="a training output_dir (holds config.yaml and phases/); not with --teacher")
    p.add_argument("--phase", default=None, help="the (teacher) phase that generates (with RUN_DIR)")
    p.add_argument("--weights", choices=WEIGHTS, default="ema", help="the phase's EMA (default) or raw weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-videos", type=int, default=None, help="with RUN_DIR: videos to generate")
    p.add_argument("--out", required=True, help="shard folder (manifest.json + shards)")
    p.add_argument("--format", choices=("safetensors", "tar"), default="safetensors")
    p.add_argument("--shard-size", type=int, default=None, help="videos per shard (default 256; 64 for --teacher)")
    p.add_argument("--steps", type=int, default=None, help="default: eval.teacher_steps for teacher phases, 2 for "
                   "students, 50 for --teacher")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default eval.cfg_scale for teacher "
                   "phases, 5 for --teacher)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (RUN_DIR: batch i uses seed + i; --teacher: "
                   "video i uses seed + i)")
    p.add_argument("--trajectory", type=int, default=0, metavar="K", help="also store the teacher's ODE states at a "
                   "K-step student's sampling levels (K evenly spaced Wan timesteps from 1000): the data of objective "
                   "ode_regression (CausVid / Self-Forcing ODE initialisation)")
    p.add_argument("--trajectory-shift", type=float, default=1.0, help="time shift of those K levels (Self-Forcing: "
                   "5 with its warped denoising steps)")
    from ..data.cli import add_teacher_data_arguments

    add_teacher_data_arguments(p)
    p.set_defaults(func=run_generate_data)

    p = sub.add_parser("generate", help="stream a video chunk by chunk (any length; actions for world models)")
    _run_args(p, "the phase to stream (a distilled student)")
    p.add_argument("--steps", type=int, default=2, help="steps per chunk, 1..8 (default 2)")
    p.add_argument("--frames", type=int, default=None, help="latent frames (default data.num_frames; may exceed it)")
    p.add_argument("--class-id", type=int, default=None, help="prompt class (synthetic data)")
    p.add_argument("--seed", type=int, default=None, help="prompt and noise (default eval.seed)")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale (default 1: off)")
    p.add_argument("--out", default=None, help="FILE.mp4|.gif (default RUN_DIR/samples/generate_<phase>.mp4)")
    _prompt_args(p)
    add_sampler_arguments(p)
    add_long_video_arguments(p)
    act = p.add_mutually_exclusive_group()
    act.add_argument("--actions", default=None, help="action ids, one per chunk, e.g. 0,1,2,3")
    act.add_argument("--interactive", action="store_true", help="read each chunk's action ids from stdin")
    add_stream_input_arguments(p)
    p.set_defaults(func=run_generate)
