"""The run config: YAML file + ``key=value`` overrides -> a validated, typed :class:`RunConfig`.

omegaconf structured configs give type checking and unknown-key detection for free; every failure
is re-raised as :class:`ConfigError` naming the full key, so users see ``phases.1.steps`` instead of
a stack trace. Cross-field checks (heads vs hidden, chunk vs frames, parallel sizes) run here too,
before any model is built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..encoders.config import EncodersConfig, validate_encoders
from ..parallel.config import ParallelConfig, validate_parallel
from .data import DataConfig, validate_data
from .errors import ConfigError
from .model import MODEL_PRESETS, CausalConfig, ModelConfig, model_preset, validate_causal, validate_model

PHASE_KINDS = ("teacher", "tf_cm", "sf_dmd")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: float = 1.0


@dataclass
class PhaseConfig:
    """One training phase: which objective trains which model, for how long."""

    name: str = MISSING
    kind: str = MISSING  # teacher | tf_cm | sf_dmd
    objective: str = MISSING  # flow_matching | dcm | scm | meanflow | dmd | rcm
    steps: int = 100
    batch_size: int = 0  # 0 = data.batch_size
    init_from: str = "scratch"  # scratch | <earlier phase name> | diffusers:<dir>
    teacher_from: str = ""  # earlier phase whose EMA weights are the frozen teacher ("" = none)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema_decay: float = 0.99
    objective_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    activation_checkpointing: bool = False
    # with activation_checkpointing: recompute only the first N transformer blocks this rank runs (0 = all);
    # the rest keep their activations, trading memory for the recomputation (Megatron's recompute_num_layers)
    checkpoint_layers: int = 0
    # with activation_checkpointing: a checkpointed block keeps each self-attention's output and log-sum-exp for its
    # recompute, which then skips the attention kernel (ops/kept_attention.py). Costs about one compute-dtype copy of
    # the block's input per checkpointed block (the memory plan counts it); on an H200 the 1.3B TF-sCM step ran 6%
    # and the SF-DMD step 10% faster for +5.5 and +2.9 GiB (benchmarks/RESULTS.md, twelfth session). Backends with a
    # separate backward only (the fused CUDA kernels, the reference); elsewhere no effect
    checkpoint_keep_attention: bool = True
    # CUDA only: fuse the norm / modulation / gate / GELU / RoPE chains with torch.compile (ops/fusion.py);
    # costs a compile per new shape family at start-up, CPU runs stay eager
    compile_elementwise: bool = False
    # with compile_elementwise: calls on tensors of fewer elements stay eager (a compiled call costs the host more;
    # short self-forcing chunk calls are host-bound; ops/fusion.py). 0 = compile every call. On an H200 the 1.3B
    # TF-sCM step is faster compiled; the SF-DMD step is faster with 45000000 (its 4,680-token chunk calls eager, its
    # whole-video calls compiled: 0.95x the eager step) than eager or compiling every call (RESULTS.md, twelfth session)
    compile_min_elements: int = 0
    # with compile_elementwise: how a call finds its compiled graph: "dynamo" (torch.compile's guards) or "own" (one
    # traced graph per call signature in a dict: about a third less host cost per call on the CPU; ops/fusion.py)
    compile_guards: str = "dynamo"
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    async_checkpoint: bool = False  # write checkpoints in a background thread (flushed before the next)
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    grad_accum: int = 1  # micro-batches per optimizer step (each rank's rows split evenly; same noise as 1)


@dataclass
class EvalConfig:
    num_videos: int = 16
    student_steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    teacher_steps: int = 32
    teacher_shift: float = 1.0  # flow shift of the teacher's reference ODE (Wan2.1 at 480p samples with 3)
    cfg_scale: float = 3.0
    seed: int = 1234
    at_phase_end: bool = True  # false: skip the end-of-phase sample video + quality report (quick runs, tests)


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    causal: CausalConfig = field(default_factory=CausalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    phases: list[PhaseConfig] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # used under torchrun (WORLD_SIZE > 1)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)  # frozen umT5 + VAE (real Wan runs)


def _key_of(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    return str(key) if key else "<config>"


def _is_objective_arg(key: str) -> bool:
    """``phases.N.objective_args.KEY`` (also nested: ``...objective_args.rollout.shift``)."""
    parts = key.split(".")
    return len(parts) >= 4 and parts[0] == "phases" and parts[2] == "objective_args"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load YAML + dotlist overrides onto the schema, apply the model preset, validate."""
    overrides = list(overrides or [])
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(bad[0], bad[0], "overrides of the form key=value (e.g. phases.0.steps=50)")
    try:
        schema = OmegaConf.structured(RunConfig)
        user = OmegaConf.load(path) if path else OmegaConf.create()
        dotlist = OmegaConf.from_dotlist(overrides)
        preset = OmegaConf.select(dotlist, "model.preset", default=None) or \
            OmegaConf.select(user, "model.preset", default=ModelConfig.preset)
        if preset not in MODEL_PRESETS:
            raise ConfigError("model.preset", preset, f"one of {sorted(MODEL_PRESETS)}")
        merged = OmegaConf.merge(schema, {"model": OmegaConf.structured(model_preset(preset))}, user)
        for item in overrides:  # one at a time so list entries (phases.0.steps=...) can be addressed
            key, value = item.split("=", 1)
            # objective_args are free-form here (checked against the objective's config class by
            # validate_run, naming the key), so a key the YAML left at its default may be added
            new_arg = _is_objective_arg(key) and OmegaConf.select(merged, key.rsplit(".", 1)[0],
                                                                   default=None) is not None
            if not new_arg and OmegaConf.select(merged, key, default="__missing__") == "__missing__":
                raise ConfigError(key, value, "an existing config key (see `megatron-rcm info CONFIG`)")
            OmegaConf.update(merged, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=True, force_add=new_arg)
        cfg: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        msg = str(err).splitlines()[0]
        raise ConfigError(_key_of(err), getattr(err, "value", None), f"a valid value ({msg})") from None
    validate_run(cfg)
    return cfg


