"""Streaming generation: chunk by chunk, 1-4 steps, rolling KV cache, progressive output.

Each chunk is sampled with the same few-step x0-prediction + re-noise sampler the student was
distilled with (:func:`megatron_rcm.selfforcing.rollout.sample_chunk`; per-chunk step counts and levels
from :mod:`megatron_rcm.diffusion.step_schedule`), then its keys/values are appended to the cache: re-run
at t = 0, or with noisy context (:mod:`megatron_rcm.network.context`) written by the last denoising
forward itself (N forwards per chunk instead of N + 1). The cache evicts by the model's
``ChunkVisibility`` (sink chunks + window; a stream may set its own, ``StreamConfig.window_chunks`` /
``sink_chunks``), so videos of any length keep a flat cache; RoPE positions keep increasing
(``rope_policy='absolute'``) or the window is re-based after the sink chunks (``'rebase'``), and the
self-attention K/V may be held in fp8 (``kv_cache_dtype``; ``models/kv_cache.py``). The noise order
matches :func:`self_forcing_rollout`, so a stream reproduces a rollout from one seed.

World models: ``action_fn(chunk_index, frames_so_far) -> actions [B, that chunk's frames, A]`` is called
before each chunk (``frames_so_far`` = list of the latest chunks, oldest first), e.g.
:func:`stdin_action_reader` for interactive play. Only as many chunks are kept as the model can
still see (its window), so an endless interactive stream holds bounded memory.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch

from ..diffusion.step_schedule import StepSchedule, StepScheduleConfig, build_schedule
from ..models.kv_cache import StreamCacheOptions
from ..network import WAN_T_SCALE, Condition, Denoiser, NoisyContext
from ..network.chunk_graphs import ChunkGraphs
from ..network.clean_frames import HeldFrames
from ..ops.chunks import ChunkLayout
from ..selfforcing.rollout import sample_chunk

# where a bad streaming schedule value comes from, for the error message (the CLI's flags)
STREAM_KEYS = {"denoising_steps": "--steps", "shift": "--shift", "steps_per_chunk": "--steps-per-chunk",
               "chunk_schedules": "--mid-t-schedules", "sigma_max": "--sigma-max"}
CACHE_KEYS = {"window_chunks": "--window-chunks", "sink_chunks": "--sink-chunks", "rope_policy": "--rope-policy",
              "kv_cache_dtype": "--kv-cache-dtype"}


@dataclass
class StreamConfig:
    steps: int = 2  # 1-4 few-step sampling
    timesteps: list[float] | None = None  # explicit Wan timesteps; default: evenly spaced from 1000
    shift: float = 1.0
    guidance_scale: float = 1.0  # CFG (1 = off; distilled students usually need none)
    # per-chunk schedules (diffusion/step_schedule.py): Causal-rCM --steps_per_chunk / --mid_t_schedules / --sigma_max
    steps_per_chunk: list[int] | None = None
    chunk_schedules: list | None = None
    sigma_max: float = 0.0
    noisy_context: NoisyContext | None = None  # None: the model's causal.context_from_last_step*
    # long streams (models/kv_cache.py StreamCacheOptions): window/sink None = the model's causal.*
    window_chunks: int | None = None
    sink_chunks: int | None = None
    # absolute | rebase; rebase by default: with sink chunks absolute positions collapse at 8x the training length
    # and rebase does not, without sinks (or within the window) the two are the same (benchmarks/RESULTS.md)
    rope_policy: str = "rebase"
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | fp8_e4m3
    trained_frames: int | None = None  # training length (latent frames): rebase leaves streams inside it unchanged
    # replay each chunk's forward as a CUDA graph (network/chunk_graphs.py): the model keeps them for its next streams
    cuda_graphs: bool = False

    def cache_options(self) -> StreamCacheOptions:
        """The stream cache's options (validated: errors name the CLI flag)."""
        return StreamCacheOptions(self.window_chunks, self.sink_chunks, self.rope_policy, self.kv_cache_dtype,
                                  self.trained_frames).validate(CACHE_KEYS)

    def schedule(self) -> StepSchedule:
        """The levels of every chunk; without explicit timesteps the base grid is evenly spaced over the
        largest step count asked for."""
        most = max([self.steps, *(self.steps_per_chunk or [])])
        cfg = StepScheduleConfig(list(self.timesteps or default_timesteps(most)), self.shift,
                                 list(self.steps_per_chunk or []), list(self.chunk_schedules or []), self.sigma_max)
        return build_schedule(cfg, "stream", names=STREAM_KEYS)


