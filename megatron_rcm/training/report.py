"""End-of-phase report: a streamed sample video and the quality number.

Quality number (DESIGN.md section 6): for fixed prompts and seeds, how far k-step student samples
are from the teacher's many-step samples (MSE / PSNR), the Frechet distance between their features
under a small fixed classifier trained on the synthetic set, and "motion accuracy" (does the
classifier recognise the prompt's motion in the generated video). Teacher samples are cached per
teacher phase so every later phase is compared against the same videos.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_SCALARS = ("mse", "psnr", "fd", "motion_acc_student", "motion_acc_teacher")


def eval_prompts(trainer) -> dict:
    from ..data import build_dataset

    cfg = trainer.cfg
    data = build_dataset(cfg.data, batch_size=cfg.eval.num_videos)
    batch = data.batch_at(10_000 + cfg.eval.seed)  # indices disjoint from the first training batches
    return {k: v.to(trainer.device) for k, v in batch.items() if torch.is_tensor(v)}


def _action_fn(prompts, chunk_frames: int):
    actions = prompts.get("actions")
    if actions is None:
        return None
    return lambda chunk, _frames: actions[:, chunk * chunk_frames:(chunk + 1) * chunk_frames]


@torch.no_grad()
def sample(trainer, model, prompts, steps: int, guidance: float, writer=None):
    from ..inference.streaming import generate_video

    d = trainer.cfg.data
    was_training = model.training
    model.eval()
    # many-step (teacher) sampling: an explicit uniform grid of noise levels, same x0 + re-noise sampler
    timesteps = None if steps <= 4 else [1000.0 * (1 - i / steps) for i in range(steps)]
    video = generate_video(model, prompts["context"], d.num_frames, d.height, d.width, steps=steps, timesteps=timesteps,
                           guidance_scale=guidance, uncond_context=prompts["uncond_context"],
                           action_fn=_action_fn(prompts, model.causal.chunk_frames), seed=trainer.cfg.eval.seed,
                           writer=writer, log=None)
    model.train(was_training)
    return video


def feature_extractor(trainer):
    from ..data import build_dataset
    from ..evaluation import train_feature_extractor

    path = Path(trainer.out) / "eval" / "extractor.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = build_dataset(trainer.cfg.data, batch_size=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny extractor trains faster single-threaded on a busy 2-core box
    try:
        return train_feature_extractor(data, steps=120, seed=0, cache_path=str(path)).to(trainer.device)
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def teacher_samples(trainer, teacher_phase: str, teacher, prompts) -> torch.Tensor:
    """The reference: the teacher's deterministic many-step ODE (2nd-order multistep, CFG), chunk by chunk."""
    from functools import partial

    from ..diffusion.samplers import causal_chunk_sample, multistep2_fm

    path = trainer.phase_dir(teacher_phase) / "eval_teacher_samples.safetensors"
    if path.exists():
        return load_file(str(path))["video"].to(trainer.device)
    e, d = trainer.cfg.eval, trainer.cfg.data
    gen = torch.Generator().manual_seed(e.seed)
    noise = torch.randn(len(prompts["context"]), d.channels, d.num_frames, d.height, d.width, generator=gen)
    was_training = teacher.training
    teacher.eval()
    video = causal_chunk_sample(teacher, noise.to(trainer.device, teacher.dtype), prompts["context"],
                                partial(multistep2_fm, steps=e.teacher_steps), actions=prompts.get("actions"),
                                uncond_context=prompts["uncond_context"], guidance_scale=e.cfg_scale)
    teacher.train(was_training)
    save_file({"video": video.float().cpu().contiguous()}, str(path))
    return video


def phase_report(trainer, phase, model, teacher) -> dict:
    """Write the phase's sample video; for distillation phases also the quality numbers per step count."""
    from ..evaluation import evaluate_samples

    e = trainer.cfg.eval
    prompts = eval_prompts(trainer)
    samples_dir = Path(trainer.out) / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    extractor = feature_extractor(trainer)
    if phase.kind == "teacher":
        video = teacher_samples(trainer, phase.name, model, prompts)
        from ..utils.video import write_video

        path = write_video(str(samples_dir / f"{phase.name}_{e.teacher_steps}step.mp4"), video[: min(4, len(video))])
        stats = evaluate_samples(video, video, prompts["class_id"], extractor)
        trainer.logger.print(f"[{phase.name}] teacher {e.teacher_steps}-step samples: {path}; "
                             f"motion accuracy {stats['motion_acc_teacher']:.3f}")
        return {"teacher_motion_acc": stats["motion_acc_teacher"]}
    ref = teacher_samples(trainer, phase.teacher_from, teacher, prompts)
    video_2step = str(samples_dir / f"{phase.name}_2step_streamed.mp4")
    rows = student_quality(trainer, model, prompts, ref, extractor, e.student_steps, video_2step=video_2step)
    metrics = {}
    for k, stats in rows:
        for name in _SCALARS:
            if name in stats:
                metrics[f"{k}step_{name}"] = stats[name]
        trainer.logger.scalars(f"eval/{phase.name}", {n: stats[n] for n in _SCALARS if n in stats}, k)
    trainer.logger.print(format_quality_table(phase.name, e.teacher_steps, rows))
    return metrics


def student_quality(trainer, model, prompts, ref, extractor, student_steps, video_2step: str | None = None) -> list:
    """[(k, stats)] for k-step samples of ``model`` against the reference videos ``ref`` (same prompts/seeds).

    With ``video_2step`` the 2-step samples are also streamed to that file chunk by chunk as they are made.
    """
    from ..evaluation import evaluate_samples
    from ..utils.video import StreamingVideoWriter

    rows = []
    for k in student_steps:
        writer = StreamingVideoWriter(video_2step) if (k == 2 and video_2step) else None
        video = sample(trainer, model, prompts, k, 1.0, writer=writer)
        if writer is not None:
            writer.close()
        rows.append((k, evaluate_samples(video, ref, prompts["class_id"], extractor)))
    return rows


def format_quality_table(name: str, teacher_steps: int, rows) -> str:
    lines = [f"[{name}] quality vs the teacher's {teacher_steps}-step samples (same prompts and seeds):",
             "  steps |    mse |  psnr |     fd | motion acc (student / teacher)"]
    for k, s in rows:
        lines.append(f"  {k:5d} | {s['mse']:.4f} | {s['psnr']:5.2f} | {s.get('fd', float('nan')):6.3f} | "
                     f"{s.get('motion_acc_student', float('nan')):.3f} / {s.get('motion_acc_teacher', float('nan')):.3f}")
    return "\n".join(lines)
