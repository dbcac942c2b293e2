"""The generation side of ``megatron-rcm serve``: one client's stream, chunk by chunk, as RGBA frames.

:class:`StreamSource` is what all sessions of a server share: a trained phase (model, run config), its
encoders when the run has them, and the sampling settings. :class:`StreamSession` is one client's stream,
built on :func:`~megatron_rcm.inference.streaming.stream_video` (the one streaming loop): its own
KV cache (inside the stream), noise generator, prompt and current action, which the stream's ``action_fn``
reads before every chunk, so a key pressed while chunk i is generated steers chunk i + 1. Closing a session
closes the stream and with it the cache. Nothing here knows about HTTP; calls block (the server runs them on
its worker thread).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch

from ..config.errors import ConfigError

ENDLESS_CHUNKS = 10_000  # "endless" play of a windowed model (flat memory): a long but finite stream
ARROWS = {"ArrowRight": 0.0, "ArrowUp": 0.5 * math.pi, "ArrowLeft": math.pi, "ArrowDown": 1.5 * math.pi}
WASD = {"d": "ArrowRight", "w": "ArrowUp", "a": "ArrowLeft", "s": "ArrowDown"}


def key_actions(action_dim: int) -> dict[str, int]:
    """Keyboard key -> action id: arrows / WASD pick the action whose direction (angle 2 pi k / A, the synthetic
    world model's convention: 0 right, then counter-clockwise) is nearest; digit keys pick ids 0-9 directly."""
    if action_dim < 1:
        return {}
    keys = {}
    for key, angle in ARROWS.items():
        keys[key] = min(range(action_dim), key=lambda k: abs(math.remainder(2 * math.pi * k / action_dim - angle,
                                                                            2 * math.pi)))
    keys.update({letter: keys[arrow] for letter, arrow in WASD.items()})
    keys.update({str(k): k for k in range(min(action_dim, 10))})
    return keys


def to_rgba(frames: torch.Tensor) -> bytes:
    """Pixel frames [3, f, H, W] in [-1, 1] -> f x H x W x 4 uint8 bytes (RGBA, opaque), what a canvas takes."""
    rgb = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
    alpha = torch.full(rgb.shape[:-1] + (1,), 255, dtype=torch.uint8)
    return torch.cat([rgb, alpha], -1).contiguous().numpy().tobytes()


@dataclass
class StreamSource:
    """A trained phase ready to stream; shared (read-only) by every session of one server."""

    model: object  # CausalWanModel, eval mode, on ``device``
    cfg: object  # the run's RunConfig
    device: torch.device
    steps: int = 2
    guidance: float = 1.0
    encoders: object | None = None  # WanEncoders (text and/or VAE) for runs with encoders.diffusers_dir
    negative_prompt: str | None = None
    cuda_graphs: bool = False  # chunk forwards replay CUDA graphs (one session at a time: network/chunk_graphs.py)
    # the VAE (possibly CPU-offloaded, moved in and out) and the text encoder are used by one session at a time
    encoder_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_run(cls, run_dir, phase: str, weights: str = "ema", device="cpu", steps: int = 2, guidance: float = 1.0,
                 negative_prompt: str | None = None) -> "StreamSource":
        """A phase of a training run folder, with the run's encoders (text and VAE) when it has them."""
        from .run_dir import find_phase, load_phase_model, load_run_config

        cfg = load_run_config(run_dir)
        find_phase(cfg, phase)
        model = load_phase_model(cfg, phase, weights, device)
        encoders = None
        if cfg.encoders.enabled:
            from .real_video import run_encoders

            encoders = run_encoders(cfg, device, text=cfg.encoders.has_text, vae=cfg.encoders.has_vae)
        return cls(model, cfg, torch.device(device), steps, guidance, encoders, negative_prompt)

    def __post_init__(self):
        vae = self.encoders is not None and getattr(self.encoders, "vae", None) is not None
        if not vae and self.model.cfg.out_channels != 3:
            raise ConfigError("encoders.diffusers_dir", self.cfg.encoders.diffusers_dir,
                              f"a pipeline folder with vae/: the model makes {self.model.cfg.out_channels}-channel "
                              "latents and serve shows pixels (a run without a VAE must be pixel-space RGB)")

    @property
    def action_dim(self) -> int:
        return self.model.cfg.action_dim

    @property
    def prompt_kind(self) -> str | None:
        """"text" (umT5 prompts), "class" (the synthetic set's class ids) or None (world models on synthetic data)."""
        if self.encoders is not None and getattr(self.encoders, "text", None) is not None:
            return "text"
        if self.cfg.data.kind == "synthetic" and not self.action_dim:
            return "class"
        return None

    @property
    def vae(self):
        return None if self.encoders is None else getattr(self.encoders, "vae", None)

    @property
    def pixel_size(self) -> tuple[int, int]:
        d = self.cfg.data
        f = self.vae.spatial_factor if self.vae is not None else 1
        return d.height * f, d.width * f

    @property
    def chunk_frames(self) -> int:
        """Latent frames per chunk."""
        return self.model.causal.chunk_frames * self.model.patch[0]

    def default_max_chunks(self) -> int:
        """Windowed models play on with flat memory; others stop at the training length (their cache grows and
        they never saw more)."""
        if self.model.causal.window_chunks:
            return ENDLESS_CHUNKS
        return max(1, self.cfg.data.num_frames // self.chunk_frames)

    def hello(self) -> dict:
        """What the page needs to know (the first message of every connection)."""
        h, w = self.pixel_size
        return {"type": "hello", "prompt": self.prompt_kind, "action_dim": self.action_dim,
                "keys": key_actions(self.action_dim), "height": h, "width": w,
                "num_classes": self.cfg.data.num_classes if self.prompt_kind == "class" else 0}

    def conditioning(self, seed: int, prompt: str | None, class_id: int | None) -> dict:
        """{"context", "uncond_context", "prefix"} for one session: the prompt's (or class's, or the data's) text
        context and, for world models on synthetic data, a clean first chunk of a data-set video to start from."""
        from .sampling import prompt_batch

        if self.prompt_kind == "text":
            with self.encoder_lock:
                ctx = self.encoders.prompt_contexts([prompt or ""], self.negative_prompt)
            return {"context": ctx["context"].to(self.device, torch.float32),
                    "uncond_context": ctx["uncond_context"].to(self.device, torch.float32), "prefix": None}
        batch = prompt_batch(self.cfg.data, 1, seed, self.device, class_id)
        prefix = None
        if self.action_dim and self.cfg.data.kind == "synthetic":
            prefix = batch["latents"][:, :, :self.chunk_frames].to(self.model.dtype)
        return {"context": batch["context"], "uncond_context": batch["uncond_context"], "prefix": prefix}


class StreamSession:
    """One client's stream: :meth:`next_chunk` gives the next chunk's pixels, :meth:`close` frees its cache."""

    def __init__(self, source: StreamSource, seed: int, prompt: str | None = None, class_id: int | None = None,
                 max_chunks: int | None = None, action: int = 0):
        self.source, self.seed, self.prompt, self.class_id = source, seed, prompt, class_id
        self.max_chunks = source.default_max_chunks() if max_chunks is None else max_chunks
        self.action = action  # set by the server when a key arrives; read before each chunk
        self.chunks_sent = 0
        self._stream = None
        self._decoder = None
        self._pending_prefix = None
        self._actions_used: dict[int, int] = {}  # chunk index -> the action it was generated with
        self._lock = threading.Lock()  # next_chunk and close never overlap, whatever thread runs them
        self._closed = False

    # ------------------------------------------------------------------ the stream
    def _action_fn(self, net):
        from .streaming import one_hot_actions

        layout_frames = None

        def action_fn(chunk, _frames):
            nonlocal layout_frames
            if layout_frames is None:
                layout_frames = net.layout((self.max_chunks + 1) * self.source.model.causal.chunk_frames)
            action = int(self.action)
            self._actions_used[chunk] = action
            return one_hot_actions([action], self.source.action_dim, layout_frames.size(chunk)).to(self.source.device)

        return action_fn

    def _start(self) -> None:
        from ..network import Denoiser
        from .streaming import StreamConfig, stream_video

        src = self.source
        cond = src.conditioning(self.seed, self.prompt, self.class_id)
        net = Denoiser.of(src.model)
        gen = torch.Generator(device=src.device).manual_seed(self.seed)
        cfg = StreamConfig(steps=src.steps, guidance_scale=src.guidance, trained_frames=src.cfg.data.num_frames,
                           cuda_graphs=src.cuda_graphs)
        action_fn = self._action_fn(net) if src.action_dim else None
        h, w = src.cfg.data.height, src.cfg.data.width
        self._stream = stream_video(src.model, cond["context"], self.max_chunks * src.chunk_frames, h, w, cfg,
                                    cond["uncond_context"], action_fn, gen, prefix=cond["prefix"])
        self._decoder = src.vae.stream() if src.vae is not None else None
        self._pending_prefix = cond["prefix"]

    def _pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """[1, C, f, H, W] latents -> [3, f', H', W'] pixels (VAE-decoded on runs with a VAE)."""
        if self._decoder is None:
            return latents[0]
        with self.source.encoder_lock:
            return self._decoder.decode(latents[:1])[0]

    @torch.no_grad()
    def next_chunk(self) -> dict | None:
        """{"index", "frames", "rgba", "action", "latency_ms", "cache_tokens", "prefix"} of the next chunk (the
        start observation of a world model first), or None when the stream has ended or the session is closed."""
        with self._lock:
            if self._closed:
                return None
            if self._stream is None:
                self._start()
            if self._pending_prefix is not None:  # show where a world model starts from
                latents, self._pending_prefix = self._pending_prefix, None
                info = {"index": 0, "action": None, "latency_ms": 0.0, "cache_tokens": 0, "prefix": True}
            else:
                out = next(self._stream, None)
                if out is None:
                    return None
                latents = out.frames
                used = self._actions_used
                action = used.pop(out.index, None)
                for done in [k for k in used if k < out.index]:  # the prefix chunks' actions
                    del used[done]
                info = {"index": out.index, "action": action,
                        "latency_ms": round(out.latency_s * 1e3, 2), "cache_tokens": out.cache_tokens,
                        "prefix": False}
                self.chunks_sent += 1
            pixels = self._pixels(latents)
            return {**info, "frames": pixels.shape[1], "rgba": to_rgba(pixels)}

    def close(self) -> None:
        """End the stream: its KV cache, decoder cache and noise generator go with it."""
        with self._lock:
            self._closed = True
            if self._stream is not None:
                self._stream.close()
            self._stream = self._decoder = self._pending_prefix = None
