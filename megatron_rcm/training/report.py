"""End-of-phase report: a streamed sample video and the quality number.

Quality number (docs/design.md, "Evaluation and the embedded default"): for fixed prompts and seeds, how far k-step student samples
are from the teacher's many-step samples (MSE / PSNR), the Frechet distance between their features
under a small fixed classifier trained on the synthetic set, and "motion accuracy" (does the
classifier recognise the prompt's motion in the generated video). Teacher samples are cached per
teacher phase so every later phase is compared against the same videos.

Everything here takes a :class:`ReportContext` (config, output folder, device, print), so the
trainer and the ``megatron-rcm eval`` command share it without a Trainer.

Runs with a VAE (``encoders.diffusers_dir``) write VAE-decoded videos (the streamed one decoded chunk by
chunk as it is generated) and compare student and teacher in pixel space; data without class ids
(text prompts) has no classifier, so only MSE/PSNR are reported. A diffusers teacher
(``teacher_from: diffusers:DIR``) is bidirectional: its reference samples come from the full-attention
ODE (:mod:`megatron_rcm.inference.bidirectional`) and are cached under ``eval/``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..inference.sampling import prompt_batch, student_sample, teacher_sample
from ..utils.files import save_safetensors

_SCALARS = ("mse", "psnr", "fd", "motion_acc_student", "motion_acc_teacher")
TEACHER_SAMPLES = "eval_teacher_samples.safetensors"


def _no_scalars(tag: str, values: dict, step: int) -> None:
    return None


@dataclass
class ReportContext:
    """What a report needs from a run: its config, output folder and device, and where to print."""

    cfg: object  # RunConfig
    out: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    print: Callable[[str], None] = print
    scalars: Callable[[str, dict, int], None] = _no_scalars  # (tag, values, step), e.g. TensorBoard
    _vae: object = field(default=None, repr=False)

    def phase_dir(self, name: str) -> Path:
        return Path(self.out) / "phases" / name

    def teacher_dir(self, teacher_from: str) -> Path:
        """Where a teacher's reference samples are cached: its phase folder, or eval/ for a diffusers teacher."""
        if teacher_from.startswith("diffusers:"):
            import hashlib

            tag = hashlib.sha256(teacher_from.encode()).hexdigest()[:12]
            return Path(self.out) / "eval" / f"diffusers_teacher_{tag}"
        return self.phase_dir(teacher_from)

    def vae(self):
        """The run's frozen VAE (loaded once), or None for runs without encoders."""
        if self._vae is None and self.cfg.encoders.has_vae:
            from ..encoders import load_encoders

            self._vae = load_encoders(self.cfg.encoders, self.cfg.model, self.device, text=False).vae
        return self._vae


def to_pixels(ctx: ReportContext, video: torch.Tensor) -> torch.Tensor:
    """Latents -> VAE-decoded pixels for runs with a VAE; unchanged otherwise (pixel-space runs)."""
    vae = ctx.vae()
    return video if vae is None else vae.decode(video).float()


def video_writer_args(ctx: ReportContext) -> dict:
    """Decoded videos are written at Wan's 16 fps, full size; the tiny pixel-space ones 8 fps, 4x enlarged."""
    return {"fps": 16, "scale": 1} if ctx.vae() is not None else {}


def has_class_ids(prompts: dict) -> bool:
    return "class_id" in prompts and bool((prompts["class_id"] >= 0).all())


def eval_prompts(ctx: ReportContext) -> dict:
    e = ctx.cfg.eval
    return prompt_batch(ctx.cfg.data, e.num_videos, e.seed, ctx.device)


def sample(ctx: ReportContext, model, prompts, steps, guidance: float, writer=None, options=None):
    """The few-step sample for a row: ``steps`` is a step count (evenly spaced levels, ``options``' noisy
    context) or a ``StreamConfig`` (a per-chunk schedule)."""
    decode = None
    if writer is not None and ctx.vae() is not None:  # the streamed video: one decoder state for sample 0
        stream = ctx.vae().stream()
        decode = lambda chunk: stream.decode(chunk[:1])  # noqa: E731
    if not isinstance(steps, int):
        options, steps = steps, steps.steps
    return student_sample(model, prompts, ctx.cfg.data, steps, guidance, seed=ctx.cfg.eval.seed, writer=writer,
                          decode=decode, options=options)


def row_label(steps) -> str:
    """A row's step label: "2" for a step count, "4,2" for per-chunk steps (a ``StreamConfig``)."""
    if isinstance(steps, int):
        return str(steps)
    return ",".join(str(k) for k in (steps.steps_per_chunk or [steps.steps]))


