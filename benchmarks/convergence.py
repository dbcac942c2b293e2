"""Convergence at equal compute: dCM vs sCM vs MeanFlow distilled from one tiny causal teacher.

    python benchmarks/convergence.py [--device cuda] [--budget-fe 12000] [--write-results] [key=value ...]
    python benchmarks/convergence.py --quick          # CPU smoke run, ~1-2 min

(a) trains the tiny recipe's causal teacher once (cached under --cache-dir by a hash of everything it
depends on), (b) distils one student per method with the trainer (phases [teacher, <method>]; same
seed, data order, optimizer and EMA for every method), each for the number of steps its budget buys,
(c) measures the quality number (``training.report``: 1- and 2-step EMA-student samples vs the
teacher's many-step ODE samples, same prompts and seeds) at fractions of the budget through the
trainer's ``on_step`` hook, (d) prints a markdown table, (e) with --write-results appends it to
benchmarks/RESULTS.md.

Compute unit: one forward-equivalent (FE) = one no-grad student forward on the teacher-forcing
sequence [clean ; noisy] at the training batch size. A method's per-step cost is counted, not
assumed: every network call during one training step is observed (batch x tokens relative to that
unit, with or without a tangent, building a graph or not) and priced with factors measured on this
machine at these shapes: a call with a tangent (JVP) costs ``jvp`` FE, a graph-building call adds
``bwd`` FE for its backward. Evaluation is not charged.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from megatron_rcm.config.run import OptimConfig, PhaseConfig, load_config, to_yaml, validate_run
from megatron_rcm.training.logger import RunLogger
from megatron_rcm.network import Condition, Denoiser, StepContext
from megatron_rcm.objectives import PhaseModels
from megatron_rcm.training.registry import build_objective, objectives
from megatron_rcm.training.report import quality_rows
from megatron_rcm.training.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "examples" / "tiny_recipe.yaml"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
METHODS = ("dcm", "scm", "meanflow")

# Objective settings per method: the teacher's CFG scale (2.0, as the reference samples) everywhere;
# otherwise each method's own defaults, except sCM's trigflow settings from the tiny recipe and dCM's
# grid shift matched to the teacher's FM shift (1.0).
METHOD_ARGS = {
    "dcm": {"cfg_scale": 2.0, "num_steps": 40, "shift": 1.0},
    "scm": {"cfg_scale": 2.0, "r_warmup_steps": 300},  # SCMConfig defaults = rCM's sigma_d 1, tau ~ N(-0.8, 1.6^2)
    "meanflow": {"cfg_scale": 2.0},
}
# Optimizer per method (--lr / --betas override all): sCM with rCM's Adam betas (0, 0.999) and a lower lr;
# at 5e-4 with betas (0.9, 0.99) its tangent norm grows without bound (RESULTS.md, "sCM settings").
METHOD_OPTIM = {"dcm": (5e-4, [0.9, 0.99]), "scm": (1e-4, [0.0, 0.999]), "meanflow": (5e-4, [0.9, 0.99])}

QUICK = {"teacher_steps": 30, "budget_fe": 120.0, "points": 3, "overrides": [
    "model.num_layers=1", "data.height=8", "data.width=8", "data.num_frames=4", "data.batch_size=4",
    "causal.chunk_frames=2", "eval.num_videos=4", "eval.teacher_steps=4"]}


# ---------------------------------------------------------------------------------------------- config
def available_methods() -> list[str]:
    return [m for m in METHODS if m in objectives()]


def base_config(args):
    cfg = load_config(args.recipe, list(args.overrides))
    cfg.eval.student_steps = [1, 2]
    # MeanFlow needs the (zero-init) interval embedding; every method gets the same architecture, so all
    # distil the same teacher (trained with it; without an interval the model uses Delta = t)
    cfg.model.interval_embedding = True
    cfg.train.log_every = max(cfg.train.log_every, 100)
    teacher = cfg.phases[0]
    if teacher.kind != "teacher":
        raise SystemExit(f"{args.recipe}: phases.0 must be the teacher phase (kind: teacher), got '{teacher.kind}'")
    if args.teacher_steps is not None:
        teacher.steps = args.teacher_steps
    cfg.phases = [teacher]
    return cfg


def method_config(base, method: str, steps: int, args, out: Path):
    cfg = dataclasses.replace(base, output_dir=str(out),
                              train=dataclasses.replace(base.train, checkpoint_every=0, keep_checkpoints=1))
    phase = PhaseConfig(name=method, kind="tf_cm", objective=method, steps=steps, init_from="teacher",
                        teacher_from="teacher", optim=method_optim(method, args),
                        ema_decay=args.ema_decay, objective_args=method_args(method, args.arg))
    cfg.phases = [base.phases[0], phase]
    validate_run(cfg)
    return cfg


def method_optim(method: str, args) -> OptimConfig:
    lr, betas = METHOD_OPTIM[method]
    return OptimConfig(lr=lr if args.lr is None else args.lr, betas=list(betas if args.betas is None else args.betas))


def method_args(method: str, overrides) -> dict:
    """METHOD_ARGS[method] with the ``--arg METHOD.KEY=VALUE`` overrides for this method (YAML-typed values)."""
    import yaml

    out = dict(METHOD_ARGS[method])
    for item in overrides or ():
        name, sep, value = item.partition("=")
        m, dot, key = name.partition(".")
        if not (sep and dot and key) or m not in METHODS:
            raise SystemExit(f"--arg {item!r}: expected METHOD.KEY=VALUE with METHOD in {list(METHODS)}")
        if m == method:
            out[key] = yaml.safe_load(value)
    return out


def teacher_key(cfg) -> str:
    """Hash of what the teacher and its reference samples depend on (not logging or checkpoint cadence)."""
    parts = {k: getattr(cfg, k) for k in ("seed", "model", "causal", "data", "eval")}
    parts["phase"], parts["precision"] = cfg.phases[0], cfg.train.precision
    return hashlib.sha256(repr(sorted(parts.items())).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------- teacher
def train_teacher(base, cache_dir: Path, device: str, quiet: bool) -> Path:
    """The teacher run directory (phases/teacher, its reference samples, the feature extractor)."""
    out = cache_dir / f"teacher-{teacher_key(base)}"
    if (out / "phases" / "teacher" / "eval_teacher_samples.safetensors").exists():
        print(f"teacher: reusing {out}")
        return out
    cfg = dataclasses.replace(base, output_dir=str(out))
    print(f"teacher: training {cfg.phases[0].steps} steps into {out}")
    t0 = time.perf_counter()
    Trainer(cfg, device=device, logger=_logger(out, cfg, quiet)).run()
    print(f"teacher: {time.perf_counter() - t0:.1f} s")
    return out


def _logger(out, cfg, quiet):
    stream = open(os.devnull, "w") if quiet else None
    return RunLogger(out, cfg.train.log_every, tensorboard=False, stream=stream)


def link_teacher(teacher_dir: Path, out: Path) -> None:
    """A fresh method run directory that sees the cached teacher phase and feature extractor."""
    if out.exists():
        shutil.rmtree(out)
    (out / "phases").mkdir(parents=True)
    (out / "phases" / "teacher").symlink_to((teacher_dir / "phases" / "teacher").resolve(), target_is_directory=True)
    (out / "eval").symlink_to((teacher_dir / "eval").resolve(), target_is_directory=True)


# ---------------------------------------------------------------------------------------------- compute
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _best_seconds(fn, device, reps: int, warmup: int = 2) -> float:
    """Fastest of ``reps`` timed calls: the least disturbed by other work on a shared machine."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def _tokens(segments) -> int:
    return sum(s.latents.numel() for s in segments)


