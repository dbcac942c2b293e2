"""The one seam between the objectives / samplers / streaming and the DiT (docs/design.md, "The network seam").

Every caller speaks flow-matching time ``s`` in [0, 1] (0 = data, 1 = noise) and a
:class:`Condition`; this object does, once each, what every call site used to spell out again:
  * the Wan time scale: the model takes ``t = 1000 s`` per latent frame;
  * the time layout: a scalar, ``[B]`` or per-frame ``[B, F]`` level becomes the model's ``[B, F]``
    (per-chunk values are spread over frames by :class:`~megatron_rcm.ops.chunks.ChunkLayout`);
  * the masks: full, block-causal and teacher-forcing masks built once per geometry and cached
    (KV-cached chunks get theirs from the cache inside the model);
  * classifier-free guidance: ``[cond ; uncond]`` in one batched forward, combined for the
    output and its tangent alike (CFG is linear, so it maps tangents too); an image context (I2V
    layout, ``Condition.image``) goes with both branches, as in Wan's image-to-video pipeline;
  * the pipeline-stage broadcast: when the model is split into pipeline stages, the layout installs
    ``model.parallel.share_stage_outputs`` and every output is made available on every stage here
    (the last stage keeps its own, differentiable tensors), so objectives run unchanged on every
    stage and import nothing from ``parallel/``.

Tangents (for the JVPs of sCM and MeanFlow) ride along every call: ``(v, dv)`` is returned, ``dv``
None without a tangent. Whether a call builds a graph is the caller's business (``torch.no_grad``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.kv_cache import KVCache
from ..ops.chunks import ChunkLayout
from ..ops.masks import GroupMask, block_causal_mask, teacher_forcing_mask
from .clean_frames import HeldFrames, free_chunk_mean, free_frames, free_mask, hold_first_frames
from .condition import Condition
from .context import NoisyContext, TeacherForcingContext

WAN_T_SCALE = 1000.0  # the model's timestep is 1000 x the flow-matching noise level s
MASK_KINDS = ("full", "block_causal", "teacher_forcing")


def wan_timesteps_to_levels(timesteps) -> list[float]:
    """User-facing Wan timesteps (1000 = pure noise, as Self-Forcing's configs write them) -> FM levels."""
    levels = [float(t) / WAN_T_SCALE for t in timesteps]
    bad = [t for t, s in zip(timesteps, levels) if not 0.0 < s <= 1.0]
    if bad:
        raise ValueError(f"denoising timesteps must be in (0, {WAN_T_SCALE:g}], got {bad}")
    return levels


def combine_guidance(cond_and_uncond: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    """CFG from a [cond ; uncond] batch: v_u + w (v_c - v_u); None passes (no tangent)."""
    if cond_and_uncond is None:
        return None
    vc, vu = cond_and_uncond.chunk(2)
    return vu + scale * (vc - vu)


def _dup(t):
    return None if t is None else torch.cat([t, t])


@dataclass
class ChunkCache:
    """The KV cache of one stream, and whether its rows are a guided [cond ; uncond] pair of streams.

    A guided stream keeps both branches' history (the same clean chunks, encoded with either
    context) in one doubled-batch cache, so every chunk call is one batched forward.
    """

    kv: KVCache
    guidance: float = 1.0
    guided: bool = False
    graphs: object | None = None  # network/chunk_graphs.py ChunkGraphs: its chunk calls replay CUDA graphs

    @property
    def num_tokens(self) -> int:
        return self.kv.num_tokens

    def __len__(self) -> int:
        return len(self.kv)

    def before(self, chunk: int) -> "ChunkCache":
        """A read-only view of the chunks cached before ``chunk`` (see ``KVCache.before``)."""
        return ChunkCache(self.kv.before(chunk), self.guidance, self.guided)

    @property
    def chunks(self) -> list[int]:
        """Indices of the chunks whose K/V are cached (after eviction), oldest first."""
        return list(self.kv.chunks)

    def forget_condition(self) -> None:
        """Drop the cached cross-attention K/V (text, image): the next call projects the new condition's.
        The chunks' self-attention K/V stay as they were written (a prompt switch without re-cache)."""
        for layer in self.kv.layers:
            layer.cross_k = layer.cross_v = layer.image_k = layer.image_v = None

    def clear(self) -> None:
        """Empty the cache (chunks and cross-attention K/V) before it is re-written (a prompt switch's re-cache)."""
        self.kv.reset()


class Denoiser:
    """A :class:`~megatron_rcm.models.CausalWanModel` seen as a flow-matching denoiser ``(x, s, cond) -> v``."""

    def __init__(self, model):
        if isinstance(model, Denoiser):
            raise TypeError("Denoiser wraps a model, not another Denoiser (use Denoiser.of)")
        self.model = model
        self._masks: dict = {}

    @classmethod
    def of(cls, model_or_net) -> "Denoiser":
        """The denoiser of a model (a Denoiser passes through), for entry points users call with models."""
        return model_or_net if isinstance(model_or_net, Denoiser) else cls(model_or_net)

    # ------------------------------------------------------------------ geometry
    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def patch_frames(self) -> int:
        """Latent frames per patched frame (the model's temporal patch; 1 for Wan)."""
        return self.model.patch[0]

    def frames(self, x: torch.Tensor) -> int:
        """Patched frames of latents x [B, C, F, H, W] (= timestep entries)."""
        return x.shape[2] // self.patch_frames

    def layout(self, x_or_frames) -> ChunkLayout:
        frames = x_or_frames if isinstance(x_or_frames, int) else self.frames(x_or_frames)
        return self.model.chunk_layout(frames)

    @property
    def noisy_context(self) -> NoisyContext:
        """How finished chunks are cached as context (the model's ``causal.context_from_last_step*``)."""
        return NoisyContext.of(self.model.causal)

    @property
    def clean_first_frames(self) -> int:
        """Latent frames at the start of every training video held clean (``causal.clean_first_frames``: a student
        trained for image-to-video by first frame, :mod:`~megatron_rcm.network.clean_frames`)."""
        return getattr(self.model.causal, "clean_first_frames", 0)

    def held_frames(self, x0: torch.Tensor) -> HeldFrames | None:
        """The held first frames of a training video x0 (None when ``clean_first_frames`` is 0)."""
        n = self.clean_first_frames
        return HeldFrames(x0[:, :, :n], self.patch_frames) if n else None

    def hold_clean(self, x: torch.Tensor, s, x0: torch.Tensor):
        """(x, per-frame s) with the held first frames of x0 clean at level 0; unchanged without any."""
        return hold_first_frames(x, s, x0, self.clean_first_frames, self.patch_frames)

    def free_mask(self, x: torch.Tensor):
        """(latents mask, per-frame mask): 0 on the held first frames, 1 elsewhere (JVP tangents, losses)."""
        return free_mask(x, self.clean_first_frames, self.patch_frames)

    def chunk_loss_mean(self, e: torch.Tensor):
        """(per-(sample, chunk) mean of latents-shaped e over the frames with a loss [B, n_chunks], the chunks that
        have any [n_chunks]): ``ChunkLayout.chunk_mean`` without the held first frames."""
        return free_chunk_mean(e, self.layout(e), self.clean_first_frames, self.patch_frames)

    def loss_frames(self, e: torch.Tensor) -> torch.Tensor:
        """The frames of latents-shaped e that carry a loss (all but the held first frames)."""
        return free_frames(e, self.clean_first_frames)

    def training_context(self, x0: torch.Tensor, noise) -> TeacherForcingContext:
        """The teacher-forcing context of a training step: clean x0, or x0 perturbed as the sampler will leave
        it (noisy context; the noise comes from the step's :class:`BatchNoise` ``noise``)."""
        return self.noisy_context.perturb(x0, self.layout(x0), noise, self.patch_frames)

    def tokens_per_frame(self, x: torch.Tensor) -> int:
        return self.model.tokens_per_frame(x.shape[3], x.shape[4])

    def mask(self, kind: str | GroupMask | None, x: torch.Tensor) -> GroupMask | None:
        """The ``kind`` mask over latents x (teacher forcing: over [clean x ; noisy x]), cached per geometry."""
        if kind is None or isinstance(kind, GroupMask) or kind == "full":
            return None if kind == "full" else kind
        if kind not in MASK_KINDS:
            raise ValueError(f"mask kind must be one of {MASK_KINDS} or a GroupMask, got {kind!r}")
        c = self.model.causal
        key = (kind, self.frames(x), self.tokens_per_frame(x), c.chunk_frames, c.first_chunk_frames, c.window_chunks,
               c.sink_chunks)
        if key not in self._masks:
            build = block_causal_mask if kind == "block_causal" else teacher_forcing_mask
            self._masks[key] = build(key[1], key[2], c.chunk_frames, self.model.visibility(),
                                     first_chunk_frames=c.first_chunk_frames or None)
        return self._masks[key]

    def wan_time(self, s, x: torch.Tensor) -> torch.Tensor:
        """FM level(s) ``s`` (scalar, [B] or per-frame [B, F]) -> the model's per-frame timestep [B, F]."""
        # levels take the latents' precision; a number is filled on the device (as_tensor would copy it there and wait)
        s = s.to(x.device, x.dtype) if isinstance(s, torch.Tensor) else torch.full((), s, device=x.device, dtype=x.dtype)
        b, f = x.shape[0], self.frames(x)
        if s.dim() == 0:
            s = s.expand(b, f)
        elif s.dim() == 1 and s.shape[0] == b:
            s = s[:, None].expand(b, f)
        elif s.shape != (b, f):
            raise ValueError(f"noise level must be a scalar, [B] or [B, frames] = [{b}, {f}]; got {tuple(s.shape)} "
                             "(spread per-chunk levels with ChunkLayout.to_frames)")
        return WAN_T_SCALE * s

    # ------------------------------------------------------------------ the calls
    def velocity(self, x, s, cond: Condition, *, attend: str | GroupMask | None = "full", guidance: float = 1.0,
                 tangent=None, s_tangent=None, interval=None, interval_tangent=None, frame_offset: int = 0):
        """(v, dv) of latents x at levels s under the ``attend`` mask (full: bidirectional)."""
        mask = self.mask(attend, x)

        def fn(x, t, ctx, actions, tx, tt, it, itt, image):
            return self.model.forward_with_tangent(x, t, ctx, tx, tt, mask=mask, actions=actions,
                                                   frame_offset=frame_offset, interval=it, interval_tangent=itt,
                                                   image=image)

        return self._call(fn, x, s, cond, guidance, tangent, s_tangent, interval, interval_tangent)

    def teacher_forcing(self, clean, noisy, s, cond: Condition, *, guidance: float = 1.0, tangent=None,
                        s_tangent=None, interval=None, interval_tangent=None):
        """(v, dv) of the noisy copy in the [clean ; noisy] teacher-forcing sequence.

        ``clean``: the context copy, clean latents (at s = 0) or a :class:`TeacherForcingContext` (noisy
        context: its own per-frame levels, from :meth:`training_context`).
        """
        mask = self.mask("teacher_forcing", noisy)
        context = clean if isinstance(clean, TeacherForcingContext) else TeacherForcingContext(clean)
        clean = context.x.to(noisy.dtype) if context.x.dtype != noisy.dtype else context.x
        clean_t = None if context.s is None else self.wan_time(context.s, noisy)

        def fn(x, t, ctx, actions, tx, tt, it, itt, image, clean, clean_t):
            return self.model.forward_teacher_forcing(clean, x, t, ctx, mask, tangent=tx, timestep_tangent=tt,
                                                      actions=actions, interval=it, interval_tangent=itt,
                                                      clean_timestep=clean_t, image=image)

        return self._call(fn, noisy, s, cond, guidance, tangent, s_tangent, interval, interval_tangent, clean=clean,
                          clean_t=clean_t)

    def new_cache(self, height: int, width: int, cond: Condition | None = None, guidance: float = 1.0,
                  evict: bool = True, options=None, reserve_frames: int | None = None,
                  stream_frames: int | None = None) -> ChunkCache:
        """An empty stream cache for latents of this size; guided when ``guidance`` != 1 and ``cond`` has uncond.
        ``evict=False`` keeps every chunk (the replayed backward reads the cache as each chunk saw it).
        ``options``: a long stream's ``models.kv_cache.StreamCacheOptions`` (None: the training mask's rule).
        ``reserve_frames``: room for this many patched frames, allocated once (a rollout's video).
        ``stream_frames``: a stream's patched frames: its cache is preallocated for them (``models/preallocated_cache.py``)."""
        guided = guidance != 1.0 and cond is not None and cond.uncond is not None
        kv = self.model.new_kv_cache(height, width, evict=evict, options=options, reserve_frames=reserve_frames,
                                     stream_frames=stream_frames)
        return ChunkCache(kv, guidance, guided)

    def chunk(self, x, s, cond: Condition, cache: ChunkCache, index: int, *, write: bool = False, tangent=None,
              s_tangent=None, interval=None, interval_tangent=None, output: bool = True):
        """(v, dv) of chunk ``index`` (latents x) against the stream's cache; ``write`` appends its K/V.

        ``cond.actions`` are the chunk's own (``Condition.frames``). The cache's guidance applies.
        ``output=False``: the caller discards the output (a pure cache write: no pipeline-stage broadcast).
        """
        def fn(x, t, ctx, actions, tx, tt, it, itt, image):
            if cache.graphs is not None and tx is None and tt is None and itt is None and not torch.is_grad_enabled():
                return cache.graphs.run(self.model, cache.kv, index, write, x=x, t=t, ctx=ctx, actions=actions,
                                        interval=it, image=image), None
            return self.model.forward_chunk(x, t, ctx, cache.kv, index, write_cache=write, actions=actions,
                                            tangent=tx, timestep_tangent=tt, interval=it, interval_tangent=itt,
                                            image=image)

        return self._call(fn, x, s, cond, cache.guidance if cache.guided else 1.0, tangent, s_tangent, interval,
                          interval_tangent, share=output, force_guided=cache.guided)

    @torch.no_grad()
    def write_chunk(self, x0, cond: Condition, cache: ChunkCache, index: int, s: float = 0.0) -> None:
        """Re-run a finished chunk (at s = 0, or at level ``s`` for noisy context: then ``x0`` is the chunk
        re-noised to ``s``) and append its keys/values, so later chunks attend to it."""
        self.chunk(x0, s, cond, cache, index, write=True, output=False)

    # ------------------------------------------------------------------ one implementation of every call
    def _call(self, fn, x, s, cond: Condition, guidance: float, tangent, s_tangent, interval, interval_tangent,
              share: bool = True, force_guided: bool = False, **extra):
        kw = dict(x=x, t=self.wan_time(s, x), actions=cond.actions, tx=tangent,
                  tt=None if s_tangent is None else self.wan_time(s_tangent, x),
                  it=None if interval is None else self.wan_time(interval, x),
                  itt=None if interval_tangent is None else self.wan_time(interval_tangent, x), image=cond.image,
                  **extra)
        guided = force_guided or (guidance != 1.0 and cond.uncond is not None)
        ctx = cond.context
        if guided:
            if cond.uncond is None:
                raise ValueError("a guided stream cache needs the unconditional context (Condition.uncond)")
            kw = {k: _dup(v) for k, v in kw.items()}
            ctx = torch.cat([cond.context, cond.uncond])
        out = fn(ctx=ctx, **kw)
        if share:
            out = self._share(out, kw["x"], kw["tx"])
        if not guided:
            return out
        return combine_guidance(out[0], guidance), combine_guidance(out[1], guidance)

    def _share(self, out, x, tx):
        share = getattr(getattr(self.model, "parallel", None), "share_stage_outputs", None)
        return out if share is None else share(out, (x, tx))
