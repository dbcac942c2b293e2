"""A stream's KV cache in buffers allocated once, at fixed addresses (streaming; CUDA graphs).

Why: the growing cache (:class:`~.kv_cache.KVCache`) builds ``[cached ; chunk]`` with a concatenation in every
layer of every forward (30 layers x 2 copies of up to 32k tokens per call at the 1.3B shape) and a new tensor on
every eviction, so nothing it hands attention has a stable address. This one reserves room for everything a
stream can ever hold at once (the sink chunks plus the window, or the whole video without a window): a chunk's
keys/values are written right after the cached ones and attention reads one prefix view of the buffer, so a
forward copies nothing but the chunk itself, and the tensors a captured CUDA graph reads and writes stay where
they were (``network/chunk_graphs.py``). What changes from chunk to chunk without changing the graph, its RoPE
frame offset and the sink rotation of ``rope_policy='rebase'``, lives in device scalars that the caller fills
before the call (:meth:`CausalWanModel.prepare_chunk`).

Values equal the growing cache's exactly (same keys in the same order; tests/test_preallocated_cache.py):
eviction moves the kept chunks to the front of the buffer (once per chunk, outside any graph), and with
``rebase`` the sink keys are read rotated from an unrotated copy. Not for rollouts (no snapshots) nor fp8.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops.chunks import ChunkLayout
from ..ops.masks import ChunkVisibility
from .kv_cache import KVCache, LayerCache, merge_runs
from .rope import apply_rope


def capacity_chunks(layout: ChunkLayout, visibility: ChunkVisibility) -> list[int]:
    """The chunk indices whose tokens a stream over ``layout`` must hold at once at most (cached + current):
    every chunk without a window, else the largest visible set (sinks + window, the first chunk's size
    counted where it can be seen)."""
    n = layout.n_chunks
    if visibility.window == 0:
        return list(range(n))
    best, best_tokens = [], -1
    for c in range(min(n, visibility.sink + visibility.window + 2)):  # chunk sizes repeat after the first
        seen = visibility.visible_chunks(c)
        frames = sum(layout.size(j) for j in seen)
        if frames > best_tokens:
            best, best_tokens = seen, frames
    return best


@dataclass
class PreallocatedKVCache(KVCache):
    """A :class:`KVCache` whose keys/values live in one buffer per layer of ``capacity_tokens`` tokens."""

    capacity_tokens: int = 0
    sink_capacity_tokens: int = 0  # tokens of the sink chunks (rebase keeps an unrotated copy of their keys)
    _k: list = field(default_factory=list, repr=False)  # per layer [B, capacity, H, D] (allocated at first use)
    _v: list = field(default_factory=list, repr=False)
    _sink_k: list = field(default_factory=list, repr=False)  # rebase: the sink chunks' keys, unrotated
    _cross: list = field(default_factory=list, repr=False)  # per layer: fixed buffers of the condition's K/V
    _offset: torch.Tensor | None = field(default=None, repr=False)  # int64 device scalar: the chunk's frame offset
    _rotation: tuple | None = field(default=None, repr=False)  # (cos, signed sin) device buffers of the sink shift
    _prepared: dict = field(default_factory=dict, repr=False)  # host values the device scalars hold now
    version: int = 0  # bumped when a buffer is (re)allocated: graphs captured before it are stale

    def __post_init__(self):
        super().__post_init__()
        if self.kv_cache_dtype != "auto":
            raise ValueError("PreallocatedKVCache holds the model's dtype (kv_cache_dtype='auto'); fp8 streams use "
                             "KVCache")
        if self.capacity_tokens <= 0:
            raise ValueError(f"PreallocatedKVCache needs capacity_tokens > 0, got {self.capacity_tokens}")
        self._k, self._v = [None] * self.num_layers, [None] * self.num_layers
        self._sink_k, self._cross = [None] * self.num_layers, [None] * self.num_layers

    # ------------------------------------------------------------------ buffers
    def _buffers(self, layer: int, k: torch.Tensor):
        buf = self._k[layer]
        shape = (k.shape[0], self.capacity_tokens, *k.shape[2:])
        if buf is None or buf.shape != shape or buf.dtype != k.dtype or buf.device != k.device:
            if self.chunks:
                raise ValueError(f"PreallocatedKVCache: layer {layer} got K/V of shape {tuple(k.shape)} {k.dtype} "
                                 f"for a cache of {None if buf is None else tuple(buf.shape)}")
            self._k[layer], self._v[layer] = k.new_empty(shape), k.new_empty(shape)
            if self.rope_policy == "rebase" and self.sink_capacity_tokens:  # now, not when the first sink commits
                self._sink_k[layer] = k.new_empty(k.shape[0], self.sink_capacity_tokens, *k.shape[2:])
            self.version += 1
        return self._k[layer], self._v[layer]

    @property
    def nbytes(self) -> int:
        held = [t for t in (*self._k, *self._v, *self._sink_k) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)

    def sink_tokens(self) -> int:
        """Tokens of the cached sink chunks (the buffer's first ones: chunks are kept in order)."""
        return sum(n for chunk, n in zip(self.chunks, self.chunk_tokens) if chunk < self.visibility.sink)

    # ------------------------------------------------------------------ what the model reads
    def frame_offset(self, start: int, device):
        if self._offset is None or self._offset.device != torch.device(device):
            self._offset = torch.zeros((), dtype=torch.long, device=device)
            self._prepared.pop("offset", None)
            self.version += 1
        if self._prepared.get("offset") != start:  # outside a graph (prepare_chunk ran first inside one)
            self._offset.fill_(start)
            self._prepared["offset"] = start
        return self._offset

    def sink_rotation(self, shift: int, head_dim: int, dtype: torch.dtype, device):
        shapes = ((1, head_dim // 2), (1, head_dim // 2, 2))  # cos, signed sin (models/rope.rope_tables)
        r = self._rotation
        if r is None or r[0].shape != shapes[0] or r[0].dtype != dtype or r[0].device != torch.device(device):
            # allocated on the stream's first call (shift 0), so no graph captured later sees it move
            self._rotation = tuple(torch.empty(shape, dtype=dtype, device=device) for shape in shapes)
            self._prepared.pop("shift", None)
            self.version += 1
        if shift == 0:
            return None
        if self._prepared.get("shift") != shift:  # outside a graph (prepare_chunk ran first inside one)
            cos, sin = super().sink_rotation(shift, head_dim, dtype, device)
            self._rotation[0].copy_(cos), self._rotation[1].copy_(sin)
            self._prepared["shift"] = shift
        return self._rotation

    def set_condition(self, layer: int, k, v, image_k=None, image_v=None) -> None:
        """Copy the condition's K/V into this layer's fixed buffers (allocated on first use or a new shape)."""
        new = (k, v, image_k, image_v)
        held = self._cross[layer]
        if held is None or any((a is None) != (b is None) or (a is not None and a.shape != b.shape)
                               for a, b in zip(held, new)):
            held = tuple(None if t is None else torch.empty_like(t) for t in new)
            self._cross[layer] = held
            self.version += 1
        for dst, src in zip(held, new):
            if dst is not None:
                dst.copy_(src)
        super().set_condition(layer, *held)

    def _read(self, layer: int, sink_rotation):
        n = self.num_tokens
        if n == 0 or self._k[layer] is None:
            return [None], None
        k, v = self._k[layer][:, :n], self._v[layer][:, :n]
        st = self.sink_tokens() if self.rope_policy == "rebase" else 0
        if st:  # the buffer's sink keys may hold another chunk's rotation: read the unrotated copy
            return [self._sink_keys(layer, st, sink_rotation), k[:, st:]], v
        return [k], v

    def _sink_keys(self, layer: int, tokens: int, sink_rotation):
        """The sink chunks' keys (``rebase``), from their unrotated copy, rotated by ``sink_rotation`` if given."""
        sink = self._sink_k[layer][:, :tokens]
        return sink if sink_rotation is None else apply_rope(sink, *sink_rotation)

    def attended(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                 sink_rotation: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The chunk's keys/values go into the buffer right after the cached ones (room the commit keeps or the
        next chunk overwrites); attention reads the prefix that ends with them. With a sink rotation the sink
        keys in the buffer are rewritten rotated from their unrotated copy; without, they are the copy."""
        n, m = self.num_tokens, k.shape[1]
        if n + m > self.capacity_tokens:
            raise ValueError(f"PreallocatedKVCache: {n} cached + {m} new tokens exceed its capacity "
                             f"{self.capacity_tokens} (build it for the stream's window, sinks and chunk sizes)")
        kb, vb = self._buffers(layer, k)
        kb[:, n:n + m].copy_(k)
        vb[:, n:n + m].copy_(v)
        if self.rope_policy == "rebase":
            st = self.sink_tokens()
            if st:
                kb[:, :st].copy_(self._sink_keys(layer, st, sink_rotation))
        return kb[:, :n + m], vb[:, :n + m], n

    # ------------------------------------------------------------------ bookkeeping (host side)
    def append(self, layer: int, chunk: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The chunk's K/V are in the buffer already (:meth:`attended` of the same call): record its size."""
        self.mark_appended(k.shape[1])

    def mark_appended(self, tokens: int) -> None:
        """Record that the last forward's chunk (``tokens`` tokens, in the buffer after the cached ones) is to be
        committed: a CUDA graph replay writes the buffer without running :meth:`append`."""
        if self._appending is not None and tokens != self._appending:
            raise ValueError(f"KVCache: layers appended {self._appending} and {tokens} tokens")
        self._appending = tokens

    def commit(self, chunk: int) -> None:
        super().commit(chunk)  # evicts through _evict
        if self.rope_policy == "rebase" and chunk < self.visibility.sink:  # a new sink chunk: keep it unrotated
            pos = self.chunks.index(chunk)
            start, n = sum(self.chunk_tokens[:pos]), self.chunk_tokens[pos]
            for layer in range(self.num_layers):
                kb = self._k[layer]
                if kb is None:
                    continue
                self._sink_k[layer][:, start:start + n].copy_(kb[:, start:start + n])

    def _evict(self, keep: list[int]) -> None:
        """Move the kept chunks to the front of the buffers, in order (the sinks, which come first, stay put)."""
        offsets = [0]
        for n in self.chunk_tokens:
            offsets.append(offsets[-1] + n)
        moved = next((i for i, p in enumerate(keep) if p != i), len(keep))  # kept chunks before it stay in place
        if moved < len(keep):
            dst = offsets[moved]
            runs = merge_runs([(offsets[p], offsets[p + 1]) for p in keep[moved:]])  # slices: no index copied to the GPU
            n = sum(b - a for a, b in runs)
            for kb, vb in zip(self._k, self._v):
                if kb is None:
                    continue
                kb[:, dst:dst + n].copy_(torch.cat([kb[:, a:b] for a, b in runs], 1))
                vb[:, dst:dst + n].copy_(torch.cat([vb[:, a:b] for a, b in runs], 1))
        self.chunks = [self.chunks[p] for p in keep]
        self.chunk_tokens = [self.chunk_tokens[p] for p in keep]

    def reset(self) -> None:
        """Empty the stream (chunks and condition); the buffers stay, so graphs captured on them stay valid."""
        self.chunks, self.chunk_tokens, self._appending = [], [], None
        for layer in self.layers:
            layer.cross_k = layer.cross_v = layer.image_k = layer.image_v = None

    def frozen(self):
        raise NotImplementedError("a preallocated stream cache has no snapshots; rollouts use KVCache")

    def before(self, chunk: int):
        raise NotImplementedError("a preallocated stream cache has no snapshots; rollouts use KVCache")


def preallocated_cache(num_layers: int, visibility: ChunkVisibility, layout: ChunkLayout, tokens_per_frame: int,
                       rope_policy: str = "absolute", rope_trained_frames: int | None = None) -> PreallocatedKVCache:
    """The preallocated cache of a stream over ``layout`` (patched frames) of ``tokens_per_frame`` tokens a frame."""
    frames = sum(layout.size(c) for c in capacity_chunks(layout, visibility))
    sink_frames = sum(layout.size(c) for c in range(min(visibility.sink, layout.n_chunks)))
    return PreallocatedKVCache(num_layers, visibility, rope_policy=rope_policy,
                               rope_trained_frames=rope_trained_frames, capacity_tokens=frames * tokens_per_frame,
                               sink_capacity_tokens=sink_frames * tokens_per_frame,
                               layers=[LayerCache() for _ in range(num_layers)])
