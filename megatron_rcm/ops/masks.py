"""Attention masks for causal video DiTs, as token *groups* plus a group-visibility matrix.

Why groups: every mask this project needs (full, frame-/chunk-wise block-causal, teacher-forcing
[clean ; noisy], local windows with sink chunks, KV-cache decoding) is constant over blocks of
tokens. Storing one small integer per token and a ``G x G`` boolean matrix is O(S + G^2) memory,
expands to the dense ``S x S`` mask for reference code, and gives an exact tile summary
(skip / full / partial) for kernels without ever materialising ``S x S``.

Group ids used by the builders: chunk ``c`` clean (or plain causal) tokens -> ``2c``,
chunk ``c`` noisy tokens (teacher forcing) -> ``2c + 1``. Clean and noisy copies of a frame share
RoPE positions; that is the model's business, not the mask's.

A fused kernel consumes ``q_groups`` (int32 [Sq]), ``k_groups`` (int32 [Sk]), ``allow``
(bool [G, G]) and ``tile_summary(block_q, block_k)`` (int8 [ceil(Sq/bq), ceil(Sk/bk)]): it never
loads a SKIP tile, applies no element mask on a FULL tile, and on a PARTIAL tile masks element
(i, j) iff ``not allow[q_groups[i], k_groups[j]]``.
"""
from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass, field

import torch

from .chunks import ChunkLayout

TILE_SKIP = 0
TILE_FULL = 1
TILE_PARTIAL = 2


@dataclass(frozen=True)
class ChunkVisibility:
    """Which earlier chunks a chunk may attend to.

    ``window``: number of most recent chunks visible, counting the chunk itself (0 = unlimited).
    ``sink``: the first ``sink`` chunks stay visible to every later chunk (attention sinks for
    long rollouts), whatever the window.
    """

    window: int = 0
    sink: int = 0

    def __post_init__(self):
        if self.window < 0:
            raise ValueError(f"ChunkVisibility.window must be >= 0 (0 = unlimited), got {self.window}")
        if self.sink < 0:
            raise ValueError(f"ChunkVisibility.sink must be >= 0, got {self.sink}")

    def matrix(self, num_chunks: int, device=None) -> torch.Tensor:
        """bool [C, C]: entry (i, j) says whether chunk i may see chunk j (j <= i)."""
        return self.between(torch.arange(num_chunks, device=device))

    def between(self, chunks) -> torch.Tensor:
        """bool [n, n]: :meth:`matrix` restricted to the (increasing) chunk indices ``chunks``."""
        c = torch.as_tensor(chunks, dtype=torch.long)
        i, j = c[:, None], c[None, :]
        vis = j <= i
        if self.window > 0:
            vis = vis & ((i - j < self.window) | (j < self.sink))
        return vis

    def visible_chunks(self, current: int) -> list[int]:
        """Chunks (<= current) that chunk ``current`` attends to; what a KV cache must keep."""
        return [j for j in range(current + 1) if self.matrix(current + 1)[current, j].item()]


