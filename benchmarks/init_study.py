"""The Causal-rCM paper's initialisation study on the tiny set: SF-DMD at equal budget from six initialisations.

    python benchmarks/init_study.py [--seeds 3] [--write-results] [key=value ...]    # the study (CPU: ~40 min)
    python benchmarks/init_study.py --quick                                         # CPU smoke run, seconds

(a) trains two causal teachers once (cached under --cache-dir by a hash of what they depend on): TF-FM
(teacher-forcing flow matching, the recipe's teacher and the real score of every SF-DMD run) and DF
(diffusion forcing); (b) for every seed, makes six initialisations from them — the TF-FM teacher itself,
the DF teacher itself, ODE regression onto the TF-FM teacher's ODE (trajectories of --ode-videos videos at a
4-step student's levels, written once by the ``generate-data --trajectory`` machinery and shared by all
seeds), TF-dCM, TF-sCM and TF-MeanFlow (each distilled from the TF-FM teacher for --init-steps steps) — and (c) refines
each with the same SF-DMD phase (--dmd-steps, the tiny recipe's settings); (d) reports, as mean ± std over
seeds, the quality of each init before and after SF-DMD: Frechet distance of the evaluation classifier's
features and motion accuracy against the TF-FM teacher's many-step ODE samples (``training.report``), and
diversity = the per-pixel standard deviation of one prompt's samples over noise seeds, averaged over
--diversity-prompts prompts (the data's own spread and the teacher's are printed for scale); (e) runs
benchmarks/convergence.py's TF-dCM vs TF-sCM comparison at equal counted compute with the reference
(Causal-rCM / rCM) settings (dCM: 48-step grid with shift 3; sCM: sigma_data 1, log-normal(-0.8, 1.6) times,
Adam betas (0, 0.999)) from the same TF-FM teacher; (f) prints markdown, --write-results appends it to
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import math
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convergence  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

from megatron_rcm.config.run import OptimConfig, PhaseConfig, load_config, validate_run  # noqa: E402
from megatron_rcm.inference.sampling import prompt_batch, student_sample, teacher_sample  # noqa: E402
from megatron_rcm.training.report import quality_rows  # noqa: E402
from megatron_rcm.training.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "examples" / "tiny_recipe.yaml"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
INITS = ("tf_teacher", "df_teacher", "ode", "dcm", "scm", "meanflow")
LABELS = {"tf_teacher": "causal teacher (TF-FM)", "df_teacher": "diffusion-forcing teacher", "ode": "ODE regression",
          "dcm": "TF-dCM", "scm": "TF-sCM", "meanflow": "TF-MeanFlow"}
# init phases distilled from the TF-FM teacher: (objective, objective_args, lr, betas); the tiny recipe's sCM,
# convergence.py's dCM / MeanFlow settings, and ODE regression onto the teacher's 4-step-student trajectory
INIT_PHASES = {
    "ode": ("ode_regression", {}, 5e-4, [0.9, 0.99]),  # trajectories from the shards (ode_shards)
    "dcm": ("dcm", {"cfg_scale": 2.0, "num_steps": 40, "shift": 1.0}, 5e-4, [0.9, 0.99]),
    "scm": ("scm", {"sigma_d": 1.0, "cfg_scale": 2.0, "r_warmup_steps": 150, "p_mean": -0.8, "p_std": 1.6},
            1e-4, [0.0, 0.999]),
    "meanflow": ("meanflow", {"cfg_scale": 2.0}, 5e-4, [0.9, 0.99]),
}
# the reference settings of the dCM vs sCM comparison (Causal-rCM dcm_total_steps 48 with sample_timestep_shift 3;
# rCM's sCM: sigma_data 1, p_G LogNormal(-0.8, 1.6), betas (0, 0.999)); warm-up and lr sized for the tiny set
REFERENCE_CONVERGENCE_ARGS = ["dcm.num_steps=48", "dcm.shift=3.0", "scm.sigma_d=1.0", "scm.p_mean=-0.8",
                              "scm.p_std=1.6", "scm.r_warmup_steps=150"]
ODE_LEVELS = (1.0, 0.75, 0.5, 0.25)  # the 4-step student's levels (Self-Forcing's [1000, 750, 500, 250], no warp)
QUICK = {"teacher_steps": 2, "init_steps": 2, "dmd_steps": 1, "seeds": 2, "convergence_budget": 28.0,
         "diversity_prompts": 1, "diversity_seeds": 2, "ode_videos": 2, "ode_steps": 2,
         "overrides": ["model.num_layers=1", "data.height=8", "data.width=8", "data.num_frames=4",
                       "data.batch_size=2", "causal.chunk_frames=2", "eval.num_videos=2", "eval.teacher_steps=2"]}


# ---------------------------------------------------------------------------------------------- configs
def base_config(args):
    """The recipe's teacher settings for both teachers; every model has the interval embedding (MeanFlow)."""
    cfg = load_config(args.recipe, list(args.overrides))
    cfg.model.interval_embedding = True
    cfg.eval.student_steps = [1, 2]
    cfg.eval.at_phase_end = False  # measured here, once per run, on the EMA weights
    cfg.train.log_every = max(cfg.train.log_every, 100)
    cfg.train.checkpoint_every, cfg.train.keep_checkpoints = 0, 1
    by_kind = {p.kind: p for p in cfg.phases}
    if "teacher" not in by_kind or "sf_dmd" not in by_kind:
        raise SystemExit(f"{args.recipe}: needs a teacher phase and an sf_dmd phase")
    tf = dataclasses.replace(by_kind["teacher"], name="tf_teacher", steps=args.teacher_steps)
    df = dataclasses.replace(tf, name="df_teacher", objective="diffusion_forcing")
    dmd = dataclasses.replace(by_kind["sf_dmd"], name="sf_dmd", steps=args.dmd_steps, teacher_from="tf_teacher")
    return cfg, [tf, df], dmd


