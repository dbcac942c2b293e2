"""``megatron-rcm``: the command line. Each subcommand is a thin shim over a library function."""
from __future__ import annotations

import argparse
import sys

from .config.errors import ConfigError


def _cmd_train(args) -> int:
    from .config.run import load_config
    from .data.checks import check_data

    cfg = load_config(args.config, args.overrides)  # before torch is imported: config errors are instant
    check_data(cfg)  # shard folders vs the config, before any run folder exists
    from .training.trainer import Trainer

    start = "restart" if args.restart else "finished_phases" if args.from_finished_phases else "auto"
    trainer = Trainer(cfg, device=args.device, start=start)
    results = trainer.run()
    if not trainer.par.is_main:  # under torchrun only rank 0 reports
        return 0
    for r in results:
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.metrics.items())
        print(f"phase {r.name}: {r.steps} steps, final loss {r.final_loss:.4g}, skipped {r.skipped_steps} {extra}")
    return 0


def _cmd_info(args) -> int:
    from .config.run import load_config, to_yaml
    from .models import build_model

    cfg = load_config(args.config, args.overrides)
    model = build_model(cfg.model, cfg.causal, device="meta")
    n = sum(p.numel() for p in model.parameters())
    print(to_yaml(cfg))
    print(f"parameters: {n:,} ({n / 1e9:.3f} B)")
    if args.gpus is not None:
        from .training.memory_plan import format_plan, plan_run

        if args.gpus < 1:
            raise ConfigError("--gpus", args.gpus, "the number of GPUs, >= 1")
        teachers = _teacher_architectures(cfg, args.teacher_preset)
        print()
        print(format_plan(plan_run(cfg, args.gpus, teachers), cfg.parallel.resolved(args.gpus), args.gpus,
                          args.gpu_memory))
    return 0


def _teacher_architectures(cfg, preset: str | None) -> dict:
    """The architecture of each ``teacher_from: diffusers:DIR`` (its folder's; ``--teacher-preset`` where the
    folder is not here, e.g. planning on a laptop); earlier phases' teachers are the run's model."""
    from .config.model import MODEL_PRESETS, model_preset

    if preset is not None and preset not in MODEL_PRESETS:
        raise ConfigError("--teacher-preset", preset, f"one of {sorted(MODEL_PRESETS)}")
    out = {}
    for i, phase in enumerate(cfg.phases):
        src = phase.teacher_from
        if not src.startswith("diffusers:"):
            continue
        from .convert.into_run import DiffusersSourceError, teacher_model_config, with_architecture

        if preset is not None:
            out[src] = with_architecture(cfg.model, model_preset(preset), preset)
            continue
        try:
            out[src] = teacher_model_config(src, cfg.model, f"phases.{i}.teacher_from")
        except DiffusersSourceError as e:
            raise DiffusersSourceError(e.key, f"{e.allowed}; or plan without the folder: --teacher-preset NAME "
                                       f"(one of {sorted(MODEL_PRESETS)})") from None
    return out


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", help="YAML run config (see examples/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. phases.0.steps=50 model.num_layers=2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-rcm", description=__doc__)
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="intra-op CPU threads per process (default: OMP_NUM_THREADS if set, else the CPUs of "
                        "this process's affinity divided by the ranks on this node)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="run the training phases of a config (teacher -> TF-CM -> SF-DMD)",
                       description="Run the phases of CONFIG into its output_dir; an existing run folder is resumed "
                       "(README: Checkpoints and resume).")
    _add_config_args(p)
    p.add_argument("--device", default="cpu")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--restart", action="store_true", help="start over: the folder's checkpoints/, phases/, "
                       "samples/ and configs move to OUTPUT_DIR/previous-N/ (nothing is deleted)")
    start.add_argument("--from-finished-phases", action="store_true", help="continue at the first unfinished phase "
                       "from the finished phases' weights (phases/<name>/done.json), setting the checkpoints aside")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("info", help="print the resolved config, the model size and (--gpus N) the memory plan")
    _add_config_args(p)
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="print the per-GPU memory plan of every phase on N GPUs (layout: parallel.* overrides)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                   help="with --gpus: warn for each phase whose plan exceeds this many GiB per GPU (H200: 139)")
    p.add_argument("--teacher-preset", default=None, metavar="NAME",
                   help="with --gpus: architecture of diffusers:DIR teachers (default: read DIR/config.json)")
    p.set_defaults(func=_cmd_info)

    from .inference.cli import add_run_dir_commands

    add_run_dir_commands(sub)

    from .inference.serve import add_serve_command

    add_serve_command(sub)

    from .data.cli import add_encode_data_command

    add_encode_data_command(sub)

    from .launch import add_launch_arguments, run_launch

    p = sub.add_parser("launch", help="start a (multi-node / SLURM) torchrun job: launch [opts] -- train CFG ...")
    add_launch_arguments(p)
    p.set_defaults(func=run_launch)

    try:
        from .convert.cli import add_convert_arguments, run_convert

        p = sub.add_parser("convert", help="convert between diffusers WanTransformer3DModel folders and our checkpoints")
        add_convert_arguments(p)
        p.set_defaults(func=run_convert)
    except ImportError:
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # key=value overrides after an option (`info CFG --gpus 8 parallel.tp=2`) join the others
            if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.overrides = list(args.overrides) + extra
    except SystemExit as e:  # argparse printed usage + the error (or --help); main() still returns the code
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"error: --threads {args.threads}: expected a positive number of threads", file=sys.stderr)
        return 2
    if args.command != "launch":  # launch sets its workers' threads itself
        from .utils.threads import configure_threads

        configure_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        if not getattr(e, "quiet", False):  # quiet: rank 0 of this torchrun job has said it
            print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
