"""One trainer per run folder: an exclusive lock on ``<output_dir>/.lock``, held for the trainer's life.

Why ``flock``: the kernel drops it when its holder dies, however it dies (SIGKILL, OOM killer), so a
crash never leaves a folder locked for good. The holder writes who it is into the file (host, pid,
start time, job id, command) for the messages, and clears it when it releases the lock cleanly, so a
file that still names someone while its lock is free was left by a trainer that did not exit cleanly:

- lock busy: another trainer is alive -> :class:`RunLockedError` (exit 2) naming it;
- lock free, file names a process of THIS host: it is gone (the kernel freed its lock) -> taken over,
  with a message;
- lock free, file names the same job (``SLURM_JOB_ID`` or torchrun's ``TORCHELASTIC_RUN_ID``): a
  restart of this job, perhaps on another node -> taken over, with a message;
- lock free, file names another host and another job: refused. This host cannot see that process, and
  on some cluster file systems ``flock`` is local to each node; the message says to delete the file
  if that trainer has stopped.

On file systems without ``flock`` (ENOLCK, EOPNOTSUPP, ...) the file's content alone decides, with
the holder's pid checked on this host.
"""
from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config.errors import UsageError

LOCK_NAME = ".lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_NO_JOB = {"", "none", "local"}  # torchrun's / our launcher's placeholder rendezvous ids name no job


class RunLockedError(UsageError):
    """The run folder belongs to another trainer."""


def current_job_id(env=None) -> str | None:
    """The scheduler job this process belongs to (kept across torchrun restarts and SLURM requeues)."""
    env = os.environ if env is None else env
    for name in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = env.get(name, "")
        if value.strip().lower() not in _NO_JOB:
            return value
    return None


@dataclass
class Holder:
    """Who holds (or last held) a run folder."""

    host: str
    pid: int
    started: str
    job: str | None = None
    command: str = ""

    @classmethod
    def me(cls) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S"), current_job_id(),
                   " ".join(shlex.quote(a) for a in sys.argv))

    @classmethod
    def parse(cls, text: str) -> "Holder | None":
        try:
            d = json.loads(text)
            return cls(str(d["host"]), int(d["pid"]), str(d.get("started", "?")), d.get("job"),
                       str(d.get("command", "")))
        except (ValueError, KeyError, TypeError):
            return None  # empty (released cleanly) or not ours

    def describe(self) -> str:
        job = f", job {self.job}" if self.job else ""
        cmd = f": {self.command}" if self.command else ""
        return f"pid {self.pid} on host {self.host} (started {self.started}{job}){cmd}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def judge(holder: Holder | None, me: Holder, lock_busy: bool | None, alive=pid_alive) -> tuple[str, str]:
    """("free" | "stale" | "held", why). ``lock_busy``: flock's answer, None where flock is unsupported."""
    if lock_busy:
        return "held", "its lock is held"
    if holder is None:
        return "free", ""
    if me.job is not None and holder.job == me.job:
        return "stale", f"an earlier attempt of this job ({me.job})"
    if holder.host == me.host:
        if lock_busy is None and holder.pid != me.pid and alive(holder.pid):
            return "held", "that process is running (this file system has no flock)"
        return "stale", "that process is gone"
    return "held", "another host: this one cannot tell whether it still runs"


class RunLock:
    """``RunLock(output_dir).acquire()`` ... ``release()`` (or use it as a context manager)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, log=print) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            busy = _try_flock(fd)
            holder = Holder.parse(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))
            me = Holder.me()
            verdict, why = judge(holder, me, busy)
            if verdict == "held":
                raise RunLockedError(self._refusal(holder, why, unverifiable=not busy and holder.host != me.host))
            if verdict == "stale":
                log(f"[lock] {self.path}: taking over the stale lock of {holder.describe()}; {why}")
            data = json.dumps(asdict(me)).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _refusal(self, holder: Holder | None, why: str, unverifiable: bool = False) -> str:
        who = holder.describe() if holder is not None else "a trainer that has not written its name yet"
        if unverifiable:
            return (f"output_dir {self.folder} is locked by {who}, on {why}; if that trainer has stopped, delete "
                    f"{self.path} and start again, else train into another output_dir")
        return (f"output_dir {self.folder} is in use by another trainer, {who} (lock file {self.path}); wait for it "
                "to finish or stop it, or train into another output_dir")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty file = released cleanly
            _unlock(fd)
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self):
        return self.acquire() if not self.held else self

    def __exit__(self, *exc):
        self.release()


def probe(folder) -> None:
    """Raise :class:`RunLockedError` if a trainer holds ``folder`` now; takes nothing (launcher pre-flight)."""
    path = Path(folder) / LOCK_NAME
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        busy = _try_flock(fd, shared=True)
        holder = Holder.parse(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))
        verdict, why = judge(holder, Holder.me(), busy)
        if busy is False:
            _unlock(fd)
        if verdict == "held":
            other_host = not busy and holder is not None and holder.host != socket.gethostname()
            raise RunLockedError(RunLock(folder)._refusal(holder, why, unverifiable=other_host))
    finally:
        os.close(fd)


def _try_flock(fd: int, shared: bool = False) -> bool | None:
    """False = locked now, True = another holder has it, None = this file system has no flock."""
    import fcntl

    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError as err:
        if err.errno in _NO_FLOCK:
            return None
        raise


def _unlock(fd: int) -> None:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError as err:
        if err.errno not in _NO_FLOCK:
            raise