@contextlib.contextmanager
def count_network_passes(models: dict):
    """Record every ``forward_segments`` call of the given models: (who, tokens, tangent, builds graph)."""
    calls = []

    def wrap(name, model):
        inner = model.forward_segments

        def counted(segments, *a, **kw):
            tangent = any(s.tangent is not None or s.timestep_tangent is not None for s in segments)
            graph = torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
            calls.append((name, _tokens(segments), tangent, graph))
            return inner(segments, *a, **kw)
        model.forward_segments = counted

    for name, model in models.items():
        wrap(name, model)
    try:
        yield calls
    finally:
        for model in models.values():
            del model.forward_segments


def unit_costs(trainer, model, batch, reps: int, fixed: dict | None = None) -> dict:
    """Measured cost of a JVP pass and of a backward, in forwards of the TF sequence (same shapes);
    ``fixed`` = {"jvp": .., "bwd": ..} replaces the measurement (to repeat an earlier budget -> steps mapping)."""
    net, x0, cond = Denoiser(model), batch["latents"], Condition.from_batch(batch)
    x, s = torch.randn_like(x0), torch.full((x0.shape[0], net.frames(x0)), 0.5, device=x0.device)
    dx, ds = torch.randn_like(x), torch.ones_like(s)
    dev = trainer.device

    def fwd():
        with torch.no_grad():
            net.teacher_forcing(x0, x, s, cond)

    def jvp():
        with torch.no_grad():
            net.teacher_forcing(x0, x, s, cond, tangent=dx, s_tangent=ds)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        net.teacher_forcing(x0, x, s, cond)[0].square().mean().backward()

    tf_, tj, tfb = (_best_seconds(f, dev, reps) for f in (fwd, jvp, fwd_bwd))
    model.zero_grad(set_to_none=True)
    units = {"fwd_ms": 1e3 * tf_, "jvp": tj / tf_, "bwd": max(tfb / tf_ - 1.0, 0.0), "unit_tokens": 2 * x0.numel()}
    return {**units, **{k: v for k, v in (fixed or {}).items() if v is not None}}