def teacher_key(cfg, teachers) -> str:
    parts = {k: getattr(cfg, k) for k in ("seed", "model", "causal", "data", "eval")}
    parts["teachers"], parts["precision"] = teachers, cfg.train.precision
    return hashlib.sha256(repr(sorted(parts.items())).encode()).hexdigest()[:12]


def init_phase(init: str, steps: int) -> PhaseConfig | None:
    if init in ("tf_teacher", "df_teacher"):
        return None  # the teacher's own weights
    objective, obj_args, lr, betas = INIT_PHASES[init]
    return PhaseConfig(name=init, kind="tf_cm", objective=objective, steps=steps, init_from="tf_teacher",
                       teacher_from="tf_teacher", optim=OptimConfig(lr=lr, betas=list(betas)), ema_decay=0.95,
                       objective_args=dict(obj_args))


def run_config(cfg, teachers, dmd, init: str, seed: int, steps: int, out: Path, shard_dir: str | None = None):
    """[teachers, init (unless a teacher), sf_dmd]; with ``shard_dir`` the run trains on those latent shards."""
    phases = list(teachers)
    first = init_phase(init, steps)
    if first is not None:
        phases.append(first)
    phases.append(dataclasses.replace(dmd, init_from=init))
    data = cfg.data if shard_dir is None else dataclasses.replace(cfg.data, kind="latent_shards", shard_dir=shard_dir)
    run = dataclasses.replace(cfg, output_dir=str(out), seed=seed, phases=phases, data=data)
    validate_run(run)
    return run


# ---------------------------------------------------------------------------------------------- measures
def diversity(videos: torch.Tensor) -> float:
    """Spread of samples of ONE prompt over noise seeds: per-pixel std over the samples [N, C, F, H, W], mean."""
    if videos.shape[0] < 2:
        return float("nan")
    return float(videos.float().clamp(-1, 1).std(dim=0, unbiased=True).mean())


def prompt_diversity(sample_fn, data_cfg, prompts: int, seeds: int, device) -> float:
    """Mean over ``prompts`` classes of :func:`diversity` of ``seeds`` samples of that class (``sample_fn(p)``)."""
    values = []
    for c in range(prompts):
        p = prompt_batch(data_cfg, seeds, seed=100 + c, device=device, class_id=c % data_cfg.num_classes)
        values.append(diversity(sample_fn(p)))
    return sum(values) / len(values)


