"""Per-GPU memory of a run under a parallel layout, before anything is allocated (``megatron-rcm info --gpus N``).

Two parts with different standing:

* **Model states** (weights, gradients, optimizer states of student, EMA, teacher and DMD critic; FSDP
  buffers) are counted exactly: every parameter of the model built on the meta device, split the way
  the layout splits it (``tp_shard_dim``: TP rows/columns; a pipeline stage's blocks; FSDP2 dim-0
  chunks of the TP-local tensor, the largest one; ZeRO-1: the optimizer state / (dp x cp)). The
  heaviest rank is reported (pipeline stage 0, FSDP rank 0).
* **Activations** are an estimate of the peak over one optimizer step of each phase. Per transformer
  block, the tensors autograd keeps are an inventory read off ``models/layers.py`` and checked against
  the saved tensors of a real block on CPU (``tests/test_memory_plan.py``, bf16 autocast, eager):
  per token, 8 fp32 + 3 compute-dtype hidden-size tensors that TP leaves whole (norm inputs/outputs,
  residual terms, linear inputs), 6 fp32 + 6 compute-dtype ones that TP splits (q/k RMSNorm, attention
  q/k/v/o; 3 more under context parallelism), 2 FFN-wide ones, 2 log-sum-exps and 6 norm statistics;
  all token terms / cp; per sample the text keys/values and
  the per-frame modulation; under bf16 autocast with fp32 weights also the bf16 copies autocast keeps.
  ``train.compile_elementwise`` fuses the norm chains, whose fp32 intermediates are then mostly
  recomputed: ``COMPILED_FP32_KEPT`` of them remain, calibrated on the H200 (RESULTS.md, 2026-12-01:
  5.2 GiB per unchecked block of the 1.3B TF-sCM step). Activation checkpointing keeps each
  checkpointed block's input only (and with ``train.checkpoint_keep_attention`` its self-attention's output
  and log-sum-exp) and recomputes one block in backward. The step is modelled as
  its network calls: teacher-forcing phases hold one grad-enabled [clean ; noisy] forward (the
  teacher's CFG pass and sCM/MeanFlow's JVP run without a graph before it), self-forcing phases hold
  one grad-enabled graph per chunk plus the rollout's KV cache (whose snapshots are prefixes of one
  buffer reserved for the video) while the scores run,
  then the critic's step. With replayed backprop (``rollout.replayed_backprop``) the rollout holds
  no graph but a never-evicting cache, and the backward rebuilds one chunk's graph at a time next to
  the gradients (and autocast's weight copies) already there. Backward working memory is taken as half a
  block's saved activations.
  The estimate is meant to be within 15% of the measured peak (``benchmarks/train_step.py --plan``).

Every number is bytes; tables print GiB.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config.model import CausalConfig, ModelConfig
from ..parallel.config import ParallelConfig
from ..parallel.model import tp_shard_dim

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
COMPILED_FP32_KEPT = 0.25  # fraction of the norm chains' fp32 intermediates kept when compiled (calibrated)
# backward working memory, in one block's saved activations: recomputing a checkpointed block and running its
# backward peaks at ~0.9 of them (its tensors are freed as its backward proceeds); without recomputation ~0.1
BACKWARD_RECOMPUTE, BACKWARD_WORKSET = 0.9, 0.1
TANGENT_PASS = 2.75  # a no-grad JVP pass's live memory / a plain pass's (tangents of everything + the JVP's scores)
CFG_BATCH = 2  # teacher passes run [cond ; uncond]


# ---------------------------------------------------------------------------------------------- model states
@dataclass(frozen=True)
class ParamCounts:
    """Parameters of the heaviest rank: all of them, the largest FSDP unit (TP-local, unsharded), the root's."""

    local: int  # held by this rank (after TP, PP and FSDP)
    unsharded: int  # TP/PP-local, before FSDP (what forward needs whole, unit by unit)
    largest_unit: int  # TP-local numel of the largest FSDP unit (a block or the root)