def step_cost(trainer, cfg, units: dict, reps: int) -> dict:
    """FE per training step of the method in ``cfg.phases[1]`` (counted passes x measured units) and its
    measured wall time (loss + backward + optimizer step)."""
    phase = cfg.phases[1]
    student = trainer._init_student(phase, cfg.seed)
    teacher = trainer._frozen(phase.teacher_from)
    objective = build_objective(phase, PhaseModels(Denoiser(teacher)))
    side = objective.side_modules()
    for module in side:
        module.to(trainer.device)
    batch = trainer._to_device(next(iter(trainer.make_data(phase))))
    net, late = Denoiser(student), StepContext(10**9)  # a late step: sCM's tangent warm-up is over
    with count_network_passes({"student": student, "teacher": teacher}) as calls:
        loss, _ = objective.loss(net, batch, late)
        loss.backward()
    fe, parts = 0.0, []
    for who, tokens, tangent, graph in calls:
        w = tokens / units["unit_tokens"]
        cost = w * (units["jvp"] if tangent else 1.0) + (w * units["bwd"] if graph else 0.0)
        fe += cost
        parts.append(f"{who} {'jvp' if tangent else 'fwd'}{'+bwd' if graph else ''} ×{w:g}")
    params = [p for p in student.parameters() if p.requires_grad]
    params += [p for m in side for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)

    def train_step():
        opt.zero_grad(set_to_none=True)
        objective.loss(net, batch, late)[0].backward()
        opt.step()

    ms = 1e3 * _best_seconds(train_step, trainer.device, reps)
    return {"fe": fe, "passes": ", ".join(parts), "step_ms": ms}


# ---------------------------------------------------------------------------------------------- quality
def budget_fractions(points: int) -> list[float]:
    """0 plus a log-2 grid ending at the full budget: [0, 2^-(points-2), ..., 1/2, 1]."""
    return [0.0] + [2.0 ** -(points - 1 - k) for k in range(1, points)] if points > 1 else [0.0, 1.0]


class QualityProbe:
    """``Trainer.on_step`` hook: the quality number (``report.quality_rows``) of the EMA student at chosen steps."""

    def __init__(self, trainer, eval_at: dict[int, float]):
        self.trainer, self.eval_at, self.rows = trainer, eval_at, {}

    def measure(self, phase, model, teacher) -> dict:
        dev = self.trainer.device
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            rows, _ = quality_rows(self.trainer.report_context, phase, model, teacher,
                                   self.trainer.cfg.eval.student_steps)
        return dict(rows)

    def __call__(self, phase, step, student, ema_model, teacher):
        if step in self.eval_at:
            self.rows[step] = self.measure(phase, ema_model, teacher)


