"""Where a (re)started trainer begins in its run folder: the rules of README "Checkpoints and resume".

A run folder holds ``config.yaml`` (written at the first start), ``config.resume-N.yaml`` (one per
resume that changed settings; the newest describes the folder, :func:`effective_config_path`),
``checkpoints/step_N/`` (:mod:`.dist_checkpoint`) and ``phases/<name>/{model,ema}.safetensors``.

**Finished phase**: ``phases/<name>/done.json`` is written right after the phase's weights, holding
their sizes and sha256 and the phase's result (steps, final loss, skipped steps); its ``report`` field
is ``pending`` until the end-of-phase report has run, then ``done`` (``skipped`` with
``eval.at_phase_end=false``). A phase is finished when its done.json is there and its weights match it
(their sizes; their sha256 too when the run continues from them instead of from a checkpoint).

**Modes** (:func:`plan_start`; the ``train`` flags ``--restart`` / ``--from-finished-phases``):

- ``auto``: a folder without checkpoints or finished phases starts at phase 0. Otherwise the newest
  checkpoint that verifies is resumed, unless finished phases reach beyond it: then the run continues
  at the first unfinished phase from their weights (running a report still pending). Checkpoints that
  exist but none verifies: :class:`ResumeError` naming the bad files and the two choices below; nothing
  is touched.
- ``finished_phases``: continue at the first unfinished phase from the finished phases' weights; the
  checkpoints are moved aside to ``previous-N/`` (a later save must not mix with them).
- ``restart``: start over; ``checkpoints/``, ``phases/``, ``samples/`` and the config files are moved
  to ``previous-N/`` (nothing is deleted).

A resume compares the config with the folder's effective one: ``model.*``, ``causal.*``, the data keys
(``data.*`` but ``batch_size``, ``num_workers``, ``shard_dir``) and any key of a finished phase are
refused, naming them (and the identity - name, kind, objective, init_from, teacher_from - of a phase
resumed mid-way); other changes are written to the next ``config.resume-N.yaml`` and printed.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config.errors import ConfigError, UsageError
from ..utils.files import sha256_file

DONE = "done.json"
CONFIG = "config.yaml"
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")
MODES = ("auto", "restart", "finished_phases")
_RESUME_CONFIG = re.compile(r"config\.resume-(\d+)\.yaml")
_PREVIOUS = re.compile(r"previous-(\d+)")
# data keys that do not change what the saved weights were trained on
_DATA_KEYS_ALLOWED = {"data.batch_size", "data.num_workers", "data.shard_dir"}
_PHASE_IDENTITY = ("name", "kind", "objective", "init_from", "teacher_from")
_ABSENT = "<absent>"


class ResumeError(UsageError):
    """The run folder cannot be resumed as asked; the message says what to do instead."""


# ---------------------------------------------------------------------------------------------- finished phases
def write_done(phase_dir, index: int, result: dict, report: str) -> Path:
    """Mark a phase finished: call right after its weights are written (hashes them)."""
    from .checkpoint import atomic_write_text

    phase_dir = Path(phase_dir)
    files = {n: {"bytes": (phase_dir / n).stat().st_size, "sha256": sha256_file(phase_dir / n)} for n in WEIGHT_FILES}
    record = {"format": "megatron-rcm-phase-done-1", "phase": result["name"], "index": index, "result": result,
              "report": report, "files": files, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_text(phase_dir / DONE, json.dumps(record, indent=1) + "\n")
    return phase_dir / DONE


def mark_reported(phase_dir, metrics: dict, report: str = "done") -> None:
    """Record the end-of-phase report's outcome in done.json."""
    from .checkpoint import atomic_write_text

    record = read_done(phase_dir)
    if record is None:
        return
    record["report"] = report
    record["result"]["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    atomic_write_text(Path(phase_dir) / DONE, json.dumps(record, indent=1) + "\n")


def read_done(phase_dir) -> dict | None:
    try:
        return json.loads((Path(phase_dir) / DONE).read_text())
    except (OSError, ValueError):
        return None


def check_done(phase_dir, name: str, full: bool = True) -> str | None:
    """None when ``phase_dir`` holds a finished phase ``name`` whose weights match done.json (sizes; with
    ``full`` also sha256), else why not."""
    phase_dir = Path(phase_dir)
    record = read_done(phase_dir)
    if record is None:
        return f"{phase_dir / DONE} is missing or unreadable" if (phase_dir / DONE).exists() else None
    if record.get("phase") != name:
        return f"{phase_dir / DONE} describes phase {record.get('phase')!r}, not {name!r}"
    for n, meta in record.get("files", {}).items():
        p = phase_dir / n
        if not p.is_file():
            return f"{p} is missing ({phase_dir / DONE} lists it)"
        if p.stat().st_size != meta["bytes"] or (full and sha256_file(p) != meta["sha256"]):
            return f"{p} does not match {phase_dir / DONE} (size or sha256): it changed after the phase finished"
    return None


def finished_prefix(out, names: list[str], full: bool = True) -> tuple[list[dict], list[str]]:
    """(done records of the leading finished phases, problems found on the way); ``full``: see check_done."""
    records, problems = [], []
    for name in names:
        d = Path(out) / "phases" / name
        problem = check_done(d, name, full)
        if problem is not None:
            problems.append(problem)
        if problem is not None or not (d / DONE).exists():
            break
        records.append(read_done(d))
    return records, problems


def _any_done(out) -> bool:
    return any((Path(out) / "phases").glob(f"*/{DONE}"))


# ---------------------------------------------------------------------------------------------- config files
def config_files(out) -> list[Path]:
    """config.yaml, then config.resume-N.yaml by N (the ones that exist)."""
    out = Path(out)
    resumes = sorted((int(m.group(1)), p) for p in out.glob("config.resume-*.yaml")
                     if (m := _RESUME_CONFIG.fullmatch(p.name)))
    first = [out / CONFIG] if (out / CONFIG).is_file() else []
    return first + [p for _, p in resumes]


def effective_config_path(out) -> Path | None:
    """The config that describes the folder now: the newest of :func:`config_files`."""
    files = config_files(out)
    return files[-1] if files else None


def _next_number(out, pattern: re.Pattern, glob: str) -> int:
    used = [int(m.group(1)) for p in Path(out).glob(glob) if (m := pattern.fullmatch(p.name))]
    return max(used, default=0) + 1


def config_tree(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))


