"""CUDA graphs of a stream's chunk calls: captured once per cache fill level, replayed for every later chunk and video.

Why: one chunk of the 1.3B student is 2-3 forwards of 30 blocks, each about 1,500 kernel launches plus the host
work around them (masks, RoPE positions, cache bookkeeping, dynamo guards when the elementwise chains are
compiled). At 1,560 tokens a frame the GPU finishes many kernels faster than Python issues the next: a frame-wise
stream is bound by the host, a chunk-wise one in part. A replayed graph issues the whole forward at once
(frame-wise 2-3x, chunk-wise +9-16% on an H200, benchmarks/RESULTS.md).

A graph replays :meth:`CausalWanModel.forward_chunk` against the stream's
:class:`~megatron_rcm.models.preallocated_cache.PreallocatedKVCache`, whose buffers never move. Everything that
differs between the calls one graph serves is in device memory when it replays:
  * the inputs (latents, per-frame timesteps, text context, actions, image tokens): copied into the graph's own;
  * the chunk's RoPE frame offset and the sink rotation (``rope_policy='rebase'``): device scalars that
    :meth:`CausalWanModel.prepare_chunk` fills before every call;
  * the condition's cross-attention K/V: projected into fixed buffers when a stream (or a prompt) starts
    (:meth:`CausalWanModel.write_condition`).
What a graph bakes in is its key: how many tokens are cached (the prefix attention reads), whether and how many
sink keys are rotated, and the inputs' shapes. So a stream with a window needs one graph per fill level until the
window is full and one for all chunks after; the steps of a chunk and its cache write share theirs (a forward
always puts the chunk's K/V after the cached ones; only a write commits them, here, after the replay).

The first call of each key runs eagerly (it is that call's answer and the capture's warm-up) and captures; later
calls replay. Graphs and the cache live as long as the model's :class:`ChunkGraphs` (:meth:`ChunkGraphs.of`):
the next video of the same shape replays them. ``capture`` is swappable: the CPU tests replay a recorded call
with the cache's host state as it was at capture time, which is what a graph does.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..config.errors import ConfigError
from .denoiser import ChunkCache


@dataclass
class _Graph:
    replay: Callable[[], None]
    inputs: dict  # name -> the static tensor the graph reads
    output: torch.Tensor  # the static tensor it writes


class CudaCapture:
    """Real CUDA graphs sharing one memory pool (the graphs replay one at a time, so their activations overlap)."""

    def __init__(self):
        self.pool = None

    def __call__(self, fn: Callable, inputs: dict):
        if self.pool is None:  # lazy library state (cuBLAS workspaces, ...) must exist before the first capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(**inputs)
            torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn(**inputs)
        self.pool = graph.pool()
        return graph.replay, out


def _signature(inputs: dict) -> tuple:
    return tuple((name, None if t is None else (tuple(t.shape), t.dtype, str(t.device)))
                 for name, t in sorted(inputs.items()))


class ChunkGraphs:
    """The captured chunk forwards of one model, and the preallocated stream cache they were captured on."""

    def __init__(self, capture: Callable | None = None):
        self.capture = capture or CudaCapture()
        self.graphs: dict[tuple, _Graph] = {}
        self.cache: ChunkCache | None = None
        self._spec = None
        self._version = None
        self.captured = 0  # graphs captured (a new key)
        self.replayed = 0  # calls served by a replay
        self.busy = False  # a stream holds the cache (the graphs serve one stream at a time)

    @classmethod
    def of(cls, model) -> "ChunkGraphs":
        """The model's graphs (created on first use; kept on the model so every stream of it reuses them)."""
        graphs = model.__dict__.get("_chunk_graphs")
        if graphs is None:
            graphs = model.__dict__["_chunk_graphs"] = cls()
        return graphs

    @staticmethod
    def refusal(model, device: torch.device, kv_cache_dtype: str) -> str | None:
        """Why a stream of ``model`` (None: not built yet) on ``device`` cannot be graphed (None: it can)."""
        if device.type != "cuda":
            return f"CUDA graphs need a CUDA device (the stream runs on {device})"
        if getattr(model, "parallel", None) is not None:
            return "CUDA graphs serve single-process streams (this model is parallelised)"
        if kv_cache_dtype != "auto":
            return f"CUDA graphs need the preallocated cache of the model's dtype (kv_cache_dtype={kv_cache_dtype})"
        return None

    @classmethod
    def require(cls, model, device: torch.device, kv_cache_dtype: str) -> None:
        """Raise the one-line error of ``--cuda-graphs`` when a stream of ``model`` cannot be graphed."""
        why = cls.refusal(model, device, kv_cache_dtype)
        if why:
            raise ConfigError("--cuda-graphs", True, f"a stream it can serve: {why}")

    def stream_cache(self, net, height: int, width: int, cond, guidance: float, options, stream_frames: int):
        """The new stream's cache: the one the graphs were captured on, emptied, when the stream has the same
        geometry; otherwise a fresh one (and the old graphs go). While another stream holds the graphs (two
        clients of one server), the new one gets a preallocated cache of its own and runs eagerly. The stream
        hands the graphs back with :meth:`release`."""
        cache = net.new_cache(height, width, cond, guidance, options=options, stream_frames=stream_frames)
        if self.busy:
            warnings.warn("CUDA graphs: another stream of this model holds them; this one runs without", stacklevel=2)
            return cache
        self.busy = True
        kv = cache.kv
        spec = (id(net.model), height, width, cache.guided, kv.visibility, kv.rope_policy, kv.rope_trained_frames,
                kv.capacity_tokens)
        if self.cache is not None and spec == self._spec:
            self.cache.kv.reset()
            self.cache.guidance = cache.guidance
            return self.cache
        self.graphs.clear()
        self.cache, self._spec, self._version = cache, spec, None
        cache.graphs = self
        return cache

    def release(self, cache: ChunkCache) -> None:
        """The stream of ``cache`` ended (or was dropped): the next stream may use the graphs."""
        if cache is self.cache:
            self.busy = False

    def _current(self, kv) -> None:
        if kv.version != self._version:  # a buffer moved: every graph reads the old one
            self.graphs.clear()
            self._version = kv.version

    def run(self, model, kv, index: int, write: bool, **inputs) -> torch.Tensor:
        """The output of chunk ``index`` (``inputs``: x, t, ctx, actions, interval, image as ``forward_chunk``
        takes them); ``write`` commits the chunk's K/V to the cache."""
        x = inputs["x"]
        rotated = model.prepare_chunk(kv, index, x.device)
        if kv.layers[0].cross_k is None:  # a new stream or prompt
            model.write_condition(inputs["ctx"], kv, inputs.get("image"))
        self._current(kv)
        key = (kv.num_tokens, kv.sink_tokens() if kv.rope_policy == "rebase" else 0, rotated, _signature(inputs))
        graph = self.graphs.get(key)
        if graph is None:
            y = self._forward(model, kv, index, inputs)
            self._current(kv)  # the eager call allocates the buffers on a stream's first chunk
            static = {name: None if t is None else t.clone() for name, t in inputs.items()}
            replay, out = self.capture(lambda **kw: self._forward(model, kv, index, kw), static)
            self.graphs[key] = _Graph(replay, static, out)
            self.captured += 1
        else:
            for name, t in graph.inputs.items():
                if t is not None:
                    t.copy_(inputs[name])
            graph.replay()
            y = graph.output.clone()  # the next replay overwrites the static output
            self.replayed += 1
        if write:
            kv.mark_appended(model.tokens_per_frame(x.shape[3], x.shape[4]) * (x.shape[2] // model.patch[0]))
            kv.commit(index)
        return y

    @staticmethod
    def _forward(model, kv, index: int, inputs: dict) -> torch.Tensor:
        return model.forward_chunk(inputs["x"], inputs["t"], inputs["ctx"], kv, index, write_cache=False,
                                   actions=inputs.get("actions"), interval=inputs.get("interval"),
                                   image=inputs.get("image"))[0]
