"""Runs cannot clobber each other: one run per run directory, with a lock that dies with its holder and
that the ranks of one run share."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from glmtrain import cli, locks
from glmtrain.cluster import FLAG
from tests._util import ROOT, compose_cfg

HOLD = "import sys, time; from glmtrain.locks import lock_run_dir; lock_run_dir(sys.argv[1]); print('held', flush=True); time.sleep(600)"


def _holder(run_dir, env=None) -> subprocess.Popen:
    import os

    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e.update(env or {})
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, env=e, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_run_on_a_held_run_dir_is_refused_until_the_holder_dies(tmp_path, capsys, monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        with pytest.raises(SystemExit) as e:  # the CLI's own path, in-process
            cli.run_config(compose_cfg(["experiment=smoke", "trainer.progress=none", f"run_dir={run_dir}"]))
        assert e.value.code == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("glmtrain: error")]
        assert len(err) == 1 and f"run_dir {run_dir} is in use by pid {holder.pid} on " in err[0], err
        assert sorted(p.name for p in run_dir.iterdir()) == [locks.LOCK_NAME]  # the refused run wrote nothing
    finally:
        FLAG.uninstall()
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait(30)
    lock = locks.FileLock(run_dir / locks.LOCK_NAME)
    assert lock.try_acquire(), "the lock outlived its holder"
    lock.release()


def test_ranks_of_one_run_share_the_lock_through_rank_0(tmp_path, monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert locks.is_lock_rank()
    for env in ({"LOCAL_RANK": "1"}, {"RANK": "3"}, {"SLURM_PROCID": "1"}, {"NODE_RANK": "1"},
                {"SLURM_PROCID": "0", "RANK": "0", "LOCAL_RANK": "2"}):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert not locks.is_lock_rank(), env
    holder = _holder(tmp_path / "run")  # rank 0 of a run holds it ...
    try:
        monkeypatch.setenv("LOCAL_RANK", "1")  # ... its other ranks go ahead
        assert locks.lock_run_dir(tmp_path / "run") is None
    finally:
        holder.kill()
        holder.wait(30)


def test_a_requeued_job_waits_for_its_own_previous_incarnation(tmp_path, monkeypatch, capsys):
    """Same SLURM job id in the lock (a requeue whose old process has not let go yet, e.g. an NFS lease):
    wait instead of failing the requeued job; another job is refused at once."""
    for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK"):
        monkeypatch.delenv(k, raising=False)
    run_dir = tmp_path / "run"
    holder = _holder(run_dir, {"SLURM_JOB_ID": "4242"})
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "999")
        with pytest.raises(locks.RunDirBusy, match="SLURM job 4242"):
            locks.lock_run_dir(run_dir)
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        monkeypatch.setattr(locks, "SAME_JOB_WAIT_S", 60.0)
        threading.Timer(1.5, holder.kill).start()
        t0 = time.monotonic()
        lock = locks.lock_run_dir(run_dir, say=print)
        assert lock is not None and 1.0 < time.monotonic() - t0 < 30
        assert "waiting for" in capsys.readouterr().out
        lock.release()
    finally:
        holder.kill()
        holder.wait(30)