def saved_config_tree(path) -> dict:
    """A saved config with today's defaults filled in (so a field added since is not a change)."""
    from omegaconf import OmegaConf

    from ..config.run import load_config

    try:
        return config_tree(load_config(path))
    except ConfigError:  # written by another version: compare what it says
        return OmegaConf.to_container(OmegaConf.load(path))


def flatten(tree, prefix: str = "") -> dict:
    """Dotted keys -> leaf values; lists of dicts (phases) are indexed, other lists are leaves."""
    out = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, dict) or (isinstance(v, list) and v and all(isinstance(x, dict) for x in v)):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """key -> (old, new) for every key whose value differs (``output_dir`` is the folder itself)."""
    a, b = flatten(old), flatten(new)
    changes = {}
    for key in sorted(set(a) | set(b), key=_natural):
        if key == "output_dir":
            continue
        x, y = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if x != y and not (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)):
            changes[key] = (x, y)
    return changes


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in key.split(".")]


def refused_changes(changes: dict, old_phases: list[dict], finished: int, in_progress: int | None) -> list[str]:
    """The changes a resume cannot take, each as 'key old -> new (why)'."""
    refused = []
    for key, (x, y) in changes.items():
        why = None
        head = key.split(".")
        if head[0] in ("model", "causal"):
            why = "the architecture"
        elif head[0] == "data" and key not in _DATA_KEYS_ALLOWED:
            why = "the data"
        elif head[0] == "phases" and len(head) > 1 and head[1].isdigit():
            i = int(head[1])
            name = old_phases[i].get("name") if i < len(old_phases) else None
            if i < finished:
                why = f"phase '{name}' is finished"
            elif i == in_progress and len(head) > 2 and head[2] in _PHASE_IDENTITY:
                why = f"phase '{name}' is in progress"
        if why:
            refused.append(f"{key} {x} -> {y} ({why})")
    return refused


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class StartPlan:
    """Where to start, and what rank 0 does to the folder first (:func:`carry_out`)."""

    start_phase: int = 0
    checkpoint: str | None = None  # resume phase ``start_phase`` mid-way from this checkpoint
    results: list[dict] = field(default_factory=list)  # PhaseResult fields of the phases before start_phase
    pending_reports: list[int] = field(default_factory=list)  # finished phases whose report has not run
    set_aside: list[str] = field(default_factory=list)  # names in the folder to move to ``set_aside_to``
    set_aside_to: str = ""
    write_config: tuple[str, str] | None = None  # (file name, YAML)
    messages: list[str] = field(default_factory=list)


