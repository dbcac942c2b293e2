"""``megatron-rcm serve RUN_DIR --phase NAME --port P``: play a trained phase in the browser.

An aiohttp server (HTTP + WebSocket) serves one small page (``static/serve.html``) and streams to each
connected client its own video as it is generated: world models take the arrow / WASD keys as the action of
the next chunk, text-to-video runs take a prompt (class-conditioned synthetic runs: a class id). Each
connection is one :class:`~megatron_rcm.inference.serve_session.StreamSession` (own KV cache, noise and
action); a client that disconnects ends its stream, which frees the cache.

Protocol. Client -> server, JSON text frames: ``{"type": "start", "prompt"?: str, "class_id"?: int,
"seed"?: int}`` (re)starts the stream, ``{"type": "action", "action": int}`` sets the action for the next
chunks, ``{"type": "stop"}`` ends the stream. Server -> client: ``{"type": "hello", ...}`` first (what the
model takes, the key map, the frame size), then per chunk one binary frame: a little-endian uint32 header
length, the JSON header (``index``, ``frames``, ``height``, ``width``, ``action``, ``latency_ms``,
``cache_tokens``, ``prefix``) and ``frames x height x width x 4`` RGBA bytes; ``{"type": "end"}`` when a
stream ends and ``{"type": "error", "message": ...}`` for a bad message (the connection stays) or a full
server (the connection closes). ``GET /status`` gives the live sessions as JSON.

Bounds: at most ``max_sessions`` streams at once, ``max_chunks`` chunks per stream, messages of at most
``max_message_bytes``, frames paced to ``fps``; loopback (127.0.0.1) unless ``--host`` says otherwise. All
sessions' chunks are computed one at a time on one worker thread, interleaved: a GPU runs one at a time
anyway, and compiled (torch.compile) model code is not thread-safe; the event loop stays free meanwhile.
"""
from __future__ import annotations

import asyncio
import json
import signal
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources

from ..config.errors import ConfigError

MAX_PROMPT_CHARS = 2000


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_sessions: int = 4
    max_chunks: int | None = None  # per stream; None: the source's default (endless for windowed models)
    fps: float = 16.0  # frames shown per second (the stream is paced to it); 0 = as fast as generated
    seed: int = 0  # session i (in connection order) uses seed + i unless the client sends one
    max_message_bytes: int = 64 * 1024


class ProtocolError(ValueError):
    """A client message the server cannot act on; answered with an error frame, the connection stays."""