@dataclass
class ChunkOutput:
    index: int
    frames: torch.Tensor  # [B, C, chunk latent frames, H, W]
    latency_s: float  # wall time to produce this chunk (sampling + cache write)
    cache_tokens: int  # KV cache size after this chunk


def uniform_timesteps(steps: int) -> list[float]:
    """Wan timesteps evenly spaced from pure noise: [1000], [1000, 500], [1000, 750, 500, 250], ..."""
    return [WAN_T_SCALE * (steps - k) / steps for k in range(steps)]


def default_timesteps(steps: int) -> list[float]:
    """The few-step streaming schedule (:func:`uniform_timesteps`, 1..8 steps)."""
    if not 1 <= steps <= 8:
        raise ValueError(f"steps must be in 1..8 for few-step streaming, got {steps}")
    return uniform_timesteps(steps)


def stream_chunks(net: Denoiser, cond: Condition, num_frames: int, height: int, width: int, chunk_sampler: Callable,
                  start_noise: Callable, guidance: float = 1.0, action_fn: Callable | None = None, prefix=None,
                  history_chunks: int | None = None, sync: Callable[[], None] | None = None,
                  noisy: NoisyContext | None = None, fresh_noise: Callable | None = None,
                  cache_options: StreamCacheOptions | None = None,
                  condition_at: Callable[[int], Condition] | None = None,
                  recache: bool = True, cuda_graphs: bool = False) -> Iterator[ChunkOutput]:
    """The streaming loop every chunk-by-chunk sampler shares (few-step students, the teacher's ODE).

    ``chunk_sampler(denoise, noise, chunk) -> x0`` denoises chunk ``chunk``, where ``denoise(x, s) -> v``
    calls the network against the stream's KV cache at FM level ``s`` (``denoise(x, s, write=True)`` also
    appends the chunk's K/V: a noisy-context sampler's last step); ``start_noise(chunk_index, shape)`` gives
    its starting noise. A chunk the sampler did not write is cached after it by ``noisy``'s rule (default:
    the model's; clean = re-run at s = 0, noisy = re-noised with ``fresh_noise(shape)``).
    With guidance the stream keeps a [cond ; uncond] pair of caches in one batch (see ``ChunkCache``).
    ``cond.actions`` is ignored: world models get each chunk's actions from ``action_fn`` (see
    :func:`stream_video`).

    ``prefix`` [B, C, P, H, W]: known clean frames (an observation, an image). Its whole chunks prefill the
    cache; frames left over fill the start of the next chunk, which is denoised with them held clean
    (:class:`~megatron_rcm.network.clean_frames.HeldFrames`) and yielded with them. ``prefix`` + ``num_frames``
    must be whole chunks.

    ``condition_at(chunk) -> Condition`` switches the conditioning mid-stream (a prompt schedule; default ``cond``
    throughout): when it returns another condition than the previous chunk's, the cached chunks' K/V are
    re-written under the new one from the latents they were cached from (``recache``, LongLive's KV re-cache),
    or only the cross-attention K/V are dropped (``recache=False``: old chunks keep the old prompt's K/V).

    ``cache_options``: window/sink, RoPE policy and K/V dtype of the stream's cache (None: the model's
    window/sink, absolute positions, the model's dtype). The cache is preallocated for the stream
    (``models/preallocated_cache.py``) unless it holds fp8; ``cuda_graphs`` replays the chunk forwards as CUDA graphs
    captured on the model's cache (``network/chunk_graphs.py``; a CUDA device, one process, the model's dtype).
    """
    b, pt = cond.batch, net.patch_frames
    given = 0 if prefix is None else prefix.shape[2]
    if given % pt or num_frames % pt:
        raise ValueError(f"frame counts must be multiples of the temporal patch {pt}")
    try:
        layout = net.layout((given + num_frames) // pt)
    except ValueError as err:
        raise ValueError(f"prefix ({given}) + num_frames ({num_frames}) must be whole chunks: {err}") from None
    end = layout.n_chunks
    first = max(k for k in range(end + 1) if layout.start(k) <= given // pt)  # whole chunks given
    hold = None
    if given > layout.start(first) * pt:  # the rest of the prefix: held clean in chunk `first`
        hold = HeldFrames(prefix[:, :, layout.start(first) * pt:].to(net.dtype), pt)
    switching = condition_at is not None
    condition_at = condition_at or (lambda _chunk: cond)
    current = condition_at(0)
    stream_frames = (given + num_frames) // pt
    if cuda_graphs:
        ChunkGraphs.require(net.model, cond.context.device, (cache_options or StreamCacheOptions()).kv_cache_dtype)
        cache = ChunkGraphs.of(net.model).stream_cache(net, height, width, current, guidance, cache_options,
                                                       stream_frames)
    else:
        cache = net.new_cache(height, width, current, guidance, options=cache_options, stream_frames=stream_frames)
    noisy = net.noisy_context if noisy is None else noisy
    fresh_noise = fresh_noise or (lambda shape: torch.randn(shape, device=cond.context.device, dtype=net.dtype))
    sync = sync or (lambda: torch.cuda.synchronize() if cond.context.is_cuda else None)
    if history_chunks is not None and history_chunks < 0:
        raise ValueError(f"history_chunks must be >= 0 (or None for the model's window), got {history_chunks}")
    if history_chunks is None:
        history_chunks = cache.kv.visibility.window or None  # None: an unlimited cache keeps everything too
    produced: deque[torch.Tensor] = deque(maxlen=history_chunks if action_fn is not None else 0)
    written = CachedChunks(keep=switching and recache)  # what each cached chunk was written from (re-cache)

    def chunk_condition(chunk):
        nonlocal current
        base = condition_at(chunk)
        if base is not current:  # a prompt switch
            current = base
            if recache:
                written.rewrite(net, cache, base)
            else:
                cache.forget_condition()
        if action_fn is None:
            return base.with_actions(None)
        a = torch.as_tensor(action_fn(chunk, list(produced)), dtype=net.dtype, device=cond.context.device)
        return base.with_actions(a.unsqueeze(0).expand(b, -1, -1) if a.dim() == 2 else a)

    def cache_chunk(x0, cc, chunk):
        x, s = noisy.cached_copy(x0, chunk, fresh_noise)
        net.write_chunk(x, cc, cache, chunk, s=s)
        written.add(chunk, x, s, cc.actions, cache)

    try:
        for chunk in range(first):  # given clean frames (a world model's observation) prefill the cache
            x0 = prefix[:, :, layout.frame_slice(chunk, pt)].to(net.dtype)
            cache_chunk(x0, chunk_condition(chunk), chunk)
            produced.append(x0)
        for chunk in range(first, end):
            t0 = time.perf_counter()
            cc = chunk_condition(chunk)
            shape = (b, net.model.cfg.in_channels, layout.size(chunk) * pt, height, width)
            wrote = []

            def denoise(x, s, write=False, cc=cc, chunk=chunk):
                wrote.append(write)
                if write:
                    written.add(chunk, x, s, cc.actions, cache)
                return net.chunk(x, s, cc, cache, chunk, write=write)[0]

            held = hold if chunk == first else None
            x0 = chunk_sampler(held.denoiser(denoise) if held else denoise, start_noise(chunk - first, shape), chunk)
            x0 = held.output(x0) if held else x0
            if not any(wrote):
                cache_chunk(x0, cc, chunk)
            sync()
            produced.append(x0)
            yield ChunkOutput(chunk, x0, time.perf_counter() - t0, cache.num_tokens)
    finally:  # also when the consumer drops the stream: the model's graphs serve the next one
        if cache.graphs is not None:
            cache.graphs.release(cache)


class CachedChunks:
    """The latents (and levels, actions) each cached chunk's K/V were written from, for as long as the cache holds
    it: a prompt switch re-writes them under the new condition (LongLive's KV re-cache). Bounded by the cache's
    window; nothing is kept when ``keep`` is False (a stream without a prompt schedule)."""

    def __init__(self, keep: bool):
        self.keep = keep
        self.entries: dict[int, tuple] = {}

    def add(self, chunk: int, x, s, actions, cache) -> None:
        """Record chunk ``chunk``'s cached copy (called just before or after its write); forget evicted chunks."""
        if not self.keep:
            return
        alive = set(cache.chunks) | {chunk}
        self.entries = {c: e for c, e in self.entries.items() if c in alive}
        self.entries[chunk] = (x.detach(), s, actions)

    def rewrite(self, net: Denoiser, cache, cond: Condition) -> None:
        """Empty ``cache`` and write every chunk it holds again, in order, under ``cond`` (the new prompt).

        Each re-written chunk attends to the re-written ones before it; chunks already evicted are not brought
        back, so with a rolling window the oldest kept chunk is re-encoded without the context it once saw (as
        LongLive re-caches the frames of its window)."""
        alive = set(cache.chunks)
        self.entries = {c: e for c, e in self.entries.items() if c in alive}
        cache.clear()
        for chunk in sorted(self.entries):
            x, s, actions = self.entries[chunk]
            net.write_chunk(x, cond.with_actions(actions), cache, chunk, s=s)


def including_prefix(chunks: Iterator[ChunkOutput], prefix, net: Denoiser) -> Iterator[ChunkOutput]:
    """A stream's chunks with the prefix frames it did not yield (its whole chunks, cached only) put in front of
    the first one, so a writer shows the video from the given frames on (``generate --image``)."""
    first = True
    for out in chunks:
        if first and prefix is not None:
            c = net.model.causal
            lead = ChunkLayout.covering(out.index + 1, c.chunk_frames, c.first_chunk_frames or None).start(out.index)
            lead *= net.patch_frames
            if lead:
                out = replace(out, frames=torch.cat([prefix[:, :, :lead].to(out.frames), out.frames], dim=2))
        first = False
        yield out


def chunkwise(sampler: Callable) -> Callable:
    """A ``sampler(denoise, noise) -> x0`` (e.g. an ODE solver) as a :func:`stream_chunks` chunk sampler that
    treats every chunk alike."""
    return lambda denoise, noise, _chunk: sampler(denoise, noise)


def few_step_sampler(schedule: StepSchedule, noisy: NoisyContext, generator=None) -> Callable:
    """The students' chunk sampler for :func:`stream_chunks`: every step of the chunk's schedule; with noisy
    context its last step writes the cache when it runs at the context level."""
    def sampler(denoise, noise, chunk):
        levels = schedule.levels(chunk)
        level = noisy.level_of(chunk)
        return sample_chunk(denoise, noise, levels, len(levels) - 1, grad=False, generator=generator,
                            write_at=level if level > 0 else None).x0

    return sampler


@torch.no_grad()
def stream_video(model, context, num_frames: int, height: int, width: int, cfg: StreamConfig | None = None,
                 uncond_context=None, action_fn: Callable | None = None, generator=None,
                 sync: Callable[[], None] | None = None, prefix=None,
                 history_chunks: int | None = None, condition_at: Callable[[int], Condition] | None = None,
                 recache: bool = True) -> Iterator[ChunkOutput]:
    """Yield each chunk as soon as it is denoised (a generator). ``num_frames`` may exceed training length.

    ``model``: a CausalWanModel (or its :class:`~megatron_rcm.network.Denoiser`). ``prefix``
    [B, C, P, H, W]: given clean frames (e.g. the world model's current observation, an image) written to
    the cache first; ``num_frames`` new frames follow them, with chunk indices (and RoPE positions)
    continuing after the prefix. Prefix frames that do not fill a whole chunk are held clean in the first
    generated chunk, which yields them too (image-to-video by first frame; see :func:`stream_chunks`).
    ``condition_at(chunk) -> Condition``: a prompt schedule (see :func:`stream_chunks`; ``context`` is then
    only the first chunk's). ``action_fn`` is asked for every chunk,
    prefix chunks included (their actions condition the cached K/V). ``history_chunks``: how many of the
    latest chunks ``frames_so_far`` holds; None = the model's ``window_chunks`` (all when unlimited).
    Nothing is kept without an ``action_fn``.
    """
    cfg = cfg or StreamConfig()
    net = Denoiser.of(model)
    schedule = cfg.schedule()
    noisy = net.noisy_context if cfg.noisy_context is None else cfg.noisy_context
    device = context.device

    def noise(shape):
        return torch.randn(shape, generator=generator, device=device, dtype=net.dtype)

    yield from stream_chunks(net, Condition(context, uncond_context), num_frames, height, width,
                             few_step_sampler(schedule, noisy, generator), lambda _chunk, shape: noise(shape),
                             cfg.guidance_scale, action_fn, prefix, history_chunks, sync, noisy, noise,
                             cfg.cache_options(), condition_at, recache, cfg.cuda_graphs)


def generate_video(model, context, num_frames: int, height: int, width: int, steps: int = 2,
                   timesteps: list[float] | None = None, shift: float = 1.0, guidance_scale: float = 1.0,
                   uncond_context=None, action_fn: Callable | None = None, seed: int | None = 0, generator=None,
                   writer=None, decode: Callable | None = None, log: Callable[[str], None] | None = print,
                   prefix=None, writer_sample: int | None = 0, options: StreamConfig | None = None,
                   condition_at: Callable[[int], Condition] | None = None, recache: bool = True,
                   show_prefix: bool = False):
    """Generate a video by streaming; returns the streamed frames [B, C, f, H, W]: the ``num_frames`` after the
    prefix's whole chunks (f = num_frames), or, when the prefix ends inside a chunk, from that chunk's start.

    ``writer`` receives each chunk as soon as it exists: ``utils.video.StreamingVideoWriter`` (``append``),
    anything with ``write``, or a callable. It gets batch element ``writer_sample`` ([C, f, H, W]; None =
    the whole [B, C, f, H, W] chunk), decoded by ``decode`` (latents -> pixels) first if given.
    Per-chunk latency goes to ``log`` (print by default; None = silent). ``options``: a StreamConfig whose
    per-chunk schedule and noisy-context fields apply (its steps/timesteps/shift/guidance are the arguments').
    ``show_prefix``: the prefix's whole chunks go to the writer (and the result) too, before the first chunk.
    """
    if generator is None and seed is not None:
        generator = torch.Generator(device=context.device)
        generator.manual_seed(seed)
    cfg = replace(options or StreamConfig(), steps=steps, timesteps=timesteps, shift=shift,
                  guidance_scale=guidance_scale)
    chunks = []
    stream = stream_video(model, context, num_frames, height, width, cfg, uncond_context, action_fn, generator,
                          prefix=prefix, condition_at=condition_at, recache=recache)
    for out in including_prefix(stream, prefix, Denoiser.of(model)) if show_prefix else stream:
        chunks.append(out.frames)
        if writer is not None:
            frames = decode(out.frames) if decode is not None else out.frames
            frames = frames if writer_sample is None else frames[writer_sample]
            put = getattr(writer, "append", None) or getattr(writer, "write", None) or writer
            put(frames.detach().float().cpu())
        if log is not None:
            log(f"chunk {out.index}: {out.frames.shape[2]} frames in {out.latency_s * 1e3:.1f} ms "
                f"(kv cache {out.cache_tokens} tokens)")
    return torch.cat(chunks, dim=2)


def one_hot_actions(ids, action_dim: int, chunk_frames: int, batch: int = 1) -> torch.Tensor:
    """Action ids (one for the chunk, or one per frame) -> one-hot [B, chunk_frames, action_dim]."""
    ids = list(ids)
    if len(ids) == 1:
        ids = ids * chunk_frames
    if len(ids) != chunk_frames:
        raise ValueError(f"give 1 or {chunk_frames} action ids per chunk, got {len(ids)}")
    if any(not 0 <= i < action_dim for i in ids):
        raise ValueError(f"action ids must be in [0, {action_dim}), got {ids}")
    a = torch.nn.functional.one_hot(torch.tensor(ids), action_dim).float()
    return a.unsqueeze(0).expand(batch, -1, -1)


def stdin_action_reader(action_dim: int, chunk_frames: int | Callable[[int], int], batch: int = 1, stream=None,
                        prompt: bool = True, default: int = 0) -> Callable:
    """An ``action_fn`` that reads one line of action ids per chunk (e.g. "2" or "0 0 3 3").

    ``chunk_frames``: the frames of every chunk, or ``size(chunk_index)`` when the first chunk has its own
    size (``ChunkLayout.size``). Empty line or EOF repeats the previous action; invalid input is reported
    and repeats it too (a per-frame line that does not fit the chunk is invalid).
    """
    state = {"ids": [default]}
    size = chunk_frames if callable(chunk_frames) else (lambda _chunk: chunk_frames)

    def action_fn(chunk_index, frames_so_far):
        chunk_frames = size(chunk_index)
        src = stream or sys.stdin
        if prompt:
            print(f"chunk {chunk_index}: action ids (0..{action_dim - 1}), enter = repeat {state['ids']}: ",
                  end="", flush=True, file=sys.stderr)
        line = src.readline()
        if line.strip():
            try:
                ids = [int(tok) for tok in line.replace(",", " ").split()]
                one_hot_actions(ids, action_dim, chunk_frames)
                state["ids"] = ids
            except ValueError as err:
                print(f"ignored ({err}); repeating {state['ids']}", file=sys.stderr)
        ids = state["ids"] if len(state["ids"]) in (1, chunk_frames) else state["ids"][-1:]
        return one_hot_actions(ids, action_dim, chunk_frames, batch)

    return action_fn