def measure(trainer, phase, model, teacher, args) -> dict:
    """FD and motion accuracy (1 and 2 steps) vs the teacher's ODE samples, and 2-step diversity."""
    dev = trainer.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        rows, _ = quality_rows(trainer.report_context, phase, model, teacher, [1, 2])
        d = trainer.cfg.data
        spread = prompt_diversity(lambda p: student_sample(model, p, d, 2, seed=7), d, args.diversity_prompts,
                                  args.diversity_seeds, dev)
    rows = dict(rows)
    return {"fd1": rows[1].get("fd", math.nan), "fd2": rows[2].get("fd", math.nan),
            "acc1": rows[1].get("motion_acc_student", math.nan), "acc2": rows[2].get("motion_acc_student", math.nan),
            "teacher_acc": rows[1].get("motion_acc_teacher", math.nan), "div2": spread}


def references(trainer, teacher, args) -> dict:
    """The diversity of the data itself and of the TF-FM teacher's CFG ODE samples, for scale."""
    from megatron_rcm.data import build_dataset

    d, e = trainer.cfg.data, trainer.cfg.eval
    data_div = []
    for c in range(args.diversity_prompts):
        data = build_dataset(d, batch_size=64)
        batch = data.batch_at(20_000 + c)
        same = batch["latents"][batch["class_id"] == (c % d.num_classes)]
        data_div.append(diversity(same[: args.diversity_seeds]))
    teacher_div = prompt_diversity(lambda p: teacher_sample(teacher, p, d, e.teacher_steps, e.cfg_scale, seed=7), d,
                                   args.diversity_prompts, args.diversity_seeds, trainer.device)
    return {"data": statistics.fmean([v for v in data_div if not math.isnan(v)] or [math.nan]),
            "teacher": teacher_div}


# ---------------------------------------------------------------------------------------------- runs
def train_teachers(cfg, teachers, args) -> Path:
    out = Path(args.cache_dir) / f"teachers-{teacher_key(cfg, teachers)}"
    done = all((out / "phases" / t.name / "ema.safetensors").exists() for t in teachers)
    if done:
        print(f"teachers: reusing {out}")
        return out
    run = dataclasses.replace(cfg, output_dir=str(out), phases=list(teachers))
    t0 = time.perf_counter()
    print(f"teachers: training TF-FM and DF, {teachers[0].steps} steps each, into {out}")
    Trainer(run, device=args.device, logger=convergence._logger(out, run, args.quiet)).run()
    print(f"teachers: {time.perf_counter() - t0:.1f} s")
    return out


def ode_shards(cfg, teacher_dir: Path, args) -> Path:
    """The TF-FM teacher's ODE samples with their states at the 4-step student's levels (``generate-data
    --trajectory 4`` of the run-folder form: the same machinery), written once and shared by all seeds."""
    from megatron_rcm.data import build_dataset
    from megatron_rcm.data.shards import MANIFEST, write_teacher_shards
    from megatron_rcm.inference.trajectory import sample_trajectory

    out = teacher_dir / f"ode_trajectories-{args.ode_videos}x{args.ode_steps}"
    if (out / MANIFEST).exists():
        return out
    run = dataclasses.replace(cfg, output_dir=str(teacher_dir))
    model = Trainer(run, device=args.device, logger=convergence._logger(teacher_dir, run, True))._frozen("tf_teacher")
    calls = [0]

    def sample_fn(batch):
        prompts = {k: v.to(args.device) for k, v in batch.items() if hasattr(v, "to")}
        calls[0] += 1
        return sample_trajectory(model, prompts, cfg.data, args.ode_steps, cfg.eval.cfg_scale, 1000 + calls[0], 1.0,
                                 list(ODE_LEVELS))

    t0 = time.perf_counter()
    dataset = build_dataset(cfg.data, batch_size=min(args.ode_videos, cfg.data.batch_size))
    write_teacher_shards(sample_fn, dataset, str(out), args.ode_videos, shard_size=256)
    print(f"ode trajectories: {args.ode_videos} videos x {len(ODE_LEVELS)} levels, {time.perf_counter() - t0:.1f} s")
    return out