def validate_run(cfg: RunConfig) -> None:
    validate_model(cfg.model)
    validate_data(cfg.data)
    validate_encoders(cfg.encoders)
    for data_key, model_key in (("channels", "in_channels"), ("text_dim", "text_dim"), ("text_len", "text_len"),
                                ("action_dim", "action_dim")):
        if getattr(cfg.data, data_key) != getattr(cfg.model, model_key):
            raise ConfigError(f"data.{data_key}", getattr(cfg.data, data_key),
                              f"model.{model_key} = {getattr(cfg.model, model_key)} (the two must agree)")
    if cfg.model.image_dim is not None and cfg.data.kind == "synthetic":
        raise ConfigError("model.image_dim", cfg.model.image_dim, "null with data.kind=synthetic (the synthetic set has "
                          "no image-encoder tokens); the image-to-video layout trains from latent shards holding "
                          "'image_context' [L, image_dim] per sample")
    if cfg.model.image_dim is not None and cfg.eval.at_phase_end:
        raise ConfigError("eval.at_phase_end", True, "false with model.image_dim set: the end-of-phase samplers do not "
                          "feed image contexts yet")
    frames = cfg.data.num_frames // int(cfg.model.patch_size[0])
    validate_causal(cfg.causal, num_frames=frames)
    ph, pw = int(cfg.model.patch_size[1]), int(cfg.model.patch_size[2])
    if cfg.data.height % ph or cfg.data.width % pw:
        raise ConfigError("data.height/width", (cfg.data.height, cfg.data.width), f"multiples of the patch {ph}x{pw}")
    if cfg.train.compile_min_elements < 0:
        raise ConfigError("train.compile_min_elements", cfg.train.compile_min_elements,
                          ">= 0 (0 compiles every call when train.compile_elementwise is on)")
    if cfg.train.compile_guards not in ("dynamo", "own"):
        raise ConfigError("train.compile_guards", cfg.train.compile_guards, "'dynamo' or 'own'")
    if cfg.train.checkpoint_layers < 0:
        raise ConfigError("train.checkpoint_layers", cfg.train.checkpoint_layers,
                          "an integer >= 0 (0 = checkpoint every block)")
    if cfg.train.grad_accum < 1:
        raise ConfigError("train.grad_accum", cfg.train.grad_accum, "an integer >= 1")
    if cfg.train.precision not in ("fp32", "bf16"):
        raise ConfigError("train.precision", cfg.train.precision, "fp32 or bf16")
    validate_eval(cfg.eval)
    seen: list[str] = []
    for i, phase in enumerate(cfg.phases):
        key = f"phases.{i}"
        if phase.kind not in PHASE_KINDS:
            raise ConfigError(f"{key}.kind", phase.kind, f"one of {PHASE_KINDS}")
        if phase.steps < 0:
            raise ConfigError(f"{key}.steps", phase.steps, ">= 0")
        if phase.name in seen:
            raise ConfigError(f"{key}.name", phase.name, "a name not used by an earlier phase")
        for ref_key in ("init_from", "teacher_from"):
            ref = getattr(phase, ref_key)
            if ref and ref != "scratch" and not ref.startswith("diffusers:") and ref not in seen:
                raise ConfigError(f"{key}.{ref_key}", ref, f"'scratch', 'diffusers:<dir>' or an earlier phase: {seen}")
        seen.append(phase.name)
    validate_run_parallel(cfg)
    # last: checking objective_args imports the objectives (and torch), so every other mistake is reported instantly
    from ..training.registry import validate_objective  # objectives depend on config, not vice versa

    for i, phase in enumerate(cfg.phases):
        validate_objective(phase, f"phases.{i}", cfg.model)


