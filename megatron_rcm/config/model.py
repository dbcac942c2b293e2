"""Model and causal-structure configs, plus the named model presets.

Field names follow diffusers' ``WanTransformer3DModel`` config where one exists (so a converted
checkpoint's ``config.json`` maps one-to-one); ``action_dim`` (world models) and ``interval_embedding``
(MeanFlow) are ours. ``image_dim`` / ``added_kv_proj_dim`` / ``pos_embed_seq_len`` are diffusers' image-to-video
layout (Wan2.1-I2V/FLF2V): an image-encoder context embedded and attended by extra K/V projections in every
cross-attention; null (the default) is the text-to-video layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from .errors import ConfigError

PARAM_DTYPES = ("float32", "bfloat16", "float16", "float64")  # names of models.causal_wan.DTYPES


@dataclass
class ModelConfig:
    preset: str = "tiny"  # informational: which preset the values came from
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    in_channels: int = 3
    out_channels: int = 3
    text_dim: int = 32
    text_len: int = 8  # tokens of the text context the built-in conditioner produces
    freq_dim: int = 32
    ffn_dim: int = 256
    num_layers: int = 2
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    action_dim: int = 0  # 0 = no action conditioning
    interval_embedding: bool = False  # MeanFlow: a zero-init embedding of the interval t - r (ours, not diffusers)
    image_dim: int | None = None  # I2V: width of the image-encoder (CLIP) tokens; null = text-to-video
    added_kv_proj_dim: int | None = None  # I2V: input width of the image K/V projections (= hidden size)
    pos_embed_seq_len: int | None = None  # FLF2V: a learned position table over the image tokens (2 x 257)
    param_dtype: str = "float32"

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


@dataclass
class CausalConfig:
    """How attention is restricted in time (docs/design.md, "The model")."""

    chunk_frames: int = 1  # latent frames per chunk; 1 = frame-wise (Causal-rCM chunk_t)
    first_chunk_frames: int = 0  # latent frames of the first chunk; 0 = like chunk_frames (Causal-rCM first_chunk_t)
    window_chunks: int = 0  # most recent chunks visible (incl. own); 0 = unlimited
    sink_chunks: int = 0  # first chunks always visible (long rollouts)
    attention_backend: str = "auto"
    # noisy context (network/context.py): cache chunks >= start at context_noise_level instead of clean (t = 0),
    # in streaming, the self-forcing rollout and teacher forcing alike (Causal-rCM context_from_last_step,
    # context_from_last_step_start_chunk; the level is its backward_timesteps[-1] = 5/8)
    context_from_last_step: bool = False
    context_from_last_step_start_chunk: int = 0
    context_noise_level: float = 0.625
    # image-to-video training (network/clean_frames.py): the first latent frames of every training video are given
    # clean (level 0), never noised and left out of the loss, in teacher forcing and the self-forcing rollout
    # (Causal-rCM's I2V by first frame; 1 = one image). 0 = off
    clean_first_frames: int = 0


MODEL_PRESETS: dict[str, dict] = {
    # CPU-sized: trains in minutes on 2 cores on 32x32 RGB "latents" (patch 1x4x4 -> 64 tokens/frame).
    "tiny": dict(patch_size=[1, 4, 4], num_attention_heads=4, attention_head_dim=16, in_channels=3,
                 out_channels=3, text_dim=32, text_len=8, freq_dim=32, ffn_dim=256, num_layers=4),
    # A few hundred million parameters: multi-GPU plumbing tests at modest cost.
    "small": dict(patch_size=[1, 2, 2], num_attention_heads=8, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, text_len=512, freq_dim=256, ffn_dim=4096, num_layers=8),
    # Wan2.1 T2V 1.3B (diffusers config of Wan-AI/Wan2.1-T2V-1.3B-Diffusers).
    "wan2.1-1.3b": dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16,
                        out_channels=16, text_dim=4096, text_len=512, freq_dim=256, ffn_dim=8960, num_layers=30),
    # Wan2.1 T2V 14B.
    "wan2.1-14b": dict(patch_size=[1, 2, 2], num_attention_heads=40, attention_head_dim=128, in_channels=16,
                       out_channels=16, text_dim=4096, text_len=512, freq_dim=256, ffn_dim=13824, num_layers=40),
}


def model_preset(name: str, **overrides) -> ModelConfig:
    """A ModelConfig from a named preset, with field overrides."""
    if name not in MODEL_PRESETS:
        raise ConfigError("model.preset", name, f"one of {sorted(MODEL_PRESETS)}")
    known = {f.name for f in fields(ModelConfig)}
    for key in overrides:
        if key not in known:
            raise ConfigError(f"model.{key}", overrides[key], f"a field of ModelConfig: {sorted(known)}")
    return ModelConfig(preset=name, **{**MODEL_PRESETS[name], **overrides})


def validate_model(cfg: ModelConfig, prefix: str = "model") -> None:
    """Fail early, naming the key, on values that cannot build a working model."""
    if len(cfg.patch_size) != 3 or any(int(p) <= 0 for p in cfg.patch_size):
        raise ConfigError(f"{prefix}.patch_size", cfg.patch_size, "three positive ints [t, h, w]")
    positive = ["num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
                "text_len", "freq_dim", "ffn_dim", "num_layers", "rope_max_seq_len"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{prefix}.{name}", getattr(cfg, name), "a positive integer")
    if cfg.attention_head_dim % 2:
        raise ConfigError(f"{prefix}.attention_head_dim", cfg.attention_head_dim, "an even number (RoPE rotates pairs)")
    if cfg.attention_head_dim // 6 < 1:
        raise ConfigError(f"{prefix}.attention_head_dim", cfg.attention_head_dim, ">= 6 (3-D RoPE splits it into t/h/w)")
    if cfg.freq_dim % 2:
        raise ConfigError(f"{prefix}.freq_dim", cfg.freq_dim, "an even number (cos/sin halves)")
    if cfg.action_dim < 0:
        raise ConfigError(f"{prefix}.action_dim", cfg.action_dim, ">= 0 (0 disables action conditioning)")
    if not isinstance(cfg.interval_embedding, bool):
        raise ConfigError(f"{prefix}.interval_embedding", cfg.interval_embedding,
                          "true or false (true adds the MeanFlow interval embedding)")
    _validate_image_layout(cfg, prefix)
    if cfg.eps <= 0:
        raise ConfigError(f"{prefix}.eps", cfg.eps, "a positive float")
    if cfg.param_dtype not in PARAM_DTYPES:
        raise ConfigError(f"{prefix}.param_dtype", cfg.param_dtype, " or ".join(PARAM_DTYPES))


def _validate_image_layout(cfg: ModelConfig, prefix: str) -> None:
    """The image-to-video keys: all null, or image_dim + added_kv_proj_dim (= hidden size) [+ pos_embed_seq_len]."""
    for name in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or value <= 0):
            raise ConfigError(f"{prefix}.{name}", value, "a positive integer or null (null = text-to-video layout)")
    if (cfg.image_dim is None) != (cfg.added_kv_proj_dim is None):
        missing = "added_kv_proj_dim" if cfg.added_kv_proj_dim is None else "image_dim"
        raise ConfigError(f"{prefix}.{missing}", None, "set together with "
                          f"{'image_dim' if missing == 'added_kv_proj_dim' else 'added_kv_proj_dim'} (the I2V layout "
                          "embeds the image tokens and attends them with added K/V projections), or both null")
    if cfg.added_kv_proj_dim is not None and cfg.added_kv_proj_dim != cfg.hidden_size:
        raise ConfigError(f"{prefix}.added_kv_proj_dim", cfg.added_kv_proj_dim,
                          f"the hidden size {cfg.hidden_size} (heads x head dim): the image embedding feeds it")
    if cfg.pos_embed_seq_len is not None and cfg.image_dim is None:
        raise ConfigError(f"{prefix}.pos_embed_seq_len", cfg.pos_embed_seq_len,
                          "null without image_dim (it positions the image tokens)")


# always registered by ops.attention; other names (e.g. "fused") need the registry, which imports torch
_BUILTIN_BACKENDS = ("auto", "reference", "sdpa")


def validate_causal(cfg: CausalConfig, num_frames: int | None = None, prefix: str = "causal") -> None:
    if cfg.chunk_frames <= 0:
        raise ConfigError(f"{prefix}.chunk_frames", cfg.chunk_frames, "a positive integer (1 = frame-wise)")
    if cfg.first_chunk_frames < 0:
        raise ConfigError(f"{prefix}.first_chunk_frames", cfg.first_chunk_frames,
                          ">= 0 (0 = the first chunk is like the others)")
    first = cfg.first_chunk_frames or cfg.chunk_frames
    if num_frames is not None and (num_frames < first or (num_frames - first) % cfg.chunk_frames):
        if cfg.first_chunk_frames:
            fits = [f for f in range(1, num_frames + 1) if (num_frames - f) % cfg.chunk_frames == 0]
            raise ConfigError(f"{prefix}.first_chunk_frames", cfg.first_chunk_frames,
                              f"first chunk + k x causal.chunk_frames ({cfg.chunk_frames}) = the {num_frames} latent "
                              f"frames: one of {fits}")
        divisors = [d for d in range(1, num_frames + 1) if num_frames % d == 0]
        raise ConfigError(f"{prefix}.chunk_frames", cfg.chunk_frames,
                          f"a divisor of the {num_frames} latent frames: {divisors}")
    if not 0 <= cfg.clean_first_frames <= first:
        raise ConfigError(f"{prefix}.clean_first_frames", cfg.clean_first_frames,
                          f"0..{first} latent frames: the held frames lie in the first chunk (of {first} frames)")
    if cfg.window_chunks < 0:
        raise ConfigError(f"{prefix}.window_chunks", cfg.window_chunks, ">= 0 (0 = unlimited)")
    if cfg.sink_chunks < 0:
        raise ConfigError(f"{prefix}.sink_chunks", cfg.sink_chunks, ">= 0")
    if cfg.context_from_last_step_start_chunk < 0:
        raise ConfigError(f"{prefix}.context_from_last_step_start_chunk", cfg.context_from_last_step_start_chunk,
                          ">= 0 (the first chunk cached with noisy context)")
    if not 0.0 < cfg.context_noise_level < 1.0:
        raise ConfigError(f"{prefix}.context_noise_level", cfg.context_noise_level,
                          "a flow-matching level in (0, 1): the level of the sampler's last step, e.g. 0.625")
    if cfg.attention_backend not in _BUILTIN_BACKENDS:
        from ..ops.attention import available_backends

        if cfg.attention_backend not in available_backends():
            raise ConfigError(f"{prefix}.attention_backend", cfg.attention_backend, f"one of {available_backends()}")
