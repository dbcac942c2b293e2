"""Causal Wan2.1-style video DiT.

Causality lives only in the attention mask and in the per-frame timesteps, so one set of weights
serves bidirectional (full mask, diffusers parity), frame-/chunk-wise block-causal, teacher-forcing
([clean ; noisy] sequences) and KV-cached streaming use. Inputs are *segments* (a video or a part
of one, with its own per-frame timesteps and absolute frame offset) whose tokens are concatenated
into one sequence; the caller supplies the :class:`GroupMask` over that sequence.

Timesteps use Wan's scale: t in [0, 1000] is 1000 x the flow-matching noise level.

Every forward can carry tangents (d latents, d timestep, d interval) and returns the output's tangent:
``forward_with_tangent`` equals ``torch.func.jvp`` of ``forward`` (tested in float64).

MeanFlow (``ModelConfig.interval_embedding``): a second timestep embedder sees the interval
Delta = t - r (Wan scale, per frame), so the net is u(z, r, t) with r and t separable. Its last linear
is zero-initialised, so a fresh or converted model computes exactly the plain model. When no interval
is given, an interval model uses Delta = t (r = 0: the average velocity to the data, whose tangent is
d timestep), so x0 = z_t - t u(z_t, 0, t) and the x0-prediction few-step samplers work unchanged.

Image-to-video layout (``ModelConfig.image_dim``, Wan2.1-I2V): every forward takes ``image`` [B, L, image_dim]
(the image encoder's tokens), embedded once per call and attended by every block's cross-attention next to
the text; it is per video (all segments, clean and noisy, share it), carries no tangent, and its K/V are
cached per stream like the text's. Such a model needs it on every call; other models refuse it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config.model import CausalConfig, ModelConfig, validate_model
from ..ops import dual
from ..ops import kept_attention
from ..ops.chunks import ChunkLayout
from ..ops.masks import ChunkVisibility, GroupMask, kv_cache_mask
from .image_embedding import ImageEmbedder
from .kv_cache import KVCache, StreamCacheOptions, sink_position_shift
from .layers import AttentionContext, WanBlock
from .preallocated_cache import preallocated_cache
from .rope import grid_positions, rope_tables

# MEGATRON_RCM_CHECKPOINT=reentrant: checkpointed blocks recompute as one autograd node each (torch's reentrant
# checkpoint) instead of through saved-tensor hooks, which cost the host tens of microseconds per saved tensor
# (~85 per block). A self-forcing exit chunk is a short call whose host time comes close to its GPU time: on the
# CPU a 30-block exit chunk's forward + backward issues in about a third less host time (benchmarks/host_overhead.py
# --recompute reentrant; RESULTS.md, tenth session). Opt-in: on an H200 the 1.3B SF-DMD step ran 3.6% faster with
# it (7.75 -> 7.47 s, RESULTS.md eleventh session) for 5.0 GiB more peak (55.1 -> 60.1); with the kept attention
# outputs (train.checkpoint_keep_attention) only 1% faster (7.04 -> 6.96 s) for 13.4 GiB more (58.0 -> 71.4; twelfth
# session, before the kept pairs were released on hand-over: ops/kept_attention.AttentionStash). The memory planner
# does not count it; under FSDP2 the hooks stay (parallel/fsdp.py).
REENTRANT_RECOMPUTE = os.environ.get("MEGATRON_RCM_CHECKPOINT", "hooks") == "reentrant"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class Segment:
    """A run of latent frames in the token sequence."""

    latents: torch.Tensor  # [B, C, F, H, W]
    timestep: torch.Tensor  # [B, F'] per (patched) frame, or [B], or a scalar
    frame_offset: int = 0  # absolute index of the first (patched) frame: RoPE and chunk ids
    tangent: torch.Tensor | None = None  # d latents
    timestep_tangent: torch.Tensor | None = None  # d timestep, same shape as timestep
    actions: torch.Tensor | None = None  # [B, F', action_dim] (world models)
    interval: torch.Tensor | None = None  # Delta = t - r, like timestep; None = timestep (r = 0); interval models
    interval_tangent: torch.Tensor | None = None  # d Delta; with interval None it is timestep_tangent


class _MLP2(nn.Module):
    """linear_1 -> act -> linear_2 with diffusers' key names."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, act):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_hidden)
        self.linear_2 = nn.Linear(d_hidden, d_out)
        self.act = act

    def forward(self, x, tx=None):
        h, th = dual.linear(x, tx, self.linear_1.weight, self.linear_1.bias)
        h, th = self.act(h, th)
        return dual.linear(h, th, self.linear_2.weight, self.linear_2.bias)


