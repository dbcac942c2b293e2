"""``megatron-rcm serve``: the protocol, several clients with their own streams, memory freed on disconnect,
bad messages answered with error frames, frames equal to ``stream_video``'s. In-process, loopback only, on a
1-step world model (the browser test, ``test_serve_browser.py``, plays a trained one)."""
import asyncio
import gc
import warnings

import aiohttp  # the test extra installs it (pyproject: test = [..., "aiohttp", ...])
import pytest
import torch

from fixtures.serve_client import next_text, receive, receive_until_action, serving
from fixtures.world_model import ACTIONS, SIZE, train_world_model
from megatron_rcm.cli import main
from megatron_rcm.inference.serve import ProtocolError, parse_message
from megatron_rcm.inference.serve_session import StreamSource, key_actions, to_rgba
from megatron_rcm.inference.streaming import StreamConfig, one_hot_actions, stream_video
from megatron_rcm.inference.sampling import prompt_batch
from megatron_rcm.models.kv_cache import KVCache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    """A run folder with a 1-step world model (windowed cache: endless play)."""
    tmp = tmp_path_factory.mktemp("serve")
    train_world_model(tmp, "phases.0.steps=1")
    return tmp / "run"


def _live_caches() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on every object touches deprecated torch attributes
        warnings.simplefilter("ignore")
        return sum(isinstance(o, KVCache) for o in gc.get_objects())


# ---------------------------------------------------------------------------------------------- pure pieces
def test_messages_are_checked():
    assert parse_message('{"type": "action", "action": 3}', 4, None) == {"type": "action", "action": 3}
    assert parse_message('{"type": "start", "seed": 5}', 4, None)["seed"] == 5
    assert parse_message('{"type": "start", "prompt": " a cat "}', 0, "text")["prompt"] == "a cat"
    assert parse_message('{"type": "start", "class_id": 2}', 0, "class", 8)["class_id"] == 2
    bad = [('{"type": "action", "action": 4}', "in \\[0, 4\\)"), ('{"type": "action", "action": true}', "integer"),
           ("not json", "JSON"), ("[1, 2]", "'type'"), ('{"type": "jump"}', "unknown message type"),
           ('{"type": "start", "prompt": "x"}', "no prompt"), ('{"type": "start", "seed": -1}', "seed")]
    for text, match in bad:
        with pytest.raises(ProtocolError, match=match):
            parse_message(text, 4, None)
    with pytest.raises(ProtocolError, match="no actions"):
        parse_message('{"type": "action", "action": 0}', 0, "text")
    with pytest.raises(ProtocolError, match="non-empty"):
        parse_message('{"type": "start", "prompt": "  "}', 0, "text")
    with pytest.raises(ProtocolError, match="class_id"):
        parse_message('{"type": "start", "class_id": 8}', 0, "class", 8)


def test_keys_map_to_the_action_of_their_direction():
    four = key_actions(4)  # 0 right, 1 up, 2 left, 3 down (angle 2 pi k / 4)
    assert [four[k] for k in ("ArrowRight", "ArrowUp", "ArrowLeft", "ArrowDown")] == [0, 1, 2, 3]
    assert [four[k] for k in "dwas"] == [0, 1, 2, 3] and four["3"] == 3 and "4" not in four
    eight = key_actions(8)
    assert [eight[k] for k in ("ArrowRight", "ArrowUp", "ArrowLeft", "ArrowDown")] == [0, 2, 4, 6]
    assert key_actions(0) == {}


def test_rgba_is_the_frame_in_bytes():
    frames = torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1, 1).expand(3, 2, 1, 2)
    out = torch.frombuffer(bytearray(to_rgba(frames)), dtype=torch.uint8).view(2, 1, 2, 4)
    assert out[0, 0, 0].tolist() == [0, 128, 255, 255] and (out == out[0, 0, 0]).all()


# ---------------------------------------------------------------------------------------------- the server
def test_streams_equal_stream_video_and_actions_steer_the_next_chunks(world_run):
    """Frames served for a seed and the actions the headers report are exactly a stream_video run's."""
    source = StreamSource.from_run(world_run, "teacher", steps=1)

    async def play(url):
        async with aiohttp.ClientSession() as http, http.ws_connect(url + "ws") as ws:
            hello = await next_text(ws)
            assert hello["type"] == "hello" and hello["action_dim"] == ACTIONS and hello["prompt"] is None
            assert hello["keys"]["ArrowLeft"] == 2 and (hello["height"], hello["width"]) == (SIZE, SIZE)
            await ws.send_json({"type": "start", "seed": 11})
            _, first = await receive(ws, 4)
            await ws.send_json({"type": "action", "action": 2})
            return first + await receive_until_action(ws, 2)

    with serving(world_run, max_chunks=40) as (url, _):
        chunks = asyncio.run(play(url))
    headers = [h for h, _ in chunks]
    n = len(chunks) - 1
    assert headers[0]["prefix"] and [h["index"] for h in headers[1:]] == list(range(1, n + 1))
    acts = [h["action"] for h in headers[1:]]
    # chunks 1-3 came before the key; from some chunk on every chunk follows it
    assert acts[:3] == [0, 0, 0] and acts[-3:] == [2, 2, 2] and acts == sorted(acts)

    batch = prompt_batch(source.cfg.data, 1, 11, "cpu")
    prefix = batch["latents"][:, :, :1]
    ref = [prefix] + [o.frames for o in stream_video(
        source.model, batch["context"], n, SIZE, SIZE, StreamConfig(steps=1), batch["uncond_context"],
        lambda c, _f: one_hot_actions([acts[c - 1] if c else 0], ACTIONS, 1), torch.Generator().manual_seed(11),
        prefix=prefix)]
    for (header, rgba), frames in zip(chunks, ref):
        want = torch.frombuffer(bytearray(to_rgba(frames[0])), dtype=torch.uint8).view_as(rgba)
        assert torch.equal(rgba, want), header


