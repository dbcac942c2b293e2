"""Start N local ranks of a script with torchrun-style env (gloo, free port) and a hard timeout."""
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, nprocs: int, args: list[str], timeout: float = 120.0) -> list[str]:
    """Run ``script`` on ``nprocs`` ranks; returns all ranks' error lists (empty = pass)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        procs = []
        for rank in range(nprocs):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
            procs.append(subprocess.Popen([sys.executable, str(Path(__file__).parent / script), *args, out],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        errors = []
        try:
            for rank, p in enumerate(procs):
                output, _ = p.communicate(timeout=timeout)
                if p.returncode != 0:
                    errors.append(f"rank {rank} exited {p.returncode}:\n{output[-3000:]}")
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            return [f"timeout after {timeout}s"]
        for rank in range(nprocs):
            f = Path(out) / f"rank{rank}.json"
            if f.exists():
                errors += [f"rank {rank}: {e}" for e in json.loads(f.read_text())]
            elif not errors:
                errors.append(f"rank {rank} wrote no result")
        return errors