def param_counts(cfg: ModelConfig, par: ParallelConfig, fsdp: bool) -> ParamCounts:
    """Exact counts for ``cfg`` under ``par`` (dp resolved) on pipeline stage 0, TP rank 0, FSDP rank 0."""
    from ..models import build_model

    model = build_model(cfg, CausalConfig(), device="meta")
    per_stage = cfg.num_layers // par.pp
    shards = par.dp * par.cp
    units: dict[str, int] = {}
    local = unsharded = 0
    for name, p in model.named_parameters():
        unit = ".".join(name.split(".")[:2]) if name.startswith("blocks.") else "root"
        if unit != "root" and int(name.split(".")[1]) >= per_stage:
            continue  # another stage's block
        shape = list(p.shape)
        d = tp_shard_dim(name) if par.tp > 1 else None
        if d is not None:
            shape[d] //= par.tp
        n = math.prod(shape)
        unsharded += n
        units[unit] = units.get(unit, 0) + n
        local += math.ceil(shape[0] / shards) * math.prod(shape[1:]) if fsdp and shape else n
    return ParamCounts(local, unsharded, max(units.values()))


@dataclass
class ModelMemory:
    """One model's memory on the heaviest rank (bytes)."""

    name: str
    params: int
    weights: int
    grads: int = 0
    optimizer: int = 0
    buffers: int = 0  # FSDP all-gather / reduce-scatter buffers

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.buffers


def model_memory(name: str, cfg: ModelConfig, par: ParallelConfig, *, trainable: bool, fsdp: bool,
                 optimizer_states: int = 2, compute_bytes: int | None = None, reduce_bytes: int | None = None,
                 counts: ParamCounts | None = None) -> ModelMemory:
    """Weights (+ gradients and AdamW's ``optimizer_states`` when ``trainable``) in ``cfg.param_dtype``.

    Without FSDP gradients are TP/PP-local and whole, ZeRO-1 splits the optimizer state over dp x cp.
    With FSDP everything is sharded, plus the all-gather of the running unit and the prefetched next
    one (compute dtype) and, when trainable, the reduce-scatter input of two units (reduce dtype).
    """
    counts = counts or param_counts(cfg, par, fsdp)
    pb = DTYPE_BYTES[cfg.param_dtype]
    cb, rb = compute_bytes or pb, reduce_bytes or pb
    held = counts.local if fsdp else counts.unsharded
    mem = ModelMemory(name, held, held * pb)
    if trainable:
        mem.grads = held * pb
        zero = 1 if fsdp else par.dp * par.cp
        mem.optimizer = math.ceil(optimizer_states * counts.unsharded / zero) * pb if not fsdp else \
            optimizer_states * held * pb
    if fsdp:
        mem.buffers = 2 * counts.largest_unit * cb + (2 * counts.largest_unit * rb if trainable else 0)
    return mem