@dataclass(eq=False)
class GroupMask:
    """A mask given by per-token group ids and a group-to-group visibility matrix.

    Immutable once built: what is derived from it (its copy on a device, whether it is full) is made once and
    kept, so a mask reused by every layer and step is copied to the GPU, and packed for the kernels, once.
    Everything the host decides (validation, :meth:`is_full`, tile summaries) reads the host copy: a
    decision read from GPU tensors would make the host wait for the GPU (``utils/host_syncs.py``).
    """

    q_groups: torch.Tensor  # int32 [Sq]
    k_groups: torch.Tensor  # int32 [Sk]
    allow: torch.Tensor  # bool [G, G]; allow[a, b]: a query of group a may see a key of group b
    _derived: dict = field(default_factory=dict, init=False, repr=False)  # device copies, is_full, host copy

    def __post_init__(self):
        if self.q_groups.dim() != 1 or self.k_groups.dim() != 1:
            raise ValueError("GroupMask.q_groups and k_groups must be 1-D (one id per token)")
        if self.allow.dim() != 2 or self.allow.shape[0] != self.allow.shape[1]:
            raise ValueError(f"GroupMask.allow must be square [G, G], got {tuple(self.allow.shape)}")
        self.q_groups = self.q_groups.to(torch.int32)
        self.k_groups = self.k_groups.to(torch.int32)
        self.allow = self.allow.to(torch.bool)
        g = self.allow.shape[0]
        host = self.host()
        for name, ids in (("q_groups", host.q_groups), ("k_groups", host.k_groups)):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= g):
                raise ValueError(f"GroupMask.{name} has ids outside [0, {g}) of the allow matrix")

    @classmethod
    def _checked(cls, q_groups, k_groups, allow, host: "GroupMask | None") -> "GroupMask":
        """A copy of a validated mask (no second validation); ``host``: its host copy, if it is on a device."""
        m = cls.__new__(cls)
        m.q_groups, m.k_groups, m.allow, m._derived = q_groups, k_groups, allow, {}
        if host is not None:  # weak: the host copy keeps its device copies, not the other way round
            m._derived["host"] = weakref.ref(host)
        return m

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q_groups.numel(), self.k_groups.numel())

    @property
    def num_groups(self) -> int:
        return self.allow.shape[0]

    def host(self) -> "GroupMask":
        """This mask with CPU tensors (itself when it is on the CPU; a device mask copies back once)."""
        if self.q_groups.device.type == "cpu":
            return self
        ref = self._derived.get("host")
        host = None if ref is None else ref()
        if host is None:
            host = GroupMask._checked(self.q_groups.cpu(), self.k_groups.cpu(), self.allow.cpu(), None)
            self._derived["host"] = lambda: host  # copied back once, kept
        return host

    def to(self, device) -> "GroupMask":
        """This mask on ``device``: copied once per device, and the host copy keeps it."""
        device = torch.device(device)
        if _on(self.q_groups, device):
            return self
        host = self.host()
        if _on(host.q_groups, device):
            return host
        key = ("to", str(device))
        if key not in host._derived:
            host._derived[key] = GroupMask._checked(host.q_groups.to(device), host.k_groups.to(device),
                                                    host.allow.to(device), host)
        return host._derived[key]

    def is_full(self) -> bool:
        """True when every query sees every key (so plain unmasked attention is exact)."""
        host = self.host()
        if "full" not in host._derived:
            qg = torch.unique(host.q_groups)
            kg = torch.unique(host.k_groups)
            host._derived["full"] = bool(host.allow[qg][:, kg].all())
        return host._derived["full"]

    def dense(self, q_slice: slice | None = None) -> torch.Tensor:
        """bool [Sq, Sk] (or the rows of ``q_slice``): True where attention is allowed."""
        qg = self.q_groups if q_slice is None else self.q_groups[q_slice]
        return self.allow[qg.long()[:, None], self.k_groups.long()[None, :]]

    def tile_summary(self, block_q: int, block_k: int) -> torch.Tensor:
        """int8 [ceil(Sq/block_q), ceil(Sk/block_k)] of TILE_SKIP / TILE_FULL / TILE_PARTIAL.

        Exact for arbitrary group layouts: a tile is FULL iff every (query group, key group) pair
        present in it is allowed, SKIP iff none is. Ragged last tiles only count real tokens.
        """
        if block_q <= 0 or block_k <= 0:
            raise ValueError(f"tile sizes must be positive, got block_q={block_q}, block_k={block_k}")
        host = self.host()  # computed on the host (a boolean index on GPU tensors would synchronise)
        pq = _group_presence(host.q_groups, block_q, self.num_groups)  # [Tq, G]
        pk = _group_presence(host.k_groups, block_k, self.num_groups)  # [Tk, G]
        allow = host.allow.to(torch.float32)
        allowed_pairs = pq @ allow @ pk.T
        total_pairs = pq.sum(1)[:, None] * pk.sum(1)[None, :]
        out = torch.full(allowed_pairs.shape, TILE_PARTIAL, dtype=torch.int8, device=allow.device)
        out[allowed_pairs == 0] = TILE_SKIP
        out[allowed_pairs == total_pairs] = TILE_FULL
        return out

    def density(self) -> float:
        """Fraction of allowed (query, key) pairs, computed at the group level."""
        g, host = self.num_groups, self.host()
        cq = torch.bincount(host.q_groups.long(), minlength=g).to(torch.float64)
        ck = torch.bincount(host.k_groups.long(), minlength=g).to(torch.float64)
        allowed = cq @ host.allow.to(torch.float64) @ ck
        return float(allowed / (cq.sum() * ck.sum()))