def validate_eval(e: EvalConfig) -> None:
    """The end-of-phase report's settings, checked at load: a bad value would otherwise fail after a phase trained."""
    steps = list(e.student_steps)
    if not steps or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in steps):
        raise ConfigError("eval.student_steps", steps, "a non-empty list of positive step counts, e.g. [1, 2, 4]")
    if len(set(steps)) != len(steps):
        raise ConfigError("eval.student_steps", steps, "step counts without repeats")
    if e.teacher_steps < 1:
        raise ConfigError("eval.teacher_steps", e.teacher_steps, "a positive number of ODE steps for the reference")
    if e.num_videos < 1:
        raise ConfigError("eval.num_videos", e.num_videos, "at least 1 prompt (2+ for the Frechet distance)")
    if not math.isfinite(e.cfg_scale) or e.cfg_scale < 0:
        raise ConfigError("eval.cfg_scale", e.cfg_scale, "a finite guidance scale >= 0 (1 = no guidance)")
    if e.seed < 0:
        raise ConfigError("eval.seed", e.seed, "an integer >= 0")


def validate_run_parallel(cfg: RunConfig, world_size: int | None = None) -> None:
    """Layout checks that need the model and the phases (and, at launch, the world size).

    Teacher and TF phases run the [clean ; noisy] sequence (2x the patched frames); self-forcing
    phases run KV-cached chunks (context parallelism splits each chunk by frames) and block-causal
    score passes over the video's frames. Each phase's global batch is split evenly over the
    data-parallel ranks.
    """
    from ..training.registry import objective_class  # objectives depend on config, not vice versa

    par = cfg.parallel
    for key in ("tp", "cp", "pp"):
        v = getattr(par, key)
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"parallel.{key}", v, "an integer >= 1")
    if par.dp != -1 and par.dp < 1:
        raise ConfigError("parallel.dp", par.dp, "an integer >= 1 or -1 (auto: world size / (tp*cp*pp))")
    par.validate_options()
    if world_size is not None:
        par = par.resolved(world_size)
    frames = cfg.data.num_frames // int(cfg.model.patch_size[0])
    validate_parallel(par, cfg.model)
    for i, phase in enumerate(cfg.phases):
        cls = objective_class(phase, f"phases.{i}")
        self_forcing = cls.self_forcing
        if self_forcing:  # KV-cached chunks are split by frames; cp | frames and cp | chunk_frames imply that cp
            # divides the first chunk (frames - k x chunk_frames) too
            validate_parallel(par, cfg.model, num_frames=frames, chunk_frames=cfg.causal.chunk_frames)
        for sequence in cls.sequences:  # the [clean ; noisy] sequence has twice the video's frames
            validate_parallel(par, cfg.model, num_frames=2 * frames if sequence == "teacher_forcing" else frames)
        key = f"phases.{i}.objective_args"
        if cfg.causal.clean_first_frames and not cls.holds_clean_frames:
            raise ConfigError("causal.clean_first_frames", cfg.causal.clean_first_frames,
                              f"0 with phases.{i} (objective {phase.objective}): image-to-video training is "
                              "implemented for every objective but this one")
        cls.check_run(cls.parse_config(dict(phase.objective_args), key), cfg, phase, key, par)
        accum = cfg.train.grad_accum
        if accum > 1 and self_forcing:
            raise ConfigError("train.grad_accum", accum, f"1 while phases.{i} is a self-forcing phase (its rollout "
                              "and critic draw from their own generators, which micro-batching would desynchronise)")
        batch = phase.batch_size or cfg.data.batch_size
        split = (1 if par.dp == -1 else par.dp) * accum
        if batch % split:
            key = f"phases.{i}.batch_size" if phase.batch_size else "data.batch_size"
            raise ConfigError(key, batch, f"a multiple of parallel.dp x train.grad_accum = {split} (the global batch "
                              "is split evenly over the data-parallel ranks, then into micro-batches)")


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