# ---------------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Geometry:
    """Token counts of a step (patched frames x tokens per frame)."""

    frames: int
    tokens_per_frame: int
    chunk_frames: int
    text_len: int

    @property
    def video(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def chunks(self) -> int:
        return self.frames // self.chunk_frames

    @property
    def chunk(self) -> int:
        return self.chunk_frames * self.tokens_per_frame


@dataclass(frozen=True)
class Compute:
    """How a model computes: activation dtype bytes, fp32-weights-under-bf16-autocast, fused chains."""

    bytes: int = 2
    autocast_copies: bool = False  # bf16 autocast over fp32 weights: autocast keeps bf16 weight copies
    compiled: bool = False


def block_saved(cfg: ModelConfig, par: ParallelConfig, tokens: int, batch: int, comp: Compute,
                frames: int, text_len: int) -> int:
    """Bytes autograd keeps for one grad-enabled block forward over ``batch`` x ``tokens`` on one rank."""
    d, f, h, tp, cp, c = cfg.hidden_size, cfg.ffn_dim, cfg.num_attention_heads, par.tp, par.cp, comp.bytes
    # eager: torch's LayerNorm keeps its fp32 input and two statistics per token (ops/dual.layer_norm without a
    # tangent), and a gated residual's addcmul its branch in the compute dtype (ops/dual.gated_residual); the
    # compiled chains keep what inductor's partitioner picks, calibrated on the GPU
    fp32_whole, fp32_split, stats, c_whole = 5, 6, 9, 5
    if comp.compiled:
        fp32_whole, fp32_split, stats, c_whole = 8 * COMPILED_FP32_KEPT, fp32_split * COMPILED_FP32_KEPT, 6, 3
    split = 6 + (3 if cp > 1 else 0)  # Ulysses: v keeps the all-to-all buffer of q, k, v; o is re-laid out
    per_token = (fp32_whole * d * 4 + fp32_split * d / tp * 4 + c_whole * d * c + split * d / tp * c + 2 * f / tp * c
                 + 2 * h / tp * 4 + stats * 4)
    per_sample = text_len * d / tp * (2 * c + 2 * 4) + text_len * 4 + 8 * frames * d * 4 / cp
    weights = (8 * d * d + 2 * d * f) / tp * 2 if comp.autocast_copies else 0
    return int(batch * (per_token * tokens / cp + per_sample) + weights)


def block_input(cfg: ModelConfig, par: ParallelConfig, tokens: int, batch: int, comp: Compute) -> int:
    """A checkpointed block keeps its input (the residual stream) only."""
    return int(batch * tokens / par.cp * cfg.hidden_size * comp.bytes)


def kept_attention(cfg: ModelConfig, par: ParallelConfig, tokens: int, batch: int, comp: Compute) -> int:
    """What a checkpointed block keeps for its recompute with ``train.checkpoint_keep_attention``: the
    self-attention output (compute dtype) and log-sum-exp (fp32) of its local heads over all its tokens."""
    d, h = cfg.hidden_size / par.tp, cfg.num_attention_heads / par.tp
    return int(batch * tokens / par.cp * (d * comp.bytes + h * 4))


def head_saved(cfg: ModelConfig, par: ParallelConfig, tokens: int, batch: int, comp: Compute) -> int:
    """Embedding and head of one forward (the head's LayerNorm in fp32, the projection's input)."""
    return int(batch * tokens / par.cp * cfg.hidden_size * (2 * 4 + comp.bytes))


def no_grad_pass(cfg: ModelConfig, par: ParallelConfig, tokens: int, batch: int, comp: Compute,
                 tangent: bool = False) -> int:
    """Live memory of a forward without a graph: residual stream and norm output (fp32), one block's
    q/k/v/o and FFN hidden (measured on CPU: within 10%); ``TANGENT_PASS`` times that with a tangent."""
    d, f = cfg.hidden_size, cfg.ffn_dim
    per_token = 3 * d * 4 + 6 * d / par.tp * comp.bytes + 2 * f / par.tp * comp.bytes
    return int((TANGENT_PASS if tangent else 1) * batch * tokens / par.cp * per_token)


def kv_cache(cfg: ModelConfig, par: ParallelConfig, tokens: int, batch: int, comp: Compute, layers: int) -> int:
    """Keys and values of ``tokens`` cached tokens in ``layers`` blocks (local heads: / tp / cp)."""
    return int(2 * layers * batch * tokens * cfg.hidden_size / (par.tp * par.cp) * comp.bytes)


def grad_forward(cfg: ModelConfig, par: ParallelConfig, tokens: int, batch: int, comp: Compute, frames: int,
                 text_len: int, checkpointing: bool, checkpoint_layers: int,
                 keep_attention: bool = False) -> tuple[int, int]:
    """(held after the forward, extra at the backward's peak) of one grad-enabled forward on pipeline stage 0."""
    layers = cfg.num_layers // par.pp
    ckpt = 0 if not checkpointing else (layers if checkpoint_layers <= 0 else min(checkpoint_layers, layers))
    a = block_saved(cfg, par, tokens, batch, comp, frames, text_len)
    kept = block_input(cfg, par, tokens, batch, comp) + \
        (kept_attention(cfg, par, tokens, batch, comp) if keep_attention else 0)
    held = (layers - ckpt) * a + ckpt * kept + head_saved(cfg, par, tokens, batch, comp)
    return held, int((BACKWARD_RECOMPUTE if ckpt else BACKWARD_WORKSET) * a)


# ---------------------------------------------------------------------------------------------- one phase
@dataclass(frozen=True)
class StepShape:
    """What a phase's objective runs in one step (``PHASE_CALLS``; unknown objectives: a teacher pass + grad)."""

    teacher_forcing: bool = True  # a grad-enabled [clean ; noisy] forward of the student
    jvp: bool = False  # a no-grad JVP pass of the student before it
    rollout: bool = False  # a self-forcing rollout (one grad graph per chunk) + scores
    critic: bool = False  # a trained critic (fake score) with its own step
    replayed: bool = False  # the rollout runs without a graph; backward replays one chunk's exit step at a time


PHASE_CALLS = {
    "flow_matching": StepShape(),
    "dcm": StepShape(),
    "scm": StepShape(jvp=True),
    "meanflow": StepShape(jvp=True),
    "dmd": StepShape(teacher_forcing=False, rollout=True, critic=True),
    "rcm": StepShape(jvp=True, rollout=True, critic=True),
}


def phase_shape(objective: str, objective_args: dict | None = None) -> StepShape:
    """The step shape of a phase (``PHASE_CALLS``), with the rollout's ``replayed_backprop`` switch read from the
    phase's objective arguments (DMD: ``rollout.replayed_backprop``; rCM: ``dmd.rollout.replayed_backprop``)."""
    from dataclasses import replace

    shape = PHASE_CALLS.get(objective, StepShape())
    args = dict(objective_args or {})
    rollout = (args.get("dmd") or {}).get("rollout") if objective == "rcm" else args.get("rollout")
    return replace(shape, replayed=bool((rollout or {}).get("replayed_backprop", False))) if shape.rollout else shape


@dataclass
class PhasePlan:
    name: str
    kind: str
    models: list[ModelMemory]
    activations: dict[str, int] = field(default_factory=dict)  # named parts of the estimate
    peak: int = 0  # the estimated peak of a step on the heaviest rank

    @property
    def states(self) -> int:
        return sum(m.total for m in self.models)

    @property
    def fixed(self) -> int:
        """What is allocated for the whole phase: weights, optimizer states, FSDP buffers (not gradients)."""
        return sum(m.weights + m.optimizer + m.buffers for m in self.models)


@dataclass(frozen=True)
class Timeline:
    """What is allocated besides weights and optimizer states when: gradients appear during backward (replacing
    the activations they consume) and stay until the next ``zero_grad``; AdamW's foreach step makes a
    parameter-sized temporary (fused AdamW none)."""

    student_grads: int
    critic_grads: int = 0
    student_step_temp: int = 0
    critic_step_temp: int = 0
    grads_live_in_critic_step: bool = True  # the trainer zeroes the student's gradients at the next step's start


def step_peak(shape: StepShape, student: ModelConfig, teacher: ModelConfig | None, critic: ModelConfig | None,
              par: ParallelConfig,
              geo: Geometry, batch: int, comp: Compute, critic_comp: Compute, time: Timeline, *, checkpointing: bool,
              checkpoint_layers: int, micro: int = 1, micro_in_flight: int = 1,
              cast_cache: int = 0, keep_attention: bool = False) -> tuple[dict[str, int], int]:
    """Named parts and the peak, over one step, of everything but weights and optimizer states.

    Forward: the no-grad passes run first (teacher-forcing phases), then the grad graph grows; the
    scores of a self-forcing step run while all of it is held. Backward: gradients replace the graph
    block by block, so its peak is max(graph, gradients) plus the working set. The critic's step follows.
    """
    parts: dict[str, int] = {}
    layers = student.num_layers // par.pp
    fwd = dict(frames=geo.frames, text_len=geo.text_len, checkpointing=checkpointing,
               checkpoint_layers=checkpoint_layers, keep_attention=keep_attention)
    held, extra, passes = 0, 0, 0
    if shape.teacher_forcing:  # the teacher's CFG pass and the JVP run (no graph) before the grad forward
        tf_tokens = 2 * geo.video
        held, extra = grad_forward(student, par, tf_tokens, batch, comp, **{**fwd, "frames": 2 * geo.frames})
        held *= micro_in_flight
        parts["teacher-forcing graph"] = held
        if teacher is not None:
            passes = no_grad_pass(teacher, par, tf_tokens, CFG_BATCH * batch, comp)
        if shape.jvp:
            passes = max(passes, no_grad_pass(student, par, tf_tokens, batch, comp, tangent=True))
        if passes:
            parts["no-grad passes (largest)"] = passes
    scores = 0
    if shape.rollout:  # the scores run while every chunk's graph and its cache snapshot are held
        chunks = geo.chunks
        h, e = grad_forward(student, par, geo.chunk, batch, comp, **{**fwd, "frames": geo.chunk_frames})
        one_chunk_kv = kv_cache(student, par, geo.chunk, batch, comp, layers)
        if shape.replayed:  # no graph in the forward: the never-evicting cache is held, one chunk's graph at a time
            parts["rollout KV cache (kept for the replay)"] = one_chunk_kv * chunks
            held += one_chunk_kv * chunks
            extra = max(extra, h + e)
        else:  # chunk k's graph keeps a snapshot of k chunks: prefixes of the one buffer reserved for the video
            parts["rollout graphs"] = chunks * h
            parts["rollout KV cache (snapshots share it)"] = one_chunk_kv * (chunks - 1)  # the last chunk: unwritten
            held += chunks * h + one_chunk_kv * (chunks - 1)
            extra = max(extra, e)
        scores = no_grad_pass(teacher or student, par, geo.video, CFG_BATCH * batch, comp)
        parts["score passes"] = scores
    parts["backward working set"] = extra
    earlier = time.student_grads if micro > 1 else 0  # micro-batches accumulate into existing gradients
    generator = time.critic_grads + earlier + max(
        max(passes, held + scores) + cast_cache,  # forward (autocast's cast cache lives until it ends)
        # backward; a replay builds each chunk's graph (under autocast: its weight copies again) while the
        # gradients of the later chunks already exist, and each chunk's gradients are new tensors added to them
        (held + 2 * time.student_grads - earlier + cast_cache if shape.replayed
         else max(held, time.student_grads - earlier)) + extra,
        time.student_grads - earlier + time.student_step_temp)  # optimizer step
    peak = generator
    if shape.critic:
        h, e = grad_forward(critic or student, par, geo.video, batch, critic_comp, **fwd)
        parts["critic graph"] = h
        live = time.student_grads if time.grads_live_in_critic_step else 0
        peak = max(peak, live + max(h, time.critic_grads) + e, live + time.critic_grads + time.critic_step_temp)
    return parts, int(peak)


def plan_phase(name: str, kind: str, shape: StepShape, student: ModelConfig, teacher: ModelConfig | None,
               par: ParallelConfig, geo: Geometry, batch: int, *, precision: str = "fp32", compiled: bool = False,
               checkpointing: bool = False, checkpoint_layers: int = 0, keep_attention: bool = False,
               micro: int = 1, pp_schedule: str = "1f1b", critic_in_autocast: bool = True, ema: bool = True,
               fused_adam: tuple[bool, bool] = (False, False), grads_live_in_critic_step: bool = True,
               critic_cfg: ModelConfig | None = None) -> PhasePlan:
    """The plan of one phase: models (student, EMA, frozen teacher, critic) and the step's peak.

    ``batch`` is the micro-batch on one data-parallel rank; ``micro`` the micro-batches per step. The
    trainer runs the critic's step (``after_step``) under the step's autocast (``critic_in_autocast``) and
    zeroes gradients at the start of a step (``grads_live_in_critic_step``); ``fused_adam``: (student,
    critic) optimizers without the foreach temporary. The critic is a copy of the teacher (``critic_cfg``
    overrides it)."""
    fsdp = par.fsdp
    pb = DTYPE_BYTES[student.param_dtype]
    mp = DTYPE_BYTES[par.fsdp_param_dtype] if fsdp and par.fsdp_param_dtype else None
    rb = DTYPE_BYTES[par.fsdp_reduce_dtype] if fsdp and par.fsdp_reduce_dtype else None
    autocast = precision == "bf16" and (mp or pb) > 2
    comp = Compute(2 if precision == "bf16" or mp == 2 else (mp or pb), autocast_copies=autocast, compiled=compiled)
    critic_comp = comp if critic_in_autocast else Compute(mp or pb, compiled=compiled)
    counts = param_counts(student, par, fsdp)
    models = [model_memory("student", student, par, trainable=True, fsdp=fsdp, compute_bytes=mp, reduce_bytes=rb,
                           counts=counts)]
    if ema:
        models.append(model_memory("EMA", student, par, trainable=False, fsdp=fsdp, counts=counts))
        models[-1].buffers = 0  # never runs forward during training
    critic = None
    if teacher is not None:
        shard = fsdp and par.fsdp_teacher == "shard"
        models.append(model_memory("teacher", teacher, par, trainable=False, fsdp=shard, compute_bytes=mp))
        if shape.critic:
            critic = model_memory("critic", critic_cfg or teacher, par, trainable=True, fsdp=fsdp, compute_bytes=mp,
                                  reduce_bytes=rb)
            models.append(critic)
    in_flight = 1 if par.pp == 1 else (micro if pp_schedule == "gpipe" else min(par.pp, micro))
    time = Timeline(models[0].grads, critic.grads if critic else 0,
                    0 if fused_adam[0] else models[0].grads, 0 if (fused_adam[1] or not critic) else critic.grads,
                    grads_live_in_critic_step)
    cast = 2 * counts.unsharded if autocast else 0  # autocast's bf16 copy of each trainable weight used
    parts, peak = step_peak(shape, student, teacher, critic_cfg or teacher, par, geo, batch, comp, critic_comp, time,
                            checkpointing=checkpointing, checkpoint_layers=checkpoint_layers, micro=micro,
                            micro_in_flight=in_flight, cast_cache=cast, keep_attention=keep_attention)
    if cast:
        parts["autocast weight copies"] = cast
    plan = PhasePlan(name, kind, models, parts)
    plan.peak = plan.fixed + peak
    return plan


# ---------------------------------------------------------------------------------------------- a run
def plan_run(cfg, gpus: int, teacher_configs: dict[str, ModelConfig] | None = None) -> list[PhasePlan]:
    """The plan of every phase of a :class:`~megatron_rcm.config.run.RunConfig` on ``gpus`` GPUs.

    ``teacher_configs``: the architecture of each ``teacher_from`` source (diffusers teachers keep their own);
    missing sources use the run's model."""
    from ..config.run import validate_run_parallel
    from ..parallel.config import validate_teacher_layout

    validate_run_parallel(cfg, world_size=gpus)
    par = cfg.parallel.resolved(gpus)
    for i, phase in enumerate(cfg.phases):
        if phase.teacher_from in (teacher_configs or {}):
            validate_teacher_layout(par, teacher_configs[phase.teacher_from], f"phases.{i}.teacher_from")
    m, data = cfg.model, cfg.data
    pt, ph, pw = (int(v) for v in m.patch_size)
    geo = Geometry(data.num_frames // pt, (data.height // ph) * (data.width // pw), cfg.causal.chunk_frames,
                   data.text_len)
    plans = []
    for phase in cfg.phases:
        shape = phase_shape(phase.objective, phase.objective_args)
        teacher = None
        if phase.teacher_from:
            teacher = (teacher_configs or {}).get(phase.teacher_from, m)
        global_batch = phase.batch_size or data.batch_size
        micro = cfg.train.grad_accum
        plans.append(plan_phase(phase.name, phase.kind, shape, m, teacher, par, geo, global_batch // par.dp // micro,
                                precision=cfg.train.precision, compiled=cfg.train.compile_elementwise,
                                checkpointing=cfg.train.activation_checkpointing,
                                checkpoint_layers=cfg.train.checkpoint_layers,
                                keep_attention=cfg.train.checkpoint_keep_attention, micro=micro,
                                pp_schedule=par.pp_schedule))
    return plans


def format_plan(plans: list[PhasePlan], par: ParallelConfig, gpus: int, gpu_gib: float | None) -> str:
    """Markdown tables (GiB per GPU) and one warning line per phase that does not fit ``gpu_gib``."""
    g = lambda b: f"{b / GIB:.1f}"  # noqa: E731
    layout = f"tp {par.tp} x cp {par.cp} x pp {par.pp} x dp {par.dp}" + (" (FSDP2)" if par.fsdp else " (ZeRO-1)")
    out = [f"memory plan per GPU: {gpus} GPUs, {layout}", "",
           "| phase | kind | model | params / GPU | weights | grads | optimizer | FSDP buffers | total |",
           "|---|---|---|---|---|---|---|---|---|"]
    for p in plans:
        for mm in p.models:
            out.append(f"| {p.name} | {p.kind} | {mm.name} | {mm.params / 1e9:.3f} B | {g(mm.weights)} | "
                       f"{g(mm.grads)} | {g(mm.optimizer)} | {g(mm.buffers)} | {g(mm.total)} |")
    out += ["", "| phase | model states | peak (est.) | activation parts (est.) |", "|---|---|---|---|"]
    warnings = []
    for p in plans:
        detail = ", ".join(f"{k} {g(v)}" for k, v in p.activations.items() if v)
        out.append(f"| {p.name} | {g(p.states)} | {g(p.peak)} | {detail} |")
        if gpu_gib is not None and p.peak > gpu_gib * GIB:
            warnings.append(f"warning: phase {p.name} needs about {g(p.peak)} GiB per GPU, more than the "
                            f"{gpu_gib:g} GiB of --gpu-memory: more GPUs, parallel.fsdp=true, parallel.tp/cp/pp, "
                            "train.activation_checkpointing or a smaller batch")
    return "\n".join(out + ([""] + warnings if warnings else []))