def run_method(base, method, teacher_dir, args, units=None):
    """Cost, then training with quality probes. Returns (cost dict, {fraction: (step, quality)})."""
    out = Path(args.work_dir) / method
    link_teacher(teacher_dir, out)
    probe_cfg = method_config(base, method, 1, args, out)
    trainer = Trainer(probe_cfg, device=args.device, logger=_logger(out, probe_cfg, args.quiet))
    if units is None:  # priced once, on a trainable copy of the teacher, and reused for every method
        phase = probe_cfg.phases[1]
        units = unit_costs(trainer, trainer._init_student(phase, base.seed),
                           trainer._to_device(next(iter(trainer.make_data(phase)))), args.reps,
                           fixed={"jvp": args.jvp_fe, "bwd": args.bwd_fe})
    cost = step_cost(trainer, probe_cfg, units, args.reps)
    steps = max(1, round(args.budget_fe / cost["fe"]))
    eval_at = {}
    for f in budget_fractions(args.points):
        eval_at.setdefault(round(f * steps), f)
    cfg = method_config(base, method, steps, args, out)
    trainer = Trainer(cfg, device=args.device, logger=_logger(out, cfg, args.quiet))
    probe = QualityProbe(trainer, eval_at)
    if 0 in eval_at:  # every method starts from the teacher's weights
        teacher = trainer._frozen("teacher")
        probe.rows[0] = probe.measure(cfg.phases[1], teacher, teacher)
    trainer.on_step = probe
    t0 = time.perf_counter()
    trainer.run_phase(1)
    cost.update(steps=steps, wall_s=time.perf_counter() - t0)
    print(f"{method}: {steps} steps, {cost['fe']:.2f} FE/step, {cost['wall_s']:.1f} s (training + probes)")
    return units, cost, {eval_at[s]: (s, q) for s, q in sorted(probe.rows.items())}


# ---------------------------------------------------------------------------------------------- report
def _f(x, fmt):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def budget_to_match(curves: dict, reference: str, key: tuple[int, str]):
    """Budget fraction at which each method first reaches the reference method's best trained value of
    ``key`` (lower is better); None where it never does. Empty when training did not improve on budget 0."""
    if reference not in curves:
        return {}
    ref = curves[reference]
    value = lambda q: q[key[0]][key[1]]
    trained = [value(q) for f, (_, q) in ref.items() if f > 0]
    if not trained or 0.0 not in ref or min(trained) >= value(ref[0.0][1]):
        return {}
    target = min(trained)
    out = {}
    for method, curve in curves.items():
        hit = [f for f, (_, q) in sorted(curve.items()) if value(q) <= target]
        out[method] = hit[0] if hit else None
    return out


def format_report(curves, costs, units, args, device_name, teacher_acc, command) -> str:
    b = args.budget_fe
    pricing = "measured" if args.jvp_fe is None and args.bwd_fe is None else "fixed by --jvp-fe/--bwd-fe where given"
    lines = [f"## Convergence at equal compute: dCM vs sCM vs MeanFlow — {datetime.date.today().isoformat()}", "",
             f"Device: {device_name}. Command: `{command}`", "",
             f"Compute: forward-equivalents (FE) — 1 FE = one no-grad student forward of the teacher-forcing "
             f"sequence at the training batch; here: forward {units['fwd_ms']:.2f} ms (measured), JVP pass = "
             f"{units['jvp']:.2f} FE, backward = {units['bwd']:.2f} FE ({pricing}). Every network call of one training step is "
             f"counted and priced with these (×w below: the call's tokens relative to the unit, 2 for CFG's batched "
             f"cond + uncond). Budget {b:g} FE per method; evaluation is not charged.", "",
             "| method | FE / step | passes in one step | ms / step | steps for the budget |", "|---|---|---|---|---|"]
    for m, c in costs.items():
        lines.append(f"| {m} | {c['fe']:.2f} | {c['passes']} | {c['step_ms']:.1f} | {c['steps']} |")
    lines += ["", f"Quality of the EMA student vs the teacher's {args.eval_teacher_steps}-step CFG ODE samples "
              f"({args.num_videos} prompts, same seeds); teacher motion accuracy {teacher_acc:.3f}. "
              "Budget 0 = the teacher's weights sampled in 1/2 steps.", "",
              "| method | budget (FE) | step | 1-step mse | 1-step fd | 1-step motion acc | 2-step mse | 2-step fd | "
              "2-step motion acc |", "|---|---|---|---|---|---|---|---|---|"]
    for m, curve in curves.items():
        for f, (step, q) in sorted(curve.items()):
            cells = [f"{q[k][n]:.4f}" if n != "motion_acc_student" else f"{q[k][n]:.3f}"
                     for k in (1, 2) for n in ("mse", "fd", "motion_acc_student")]
            lines.append(f"| {m} | {f * b:g} | {step} | " + " | ".join(cells) + " |")
    lines.append("")
    for key in ((1, "mse"), (1, "fd"), (2, "mse"), (2, "fd")):
        hit = budget_to_match(curves, "dcm", key)
        what = f"dCM's best {key[0]}-step {key[1]}"
        lines.append(f"- Budget to first reach {what}: " + (", ".join(
            f"{m} {_f(None if f is None else f * b, 'g')} FE" for m, f in hit.items()) if hit
            else "n/a (dCM did not improve on budget 0)") + ".")
    return "\n".join(lines) + "\n"


