"""``ParallelConfig``: the sizes of the tensor/context/pipeline/data-parallel groups, validated early.

Every check raises :class:`ConfigError` naming the key, so a bad launch fails before any process
group exists (and with the same message on every rank).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..config.errors import ConfigError

PP_SCHEDULES = ("1f1b", "gpipe")
FSDP_TEACHER = ("shard", "replicate")
FSDP_DTYPES = ("", "float32", "bfloat16", "float16", "float64")


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel: attention heads and FFN columns
    cp: int = 1  # context parallel (Ulysses): video frames of the token sequence
    pp: int = 1  # pipeline parallel: contiguous runs of transformer blocks
    dp: int = -1  # data parallel; -1 = world_size / (tp * cp * pp)
    # FSDP2 (torch fully_shard) over the data x context ranks: weights, gradients and optimizer states of the
    # student, EMA and DMD critic sharded (one unit per transformer block + the root), instead of ZeRO-1
    fsdp: bool = False
    fsdp_teacher: str = "shard"  # the frozen teacher under fsdp: shard | replicate (no all-gathers, full memory)
    # FSDP2 mixed precision: dtype of the all-gathered (compute) weights and of the gradient reduce-scatter;
    # "" = the parameter dtype (model.param_dtype stays the master dtype of weights and optimizer states)
    fsdp_param_dtype: str = ""
    fsdp_reduce_dtype: str = ""
    # micro-batch order under pipeline parallelism: 1f1b (at most pp micro-batches' activations live per
    # stage) or gpipe (all forwards, then all backwards); the same numbers either way
    pp_schedule: str = "1f1b"

    def resolved(self, world_size: int) -> "ParallelConfig":
        """A copy with ``dp`` filled in; checks that the sizes multiply to the world size."""
        for key in ("tp", "cp", "pp"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"parallel.{key}", v, "an integer >= 1")
        inner = self.tp * self.cp * self.pp
        dp = self.dp
        if dp == -1:
            if world_size % inner:
                raise ConfigError("parallel.tp*cp*pp", inner, f"a divisor of the world size {world_size}")
            dp = world_size // inner
        if not isinstance(dp, int) or dp < 1:
            raise ConfigError("parallel.dp", dp, "an integer >= 1 or -1 (auto)")
        if dp * inner != world_size:
            raise ConfigError("parallel.dp", dp, f"tp*cp*pp*dp = world size {world_size} (tp*cp*pp = {inner})")
        self.validate_options()
        return replace(self, dp=dp)

    def validate_options(self) -> None:
        """The non-size keys (FSDP and pipeline-schedule choices)."""
        if not isinstance(self.fsdp, bool):
            raise ConfigError("parallel.fsdp", self.fsdp, "true or false")
        if self.fsdp_teacher not in FSDP_TEACHER:
            raise ConfigError("parallel.fsdp_teacher", self.fsdp_teacher, f"one of {FSDP_TEACHER}")
        for key in ("fsdp_param_dtype", "fsdp_reduce_dtype"):
            if getattr(self, key) not in FSDP_DTYPES:
                raise ConfigError(f"parallel.{key}", getattr(self, key),
                                  f"one of {FSDP_DTYPES} ('' = the parameter dtype)")
        if self.pp_schedule not in PP_SCHEDULES:
            raise ConfigError("parallel.pp_schedule", self.pp_schedule, f"one of {PP_SCHEDULES}")


def validate_parallel(par: ParallelConfig, model_cfg, num_frames: int | None = None,
                      chunk_frames: int | None = None, world_size: int | None = None) -> None:
    """Model-dependent checks: head/FFN split, layer split, frame split for context parallelism.

    ``num_frames`` is the number of patched frames of the token sequence (2x the video for a
    teacher-forcing [clean ; noisy] sequence); ``chunk_frames`` the chunk of a KV-cached forward.
    """
    if world_size is not None:
        par = par.resolved(world_size)
    heads = model_cfg.num_attention_heads
    if heads % (par.tp * par.cp):
        raise ConfigError("parallel.tp*cp", par.tp * par.cp, f"a divisor of num_attention_heads = {heads}")
    if model_cfg.ffn_dim % par.tp:
        raise ConfigError("parallel.tp", par.tp, f"a divisor of ffn_dim = {model_cfg.ffn_dim}")
    if model_cfg.num_layers % par.pp:
        raise ConfigError("parallel.pp", par.pp, f"a divisor of num_layers = {model_cfg.num_layers}")
    if num_frames is not None and num_frames % par.cp:
        raise ConfigError("parallel.cp", par.cp, f"a divisor of the sequence's latent frames ({num_frames})")
    if chunk_frames is not None and chunk_frames % par.cp:
        raise ConfigError("parallel.cp", par.cp, f"a divisor of causal.chunk_frames = {chunk_frames} "
                          "(a KV-cached chunk is split by frames over the context-parallel ranks)")


def validate_teacher_layout(par: ParallelConfig, teacher_cfg, key: str) -> None:
    """A frozen teacher of its own size (``teacher_from: diffusers:DIR``) is split like the student:
    its heads, FFN and layers must divide too; the error names the layout key and the teacher (``key``)."""
    try:
        validate_parallel(par, teacher_cfg)
    except ConfigError as e:
        raise ConfigError(e.key, e.value, f"{e.allowed} of the teacher of {key} (its own architecture)") from None