def test_clients_have_their_own_sessions_and_disconnecting_frees_them(world_run):
    async def scenario(url, server):
        async with aiohttp.ClientSession() as http:
            a, b = await http.ws_connect(url + "ws"), await http.ws_connect(url + "ws")
            for ws, seed in ((a, 1), (b, 2)):
                await next_text(ws)
                await ws.send_json({"type": "start", "seed": seed})
            (_, ca), (_, cb) = await receive(a, 3), await receive(b, 3)
            assert not torch.equal(ca[0][1], cb[0][1])  # own seeds: other start frames
            status = await (await http.get(url + "status")).json()
            assert len(status["sessions"]) == 2 and all(s["streaming"] for s in status["sessions"])
            assert await asyncio.to_thread(_live_caches) == before + 2  # one KV cache per session

            c = await http.ws_connect(url + "ws")  # a third client: the server is full
            busy = await next_text(c)
            assert busy["type"] == "error" and "busy" in busy["message"]
            assert (await c.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)

            await a.close()
            for _ in range(100):
                status = await (await http.get(url + "status")).json()
                if len(status["sessions"]) == 1:
                    break
                await asyncio.sleep(0.05)
            assert [s["id"] for s in status["sessions"]] == [1]
            assert await asyncio.to_thread(_live_caches) == before + 1  # a's cache is gone, b plays on
            _, more = await receive(b, 2)
            assert more[-1][0]["index"] > cb[-1][0]["index"]
            await b.close()
            for _ in range(100):
                if not (await (await http.get(url + "status")).json())["sessions"]:
                    break
                await asyncio.sleep(0.05)
            assert await asyncio.to_thread(_live_caches) == before

    before = _live_caches()
    with serving(world_run, max_sessions=2) as (url, server):
        asyncio.run(scenario(url, server))


def test_bad_messages_get_error_frames_and_the_stream_goes_on(world_run):
    async def scenario(url):
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(url + "ws")
            await next_text(ws)
            await ws.send_json({"type": "start"})
            await receive(ws, 2)
            errors = []
            for bad in ("{", '{"type": "action", "action": 9}', '{"type": "fly"}', '{"type": "start", "prompt": "a"}'):
                await ws.send_str(bad)
                errors.append(await next_text(ws))
            await ws.send_bytes(b"\x00\x01")
            errors.append(await next_text(ws))
            assert [e["type"] for e in errors] == ["error"] * 5, errors
            assert "JSON" in errors[0]["message"] and "[0, 4)" in errors[1]["message"]
            await ws.send_json({"type": "action", "action": 1})
            await receive_until_action(ws, 1)  # still streaming, and still listening
            await ws.send_str("x" * 70_000)  # over max_message_bytes: this connection is closed ...
            msg = await ws.receive()
            while msg.type == aiohttp.WSMsgType.BINARY:  # chunks already on their way
                msg = await ws.receive()
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR), msg
            fresh = await http.ws_connect(url + "ws")  # ... and the server serves the next client
            assert (await next_text(fresh))["type"] == "hello"
            await fresh.send_json({"type": "stop"})
            await fresh.close()

    with serving(world_run) as (url, _):
        asyncio.run(scenario(url))


def test_a_stream_ends_at_max_chunks(world_run):
    async def scenario(url):
        async with aiohttp.ClientSession() as http, http.ws_connect(url + "ws") as ws:
            await next_text(ws)
            await ws.send_json({"type": "start"})
            texts, chunks = await receive(ws, 4)  # the start frame + 3 chunks
            end = await next_text(ws)
            assert end["type"] == "end" and "3 chunks" in end["reason"]

    with serving(world_run, max_chunks=3, fps=0) as (url, _):
        asyncio.run(scenario(url))


def test_cli_refusals_are_one_line(world_run, tmp_path, capsys):
    for argv, needle in (([str(world_run), "--phase", "teacher", "--port", "70000"], "--port"),
                         ([str(world_run), "--phase", "nope"], "unknown phase"),
                         ([str(tmp_path / "none"), "--phase", "teacher"], "does not exist"),
                         ([str(world_run), "--phase", "teacher", "--max-sessions", "0"], "--max-sessions"),
                         ([str(world_run), "--phase", "teacher", "--cuda-graphs"], "--cuda-graphs")):
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err
