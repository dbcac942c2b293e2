"""One trainer per run folder, with real processes: a second trainer exits 2 naming the holder (also every rank
of a 2-process torchrun-style start, none hanging), and a dead holder's stale lock is taken over."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rcm.training.run_lock import LOCK_NAME, Holder, RunLock, RunLockedError, judge

ROOT = Path(__file__).resolve().parents[1]
YAML = """
model: {num_layers: 1}
causal: {chunk_frames: 2}
data: {num_frames: 4, height: 8, width: 8, batch_size: 2}
train: {checkpoint_every: 0, log_every: 1}
eval: {at_phase_end: false}
phases:
  - {name: t, kind: teacher, objective: flow_matching, steps: 1}
"""
HOLD = """
import sys, time
from megatron_rcm.training.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            **extra}


@pytest.fixture
def holder(tmp_path):
    """A separate process that holds the lock of tmp_path/run until killed."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield run, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _train(tmp_path, run, env=None, timeout=120):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(YAML)
    return subprocess.Popen([sys.executable, "-m", "megatron_rcm.cli", "train", str(cfg), f"output_dir={run}"],
                            env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_second_trainer_is_refused_then_a_dead_holders_lock_is_taken_over(tmp_path, holder):
    run, proc = holder
    res = _train(tmp_path, run)
    out, err = res.communicate(timeout=120)
    assert res.returncode == 2, out + err
    assert err.count("\n") == 1 and err.startswith(f"error: output_dir {run} is in use by another trainer")
    assert f"pid {proc.pid} on host {socket.gethostname()}" in err
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME], "the refused trainer wrote into the folder"
    proc.send_signal(signal.SIGKILL)  # the holder dies without releasing: the file still names it
    proc.wait()
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == proc.pid
    res = _train(tmp_path, run)
    out, err = res.communicate(timeout=120)
    assert res.returncode == 0, out + err
    assert f"taking over the stale lock of pid {proc.pid} on host {socket.gethostname()}" in out
    assert (run / "phases" / "t" / "done.json").is_file()
    assert (run / LOCK_NAME).read_text() == "", "a clean exit leaves the lock file empty"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_rank_of_a_distributed_start_exits_2_without_hanging(tmp_path, holder):
    run, proc = holder
    port = _free_port()
    ranks = [_train(tmp_path, run, env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    results = []
    try:
        for p in ranks:
            out, err = p.communicate(timeout=120)
            results.append((out, err, p.returncode))
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    (out0, err0, rc0), (out1, err1, rc1) = results
    assert (rc0, rc1) == (2, 2), err0 + err1
    assert f"in use by another trainer, pid {proc.pid}" in err0
    assert "error:" not in err1, "only rank 0 reports; the others follow its verdict quietly"


def test_the_verdicts():
    me = Holder("here", 10, "now", job="77")
    dead = lambda pid: False  # noqa: E731
    alive = lambda pid: True  # noqa: E731
    assert judge(None, me, lock_busy=True)[0] == "held"
    assert judge(None, me, lock_busy=False)[0] == "free"
    assert judge(Holder("here", 5, "t"), me, lock_busy=False)[0] == "stale"  # flock free: it is gone
    assert judge(Holder("here", 5, "t"), me, lock_busy=None, alive=alive)[0] == "held"  # no flock: pid alive
    assert judge(Holder("here", 5, "t"), me, lock_busy=None, alive=dead)[0] == "stale"
    assert judge(Holder("there", 5, "t"), me, lock_busy=False)[0] == "held"  # another host: cannot tell
    assert judge(Holder("there", 5, "t", job="77"), me, lock_busy=False)[0] == "stale"  # a restart of this job


def test_a_lock_left_on_another_host_says_how_to_clear_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "started": "yesterday"}))
    with pytest.raises(RunLockedError, match=f"if that trainer has stopped, delete {run / LOCK_NAME}"):
        RunLock(run).acquire()
    with RunLock(tmp_path / "other") as lock:  # in-process: a second acquire of a held folder is refused too
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path / "other").acquire()
        assert lock.held
    RunLock(tmp_path / "other").acquire().release()