def _on(t: torch.Tensor, device: torch.device) -> bool:
    """Whether ``t`` lives on ``device`` (a CUDA device without an index means the current one)."""
    if t.device.type != device.type:
        return False
    if device.index is None:
        return device.type != "cuda" or t.device.index == torch.cuda.current_device()
    return t.device.index == device.index


def _group_presence(groups: torch.Tensor, block: int, num_groups: int) -> torch.Tensor:
    n = groups.numel()
    tiles = math.ceil(n / block)
    tile_of_token = torch.arange(n, device=groups.device) // block
    presence = torch.zeros(tiles, num_groups, dtype=torch.float32, device=groups.device)
    presence[tile_of_token, groups.long()] = 1.0
    return presence


def chunk_layout(num_frames: int, tokens_per_frame: int, chunk_frames: int,
                 first_chunk_frames: int | None = None) -> ChunkLayout:
    """The chunk pattern of a [frames x tokens_per_frame] sequence (defined once, in :class:`ChunkLayout`)."""
    if num_frames <= 0 or tokens_per_frame <= 0:
        raise ValueError(f"num_frames and tokens_per_frame must be positive, got {num_frames}, {tokens_per_frame}")
    return ChunkLayout(num_frames, chunk_frames, first_chunk_frames)


def chunk_ids(num_frames: int, tokens_per_frame: int, chunk_frames: int, first_chunk: int = 0,
              first_chunk_frames: int | None = None) -> torch.Tensor:
    """Chunk index of every token of a [frames x tokens_per_frame] sequence (``first_chunk`` is added)."""
    layout = chunk_layout(num_frames, tokens_per_frame, chunk_frames, first_chunk_frames)
    return (layout.chunk_of_frames().repeat_interleave(tokens_per_frame) + first_chunk).to(torch.int32)


def full_mask(num_q: int, num_k: int | None = None) -> GroupMask:
    """Bidirectional attention (the mask of the original Wan2.1 model)."""
    num_k = num_q if num_k is None else num_k
    one = torch.ones(1, 1, dtype=torch.bool)
    return GroupMask(torch.zeros(num_q, dtype=torch.int32), torch.zeros(num_k, dtype=torch.int32), one)


def block_causal_mask(
    num_frames: int,
    tokens_per_frame: int,
    chunk_frames: int = 1,
    visibility: ChunkVisibility = ChunkVisibility(),
    first_chunk_frames: int | None = None,
) -> GroupMask:
    """Block-causal mask: bidirectional inside a chunk, causal across chunks.

    ``chunk_frames=1`` is the frame-wise variant; ``first_chunk_frames`` gives the first chunk its own
    size (Causal-rCM's c1-4). Groups are the chunks (ids ``2c``); the odd ids stay unused so that the
    group space matches :func:`teacher_forcing_mask`.
    """
    n_chunks = chunk_layout(num_frames, tokens_per_frame, chunk_frames, first_chunk_frames).n_chunks
    ids = 2 * chunk_ids(num_frames, tokens_per_frame, chunk_frames, first_chunk_frames=first_chunk_frames)
    allow = torch.zeros(2 * n_chunks, 2 * n_chunks, dtype=torch.bool)
    allow[0::2, 0::2] = visibility.matrix(n_chunks)
    return GroupMask(ids, ids, allow)


