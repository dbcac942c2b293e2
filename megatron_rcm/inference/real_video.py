"""Text-to-video for runs with encoders: prompts -> umT5 context, streamed generation, VAE-decoded files.

``generate`` streams chunk by chunk and decodes each chunk through the VAE's streaming decoder as
soon as it exists, appending it to the video file (per-chunk latency printed with the decode time);
``sample`` over a prompt file writes one file per (prompt, seed), named ``<prompt>-<i>.mp4`` as video
benchmark suites such as VBench read them. Runs without encoders keep the latent/pixel-space paths
of :mod:`.cli`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from ..config.errors import ConfigError

DECODED_FPS = 16  # Wan2.1's frame rate


def run_encoders(cfg, device, text: bool = True, vae: bool = True):
    """The run's frozen encoders (``encoders.*`` of its config), checked against its model."""
    from ..encoders import load_encoders

    if (text and not cfg.encoders.has_text) or (vae and not cfg.encoders.has_vae):
        raise ConfigError("encoders.diffusers_dir", cfg.encoders.diffusers_dir,
                          "a diffusers Wan pipeline folder in the run's config.yaml: text prompts and VAE decoding "
                          "need its tokenizer/, text_encoder/ and vae/")
    if vae and torch.device(device).type == "cuda":
        # the VAE's 3-D convolutions see a few fixed shapes per stream: let cuDNN pick their algorithms
        # (+3.6% video frames/s with the decode in the loop on an H200, benchmarks/RESULTS.md)
        torch.backends.cudnn.benchmark = True
    return load_encoders(cfg.encoders, cfg.model, device, text=text, vae=vae)


def gather_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    from ..data.prompts import read_prompts

    if prompt is not None and prompts_file is not None:
        raise ConfigError("--prompt/--prompts", prompt, "one of the two: a prompt, or a prompt file")
    if prompt is not None:
        if not prompt.strip():
            raise ConfigError("--prompt", prompt, "a non-empty prompt")
        return [prompt.strip()]
    return read_prompts(prompts_file) if prompts_file is not None else []


def prompt_inputs(encoders, prompts: list[str], negative_prompt: str | None, device) -> dict:
    """{"context", "uncond_context"} [B, L, D] for the prompts, in float32 on ``device``."""
    ctx = encoders.prompt_contexts(prompts, negative_prompt)
    return {k: v.to(device, torch.float32) for k, v in ctx.items()}


def benchmark_file_name(prompt: str, index: int, suffix: str = ".mp4", limit: int = 240) -> str:
    """``<prompt>-<index>.mp4`` (VBench's naming); path separators become '_', over-long names are cut."""
    stem = prompt.replace("/", "_").replace("\\", "_").replace("\0", "")
    tail = f"-{index}{suffix}"
    while len((stem + tail).encode("utf-8")) > limit:
        stem = stem[:-1]
    return stem + tail


def stream_decoded(model, inputs: dict, num_frames: int, height: int, width: int, steps: int, guidance: float,
                   seed: int, vae=None, action_fn=None, sync: Callable[[], None] | None = None, options=None,
                   prefix=None, condition_at=None, recache: bool = True):
    """Yield (chunk, video frames [1, 3, f, H, W] or the latents without ``vae``, decode seconds) per chunk.

    Each chunk goes through the VAE's streaming decoder as soon as it is denoised, so a stream can be
    shown or written while it grows; the decoded frames equal one decode of the whole video. ``options``: a
    ``StreamConfig`` with per-chunk steps / noisy context. ``prefix`` (an image's latent frame) leads the video:
    its frames come first in the first chunk's output (decode(encode(image)) with a VAE); ``condition_at``: a
    prompt schedule (see ``stream_chunks``).
    """
    from dataclasses import replace

    from ..network import Denoiser
    from .streaming import StreamConfig, including_prefix, stream_video

    context = inputs["context"]
    gen = torch.Generator(device=context.device).manual_seed(seed)
    cfg = replace(options or StreamConfig(), steps=steps, guidance_scale=guidance)
    sync = sync or ((lambda: torch.cuda.synchronize()) if context.is_cuda else (lambda: None))
    decoder = vae.stream() if vae is not None else None
    stream = stream_video(model, context, num_frames, height, width, cfg, inputs.get("uncond_context"), action_fn,
                          gen, sync=sync, prefix=prefix, condition_at=condition_at, recache=recache)
    for out in including_prefix(stream, prefix, Denoiser.of(model)):
        t0 = time.perf_counter()
        frames = decoder.decode(out.frames[:1]) if decoder is not None else out.frames[:1]
        sync()
        yield out, frames, time.perf_counter() - t0


def stream_to_writer(model, inputs: dict, num_frames: int, height: int, width: int, steps: int, guidance: float,
                     seed: int, vae, writer, action_fn=None, log: Callable[[str], None] | None = print, options=None,
                     **stream):
    """Stream one video into ``writer`` (each chunk decoded and appended as it comes); returns the latents.

    Per-chunk lines give the chunk's latency split into denoising (sampling + KV-cache write) and VAE decode.
    """
    chunks = []
    for out, frames, decode_s in stream_decoded(model, inputs, num_frames, height, width, steps, guidance, seed, vae,
                                                action_fn, options=options, **stream):
        writer.append(frames[0].detach().float().cpu())
        chunks.append(out.frames)
        if log is not None:
            log(f"chunk {out.index}: {out.frames.shape[2]} latent -> {frames.shape[2]} video frames in "
                f"{(out.latency_s + decode_s) * 1e3:.1f} ms (denoise {out.latency_s * 1e3:.1f} ms + VAE decode "
                f"{decode_s * 1e3:.1f} ms; kv cache {out.cache_tokens} tokens)")
    return torch.cat(chunks, dim=2)