def device_description(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (model/data/eval/teacher phase)")
    ap.add_argument("--recipe", default=str(RECIPE))
    ap.add_argument("--methods", default=",".join(available_methods()))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--teacher-steps", type=int, default=None, help="default: the recipe's teacher phase")
    ap.add_argument("--budget-fe", type=float, default=12000.0, help="forward-equivalents per method")
    ap.add_argument("--points", type=int, default=7, help="budget points: 0 and a log-2 grid up to the budget")
    ap.add_argument("--lr", type=float, default=None, help="every method's lr (default: METHOD_OPTIM's)")
    ap.add_argument("--betas", type=lambda v: [float(b) for b in v.split(",")], default=None,
                    help="AdamW betas of every method's optimizer, e.g. 0.9,0.99 (default: METHOD_OPTIM's)")
    ap.add_argument("--arg", action="append", default=[], metavar="METHOD.KEY=VALUE",
                    help="override one objective argument of one method, e.g. scm.sigma_d=1.0 (repeatable)")
    ap.add_argument("--ema-decay", type=float, default=0.95)
    ap.add_argument("--reps", type=int, default=5, help="timing repetitions for the cost measurement")
    ap.add_argument("--jvp-fe", type=float, default=None, help="price a JVP pass at this many FE (default: measure)")
    ap.add_argument("--bwd-fe", type=float, default=None, help="price a backward at this many FE (default: measure)")
    ap.add_argument("--cache-dir", default="runs/convergence_cache")
    ap.add_argument("--work-dir", default="runs/convergence")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    ap.add_argument("--quiet", action="store_true", help="no trainer log lines")
    ap.add_argument("--out-md", default=None, help="also write the markdown section to this file")
    ap.add_argument("--write-results", action="store_true", help=f"append the section to {RESULTS}")
    args = ap.parse_args(argv)
    if args.quick:
        args.overrides = QUICK["overrides"] + list(args.overrides)
        for k in ("teacher_steps", "budget_fe", "points"):
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, QUICK[k])
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS or m not in objectives()]
    if unknown:
        ap.error(f"--methods: {unknown} not available here; choose from {available_methods()}")
    return args


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    base = base_config(args)
    args.eval_teacher_steps, args.num_videos = base.eval.teacher_steps, base.eval.num_videos
    teacher_dir = train_teacher(base, Path(args.cache_dir), args.device, args.quiet)
    curves, costs, units = {}, {}, None
    command = "python benchmarks/convergence.py " + " ".join(shlex.quote(a) for a in argv)
    for method in args.methods:
        units, costs[method], curves[method] = run_method(base, method, teacher_dir, args, units)
        teacher_acc = curves[args.methods[0]][0.0][1][1]["motion_acc_teacher"]
        report = format_report(curves, costs, units, args, device_description(args.device), teacher_acc, command)
        if args.out_md:  # after every method, so a run cut short still leaves its finished rows
            Path(args.out_md).write_text(report)
    print(report)
    if args.write_results:
        with open(RESULTS, "a") as f:
            f.write("\n" + report)
    return {"curves": curves, "costs": costs, "units": units, "report": report}


if __name__ == "__main__":
    main()
