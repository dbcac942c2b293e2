"""``megatron-rcm serve`` in a real headless browser: the system Chromium driven by Playwright.

The trained world model of the ``world_model_run`` fixture (tests/fixtures/world_model.py, with a rolling
3-chunk window so it plays on past its 4-frame training length) is served by the CLI on a free loopback port, and the page is
opened in Chromium: it loads, frames arrive and are drawn, and the pressed keys (arrow, then WASD) change
the direction the shape moves in the frames that follow. The motion is measured on the pixels the page
received, grouped by the action the server reports for each chunk.

Chromium comes from Debian's packages (``apt-get install -y chromium``, the README's test set-up), not from
``playwright install`` (a browser download from outside the package registries); without it this test fails
saying so, it is never skipped.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from fixtures.world_model import ACTIONS, SIZE, action_direction, frame_displacements

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INSTALL = ("install it as the README's test set-up does: apt-get update && apt-get install -y chromium "
           "(Debian's package; `playwright install` downloads a browser from outside the registries and fails here), "
           "or point MEGATRON_RCM_CHROMIUM at a Chromium binary")
SEGMENT, TURN = 10, 2  # chunks (= frames) played per key; frames the shape takes to turn, left out of the measure
pytestmark = pytest.mark.usefixtures("one_thread")


def chromium_path() -> str:
    path = os.environ.get("MEGATRON_RCM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path or not os.access(path, os.X_OK):
        pytest.fail(f"no Chromium found for the browser test: {INSTALL}")
    return path


@pytest.fixture(scope="module")
def served_world_model(world_model_run):
    """The CLI serving the trained world model: yields its URL; the server process is stopped afterwards."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH",
                                                                                                      "")])}
    proc = subprocess.Popen([sys.executable, "-m", "megatron_rcm.cli", "--threads", "1", "serve", str(world_model_run),
                             "--phase", "teacher", "--steps", "1", "--port", "0", "--fps", "20",
                             "--max-sessions", "2", "--max-chunks", "80"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert " at http://127.0.0.1:" in line, f"the server did not start: {line}{proc.stdout.read()}"
        yield line.split(" at ", 1)[1].split()[0]
    finally:
        proc.terminate()  # SIGTERM: the server closes its sessions and exits
        try:
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def _chunks_with(page, action, count, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        n = page.evaluate(f"() => rcm.chunks.filter(c => c.header.action === {action}).length")
        if n >= count:
            return
        page.wait_for_timeout(50)
    raise AssertionError(f"fewer than {count} chunks with action {action} arrived; errors: "
                         f"{page.evaluate('() => rcm.errors')}")


def test_page_plays_the_world_model_and_keys_steer_it(served_world_model):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[test]' (the README's test set-up)")
    chromium = chromium_path()
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        browser = pw.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True,
                                                        args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(served_world_model)
            page.wait_for_function("() => window.rcm && rcm.hello && rcm.received >= 4", timeout=60_000)
            assert page.evaluate("() => rcm.hello.action_dim") == ACTIONS
            assert page.is_visible("#keys") and not page.is_visible("#controls")  # keys, no prompt box
            drawn = page.evaluate("() => { const d = document.getElementById('screen').getContext('2d')"
                                  ".getImageData(0, 0, 512, 512).data; let lo = 255, hi = 0;"
                                  " for (let i = 0; i < d.length; i += 4) { lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); }"
                                  " return hi - lo; }")
            assert drawn > 50, "the canvas shows no frame"
            _chunks_with(page, 0, SEGMENT)
            page.keyboard.press("ArrowLeft")  # action 2: left
            _chunks_with(page, 2, SEGMENT)
            page.keyboard.press("s")  # WASD: down, action 3
            _chunks_with(page, 3, SEGMENT)
            assert page.inner_text("#action") == "3"
            chunks = page.evaluate("() => rcm.chunks.map(c => ({header: c.header, pixels: Array.from(c.pixels)}))")
        finally:
            browser.close()

    headers = [c["header"] for c in chunks]
    assert headers[0]["prefix"] and [h["index"] for h in headers] == list(range(len(headers)))
    frames = torch.cat([torch.tensor(c["pixels"], dtype=torch.float32).view(h["frames"], SIZE, SIZE, 4)
                        for c, h in zip(chunks, headers)])  # [F, H, W, RGBA]
    video = (frames[..., :3] / 127.5 - 1).permute(3, 0, 1, 2)[None]  # [1, 3, F, H, W]
    d = frame_displacements(video)[0]  # motion into frame t, t = 1..F-1
    actions = [h["action"] for h in headers[1:]]  # each chunk is one frame; its action moves the shape into it
    assert actions == sorted(actions, key=[0, 2, 3].index)  # 0 ... then 2 ... then 3: the keys steered the stream
    motion, report = {}, []
    for k in (0, 2, 3):
        frames_k = [t for t, a in enumerate(actions) if a == k][TURN:]  # past the turn the shape takes after a key
        motion[k] = d[frames_k].mean(0)
        report.append(f"action {k}: {len(frames_k)} frames, mean motion (y, x) {motion[k].tolist()} px/frame")
    report = "; ".join(report)
    for k in (0, 2, 3):  # each key's frames move the shape its way (2 px/frame in the data; the model ~1-2)
        assert float(motion[k] @ action_direction(k)) > 0.5, report
    assert float(motion[0] @ action_direction(2)) < -0.5, report  # right, then left: the direction reversed
