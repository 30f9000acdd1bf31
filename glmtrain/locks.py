"""Locks that die with their holder: one run per run directory, one builder per shard directory.

Both are POSIX record locks (``fcntl.lockf``) on a small file, chosen over ``flock`` because

* the kernel releases them when the holding *process* ends in any way (exit, exception, SIGKILL,
  out-of-memory kill) -- there is no stale lock file to clean up;
* they are **not inherited by forked children**: a DataLoader worker or a shard-build worker that
  outlives a killed parent cannot keep the lock (a ``flock`` is shared with every forked child);
* they work across machines on NFS (NFSv4 natively, NFSv3 through ``lockd``/NLM).

NFS caveats: a mount with ``nolock`` or ``local_lock=all`` keeps locks on one node (two nodes could
then both hold one); after a client node crashes, the server frees its locks only when the lease
expires (NFSv4: about 90 s) -- a requeued SLURM job waits for that (below).  Locks are per process:
one process can take the same lock again (a second ``train()`` in one process is the same run).

The lock file holds a line of JSON naming the holder (host, pid, SLURM job, start time, command) for
the one-line refusal a second process gets.

**Run directories** (:func:`hold_run_dir`): only global rank 0 takes the lock -- the ranks of one run
(Lightning-launched DDP children, ``torchrun`` workers, ``srun`` tasks, other nodes) share it through
rank 0, which starts first and outlives them.  A process that finds the lock held by *its own* SLURM
job (a requeued job whose previous incarnation on a crashed node has not been released yet) waits for
it; any other holder means a second run on the same directory, which is refused.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import functools
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

LOCK_NAME = ".glmtrain.lock"
SAME_JOB_WAIT_S = float(os.environ.get("GLMTRAIN_LOCK_WAIT_S", "300"))


class LockBusy(RuntimeError):
    """Another process holds the lock; one line naming the holder."""


def holder_info() -> dict[str, Any]:
    env = os.environ
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": env.get("SLURM_JOB_ID", ""),
            "started": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)[:300]}


def describe_holder(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process (it has not recorded itself yet)"
    job = f", SLURM job {info['job']}" if info.get("job") else ""
    return f"pid {info.get('pid')} on {info.get('host')}{job}, since {info.get('started')}"


class FileLock:
    """An exclusive POSIX lock on ``path`` (created if missing); the content names the holder."""

    # per process: a lockf lock belongs to the process, and closing ANY descriptor of the file drops it,
    # so a process keeps one descriptor per lock file and counts how often it took the lock
    _held: dict[str, list] = {}

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = None

    def _read_holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if key in FileLock._held:  # this process holds it already
            FileLock._held[key][1] += 1
            self._f = FileLock._held[key][0]
            return True
        f = open(self.path, "a+")  # never truncates: a refused process changes nothing
        try:
            fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self._f = f
        FileLock._held[key] = [f, 1]
        return True

    def acquire(self, wait_s: float = 0.0, why_wait: Callable[[dict | None], bool] = lambda info: True,
                say: Callable[[str], None] | None = None) -> None:
        """Take the lock; if busy, wait up to ``wait_s`` (when ``why_wait(holder)`` says so), else raise LockBusy."""
        t0, told = time.monotonic(), False
        while not self.try_acquire():
            info = self._read_holder()
            if time.monotonic() - t0 >= wait_s or not why_wait(info):
                raise LockBusy(describe_holder(info))
            if not told and say is not None:
                say(f"waiting for {self.path} (held by {describe_holder(info)})")
                told = True
            time.sleep(1.0)

    def record(self, info: dict[str, Any] | None = None) -> None:
        """Write the holder line (after the lock is ours)."""
        self._f.seek(0)
        self._f.truncate()
        self._f.write(json.dumps(info or holder_info()) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def release(self) -> None:
        if self._f is None:
            return
        key = str(self.path.resolve())
        held = FileLock._held.get(key)
        self._f = None
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del FileLock._held[key]
            fcntl.lockf(held[0].fileno(), fcntl.LOCK_UN)
            held[0].close()


# ----------------------------------------------------------------------------- run directories
def is_lock_rank() -> bool:
    """Global rank 0 of the run (every rank variable a launcher may set is 0 or absent)."""
    env = os.environ
    return all(int(env.get(v, "0") or 0) == 0 for v in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"))


class RunDirBusy(LockBusy):
    pass


def lock_run_dir(run_dir: Path, say: Callable[[str], None] | None = None) -> FileLock | None:
    """Rank 0: take ``run_dir``'s lock (refusing with one line if another run holds it); other ranks: None."""
    if not is_lock_rank():
        return None
    lock = FileLock(Path(run_dir) / LOCK_NAME)
    job = os.environ.get("SLURM_JOB_ID", "")
    same_job = lambda info: bool(job) and bool(info) and info.get("job") == job  # noqa: E731 (a requeue of ours)
    try:
        lock.acquire(SAME_JOB_WAIT_S, same_job, say)
    except LockBusy as e:
        raise RunDirBusy(f"run_dir {run_dir} is in use by {e} (its lock {lock.path} is held); wait for that run to "
                         "end or choose another run_dir=...") from None
    lock.record()
    return lock


def hold_run_dir(fn: Callable) -> Callable:
    """Decorator for ``train(run)``: the run directory is locked for the duration of the call (rank 0)."""

    @functools.wraps(fn)
    def wrapper(run, *args, **kwargs):
        lock = lock_run_dir(Path(run.run_dir), say=lambda m: print(f"glmtrain: {m}", file=sys.stderr, flush=True))
        try:
            return fn(run, *args, **kwargs)
        finally:
            if lock is not None:
                lock.release()

    return wrapper