class _ConditionEmbedder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.freq_dim = cfg.freq_dim
        self.time_embedder = _MLP2(cfg.freq_dim, d, d, dual.silu)
        self.time_proj = nn.Linear(d, 6 * d)
        self.text_embedder = _MLP2(cfg.text_dim, d, d, dual.gelu_tanh)
        # MeanFlow interval Delta = t - r; zero-init last linear (set by the model) so it starts as a no-op
        self.interval_embedder = _MLP2(cfg.freq_dim, d, d, dual.silu) if cfg.interval_embedding else None
        self.image_embedder = ImageEmbedder(cfg.image_dim, d, cfg.pos_embed_seq_len) if cfg.image_dim else None


class CausalWanModel(nn.Module):
    parallel = None  # megatron_rcm.parallel.ParallelContext when wrapped; None = single process

    def __init__(self, cfg: ModelConfig, causal: CausalConfig | None = None):
        super().__init__()
        validate_model(cfg)
        self.cfg = cfg
        self.causal = causal or CausalConfig()
        d = cfg.hidden_size
        p = tuple(int(x) for x in cfg.patch_size)
        self.patch = p
        self.patch_embedding = nn.Conv3d(cfg.in_channels, d, kernel_size=p, stride=p)
        self.condition_embedder = _ConditionEmbedder(cfg)
        self.action_embedder = _MLP2(cfg.action_dim, d, d, dual.silu) if cfg.action_dim > 0 else None
        self.blocks = nn.ModuleList(
            WanBlock(d, cfg.ffn_dim, cfg.num_attention_heads, cfg.eps, cfg.cross_attn_norm, cfg.added_kv_proj_dim)
            for _ in range(cfg.num_layers)
        )
        self.proj_out = nn.Linear(d, cfg.out_channels * p[0] * p[1] * p[2])
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, d) / d**0.5)
        self.gradient_checkpointing = False
        self.checkpoint_layers = 0  # with gradient_checkpointing: checkpoint only the first N blocks run here (0: all)
        self.reentrant_recompute = REENTRANT_RECOMPUTE  # False under FSDP2 (parallel/fsdp.py)
        # with gradient_checkpointing: checkpointed blocks keep their self-attention outputs for the recompute
        # (train.checkpoint_keep_attention; ops/kept_attention.py)
        self.keep_attention = False
        # a converted teacher starts exactly as it was
        for extra in (self.action_embedder, self.condition_embedder.interval_embedder):
            if extra is not None:
                nn.init.zeros_(extra.linear_2.weight)
                nn.init.zeros_(extra.linear_2.bias)

    # ------------------------------------------------------------------ geometry
    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    def tokens_per_frame(self, height: int, width: int) -> int:
        _, ph, pw = self.patch
        if height % ph or width % pw:
            raise ValueError(f"latent size {height}x{width} is not divisible by the patch {ph}x{pw}")
        return (height // ph) * (width // pw)

    def visibility(self) -> ChunkVisibility:
        return ChunkVisibility(self.causal.window_chunks, self.causal.sink_chunks)

    def chunk_layout(self, frames: int) -> ChunkLayout:
        """The chunk pattern over ``frames`` patched frames (``causal.first_chunk_frames`` + k x ``chunk_frames``)."""
        c = self.causal
        return ChunkLayout(frames, c.chunk_frames, c.first_chunk_frames or None)

    def new_kv_cache(self, height: int, width: int, evict: bool = True,
                     options: StreamCacheOptions | None = None, reserve_frames: int | None = None,
                     stream_frames: int | None = None) -> KVCache:
        """An empty stream cache (``height``/``width`` are checked against the patch); ``evict=False`` keeps
        every chunk (the replayed self-forcing backward reads it as it was before each chunk). ``options``:
        a long stream's window/sink, RoPE policy and K/V dtype (None: the training mask's rule, absolute
        positions, the model's dtype). ``reserve_frames``: patched frames to allocate room for at once (a
        rollout's whole video; ``KVCache.reserve_tokens``). ``stream_frames``: the patched frames of a stream
        (a stream, not a rollout): its cache is a :class:`PreallocatedKVCache` sized for them (fixed buffers,
        no per-call concatenation, CUDA graphs) unless it holds fp8."""
        tokens = self.tokens_per_frame(height, width)
        if stream_frames is not None and evict and (options is None or options.kv_cache_dtype == "auto"):
            options = (options or StreamCacheOptions()).validate()
            trained = None if options.trained_frames is None else max(1, options.trained_frames // self.patch[0])
            return preallocated_cache(len(self.blocks), options.visibility(self.visibility()),
                                      self.chunk_layout(stream_frames), tokens, options.rope_policy, trained)
        if options is None:
            return KVCache(len(self.blocks), self.visibility(), evict=evict,
                           reserve_tokens=None if reserve_frames is None else reserve_frames * tokens)
        options.validate()
        trained = None if options.trained_frames is None else max(1, options.trained_frames // self.patch[0])
        return KVCache(len(self.blocks), options.visibility(self.visibility()), evict=evict,
                       rope_policy=options.rope_policy, kv_cache_dtype=options.kv_cache_dtype,
                       rope_trained_frames=trained)

    # ------------------------------------------------------------------ public forwards
    def forward(self, x, timestep, context, mask: GroupMask | None = None, actions=None, frame_offset: int = 0,
                interval=None, image=None):
        """Denoiser output for latents x [B, C, F, H, W] (flow-matching velocity for Wan teachers;
        MeanFlow average velocity over [t - interval, t] for interval models)."""
        seg = Segment(x, timestep, frame_offset, actions=actions, interval=interval)
        return self.forward_segments([seg], context, mask, image=image)[0][0]

    def forward_with_tangent(self, x, timestep, context, tangent=None, timestep_tangent=None,
                             mask: GroupMask | None = None, actions=None, frame_offset: int = 0,
                             interval=None, interval_tangent=None, image=None):
        """(output, d output) along (d x, d timestep, d interval) in one pass; equals torch.func.jvp of forward."""
        seg = Segment(x, timestep, frame_offset, tangent, timestep_tangent, actions, interval, interval_tangent)
        return self.forward_segments([seg], context, mask, image=image)[0]

    def forward_teacher_forcing(self, clean, noisy, timestep, context, mask: GroupMask, tangent=None,
                                timestep_tangent=None, actions=None, interval=None, interval_tangent=None,
                                clean_timestep=None, image=None):
        """Run [clean (t = 0) ; noisy (t)] of the same video; returns (output, tangent) for the noisy part.

        Both copies share RoPE positions (frame_offset 0); the clean context carries no tangent (and,
        on interval models, the default interval 0). ``clean_timestep`` (per frame) is the context copy's
        level when it is not clean (Causal-rCM's noisy context: what a stream caches from its last step).
        """
        t0 = torch.zeros_like(self._frame_timesteps(timestep, noisy)) if clean_timestep is None else clean_timestep
        segs = [Segment(clean, t0, 0, actions=actions),
                Segment(noisy, timestep, 0, tangent, timestep_tangent, actions, interval, interval_tangent)]
        return self.forward_segments(segs, context, mask, image=image)[1]

    def forward_chunk(self, x, timestep, context, cache: KVCache, chunk: int, write_cache: bool = False,
                      actions=None, tangent=None, timestep_tangent=None, interval=None, interval_tangent=None,
                      image=None):
        """One chunk against the KV cache of earlier chunks; ``write_cache`` appends this chunk's K/V."""
        frames = x.shape[2] // self.patch[0]
        layout = self._layout_through(chunk)
        if frames != layout.size(chunk):
            raise ValueError(f"forward_chunk: chunk {chunk} has {layout.size(chunk)} latent frames, got {frames}")
        seg = Segment(x, timestep, cache.frame_offset(layout.start(chunk), x.device), tangent, timestep_tangent,
                      actions, interval, interval_tangent)
        return self.forward_segments([seg], context, mask=None, cache=cache, write_cache=write_cache,
                                     cache_chunk=chunk, image=image)[0]

    # ------------------------------------------------------------------ the one code path
    def forward_segments(self, segments: list[Segment], context, mask: GroupMask | None = None,
                         cache: KVCache | None = None, write_cache: bool = False, cache_chunk: int | None = None,
                         image=None):
        dtype = self.dtype
        ce = self.condition_embedder
        text, _ = ce.text_embedder(context.to(dtype))
        img = self._image_embedding(image, context)

        tokens, ttokens, temb, ttemb, positions, grids = [], [], [], [], [], []
        for seg in segments:
            x, tx, grid = self._patchify(seg.latents.to(dtype), None if seg.tangent is None else seg.tangent.to(dtype))
            t = self._frame_timesteps(seg.timestep, seg.latents)
            tt = None if seg.timestep_tangent is None else self._frame_timesteps(seg.timestep_tangent, seg.latents)
            e, te = self._time_embedding(t, tt, seg.actions)
            e, te = self._add_interval_embedding(e, te, seg, t, tt)
            tokens.append(x), ttokens.append(tx), temb.append(e), ttemb.append(te), grids.append(grid)
            positions.append(grid_positions(*grid, frame_offset=seg.frame_offset, device=x.device))
        tpf = grids[0][1] * grids[0][2]
        if any(g[1] * g[2] != tpf for g in grids):
            raise ValueError("all segments must have the same spatial size (tokens per frame)")

        x = torch.cat(tokens, dim=1)
        tx = _cat_optional(ttokens, tokens)
        e = torch.cat(temb, dim=1)  # [B, F_total, D]
        te = _cat_optional(ttemb, temb)
        mod, tmod = dual.linear(*dual.silu(e, te), ce.time_proj.weight, ce.time_proj.bias)
        mod = mod.unflatten(-1, (6, -1))
        tmod = None if tmod is None else tmod.unflatten(-1, (6, -1))

        pos = torch.cat(positions)
        cos, sin = rope_tables(pos, self.cfg.attention_head_dim, torch.promote_types(dtype, torch.float32))
        if cache is not None:
            mask = kv_cache_mask(cache.chunks, cache.chunk_tokens, cache_chunk, x.shape[1], cache.visibility)
        elif mask is not None and mask.shape != (x.shape[1], x.shape[1]):
            raise ValueError(f"mask covers {mask.shape} tokens but the segments make a sequence of {x.shape[1]}")
        if mask is not None and mask.is_full():
            mask = None
        if mask is not None:
            mask = mask.to(x.device)
        actx = AttentionContext(cos, sin, mask, self.causal.attention_backend, cache, cache_chunk, write_cache,
                                self._sink_rotation(cache, cache_chunk, cos.dtype, x.device))
        par = self.parallel
        if par is not None and par.cp > 1:  # context parallel: this rank keeps a contiguous run of frames
            x, tx, mod, tmod, e, te = par.scatter_frames(x, tx, mod, tmod, e, te)
        if par is not None and par.pp > 1:  # pipeline: later stages take (x, tx) from the previous stage
            x, tx = par.pipeline_recv(x, tx)

        # cache-writing passes run under no_grad; grad-carrying cached passes (self-forcing exit steps) only
        # read the cache and are checkpointed against a frozen snapshot of it
        use_ckpt = self.gradient_checkpointing and torch.is_grad_enabled() and (cache is None or not write_cache)
        if use_ckpt and cache is not None:
            actx = replace(actx, cache=cache.frozen())
        ran = 0  # blocks this rank has run (pipeline stages own a run of them)
        for i, block in enumerate(self.blocks):
            if par is not None and not par.owns_layer(i):
                continue
            ran += 1
            if use_ckpt and (self.checkpoint_layers <= 0 or ran <= self.checkpoint_layers):
                run = kept_attention.keeping(block) if self.keep_attention else block
                x, tx = checkpoint(run, x, tx, mod, tmod, text, actx, i, img, use_reentrant=self.reentrant_recompute)
            else:
                x, tx = block(x, tx, mod, tmod, text, actx, i, img)
        if cache is not None and write_cache:
            cache.commit(cache_chunk)
        if par is not None and par.pp > 1 and not par.pipeline_send(x, tx):
            return [(None, None)] * len(segments)  # not the last stage: the output lives there

        y, ty = self._head(x, tx, e, te)
        if par is not None and par.cp > 1:
            y, ty = par.gather_frames(y, ty)
        outs, start, fstart = [], 0, 0
        for grid in grids:
            n, f = grid[0] * tpf, grid[0]
            ys = self._unpatchify(y[:, start:start + n], grid)
            tys = None if ty is None else self._unpatchify(ty[:, start:start + n], grid)
            outs.append((ys, tys))
            start, fstart = start + n, fstart + f
        return outs

    # ------------------------------------------------------------------ pieces
    def _sink_rotation(self, cache: KVCache | None, chunk: int | None, dtype, device):
        """(cos, sin) moving the sink keys forward for ``rope_policy='rebase'`` (see ``sink_position_shift``),
        or None (absolute positions, or nothing to move yet)."""
        if cache is None or cache.rope_policy != "rebase" or chunk is None:
            return None
        shift = sink_position_shift(cache.visibility, self._layout_through(chunk), chunk, cache.rope_trained_frames)
        return cache.sink_rotation(shift, self.cfg.attention_head_dim, dtype, device)

    def _layout_through(self, chunk: int) -> ChunkLayout:
        """The chunk pattern of a stream up to chunk ``chunk`` (streams run past any training length)."""
        c = self.causal
        return ChunkLayout.covering(chunk + 1, c.chunk_frames, c.first_chunk_frames or None)

    def prepare_chunk(self, cache: KVCache, chunk: int, device) -> bool:
        """Set what the cache hands this chunk's forward (its RoPE frame offset, the sink rotation) ahead of the
        call: a CUDA graph replays the forward without running this Python (``network/chunk_graphs.py``).
        Returns whether the sink keys are rotated for this chunk."""
        cache.frame_offset(self._layout_through(chunk).start(chunk), device)
        dtype = torch.promote_types(self.dtype, torch.float32)  # the RoPE tables' dtype (forward_segments)
        return self._sink_rotation(cache, chunk, dtype, device) is not None

    def write_condition(self, context, cache: KVCache, image=None) -> None:
        """Project the condition's cross-attention K/V (text; image with the I2V layout) for every block into
        ``cache`` now, as the first chunk call would: a captured CUDA graph then reads them from fixed buffers."""
        text, _ = self.condition_embedder.text_embedder(context.to(self.dtype))
        img = self._image_embedding(image, context)
        for i, block in enumerate(self.blocks):
            k, _, v, _ = block.attn2.project_kv(text, None)
            ki, vi = block.attn2.project_image_kv(img) if img is not None else (None, None)
            cache.set_condition(i, k, v, ki, vi)

    def _frame_timesteps(self, t, latents) -> torch.Tensor:
        b, frames = latents.shape[0], latents.shape[2] // self.patch[0]
        t = torch.as_tensor(t, device=latents.device)
        if t.dim() == 0:
            t = t.expand(b)
        if t.dim() == 1:
            t = t[:, None].expand(b, frames)
        if t.shape != (b, frames):
            raise ValueError(f"timestep must be a scalar, [B] or [B, frames]=[{b}, {frames}]; got {tuple(t.shape)}")
        return t

    def _time_embedding(self, t, tt, actions):
        ce = self.condition_embedder
        dtype = self.dtype
        s, ts = dual.sinusoidal_embedding(t, tt, ce.freq_dim)
        e, te = ce.time_embedder(s.to(dtype), None if ts is None else ts.to(dtype))
        if self.action_embedder is not None:
            if actions is None:
                raise ValueError(f"this model is action-conditioned (action_dim={self.cfg.action_dim}): pass actions "
                                 "[B, frames, action_dim]")
            if actions.shape[:2] != t.shape or actions.shape[-1] != self.cfg.action_dim:
                raise ValueError(f"actions must be [B, frames, {self.cfg.action_dim}] = "
                                 f"[{t.shape[0]}, {t.shape[1]}, {self.cfg.action_dim}], got {tuple(actions.shape)}")
            a, _ = self.action_embedder(actions.to(dtype))
            e = e + a
        elif actions is not None:
            raise ValueError("actions were given but model.action_dim = 0; set model.action_dim to the action size")
        return e, te

    def _image_embedding(self, image, context):
        """The embedded image context [B, L_img, D] (I2V layout), or None; a missing or unexpected one is an error."""
        emb = self.condition_embedder.image_embedder
        if emb is None:
            if image is not None:
                raise ValueError("an image context was given but model.image_dim is null (text-to-video layout); set "
                                 "model.image_dim / added_kv_proj_dim to the image-to-video layout's values")
            return None
        if image is None:
            raise ValueError(f"this model has the image-to-video layout (model.image_dim={self.cfg.image_dim}): pass "
                             "the image encoder's tokens as image [B, tokens, image_dim] (Condition.image)")
        if image.shape[0] != context.shape[0]:
            raise ValueError(f"the image context has batch {image.shape[0]}, the text context {context.shape[0]}")
        return emb(image.to(self.dtype))

    def _add_interval_embedding(self, e, te, seg: Segment, t, tt):
        """e + interval_embedder(sin(Delta)); Delta defaults to t (r = 0), its tangent to dt."""
        emb = self.condition_embedder.interval_embedder
        if emb is None:
            if seg.interval is not None or seg.interval_tangent is not None:
                raise ValueError("an interval was given but model.interval_embedding = false; set "
                                 "model.interval_embedding=true to build the MeanFlow interval embedding")
            return e, te
        if seg.interval is None:
            if seg.interval_tangent is not None:
                raise ValueError("interval_tangent needs an interval (without one the interval is the timestep)")
            d, td = t, tt
        else:
            d = self._frame_timesteps(seg.interval, seg.latents)
            td = None if seg.interval_tangent is None else self._frame_timesteps(seg.interval_tangent, seg.latents)
        s, ts = dual.sinusoidal_embedding(d, td, self.condition_embedder.freq_dim)
        a, ta = emb(s.to(self.dtype), None if ts is None else ts.to(self.dtype))
        if ta is not None:
            te = ta if te is None else te + ta
        return e + a, te

    def _patchify(self, x, tx):
        if x.dim() != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"latents must be [B, {self.cfg.in_channels}, F, H, W], got {tuple(x.shape)}")
        pt, ph, pw = self.patch
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"latent shape {tuple(x.shape[2:])} is not divisible by the patch {self.patch}")
        w = self.patch_embedding
        y = nn.functional.conv3d(x, w.weight, w.bias, stride=self.patch)
        grid = tuple(y.shape[2:])
        y = y.flatten(2).transpose(1, 2)
        ty = None
        if tx is not None:
            ty = nn.functional.conv3d(tx, w.weight, None, stride=self.patch).flatten(2).transpose(1, 2)
        return y, ty, grid

    def _head(self, x, tx, e, te):
        frames = e.shape[1]
        mod = self.scale_shift_table.unsqueeze(0) + e.unsqueeze(2)  # [B, F, 2, D]
        shift, scale = (m.unsqueeze(2) for m in dual.upcast(mod).unbind(2))
        t_shift = t_scale = None
        if te is not None:
            t_shift = t_scale = dual.upcast(te).unsqueeze(2)
        xf = x.unflatten(1, (frames, -1))
        txf = None if tx is None else tx.unflatten(1, (frames, -1))
        n, tn = dual.layer_norm(dual.upcast(xf), None if txf is None else dual.upcast(txf), eps=self.cfg.eps)
        h, th = dual.modulate(n, tn, shift, t_shift, scale, t_scale)
        h, th = h.to(x.dtype).flatten(1, 2), None if th is None else th.to(x.dtype).flatten(1, 2)
        return dual.linear(h, th, self.proj_out.weight, self.proj_out.bias)

    def _unpatchify(self, y, grid):
        f, h, w = grid
        pt, ph, pw = self.patch
        b = y.shape[0]
        y = y.reshape(b, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return y.reshape(b, y.shape[1], f * pt, h * ph, w * pw)


def _cat_optional(tangents, primals):
    """Concatenate tangents along dim 1, zero-filling missing ones; None if all are missing."""
    if all(t is None for t in tangents):
        return None
    return torch.cat([torch.zeros_like(p) if t is None else t for t, p in zip(tangents, primals)], dim=1)


def build_model(cfg: ModelConfig, causal: CausalConfig | None = None, device="cpu") -> CausalWanModel:
    """Build in the configured parameter dtype; ``device='meta'`` allocates nothing (real-size shape checks)."""
    with torch.device(device):
        model = CausalWanModel(cfg, causal)
    return model.to(DTYPES[cfg.param_dtype]) if device != "meta" else model.to(dtype=DTYPES[cfg.param_dtype])