def teacher_forcing_mask(
    num_frames: int,
    tokens_per_frame: int,
    chunk_frames: int = 1,
    visibility: ChunkVisibility = ChunkVisibility(),
    first_chunk_frames: int | None = None,
) -> GroupMask:
    """Mask over the teacher-forcing sequence [clean frames ; noisy frames] of one video.

    Clean chunk i sees clean chunks j <= i (subject to ``visibility``); noisy chunk i sees clean
    chunks j < i (same visibility) and itself, never other noisy chunks. This is exactly what noisy
    chunk i would see at inference with a KV cache of clean chunks.
    """
    n_chunks = chunk_layout(num_frames, tokens_per_frame, chunk_frames, first_chunk_frames).n_chunks
    c = chunk_ids(num_frames, tokens_per_frame, chunk_frames, first_chunk_frames=first_chunk_frames)
    ids = torch.cat([2 * c, 2 * c + 1])
    vis = visibility.matrix(n_chunks)
    allow = torch.zeros(2 * n_chunks, 2 * n_chunks, dtype=torch.bool)
    allow[0::2, 0::2] = vis  # clean -> clean
    allow[1::2, 0::2] = vis & ~torch.eye(n_chunks, dtype=torch.bool)  # noisy -> strictly earlier clean
    allow[1::2, 1::2] = torch.eye(n_chunks, dtype=torch.bool)  # noisy -> itself
    return GroupMask(ids, ids, allow)


def kv_cache_mask(
    cached_chunks: list[int] | torch.Tensor,
    tokens_per_chunk: int | list[int],
    current_chunk: int,
    num_query_tokens: int | None = None,
    visibility: ChunkVisibility = ChunkVisibility(),
) -> GroupMask:
    """Queries of ``current_chunk`` against keys [cached chunks ; current chunk].

    ``cached_chunks`` lists the chunk index of each cached chunk in cache order (a rolling cache
    may hold a sink chunk followed by recent ones); ``tokens_per_chunk`` is one count for all of them
    or one per cached chunk (a first chunk of its own size). Chunks the visibility rule hides are
    masked, so a cache that kept more than needed still gives the block-causal answer.
    """
    cached = torch.as_tensor(cached_chunks, dtype=torch.int32).reshape(-1)
    if cached.numel() and int(cached.max()) >= current_chunk:
        raise ValueError(f"kv cache holds chunk {int(cached.max())} >= current chunk {current_chunk}")
    if isinstance(tokens_per_chunk, int):
        counts = torch.full((cached.numel(),), tokens_per_chunk, dtype=torch.long)
        nq = tokens_per_chunk if num_query_tokens is None else num_query_tokens
    else:
        counts = torch.as_tensor(list(tokens_per_chunk), dtype=torch.long).reshape(-1)
        if counts.numel() != cached.numel():
            raise ValueError(f"{counts.numel()} token counts for {cached.numel()} cached chunks")
        if num_query_tokens is None:
            raise ValueError("num_query_tokens is needed when cached chunks have their own token counts")
        nq = num_query_tokens
    # groups: only the chunks present, renumbered (an endless stream's chunk indices grow without bound; a
    # visibility matrix over all of them would cost O(chunks^2) per call)
    present = sorted(set(cached.tolist()) | {current_chunk})
    group = {c: g for g, c in enumerate(present)}
    allow = visibility.between(present)
    structure = (tuple(group[c] for c in cached.tolist()), tuple(counts.tolist()), nq, group[current_chunk],
                 allow.shape[0], tuple(allow.flatten().tolist()))
    return _kv_cache_mask(structure)


@functools.lru_cache(maxsize=64)
def _kv_cache_mask(structure: tuple) -> GroupMask:
    """One mask object per cache structure (renumbered groups, token counts, visibility): a stream's later chunks
    reuse it, and with it its device copy and packing (GroupMask.to, the kernels' pack cache)."""
    cached_groups, counts, nq, current, g, allow = structure
    cached_ids = torch.tensor(cached_groups, dtype=torch.int32).repeat_interleave(torch.tensor(counts, dtype=torch.long))
    k_ids = torch.cat([cached_ids, torch.full((nq,), current, dtype=torch.int32)])
    q_ids = torch.full((nq,), current, dtype=torch.int32)
    return GroupMask(q_ids, k_ids, torch.tensor(allow, dtype=torch.bool).reshape(g, g))