def parse_message(text: str, action_dim: int, prompt_kind: str | None, num_classes: int = 0) -> dict:
    """A client's JSON text frame -> a checked message dict, or :class:`ProtocolError` saying what is wrong."""
    try:
        msg = json.loads(text)
    except ValueError:
        raise ProtocolError("messages are JSON objects, e.g. {\"type\": \"action\", \"action\": 1}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("messages are JSON objects with a string 'type': start, action or stop")
    kind = msg["type"]
    if kind == "action":
        if not action_dim:
            raise ProtocolError("this model takes no actions (model.action_dim = 0)")
        a = msg.get("action")
        if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < action_dim:
            raise ProtocolError(f"'action' must be an integer in [0, {action_dim}), got {a!r}")
        return {"type": "action", "action": a}
    if kind == "stop":
        return {"type": "stop"}
    if kind != "start":
        raise ProtocolError(f"unknown message type {kind!r}: expected start, action or stop")
    out = {"type": "start", "prompt": None, "class_id": None, "seed": None}
    seed = msg.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ProtocolError(f"'seed' must be a non-negative integer, got {seed!r}")
        out["seed"] = seed
    if prompt_kind == "text":
        prompt = msg.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ProtocolError("this model takes a text prompt: 'prompt' must be a non-empty string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ProtocolError(f"'prompt' is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
        out["prompt"] = prompt.strip()
    elif prompt_kind == "class" and msg.get("class_id") is not None:
        c = msg["class_id"]
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes:
            raise ProtocolError(f"'class_id' must be an integer in [0, {num_classes}), got {c!r}")
        out["class_id"] = c
    elif msg.get("prompt") is not None or msg.get("class_id") is not None:
        raise ProtocolError("this model takes no prompt" if prompt_kind is None else
                            "this model takes a class id ('class_id'), not a text prompt")
    return out


def pack_chunk(chunk: dict, height: int, width: int) -> bytes:
    """One binary frame: uint32 header length (little endian), JSON header, RGBA bytes."""
    header = {k: v for k, v in chunk.items() if k != "rgba"}
    header.update(type="chunk", height=height, width=width)
    raw = json.dumps(header).encode()
    return struct.pack("<I", len(raw)) + raw + chunk["rgba"]


def page_html() -> str:
    return resources.files("megatron_rcm.inference").joinpath("static/serve.html").read_text(encoding="utf-8")


class _Client:
    """One WebSocket connection: at most one running stream, paced, sent as it is generated."""

    def __init__(self, server: "StreamServer", ident: int, ws):
        self.server, self.id, self.ws = server, ident, ws
        self.session = None
        self.task: asyncio.Task | None = None
        self._stop = False

    async def start(self, msg: dict) -> None:
        from .serve_session import StreamSession

        await self.stop()
        srv = self.server
        seed = msg["seed"] if msg["seed"] is not None else srv.cfg.seed + self.id
        action = self.session.action if self.session is not None else 0
        self.session = StreamSession(srv.source, seed, msg["prompt"], msg["class_id"], srv.cfg.max_chunks, action)
        self._stop = False
        self.task = asyncio.get_running_loop().create_task(self._run(self.session))

    async def stop(self) -> None:
        """End the running stream (after its current chunk) and free it."""
        self._stop = True
        if self.task is not None:
            await asyncio.shield(self.task)
            self.task = None

    async def send(self, payload) -> bool:
        if self.ws.closed:
            return False
        try:
            await (self.ws.send_bytes(payload) if isinstance(payload, bytes) else self.ws.send_json(payload))
            return True
        except (ConnectionError, RuntimeError):  # the client went away mid-send
            return False

    async def _run(self, session) -> None:
        srv, loop = self.server, asyncio.get_running_loop()
        h, w = srv.source.pixel_size
        due = loop.time()
        reason = "stopped"
        try:
            while not self._stop:
                chunk = await loop.run_in_executor(srv.executor, session.next_chunk)
                if chunk is None:
                    reason = f"the stream ended after {session.chunks_sent} chunks (max_chunks {session.max_chunks})"
                    break
                if not await self.send(pack_chunk(chunk, h, w)):
                    return
                if srv.cfg.fps > 0:  # pace: chunk i + 1 is generated once chunk i's frames have been shown
                    due = max(due + chunk["frames"] / srv.cfg.fps, loop.time() - 1.0)
                    await asyncio.sleep(max(0.0, due - loop.time()))
            await self.send({"type": "end", "reason": reason})
        except Exception as err:  # a generation failure ends this stream, never the server
            await self.send({"type": "error", "message": f"generation failed: {type(err).__name__}: {err}"})
        finally:
            await loop.run_in_executor(srv.executor, session.close)


class StreamServer:
    """The aiohttp application around one :class:`StreamSource` (see the module docstring)."""

    def __init__(self, source, cfg: ServeConfig | None = None):
        self.source, self.cfg = source, cfg or ServeConfig()
        self.clients: dict[int, _Client] = {}
        self.connections = 0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megatron-rcm-serve")

    def app(self):
        from aiohttp import web

        app = web.Application(client_max_size=self.cfg.max_message_bytes)
        app.router.add_get("/", self._index)
        app.router.add_get("/status", self._status)
        app.router.add_get("/ws", self._websocket)
        app.on_shutdown.append(self._close_all)
        return app

    async def _index(self, request):
        from aiohttp import web

        return web.Response(text=page_html(), content_type="text/html", headers={"Cache-Control": "no-store"})

    async def _status(self, request):
        from aiohttp import web

        sessions = [{"id": c.id, "streaming": c.task is not None and not c.task.done(),
                     "chunks_sent": c.session.chunks_sent if c.session is not None else 0}
                    for c in self.clients.values()]
        return web.json_response({"sessions": sessions, "max_sessions": self.cfg.max_sessions})

    async def _websocket(self, request):
        from aiohttp import WSMsgType, web

        ws = web.WebSocketResponse(max_msg_size=self.cfg.max_message_bytes, heartbeat=30.0)
        await ws.prepare(request)
        if len(self.clients) >= self.cfg.max_sessions:
            await ws.send_json({"type": "error", "message": f"server busy: {self.cfg.max_sessions} sessions are "
                                "playing (--max-sessions); try again later"})
            await ws.close(code=1013, message=b"busy")
            return ws
        client = _Client(self, self.connections, ws)
        self.connections += 1
        self.clients[client.id] = client
        src = self.source
        try:
            await client.send({**src.hello(), "session": client.id, "fps": self.cfg.fps,
                               "max_chunks": self.cfg.max_chunks or src.default_max_chunks()})
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._handle(client, msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await client.send({"type": "error", "message": "binary messages are not understood; send JSON "
                                       "text frames"})
                else:  # ERROR (e.g. a frame over max_message_bytes): aiohttp closes the connection
                    break
        finally:
            await client.stop()
            del self.clients[client.id]
        return ws

    async def _handle(self, client: _Client, text: str) -> None:
        src = self.source
        try:
            msg = parse_message(text, src.action_dim, src.prompt_kind, src.hello()["num_classes"])
        except ProtocolError as err:
            await client.send({"type": "error", "message": str(err)})
            return
        if msg["type"] == "start":
            await client.start(msg)
        elif msg["type"] == "stop":
            await client.stop()
        elif client.session is not None:  # an action: read by the stream before its next chunk
            client.session.action = msg["action"]

    async def _close_all(self, app) -> None:
        for client in list(self.clients.values()):
            await client.ws.close(code=1001, message=b"server shutdown")


# ---------------------------------------------------------------------------------------------- running it
async def serve_forever(server: StreamServer, ready=None, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set (or SIGINT/SIGTERM); ``ready(url)`` is called once the port is bound."""
    from aiohttp import web

    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, server.cfg.host, server.cfg.port)
    await site.start()
    host, port = runner.addresses[0][:2]
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests) or no signals
            pass
    if ready is not None:
        ready(f"http://{host}:{port}/")
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        server.executor.shutdown(wait=True)


def run_serve(args) -> int:
    """The ``serve`` subcommand: load the phase, then serve until interrupted."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise ConfigError("serve", None, "the aiohttp package: pip install 'megatron-rcm[serve]'") from None
    from .serve_session import StreamSource

    if not 1 <= args.steps <= 8:
        raise ConfigError("--steps", args.steps, "1..8 few-step streaming steps")
    for flag, value, ok in (("--port", args.port, 0 <= args.port < 65536),
                            ("--max-sessions", args.max_sessions, args.max_sessions >= 1),
                            ("--max-chunks", args.max_chunks, args.max_chunks is None or args.max_chunks >= 1),
                            ("--fps", args.fps, args.fps >= 0)):
        if not ok:
            raise ConfigError(flag, value, {"--port": "a TCP port in 0..65535 (0: any free port)",
                                            "--max-sessions": "at least 1", "--max-chunks": "at least 1 chunk",
                                            "--fps": ">= 0 (0: as fast as generated)"}[flag])
    if args.cuda_graphs:
        import torch

        from ..network.chunk_graphs import ChunkGraphs

        ChunkGraphs.require(None, torch.device(args.device), "auto")
    t0 = time.perf_counter()
    source = StreamSource.from_run(args.run_dir, args.phase, args.weights, args.device, args.steps, args.guidance,
                                   args.negative_prompt)
    source.cuda_graphs = args.cuda_graphs
    cfg = source.cfg
    seed = cfg.eval.seed if args.seed is None else args.seed
    scfg = ServeConfig(args.host, args.port, args.max_sessions, args.max_chunks, args.fps, seed)
    server = StreamServer(source, scfg)
    limit = scfg.max_chunks or source.default_max_chunks()
    wants = "arrow/WASD keys" if source.action_dim else {"text": "a text prompt", "class": "a class id"}.get(
        source.prompt_kind, "nothing")

    def ready(url):
        print(f"serving phase '{args.phase}' of {cfg.output_dir} at {url} (loaded in {time.perf_counter() - t0:.1f} "
              f"s; {args.steps} steps per chunk, takes {wants}; up to {scfg.max_sessions} sessions of {limit} chunks; "
              "Ctrl-C stops)", flush=True)

    asyncio.run(serve_forever(server, ready))
    return 0


def add_serve_command(sub) -> None:
    from .run_dir import WEIGHTS

    p = sub.add_parser("serve", help="play a trained phase in the browser (HTTP + WebSocket; world models: keys as "
                       "actions, text-to-video: a prompt box)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training output_dir (holds config.yaml and phases/)")
    p.add_argument("--phase", required=True, help="the phase to stream (a distilled student, or a teacher)")
    p.add_argument("--weights", choices=WEIGHTS, default="ema", help="the phase's EMA (default) or raw weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 exposes the server to the network, with no authentication)")
    p.add_argument("--steps", type=int, default=2, help="denoising steps per chunk, 1..8 (default 2)")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale (default 1: off)")
    p.add_argument("--fps", type=float, default=16.0, help="frames per second the streams are paced to (default "
                   "16; 0: as fast as generated)")
    p.add_argument("--max-sessions", type=int, default=4, help="clients streaming at once (default 4)")
    p.add_argument("--max-chunks", type=int, default=None, help="chunks per stream (default: endless for models "
                   "with causal.window_chunks, else the training length)")
    p.add_argument("--seed", type=int, default=None, help="session i uses seed + i (default eval.seed)")
    p.add_argument("--negative-prompt", default=None, help="CFG's negative prompt for text runs")
    p.add_argument("--cuda-graphs", action="store_true", help="replay chunk forwards as CUDA graphs (one session at "
                   "a time gets them; the others run eagerly)")
    p.set_defaults(func=run_serve)
