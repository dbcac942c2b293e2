"""KV cache for streaming (chunk-by-chunk) generation and self-forcing rollouts.

After a chunk is denoised it is re-run at t = 0 with ``write=True``; each self-attention layer then
appends the chunk's (normed, rotated) keys and values. Later chunks attend to the cache plus
themselves. Eviction follows the same :class:`ChunkVisibility` rule as the training mask (sink
chunks + a window of recent chunks), so memory stays flat over arbitrarily long rollouts and the
cached answer equals the block-causal full-sequence answer. Cross-attention keys/values of the text
context (and of the image context, I2V layout) are computed once per video and kept here too. Chunks
may have different sizes (the first chunk of Causal-rCM's c1-4 pattern): each cached chunk's token count
is recorded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops.masks import ChunkVisibility


@dataclass
class LayerCache:
    k: torch.Tensor | None = None  # [B, S_cache, H, D]
    v: torch.Tensor | None = None
    cross_k: torch.Tensor | None = None  # [B, L, H, D]
    cross_v: torch.Tensor | None = None
    image_k: torch.Tensor | None = None  # [B, L_img, H, D] (I2V layout)
    image_v: torch.Tensor | None = None


class _FrozenLayer:
    """A :class:`LayerCache` view whose cross-attention slots ignore writes (see ``KVCache.frozen``)."""

    def __init__(self, c: LayerCache):
        self.k, self.v = c.k, c.v
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
    the cache as it was before each chunk (:meth:`before`).
    """

    num_layers: int
    visibility: ChunkVisibility = field(default_factory=ChunkVisibility)
    chunks: list[int] = field(default_factory=list)  # chunk index of each cached chunk, in cache order
    chunk_tokens: list[int] = field(default_factory=list)  # tokens of each cached chunk
    layers: list[LayerCache] = field(default_factory=list)
    evict: bool = True
    _appending: int | None = field(default=None, repr=False)  # tokens of the chunk being appended

    def __post_init__(self):
        if not self.layers:
            self.layers = [LayerCache() for _ in range(self.num_layers)]

    def frozen(self) -> "KVCache":
        """A read-only snapshot (the same tensors, no copy) for activation-checkpointed passes.

        Why: a checkpointed block recomputes its forward during backward, when the live cache has
        already grown (later chunks appended, old ones evicted). The snapshot keeps what the forward
        saw. Cached tensors are never modified in place (append/evict build new tensors), so holding
        references is enough. Cross-attention K/V missing at snapshot time stay missing (writes are
        ignored), so forward and recomputation build the same graph.
        """
        return KVCache(self.num_layers, self.visibility, list(self.chunks), list(self.chunk_tokens),
                       [_FrozenLayer(c) for c in self.layers], self.evict)

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
        return view

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def num_tokens(self) -> int:
        return sum(self.chunk_tokens)

    def keys_values(self, layer: int):
        c = self.layers[layer]
        return c.k, c.v

    def append(self, layer: int, chunk: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add one chunk's keys/values for one layer (the chunk index list is updated by :meth:`commit`)."""
        if self._appending is not None and k.shape[1] != self._appending:
            raise ValueError(f"KVCache: layers appended {self._appending} and {k.shape[1]} tokens for chunk {chunk}")
        self._appending = k.shape[1]
        c = self.layers[layer]
        k, v = k.detach(), v.detach()
        c.k = k if c.k is None else torch.cat([c.k, k], dim=1)
        c.v = v if c.v is None else torch.cat([c.v, v], dim=1)

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
        if len(keep) == len(self.chunks):
            return
        offsets = [0]
        for n in self.chunk_tokens:
            offsets.append(offsets[-1] + n)
        idx = torch.cat([torch.arange(offsets[p], offsets[p + 1]) for p in keep])
        for c in self.layers:
            if c.k is not None:
                idx_d = idx.to(c.k.device)
                c.k = c.k.index_select(1, idx_d)
                c.v = c.v.index_select(1, idx_d)
        self.chunks = [self.chunks[p] for p in keep]
        self.chunk_tokens = [self.chunk_tokens[p] for p in keep]

    def _kept_positions(self, next_chunk: int) -> list[int]:
        w, s = self.visibility.window, self.visibility.sink
        if w == 0 or not self.evict:
            return list(range(len(self.chunks)))
        return [p for p, c in enumerate(self.chunks) if c < s or next_chunk - c < w]

    def reset(self) -> None:
        self.chunks, self.chunk_tokens, self._appending = [], [], None
        self.layers = [LayerCache() for _ in range(self.num_layers)]