def effective_mode(mode: str, env=None, log=print) -> str:
    """The flags apply to a job's first attempt only: torchrun restarts resume their own checkpoints."""
    if mode not in MODES:
        raise ValueError(f"resume mode {mode!r}: expected one of {MODES}")
    env = os.environ if env is None else env
    attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if mode != "auto" and attempt > 0:
        log(f"torchrun restart attempt {attempt}: resuming this job's own progress (the start flag applied to "
            "attempt 0 only)")
        return "auto"
    return mode


def _choices(out: Path, names: list[str], finished: list[dict]) -> str:
    restart = (f"--restart starts over (checkpoints/, phases/, samples/ and the config files move to "
               f"{out}/previous-N/, nothing is deleted)")
    if not finished:
        return (f"re-run the same command with {restart}; no phase has finished (phases/<name>/{DONE}), so there are "
                "no weights to continue from")
    done = ", ".join(f"'{r['phase']}'" for r in finished)
    where = (f"continues at phase '{names[len(finished)]}'" if len(finished) < len(names)
             else "collects their results (all phases are finished)")
    return (f"re-run the same command with --from-finished-phases, which {where} from the weights of the finished "
            f"phase(s) {done} (the checkpoints move to {out}/previous-N/), or with {restart}")


def plan_start(cfg, out, mode: str, checkpoint=None, checkpoint_state: dict | None = None,
               bad: list[str] | None = None) -> StartPlan:
    """Decide where the run starts. ``checkpoint`` / ``checkpoint_state``: the newest checkpoint that
    verifies and its saved counters (auto mode), ``bad``: what was wrong with the others."""
    from ..config.run import to_yaml
    from .checkpoint import list_checkpoints

    out, bad = Path(out), list(bad or [])
    names = [p.name for p in cfg.phases]
    plan = StartPlan()
    previous = f"previous-{_next_number(out, _PREVIOUS, 'previous-*')}"
    if mode == "restart":
        plan.set_aside = [n for n in ("checkpoints", "phases", "samples") if (out / n).exists()]
        plan.set_aside += [p.name for p in config_files(out)]
        plan.set_aside_to = previous if plan.set_aside else ""
        plan.write_config = (CONFIG, to_yaml(cfg))
        return plan
    saved_path = effective_config_path(out)
    saved = saved_config_tree(saved_path) if saved_path is not None else None
    old_phases = list(saved.get("phases") or []) if saved else [{"name": n} for n in names]
    old_names = [str(p.get("name")) for p in old_phases]
    finished, problems = finished_prefix(out, old_names, full=False)  # sizes only: cheap for any model
    ck_next, in_progress = 0, None
    if checkpoint is not None:
        at = int(checkpoint_state["phase_index"])
        ck_next, in_progress = (at + 1, None) if checkpoint_state.get("phase_done") else (at, at)
    if mode == "auto":
        if checkpoint is None and list_checkpoints(out / "checkpoints"):
            raise ResumeError(f"no checkpoint in {out / 'checkpoints'} verifies ({'; '.join(bad) or 'none usable'}). "
                              f"Nothing was changed: {_choices(out, names, finished)}")
        if checkpoint is None and not finished and not (_any_done(out) or problems):
            # a new run, or one that never got to its first checkpoint: start at phase 0
            plan.set_aside = [p.name for p in config_files(out) if p.name != CONFIG]  # stale resume configs
            plan.set_aside_to = previous if plan.set_aside else ""
            plan.write_config = (CONFIG, to_yaml(cfg))
            return plan
    if mode == "finished_phases" or len(finished) > ck_next:  # the run starts from these weights: sha256 too
        finished, problems = finished_prefix(out, old_names, full=True)
    plan.messages += [f"[resume] not a finished phase: {why}" for why in problems]
    q = len(finished)
    if mode == "finished_phases":
        if not finished:
            why = f" ({'; '.join(problems)})" if problems else ""
            raise ResumeError(f"--from-finished-phases: no phase of {out} has finished (phases/<name>/{DONE} next to "
                              f"its weights){why}; re-run with --restart to start over")
        from_finished = True
        plan.set_aside = ["checkpoints"] if (out / "checkpoints").exists() else []
    else:
        from_finished = q > ck_next
        if checkpoint is None and not from_finished:  # finished-phase records, but not of a usable first phase
            raise ResumeError(f"{out} has no checkpoints and no usable finished first phase "
                              f"({'; '.join(problems) or 'the first phase has no ' + DONE}). "
                              "Nothing was changed: re-run the same command with --restart to start over")
    position = q if from_finished else ck_next
    if from_finished:
        in_progress = None
    if saved is not None:
        changes = config_changes(saved, config_tree(cfg))
        refused = refused_changes(changes, old_phases, position, in_progress)
        if refused:
            raise ResumeError(f"cannot resume {out} with these changes to {saved_path.name}: {', '.join(refused)}. "
                              f"Resume with the saved values, train into another output_dir, or re-run with "
                              "--restart to start over")
        if changes:
            name = f"config.resume-{_next_number(out, _RESUME_CONFIG, 'config.resume-*.yaml')}.yaml"
            plan.write_config = (name, to_yaml(cfg))
            listed = ", ".join(f"{k} {x} -> {y}" for k, (x, y) in changes.items())
            plan.messages.append(f"[resume] changed settings: {listed} (written to {out / name}; {saved_path.name} "
                                 "keeps what the run had)")
    else:
        plan.write_config = (CONFIG, to_yaml(cfg))
    if from_finished:
        plan.start_phase = q
        plan.results = [r["result"] for r in finished]
        plan.pending_reports = [i for i, r in enumerate(finished) if r.get("report") == "pending"]
        where = f"at phase '{names[q]}'" if q < len(names) else "with nothing left to train"
        plan.messages.append(f"[resume] continuing {where} from the finished phase(s) "
                             f"{', '.join(r['phase'] for r in finished)} (phases/<name>/{DONE})")
    else:
        plan.start_phase = ck_next
        plan.checkpoint = None if in_progress is None else str(checkpoint)
        plan.results = list(checkpoint_state.get("results", []))
        plan.messages.append(f"resuming from {checkpoint} (phase {ck_next}, step {checkpoint_state['phase_step']})")
    if plan.set_aside:
        plan.set_aside_to = previous
    return plan


def carry_out(out, plan: StartPlan, log=print) -> None:
    """Rank 0: move what the plan sets aside, write its config file, print its messages."""
    from .checkpoint import atomic_write_text

    out = Path(out)
    if plan.set_aside:
        dest = out / plan.set_aside_to
        dest.mkdir(parents=True)
        for name in plan.set_aside:
            os.replace(out / name, dest / name)
        log(f"[resume] moved {', '.join(plan.set_aside)} to {dest} (nothing is deleted; remove it when no longer "
            "needed)")
    if plan.write_config is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / plan.write_config[0], plan.write_config[1])
    for message in plan.messages:
        log(message)