def schedule_row(schedule) -> object | None:
    """The row sampling with a training rollout's per-chunk schedule (a ``StepScheduleConfig``), or None."""
    if schedule is None or not schedule.steps_per_chunk:
        return None
    from ..inference.streaming import StreamConfig

    return StreamConfig(steps=max(schedule.steps_per_chunk), timesteps=list(schedule.denoising_steps),
                        shift=schedule.shift, steps_per_chunk=list(schedule.steps_per_chunk),
                        chunk_schedules=list(schedule.chunk_schedules), sigma_max=schedule.sigma_max)


def feature_extractor(ctx: ReportContext):
    from ..data import build_dataset
    from ..evaluation import train_feature_extractor

    path = Path(ctx.out) / "eval" / "extractor.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = build_dataset(ctx.cfg.data, batch_size=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny extractor trains faster single-threaded on a busy 2-core box
    try:
        return train_feature_extractor(data, steps=120, seed=0, cache_path=str(path)).to(ctx.device)
    finally:
        torch.set_num_threads(threads)


def _teacher_cache_key(ctx: ReportContext, num_videos: int) -> dict:
    e, d = ctx.cfg.eval, ctx.cfg.data
    key = {"num_videos": str(num_videos), "teacher_steps": str(e.teacher_steps), "seed": str(e.seed),
           "cfg_scale": repr(float(e.cfg_scale)), "shape": f"{d.channels}x{d.num_frames}x{d.height}x{d.width}"}
    if e.teacher_shift != 1.0:  # (caches made before the shift existed used 1)
        key["teacher_shift"] = repr(float(e.teacher_shift))
    return key


def _cached_teacher_samples(path: Path, key: dict):
    """The cached video if it was made with the same eval settings (older files: same batch size)."""
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    video = load_file(str(path))["video"]
    if meta and any(meta.get(k) != v for k, v in key.items()):
        return None
    if not meta and video.shape[0] != int(key["num_videos"]):
        return None
    return video


@torch.no_grad()
def teacher_samples(ctx: ReportContext, teacher_phase: str, teacher, prompts) -> torch.Tensor:
    """The reference: the teacher's deterministic many-step ODE (2nd-order multistep, CFG), chunk by chunk.

    Cached in the teacher's phase folder; a cache made with other eval settings is not used and not
    overwritten (it stays the run's reference).
    """
    e = ctx.cfg.eval
    path = ctx.teacher_dir(teacher_phase) / TEACHER_SAMPLES
    key = _teacher_cache_key(ctx, len(prompts["context"]))
    cached = _cached_teacher_samples(path, key)
    if cached is not None:
        return cached.to(ctx.device)
    if teacher_phase.startswith("diffusers:"):
        video = diffusers_teacher_sample(ctx, teacher_phase, teacher, prompts)
    else:
        video = teacher_sample(teacher, prompts, ctx.cfg.data, e.teacher_steps, e.cfg_scale, seed=e.seed,
                               shift=e.teacher_shift)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors({"video": video.float().cpu().contiguous()}, path, metadata=key)
    return video


def diffusers_teacher_sample(ctx: ReportContext, spec: str, teacher, prompts) -> torch.Tensor:
    """The bidirectional teacher's ODE (eval steps, shift and CFG) from the same noise as teacher_sample."""
    from ..inference.bidirectional import bidirectional_sample

    e, d = ctx.cfg.eval, ctx.cfg.data
    g = torch.Generator().manual_seed(e.seed)
    noise = torch.randn(len(prompts["context"]), d.channels, d.num_frames, d.height, d.width, generator=g)
    return bidirectional_sample(teacher, noise, prompts["context"], prompts["uncond_context"], e.teacher_steps,
                                e.cfg_scale, e.teacher_shift)


