"""KV cache for streaming (chunk-by-chunk) generation and self-forcing rollouts.

After a chunk is denoised it is re-run at t = 0 with ``write=True``; each self-attention layer then
appends the chunk's (normed, rotated) keys and values. Later chunks attend to the cache plus
themselves. Eviction follows the same :class:`ChunkVisibility` rule as the training mask (sink
chunks + a window of recent chunks), so memory stays flat over arbitrarily long rollouts and the
cached answer equals the block-causal full-sequence answer. Cross-attention keys/values of the text
context (and of the image context, I2V layout) are computed once per video and kept here too. Chunks
may have different sizes (the first chunk of Causal-rCM's c1-4 pattern): each cached chunk's token count
is recorded.

Streams past the training length (:class:`StreamCacheOptions`): the window/sink may differ from the
training mask's, the sink chunks' RoPE positions may be re-based (``rope_policy='rebase'``, see
:func:`sink_position_shift`), and the self-attention K/V may be held in fp8 (``kv_cache_dtype='fp8_e4m3'``,
:mod:`.kv_quant`). Training paths build caches without options: absolute positions, the model's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config.errors import ConfigError
from ..config.stream_cache import KV_CACHE_DTYPES, ROPE_POLICIES
from ..ops.chunks import ChunkLayout
from ..ops.masks import ChunkVisibility
from .kv_quant import dequantize, quantize_per_head
from .rope import apply_rope, rope_tables


@dataclass(frozen=True)
class StreamCacheOptions:
    """How a stream's cache behaves past the training length (``None`` = the model's ``causal.*``).

    ``window_chunks`` / ``sink_chunks``: the rolling cache (Self-Forcing's ``local_attn_size`` / ``sink_size``;
    sink 0 is Causal-rCM's ``sliding_window``, sink > 0 LongLive's frame sink). ``rope_policy``: ``absolute``
    (positions keep increasing) or ``rebase`` (the window is placed right after the sink chunks, as if the
    evicted chunks never existed: the Infinity-RoPE / block-relative family). ``kv_cache_dtype``: ``auto``
    (the model's dtype) or ``fp8_e4m3`` (self-attention K/V in fp8 with per chunk and head scales).
    ``trained_frames``: the training videos' latent frames; ``rebase`` then moves positions only as far as
    needed to keep every attended distance inside that range, so a stream inside it is exactly the trained
    one (None: as if the window always followed the sinks).
    """

    window_chunks: int | None = None
    sink_chunks: int | None = None
    rope_policy: str = "absolute"
    kv_cache_dtype: str = "auto"
    trained_frames: int | None = None

    def validate(self, names: dict[str, str] | None = None) -> "StreamCacheOptions":
        """Raise a ConfigError naming the field (or the flag in ``names``) of a bad value."""
        name = lambda key: (names or {}).get(key, key)  # noqa: E731
        for key in ("window_chunks", "sink_chunks"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ConfigError(name(key), value, "a chunk count >= 0 (window 0 = unlimited)")
        if self.rope_policy not in ROPE_POLICIES:
            raise ConfigError(name("rope_policy"), self.rope_policy, f"one of {list(ROPE_POLICIES)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(name("kv_cache_dtype"), self.kv_cache_dtype, f"one of {list(KV_CACHE_DTYPES)}")
        if self.trained_frames is not None and (not isinstance(self.trained_frames, int) or self.trained_frames < 1):
            raise ConfigError(name("trained_frames"), self.trained_frames, "the training length in latent frames (>= 1)")
        return self

    def visibility(self, model_visibility: ChunkVisibility) -> ChunkVisibility:
        w = model_visibility.window if self.window_chunks is None else self.window_chunks
        s = model_visibility.sink if self.sink_chunks is None else self.sink_chunks
        return ChunkVisibility(w, s)


def sink_position_shift(visibility: ChunkVisibility, layout: ChunkLayout, chunk: int,
                        trained_frames: int | None = None) -> int:
    """Latent frames by which ``rope_policy='rebase'`` moves the sink chunks forward for chunk ``chunk``.

    Rebasing gives the sink chunks their own positions and the visible window (its cached chunks and the
    current one) positions as if it started right after the sinks: the window moves back by the frames of
    the evicted chunks between them. RoPE attention scores depend only on position differences (per axis),
    so that equals moving only the sink keys *forward* by those frames and leaving every other position
    absolute. Why this form: the shift touches only the few sink tokens at read time (a rotation of a
    rotated key by the delta, the rotations compose), needs no un-rotated copy of the cache and no
    re-rotation of the window's keys (which would repeat every chunk and, in fp8, re-quantise), and
    ``absolute`` pays nothing. Without sinks (a plain sliding window) or before anything was evicted the
    shift is 0: rebase equals absolute there exactly. ``trained_frames`` caps the shift at what keeps the
    sink-to-chunk distance inside the trained range (the chunk's end at ``trained_frames``, Infinity-RoPE's
    ``f_limit``): a stream shorter than the training videos is then unchanged even when it evicts.
    """
    w, s = visibility.window, visibility.sink
    first_window_chunk = chunk - w + 1
    if w == 0 or s == 0 or first_window_chunk <= s:
        return 0
    shift = layout.start(first_window_chunk) - layout.start(s)
    if trained_frames is not None:
        shift = min(shift, max(0, layout.start(chunk) + layout.size(chunk) - trained_frames))
    return shift


@dataclass
class LayerCache:
    k: torch.Tensor | None = None  # [B, S_cache, H, D] (fp8 with kv_cache_dtype='fp8_e4m3')
    v: torch.Tensor | None = None
    k_scale: torch.Tensor | None = None  # fp8 only: [B, cached chunks, H] float32
    v_scale: torch.Tensor | None = None
    dtype: torch.dtype | None = None  # what fp8 entries dequantise to (the appended K/V's dtype)
    cross_k: torch.Tensor | None = None  # [B, L, H, D]
    cross_v: torch.Tensor | None = None
    image_k: torch.Tensor | None = None  # [B, L_img, H, D] (I2V layout)
    image_v: torch.Tensor | None = None
    k_room: torch.Tensor | None = None  # the buffer ``k`` is a prefix view of, with room for later chunks
    v_room: torch.Tensor | None = None


def _extend(cached: torch.Tensor | None, room: torch.Tensor | None, new: torch.Tensor, reserve: int | None):
    """(cached followed by new, the buffer it is a prefix of). ``new`` is written in place right after the
    prefix when ``room`` has space for it (the prefix itself, which snapshots may hold, is never touched);
    the first chunk goes into a fresh buffer of ``reserve`` tokens; otherwise (no room: after an eviction,
    or past the reserve) the two are concatenated as a new tensor."""
    n, m = (0 if cached is None else cached.shape[1]), new.shape[1]
    if room is not None and cached is not None and cached.data_ptr() == room.data_ptr() and room.shape[1] >= n + m:
        room[:, n:n + m].copy_(new)
        return room[:, :n + m], room
    if cached is None and reserve is not None and reserve > m:
        room = new.new_empty(new.shape[0], reserve, *new.shape[2:])
        room[:, :m].copy_(new)
        return room[:, :m], room
    return (new if cached is None else torch.cat([cached, new], dim=1)), None


class _FrozenLayer:
    """A :class:`LayerCache` view whose cross-attention slots ignore writes (see ``KVCache.frozen``)."""

    def __init__(self, c: LayerCache):
        self.k, self.v, self.k_scale, self.v_scale, self.dtype = c.k, c.v, c.k_scale, c.v_scale, c.dtype
        self._cross = (c.cross_k, c.cross_v, c.image_k, c.image_v)

    cross_k = property(lambda self: self._cross[0], lambda self, value: None)
    cross_v = property(lambda self: self._cross[1], lambda self, value: None)
    image_k = property(lambda self: self._cross[2], lambda self, value: None)
    image_v = property(lambda self: self._cross[3], lambda self, value: None)


@dataclass
class KVCache:
    """Keys/values of the cached chunks of one stream, per self-attention layer.

    Chunks may differ in size (a first chunk of its own size, Causal-rCM's c1-4): the token count of
    each cached chunk is recorded when it is committed. ``evict=False`` keeps every chunk (the
    attention mask still applies the window/sink rule): the replayed self-forcing backward re-reads
    the cache as it was before each chunk (:meth:`before`). ``reserve_tokens`` (a self-forcing rollout:
    the whole video's tokens) allocates each layer's keys/values once and appends in place, so the
    snapshots of an activation-checkpointed rollout share one buffer (their prefixes of it) instead of
    holding a copy of the cache per chunk (1 + 2 + ... + n - 1 chunks).
    """

    num_layers: int
    visibility: ChunkVisibility = field(default_factory=ChunkVisibility)
    chunks: list[int] = field(default_factory=list)  # chunk index of each cached chunk, in cache order
    chunk_tokens: list[int] = field(default_factory=list)  # tokens of each cached chunk
    layers: list[LayerCache] = field(default_factory=list)
    evict: bool = True
    rope_policy: str = "absolute"  # see StreamCacheOptions; the model applies it (sink_position_shift)
    kv_cache_dtype: str = "auto"
    rope_trained_frames: int | None = None  # patched frames (StreamCacheOptions.trained_frames / temporal patch)
    reserve_tokens: int | None = None  # room per layer allocated at the first append (a rollout's whole video)
    _appending: int | None = field(default=None, repr=False)  # tokens of the chunk being appended

    def __post_init__(self):
        if not self.layers:
            self.layers = [LayerCache() for _ in range(self.num_layers)]

    def frozen(self) -> "KVCache":
        """A read-only snapshot (the same tensors, no copy) for activation-checkpointed passes.

        Why: a checkpointed block recomputes its forward during backward, when the live cache has
        already grown (later chunks appended, old ones evicted). The snapshot keeps what the forward
        saw. Cached tokens are never modified in place (evict builds new tensors; append writes only past
        the cached prefix, into the room ``reserve_tokens`` left), so holding references is enough. Cross-attention K/V missing at snapshot time stay missing (writes are
        ignored), so forward and recomputation build the same graph.
        """
        return KVCache(self.num_layers, self.visibility, list(self.chunks), list(self.chunk_tokens),
                       [_FrozenLayer(c) for c in self.layers], self.evict, self.rope_policy, self.kv_cache_dtype,
                       self.rope_trained_frames)

    def before(self, chunk: int) -> "KVCache":
        """A read-only view of the cached chunks with index < ``chunk`` (slices, no copy).

        Cache order is chunk order, so they are a prefix; on a cache that never evicted this is
        exactly the cache that chunk ``chunk`` was generated against.
        """
        n = sum(1 for c in self.chunks if c < chunk)
        tokens = sum(self.chunk_tokens[:n])
        view = self.frozen()
        view.chunks, view.chunk_tokens = view.chunks[:n], view.chunk_tokens[:n]
        for layer in view.layers:
            if layer.k is not None:
                layer.k, layer.v = (layer.k[:, :tokens], layer.v[:, :tokens]) if n else (None, None)
            if layer.k_scale is not None:
                layer.k_scale, layer.v_scale = (layer.k_scale[:, :n], layer.v_scale[:, :n]) if n else (None, None)
        return view

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def num_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def nbytes(self) -> int:
        """Bytes held by the self-attention keys/values (fp8 scales included; cross-attention K/V excluded:
        they are per video, not per chunk)."""
        def held(t, room):
            return t if room is None else room

        return sum(t.numel() * t.element_size() for c in self.layers
                   for t in (held(c.k, getattr(c, "k_room", None)), held(c.v, getattr(c, "v_room", None)),
                             c.k_scale, c.v_scale) if t is not None)

    def keys_values(self, layer: int, sink_rotation: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The cached keys/values of ``layer`` as attention reads them: dequantised (fp8), and with
        ``sink_rotation`` (cos, signed sin of :func:`sink_position_shift`'s frames) applied to the sink chunks' keys."""
        keys, v = self._read(layer, sink_rotation)
        return (keys[0] if len(keys) == 1 else torch.cat(keys, dim=1)), v

    def attended(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                 sink_rotation: tuple[torch.Tensor, torch.Tensor] | None = None):
        """(keys, values, cached tokens): the cached keys/values of ``layer`` (as :meth:`keys_values` reads them)
        followed by a chunk's own ``k``/``v``, each built with one concatenation (the sink rotation costs no
        extra copy of the cache)."""
        keys, cv = self._read(layer, sink_rotation)
        if cv is None:
            return k, v, 0
        return torch.cat([*keys, k], dim=1), torch.cat([cv, v], dim=1), cv.shape[1]

    def _read(self, layer: int, sink_rotation):
        """([key pieces in cache order], values) of ``layer``, dequantised; ([None], None) when empty."""
        c = self.layers[layer]
        k, v = c.k, c.v
        if k is None:
            return [k], v
        if c.k_scale is not None:
            k = dequantize(k, c.k_scale, self.chunk_tokens, c.dtype)
            v = dequantize(v, c.v_scale, self.chunk_tokens, c.dtype)
        if sink_rotation is not None:
            sink_tokens = sum(n for chunk, n in zip(self.chunks, self.chunk_tokens) if chunk < self.visibility.sink)
            if sink_tokens:
                return [apply_rope(k[:, :sink_tokens], *sink_rotation), k[:, sink_tokens:]], v
        return [k], v

    def append(self, layer: int, chunk: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add one chunk's keys/values for one layer (the chunk index list is updated by :meth:`commit`)."""
        if self._appending is not None and k.shape[1] != self._appending:
            raise ValueError(f"KVCache: layers appended {self._appending} and {k.shape[1]} tokens for chunk {chunk}")
        self._appending = k.shape[1]
        c = self.layers[layer]
        k, v = k.detach(), v.detach()
        if self.kv_cache_dtype == "fp8_e4m3":
            c.dtype = k.dtype
            (k, sk), (v, sv) = quantize_per_head(k), quantize_per_head(v)
            c.k_scale = sk if c.k_scale is None else torch.cat([c.k_scale, sk], dim=1)
            c.v_scale = sv if c.v_scale is None else torch.cat([c.v_scale, sv], dim=1)
        if isinstance(c, _FrozenLayer):  # a snapshot's (recomputed) write: never into the live cache's room
            c.k = k if c.k is None else torch.cat([c.k, k], dim=1)
            c.v = v if c.v is None else torch.cat([c.v, v], dim=1)
            return
        c.k, c.k_room = _extend(c.k, c.k_room, k, self.reserve_tokens)
        c.v, c.v_room = _extend(c.v, c.v_room, v, self.reserve_tokens)

    def commit(self, chunk: int) -> None:
        """Record that every layer appended ``chunk``; then evict chunks no future chunk can see."""
        if self.chunks and chunk <= self.chunks[-1]:
            raise ValueError(f"KVCache chunks must be appended in order: got {chunk} after {self.chunks[-1]}")
        if self._appending is None:
            raise ValueError(f"KVCache.commit({chunk}) without an append")
        self.chunks.append(chunk)
        self.chunk_tokens.append(self._appending)
        self._appending = None
        keep = self._kept_positions(next_chunk=chunk + 1)
        if len(keep) != len(self.chunks):
            self._evict(keep)

    def _evict(self, keep: list[int]) -> None:
        """Keep only the cached chunks at positions ``keep`` (in order): new tensors, so snapshots stay intact."""
        offsets = [0]
        for n in self.chunk_tokens:
            offsets.append(offsets[-1] + n)
        # slices of contiguous runs, concatenated: an index tensor would be copied to the GPU (and waited for)
        tokens = merge_runs([(offsets[p], offsets[p + 1]) for p in keep])
        chunks = merge_runs([(p, p + 1) for p in keep])
        for c in self.layers:
            if c.k is not None:
                c.k = torch.cat([c.k[:, a:b] for a, b in tokens], 1)
                c.v = torch.cat([c.v[:, a:b] for a, b in tokens], 1)
                c.k_room = c.v_room = None
            if c.k_scale is not None:
                c.k_scale = torch.cat([c.k_scale[:, a:b] for a, b in chunks], 1)
                c.v_scale = torch.cat([c.v_scale[:, a:b] for a, b in chunks], 1)
        self.chunks = [self.chunks[p] for p in keep]
        self.chunk_tokens = [self.chunk_tokens[p] for p in keep]

    def frame_offset(self, start: int, device):
        """The RoPE frame offset of the chunk starting at patched frame ``start``, as the model reads it: the int
        here; a preallocated stream cache gives a device scalar instead, so CUDA graphs replay it per chunk."""
        return start

    def sink_rotation(self, shift: int, head_dim: int, dtype: torch.dtype, device):
        """(cos, signed sin) of :func:`models.rope.rope_tables` rotating the sink keys forward by ``shift`` frames
        (``rope_policy='rebase'``, :func:`sink_position_shift`), or None when there is nothing to move."""
        if shift == 0:
            return None
        position = torch.zeros(1, 3, dtype=torch.long, device=device)  # filled there: no copy to wait for
        position[:, 0] = shift  # the time axis only
        return rope_tables(position, head_dim, dtype)

    def set_condition(self, layer: int, k, v, image_k=None, image_v=None) -> None:
        """Hold the cross-attention K/V of the stream's condition (text; image with the I2V layout) for ``layer``."""
        c = self.layers[layer]
        c.cross_k, c.cross_v, c.image_k, c.image_v = k, v, image_k, image_v

    def _kept_positions(self, next_chunk: int) -> list[int]:
        w, s = self.visibility.window, self.visibility.sink
        if w == 0 or not self.evict:
            return list(range(len(self.chunks)))
        return [p for p, c in enumerate(self.chunks) if c < s or next_chunk - c < w]

    def reset(self) -> None:
        self.chunks, self.chunk_tokens, self._appending = [], [], None
        self.layers = [LayerCache() for _ in range(self.num_layers)]


def merge_runs(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Increasing [a, b) ranges with touching neighbours merged."""
    out: list[list[int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]