def share_teacher_with_convergence(args, teacher_dir: Path, argv: list[str]) -> None:
    """Point benchmarks/convergence.py's teacher cache at this study's TF-FM teacher (same recipe phase, same
    eval settings), so its dCM vs sCM part distils the very teacher of the table above."""
    from megatron_rcm.training.report import TEACHER_SAMPLES

    cargs = convergence.parse_args(argv)
    target = Path(cargs.cache_dir) / f"teacher-{convergence.teacher_key(convergence.base_config(cargs))}"
    if (target / "phases" / "teacher").exists() or not (teacher_dir / "phases" / "tf_teacher" / TEACHER_SAMPLES).exists():
        return  # (without the teacher's reference samples convergence.py would train its teacher into the link)
    (target / "phases").mkdir(parents=True, exist_ok=True)
    (target / "phases" / "teacher").symlink_to((teacher_dir / "phases" / "tf_teacher").resolve(), target_is_directory=True)
    if not (target / "eval").exists():
        (target / "eval").symlink_to((teacher_dir / "eval").resolve(), target_is_directory=True)


def link_teachers(teacher_dir: Path, out: Path, names) -> None:
    if out.exists():
        shutil.rmtree(out)
    (out / "phases").mkdir(parents=True)
    for name in names:
        (out / "phases" / name).symlink_to((teacher_dir / "phases" / name).resolve(), target_is_directory=True)
    (teacher_dir / "eval").mkdir(exist_ok=True)
    (out / "eval").symlink_to((teacher_dir / "eval").resolve(), target_is_directory=True)


def run_init(cfg, teachers, dmd, init, seed, teacher_dir, args) -> dict:
    """Train the init (if it is not a teacher; with --shared-inits only for the first seed) and SF-DMD from it;
    the measures of both."""
    out = Path(args.work_dir) / f"{init}-seed{seed}"
    link_teachers(teacher_dir, out, [t.name for t in teachers])
    run = run_config(cfg, teachers, dmd, init, seed, args.init_steps, out)
    trainer = Trainer(run, device=args.device, logger=convergence._logger(out, run, args.quiet))
    t0 = time.perf_counter()
    teacher = trainer._frozen("tf_teacher")
    first = len(teachers)
    if args.shared_inits and seed != args.seeds_list[0] and run.phases[first].kind != "sf_dmd":
        shared = Path(args.work_dir) / f"{init}-seed{args.seeds_list[0]}" / "phases" / init
        (out / "phases" / init).symlink_to(shared.resolve(), target_is_directory=True)
        first += 1
    if run.phases[first].kind != "sf_dmd":  # the init phase (ODE regression on the trajectory shards)
        shards = str(ode_shards(cfg, teacher_dir, args)) if init == "ode" else None
        init_run = run_config(cfg, teachers, dmd, init, seed, args.init_steps, out, shards)
        Trainer(init_run, device=args.device, logger=convergence._logger(out, init_run, args.quiet)).run_phase(first)
        first += 1
    before = measure(trainer, run.phases[-1], trainer._frozen(init), teacher, args)
    trainer.run_phase(first)
    after = measure(trainer, run.phases[-1], trainer._frozen("sf_dmd"), teacher, args)
    wall = time.perf_counter() - t0
    print(f"{init} seed {seed}: init 2-step FD {before['fd2']:.1f} -> SF-DMD {after['fd2']:.1f}, "
          f"motion acc {after['acc2']:.3f}, diversity {after['div2']:.3f} ({wall:.1f} s)")
    return {"before": before, "after": after, "wall_s": wall, "refs": references(trainer, teacher, args)
            if init == args.inits[0] and seed == args.seeds_list[0] else None}


# ---------------------------------------------------------------------------------------------- report
def mean_std(values) -> str:
    vals = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "-"
    if len(vals) == 1:
        return _num(vals[0])
    return f"{_num(statistics.fmean(vals))} ± {_num(statistics.stdev(vals))}"