def quality_rows(ctx: ReportContext, phase, model, teacher, steps, samples_dir: Path | None = None, options=None):
    """(rows, metrics) of ``model``'s k-step samples vs its teacher phase's samples, for each k in ``steps``.

    An entry of ``steps`` may also be a ``StreamConfig`` (per-chunk steps, labelled "4,2"); ``options`` (a
    ``StreamConfig``) sets the noisy context of the plain step counts. With ``samples_dir`` the 2-step
    sample is also streamed to ``<phase>_2step_streamed.mp4`` there.
    """
    from ..evaluation import evaluate_samples
    from ..utils.video import StreamingVideoWriter

    prompts = eval_prompts(ctx)
    extractor = feature_extractor(ctx) if has_class_ids(prompts) else None
    # no teacher (e.g. MeanFlow from data): no reference videos, only the student's own motion accuracy
    ref = teacher_samples(ctx, phase.teacher_from, teacher, prompts) if teacher is not None else None
    ref = None if ref is None else to_pixels(ctx, ref)
    rows, metrics = [], {}
    for k in steps:
        writer = None
        if k == 2 and samples_dir is not None:  # the streamed video: frames are written chunk by chunk
            writer = StreamingVideoWriter(str(Path(samples_dir) / f"{phase.name}_2step_streamed.mp4"),
                                          **video_writer_args(ctx))
        video = to_pixels(ctx, sample(ctx, model, prompts, k, 1.0, writer=writer, options=options))
        k = k if isinstance(k, int) else row_label(k)
        if writer is not None:
            ctx.print(f"[{phase.name}] {k}-step sample video, streamed chunk by chunk: {writer.close()}")
        stats = evaluate_samples(video, video if ref is None else ref, prompts["class_id"], extractor)
        if ref is None:
            stats = {n: v for n, v in stats.items() if n == "motion_acc_student"}
        rows.append((k, stats))
        for name in _SCALARS:
            if name in stats:
                metrics[f"{str(k).replace(',', '-')}step_{name}"] = stats[name]
        if isinstance(k, int):
            ctx.scalars(f"eval/{phase.name}", {n: stats[n] for n in _SCALARS if n in stats}, k)
    return rows, metrics


def phase_report(ctx: ReportContext, phase, model, teacher) -> dict:
    """Write the phase's sample video; for distillation phases also the quality numbers per step count."""
    from ..evaluation import evaluate_samples
    from ..utils.video import write_video

    e = ctx.cfg.eval
    samples_dir = Path(ctx.out) / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    if phase.kind == "teacher":
        prompts = eval_prompts(ctx)
        video = teacher_samples(ctx, phase.name, model, prompts)
        shown = to_pixels(ctx, video[: min(4, len(video))])
        shown = shown[0] if len(shown) == 1 else shown  # one video: no grid border
        path = write_video(str(samples_dir / f"{phase.name}_{e.teacher_steps}step.mp4"), shown,
                           **video_writer_args(ctx))
        if not has_class_ids(prompts):  # text prompts: no classifier to read the motion with
            ctx.print(f"[{phase.name}] teacher {e.teacher_steps}-step samples: {path}")
            return {}
        stats = evaluate_samples(video, video, prompts["class_id"], feature_extractor(ctx))
        ctx.print(f"[{phase.name}] teacher {e.teacher_steps}-step samples: {path}; "
                  f"motion accuracy {stats['motion_acc_teacher']:.3f}")
        return {"teacher_motion_acc": stats["motion_acc_teacher"]}
    from .registry import objective_class  # the rollout's per-chunk schedule gets its own row

    cls = objective_class(phase, f"phases.{phase.name}")
    per_chunk = schedule_row(cls.few_step_schedule(cls.parse_config(dict(phase.objective_args), "objective_args")))
    rows, metrics = quality_rows(ctx, phase, model, teacher, list(e.student_steps) + [r for r in [per_chunk] if r],
                                 samples_dir)
    ctx.print(format_quality_table(phase.name, e.teacher_steps, rows))
    return metrics


# (header, width, decimals) of the numeric columns; widths hold 4-digit FDs (FD is often 100s-1000s)
_COLUMNS = (("mse", 7, 4), ("psnr", 6, 2), ("fd", 9, 2))


def _cell(value: float, width: int, decimals: int) -> str:
    """``value`` right-aligned in exactly ``width`` characters (exponent notation if it would not fit)."""
    text = f"{value:{width}.{decimals}f}"
    return text if len(text) <= width else f"{value:{width}.{max(0, width - 7)}e}"


def format_quality_table(name: str, teacher_steps: int, rows) -> str:
    """The quality table (README "Reading the quality table"): columns stay aligned for any value."""
    head = " | ".join(f"{h:>{w}}" for h, w, _ in _COLUMNS)
    lines = [f"[{name}] quality vs the teacher's {teacher_steps}-step samples (same prompts and seeds):",
             f"  steps | {head} | motion acc (student / teacher)"]
    for k, s in rows:  # a phase without a teacher has only the student's motion accuracy (nan elsewhere)
        g = lambda name: s.get(name, float("nan"))  # noqa: E731
        cells = " | ".join(_cell(g(h), w, d) for h, w, d in _COLUMNS)
        lines.append(f"  {str(k):>5} | {cells} | {g('motion_acc_student'):.3f} / {g('motion_acc_teacher'):.3f}")
    return "\n".join(lines)