def generate_files(args, cfg, phase, model, frames: int, action_fn) -> int:
    """``generate`` on a run with encoders: one streamed, VAE-decoded file per prompt."""
    from ..utils.video import StreamingVideoWriter
    from .cli import _frames_of, _image_prefix, _prompt_schedule, _stream_layout, long_stream_options, stream_options
    from .sampling import prompt_batch

    device = torch.device(args.device)
    options = long_stream_options(stream_options(args, cfg.causal, args.steps), cfg, model, frames)
    prompts = gather_prompts(args.prompt, args.prompts)
    switching = getattr(args, "prompts_at", None) is not None
    encoders = run_encoders(cfg, device, text=bool(prompts) or switching, vae=cfg.encoders.has_vae)
    seed = cfg.eval.seed if args.seed is None else args.seed
    out = Path(args.out or Path(cfg.output_dir) / "samples" / f"generate_{phase.name}.mp4")
    prefix = _image_prefix(args, cfg, model, frames, encoders.vae, device)
    schedule = _prompt_schedule(args, cfg, _stream_layout(model, frames), None,
                                lambda text: prompt_inputs(encoders, [text], args.negative_prompt, device))
    if schedule is not None:
        first = schedule(0)
        inputs_list = [{"context": first.context, "uncond_context": first.uncond}]
    elif prompts:
        inputs_list = [prompt_inputs(encoders, [p], args.negative_prompt, device) for p in prompts]
    else:  # no prompt: the data's first evaluation prompt (its stored context)
        batch = prompt_batch(cfg.data, 1, seed, device)
        inputs_list = [{"context": batch["context"], "uncond_context": batch["uncond_context"]}]
    d = cfg.data
    pixel_frames = encoders.vae.pixel_frames(frames) if encoders.vae is not None else frames
    for i, inputs in enumerate(inputs_list):
        path = out if len(inputs_list) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        shown = f" for {prompts[i]!r}" if prompts else ""
        print(f"streaming {frames} latent frames ({pixel_frames} video frames) from phase '{phase.name}'{shown}, "
              f"{args.steps} steps per chunk, to {path}")
        writer = StreamingVideoWriter(str(path), fps=DECODED_FPS, scale=1) if encoders.vae is not None else \
            StreamingVideoWriter(str(path))
        try:
            stream_to_writer(model, inputs, frames - _frames_of(prefix), d.height, d.width, args.steps, args.guidance,
                             seed, encoders.vae, writer, action_fn=action_fn, options=options, prefix=prefix,
                             condition_at=schedule, recache=args.recache)
        finally:
            written = writer.close()
        print(f"wrote {written}: {writer.frames_written} frames")
    return 0


def sample_files(args, cfg, phase, model) -> int:
    """``sample --prompts FILE|--prompt P --num-seeds N --out DIR``: one decoded file per (prompt, seed)."""
    from ..utils.video import write_video
    from .cli import stream_options
    from .sampling import sample_phase

    device = torch.device(args.device)
    prompts = gather_prompts(args.prompt, args.prompts)
    if args.num_seeds < 1:
        raise ConfigError("--num-seeds", args.num_seeds, "at least 1 video per prompt")
    options = stream_options(args, cfg.causal)  # (its step count is the sampled one)
    out = Path(args.out)
    if out.suffix.lower() in (".mp4", ".gif"):
        raise ConfigError("--out", args.out, "a folder: with --prompt/--prompts one file per (prompt, seed) is written "
                          "there, named <prompt>-<i>.mp4")
    encoders = run_encoders(cfg, device, text=True, vae=cfg.encoders.has_vae)
    steps = args.steps if args.steps is not None else (cfg.eval.teacher_steps if phase.kind == "teacher" else 2)
    guidance = args.guidance if args.guidance is not None else (cfg.eval.cfg_scale if phase.kind == "teacher" else 1.0)
    seed = cfg.eval.seed if args.seed is None else args.seed
    out.mkdir(parents=True, exist_ok=True)
    for prompt in prompts:
        inputs = prompt_inputs(encoders, [prompt], args.negative_prompt, device)
        for i in range(args.num_seeds):
            latents = sample_phase(phase.kind, model, inputs, cfg.data, steps, guidance, seed=seed + i,
                                   teacher_shift=cfg.eval.teacher_shift, options=options)
            video = encoders.vae.decode(latents).float() if encoders.vae is not None else latents
            kw = {"fps": DECODED_FPS, "scale": 1} if encoders.vae is not None else {}
            path = write_video(str(out / benchmark_file_name(prompt, i)), video[0], **kw)
            print(f"wrote {path}: {video.shape[2]} frames, {steps}-step sampling of phase '{phase.name}', "
                  f"seed {seed + i}")
    return 0