def _num(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else (f"{x:.1f}" if abs(x) >= 10 else f"{x:.3f}")


def format_study(results: dict, refs: dict, args, device: str, command: str, teacher_acc: float) -> str:
    seeds = len(args.seeds_list)
    lines = [f"## Initialisation study: SF-DMD at equal budget from six initialisations (issue 20) — {args.date}", "",
             f"Device: {device}. Command: `{command}`", "",
             f"Teachers: TF-FM and DF, {args.teacher_steps} steps each (the tiny recipe's teacher settings; the TF-FM "
             f"teacher is every SF-DMD run's real score and the reference of every FD); inits distilled from the TF-FM "
             f"teacher for {args.init_steps} steps; SF-DMD {args.dmd_steps} steps (the tiny recipe's settings) from "
             f"each. {seeds} seed(s) per init ({'SF-DMD only: each init trained once' if args.shared_inits else 'init + SF-DMD'}"
             f"), mean ± std. ODE regression: {args.ode_videos} TF-FM teacher trajectories ({args.ode_steps} ODE steps, "
             f"levels {list(ODE_LEVELS)}). FD / motion accuracy: "
             f"{args.num_videos} prompts vs the teacher's {args.eval_teacher_steps}-step CFG ODE samples (teacher "
             f"motion accuracy {teacher_acc:.3f}). Diversity: per-pixel std of {args.diversity_seeds} 2-step samples "
             f"of one prompt over noise seeds, mean of {args.diversity_prompts} prompts (data itself "
             f"{_num(refs['data'])}, the teacher's ODE samples {_num(refs['teacher'])}).", "",
             "| init | FD 1 / 2 step, init | FD 1-step, after SF-DMD | FD 2-step, after SF-DMD | motion acc 1 / 2 "
             "step, after | diversity, init | diversity, after |", "|---|---|---|---|---|---|---|"]
    for init, runs in results.items():
        b = [r["before"] for r in runs]
        a = [r["after"] for r in runs]
        lines.append(f"| {LABELS[init]} | {mean_std([x['fd1'] for x in b])} / {mean_std([x['fd2'] for x in b])} | "
                     f"{mean_std([x['fd1'] for x in a])} | {mean_std([x['fd2'] for x in a])} | "
                     f"{mean_std([x['acc1'] for x in a])} / {mean_std([x['acc2'] for x in a])} | "
                     f"{mean_std([x['div2'] for x in b])} | {mean_std([x['div2'] for x in a])} |")
    return "\n".join(lines) + "\n"


def rank_inits(results: dict, key: str = "fd2") -> list[str]:
    """Inits by their mean ``key`` after SF-DMD, best (lowest) first."""
    mean = {i: statistics.fmean([r["after"][key] for r in runs]) for i, runs in results.items()}
    return sorted(mean, key=mean.get)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (model/data/eval)")
    ap.add_argument("--recipe", default=str(RECIPE))
    ap.add_argument("--inits", default=",".join(INITS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--teacher-steps", type=int, default=2000, help="each teacher (the recipe: 2000)")
    ap.add_argument("--init-steps", type=int, default=300, help="each distilled init (the recipe's TF-sCM: 300)")
    ap.add_argument("--dmd-steps", type=int, default=60, help="SF-DMD from every init (the recipe: 60)")
    ap.add_argument("--diversity-prompts", type=int, default=4)
    ap.add_argument("--diversity-seeds", type=int, default=8)
    ap.add_argument("--shared-inits", action="store_true", help="train each init once (first seed) and vary only "
                    "SF-DMD's seed (to fit a small compute budget)")
    ap.add_argument("--ode-videos", type=int, default=256, help="teacher ODE trajectories for ODE regression")
    ap.add_argument("--ode-steps", type=int, default=16, help="their ODE steps (the eval reference uses 16 too)")
    ap.add_argument("--convergence-budget", type=float, default=3000.0, help="FE per method for dCM vs sCM (0: skip)")
    ap.add_argument("--convergence-points", type=int, default=5)
    ap.add_argument("--cache-dir", default="runs/init_study_cache")
    ap.add_argument("--work-dir", default="runs/init_study")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--device-name", default=None, help="the device as written in the table (default: detected)")
    ap.add_argument("--quick", action="store_true", help="minuscule sizes for a CPU smoke run")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--out-md", default=None, help="also write the markdown to this file (after every run)")
    ap.add_argument("--write-results", action="store_true", help=f"append the markdown to {RESULTS}")
    args = ap.parse_args(argv)
    if args.quick:
        args.overrides = QUICK["overrides"] + list(args.overrides)
        for k, v in QUICK.items():
            if k != "overrides" and getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
        if args.convergence_points == ap.get_default("convergence_points"):
            args.convergence_points = 3
    args.inits = [i for i in args.inits.split(",") if i]
    unknown = [i for i in args.inits if i not in INITS]
    if unknown:
        ap.error(f"--inits: unknown {unknown}; choose from {list(INITS)}")
    args.seeds_list = list(range(args.seeds))
    return args


def convergence_argv(args) -> list[str]:
    argv = ["--methods", "dcm,scm", "--budget-fe", str(args.convergence_budget), "--points",
            str(args.convergence_points), "--teacher-steps", str(args.teacher_steps), "--device", args.device,
            "--cache-dir", str(Path(args.cache_dir) / "convergence"), "--work-dir", str(Path(args.work_dir) / "conv"),
            "--recipe", args.recipe] + [a for kv in REFERENCE_CONVERGENCE_ARGS for a in ("--arg", kv)]
    if args.quick:
        argv += ["--quick", "--reps", "1", "--jvp-fe", "2", "--bwd-fe", "2"]
    if args.quiet:
        argv.append("--quiet")
    return argv + list(args.overrides if not args.quick else args.overrides[len(QUICK["overrides"]):])


def run_convergence(args, command_prefix: str, teacher_dir: Path) -> str:
    """benchmarks/convergence.py's dCM vs sCM at equal counted compute with the reference settings."""
    argv = convergence_argv(args)
    share_teacher_with_convergence(args, teacher_dir, argv)
    out = convergence.main(argv)
    report = out["report"].replace("## Convergence at equal compute: dCM vs sCM vs MeanFlow",
                                   "### TF-dCM vs TF-sCM at equal counted compute, reference settings", 1)
    return report.replace(f"`python benchmarks/convergence.py {' '.join(shlex.quote(a) for a in argv)}`",
                          f"`{command_prefix}` (its convergence part: `python benchmarks/convergence.py "
                          f"{' '.join(shlex.quote(a) for a in argv)}`)")


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = "python benchmarks/init_study.py " + " ".join(shlex.quote(a) for a in argv)
    cfg, teachers, dmd = base_config(args)
    args.eval_teacher_steps, args.num_videos = cfg.eval.teacher_steps, cfg.eval.num_videos
    t0 = time.perf_counter()
    teacher_dir = train_teachers(cfg, teachers, args)
    results, refs = {i: [] for i in args.inits}, None
    report = ""
    device = args.device_name or convergence.device_description(args.device)
    for seed in args.seeds_list:
        for init in args.inits:
            r = run_init(cfg, teachers, dmd, init, seed, teacher_dir, args)
            refs = refs or r["refs"]
            results[init].append(r)
            done = {i: v for i, v in results.items() if v}
            teacher_acc = r["after"]["teacher_acc"]
            report = format_study(done, refs, args, device, command, teacher_acc)
            if args.out_md:
                Path(args.out_md).write_text(report)
    report += f"\nRanking by 2-step FD after SF-DMD (best first): {', '.join(LABELS[i] for i in rank_inits(results))}.\n"
    report += f"Wall time of the study part: {time.perf_counter() - t0:.0f} s.\n"
    if args.convergence_budget > 0:
        report += "\n" + run_convergence(args, command, teacher_dir)
    if args.out_md:
        Path(args.out_md).write_text(report)
    print(report)
    if args.write_results:
        with open(RESULTS, "a") as f:
            f.write("\n" + report)
    return {"results": results, "refs": refs, "report": report}


if __name__ == "__main__":
    main()
