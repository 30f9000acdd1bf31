"""Fixtures for the cluster-operation tests: a real local SLURM, reference runs, run helpers.

* ``slurm`` (session): starts a one-node SLURM with the project's ``scripts/slurm-local/start.sh
  --fresh`` (which installs Debian's slurm and munge packages when they are missing) the first
  time a test asks for it, and ALWAYS stops it (``stop.sh``) at the end of the session, also when
  tests fail or the start itself failed half-way.  If SLURM cannot be started, the tests that need
  it fail when ``CI=true`` and are skipped otherwise, with a reason that says how to enable them.
* ``reference_1p`` / ``reference_ddp`` (session): uninterrupted tiny runs (single process /
  2-process CPU DDP) that the recovery and SLURM tests compare their final weights with.
"""

from __future__ import annotations

import csv
import fcntl
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glmtrain.ckpt_formats import load_file

ROOT = Path(__file__).resolve().parents[1]
SLURM_LOCAL = Path(os.environ.get("GLMTRAIN_SLURM_LOCAL", ROOT / "scripts" / "slurm-local"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
LOCK_WAIT_S = int(os.environ.get("GLMTRAIN_SLURM_LOCK_WAIT_S", "900"))

# A tiny, deterministic CPU run: 12 optimizer steps, a checkpoint every 2 (all kept), dropout on
# (so that the restored RNG state matters), one torch thread per process (identical reductions
# everywhere, also inside SLURM), no validation and no final evaluation (speed).
TINY = [
    "experiment=smoke", "model=transformer", "trainer.max_steps=12", "trainer.ckpt_every=2", "trainer.keep_last=0",
    "trainer.val_every=0", "trainer.log_every=1", "trainer.progress=none", "eval.final=false",
    "trainer.deterministic=true", "trainer.threads=1", "trainer.accelerator=cpu", "model.dropout=0.1",
    "optim.warmup_steps=2", "data.num_workers=0",
]
DDP = ["strategy=ddp", "trainer.devices=2"]


# ----------------------------------------------------------------------------- run helpers
def cli_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "glmtrain", *args]


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    for k in [k for k in env if k.startswith("SLURM_")]:
        env.pop(k)  # a test run inside a SLURM allocation must not look like a SLURM task
    return env


def run_glmtrain(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    res = subprocess.run(cli_cmd(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=child_env())
    assert res.returncode == 0, f"glmtrain {' '.join(args)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def final_checkpoint(run_dir: Path) -> dict:
    from glmtrain.checkpointing import list_checkpoints

    step, path = list_checkpoints(Path(run_dir) / "checkpoints")[-1]
    return load_file(path)


def steps_saved(run_dir: Path) -> list[int]:
    from glmtrain.checkpointing import list_checkpoints

    return [s for s, _ in list_checkpoints(Path(run_dir) / "checkpoints")]


def losses(run_dir: Path) -> dict[int, str]:
    """step -> logged training loss, as written (string: compared exactly), over all (re)starts."""
    out: dict[int, str] = {}
    for f in sorted((Path(run_dir) / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        for row in csv.DictReader(open(f)):
            if row.get("loss"):
                out[int(float(row["step"]))] = row["loss"]
    return out


def assert_same_training_state(a: dict, b: dict) -> None:
    """Bit-exact: weights, optimizer moments, schedule, step and data position."""
    assert a["global_step"] == b["global_step"]
    assert a["glmtrain"]["consumed_samples"] == b["glmtrain"]["consumed_samples"]
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys()
    diff = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not diff, f"weights differ in {len(diff)} tensors, e.g. {diff[:3]}: max |d| = " \
                     f"{max(float((sa[k] - sb[k]).abs().max()) for k in diff):.3e}"
    oa, ob = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for k in oa[i]:
            assert torch.equal(torch.as_tensor(oa[i][k]), torch.as_tensor(ob[i][k])), f"optimizer state {i}.{k} differs"
    assert a["lr_schedulers"] == b["lr_schedulers"]


def kill_midway(args: list[str], run_dir: Path, rng: random.Random, max_steps: int, timeout: float = 180) -> dict:
    """Start a run in its own process group; once the checkpoint of a random step exists, wait a random
    moment and SIGKILL the whole group (every rank).  Returns what happened (for the test's message)."""
    ckpt_every = 2
    after = rng.choice([s for s in range(ckpt_every, max_steps // 2 + 1, ckpt_every)])
    delay = rng.uniform(0.0, 0.3)
    p = subprocess.Popen(cli_cmd(args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=child_env(), start_new_session=True)
    target = run_dir / "checkpoints" / f"step-{after:08d}.ckpt"
    t0 = time.time()
    try:
        while not target.exists():
            if p.poll() is not None:
                raise AssertionError(f"run ended before step {after}: rc={p.returncode}\n{p.stdout.read()[-3000:]}")
            if time.time() - t0 > timeout:
                raise AssertionError(f"no checkpoint of step {after} after {timeout} s")
            time.sleep(0.01)
        time.sleep(delay)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(30)
    saved = steps_saved(run_dir)
    return {"after_ckpt": after, "delay_s": round(delay, 3), "rc": p.returncode, "saved": saved}


@pytest.fixture(scope="session")
def recovery_seed() -> int:
    seed = int(os.environ.get("GLMTRAIN_TEST_SEED", random.SystemRandom().randrange(1 << 30)))
    print(f"\n[recovery] random kill points from GLMTRAIN_TEST_SEED={seed}")
    return seed


@pytest.fixture(scope="session")
def reference_1p(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref1p") / "run"
    run_glmtrain([*TINY, f"run_dir={run_dir}"])
    return run_dir


@pytest.fixture(scope="session")
def reference_ddp(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("refddp") / "run"
    run_glmtrain([*TINY, *DDP, f"run_dir={run_dir}"])
    return run_dir


# ----------------------------------------------------------------------------- SLURM
class LocalSlurm:
    """A started local cluster plus small polling helpers (no fixed sleeps)."""

    def __init__(self, base: Path):
        self.base = base

    @staticmethod
    def sbatch(args: list[str], cwd: Path = ROOT, env: dict | None = None) -> str:
        res = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                             env=env or child_env())
        assert res.returncode == 0, f"sbatch {' '.join(args)} failed: {res.stderr}"
        return res.stdout.strip().split(";")[0]

    @staticmethod
    def job(job_id: str) -> dict[str, str]:
        res = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
        out: dict[str, str] = {}
        for tok in res.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                out.setdefault(k, v)
        return out

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait(self, job_id: str, states=("COMPLETED",), timeout: float = 240, poll: float = 0.25) -> str:
        """Poll until the job reaches a final state; return it (assert it is one of ``states``)."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
        t0 = time.time()
        st = "UNKNOWN"
        while time.time() - t0 < timeout:
            st = self.state(job_id)
            if st in final:
                break
            time.sleep(poll)
        assert st in states, f"job {job_id} ended as {st} (wanted {states}) after {time.time() - t0:.0f} s: {self.job(job_id)}"
        return st

    def wait_for(self, predicate, what: str, timeout: float = 180, poll: float = 0.05):
        t0 = time.time()
        while time.time() - t0 < timeout:
            v = predicate()
            if v:
                return v
            time.sleep(poll)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _slurm_unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"SLURM tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"local SLURM not available: {reason}")


HOW = ("to enable them, run the tests as root on a machine where apt-get can install slurmctld, slurmd, "
       "slurm-client and munge (or where they are installed); scripts/slurm-local/start.sh does the rest")


@pytest.fixture(scope="session")
def slurm():
    start, stop = SLURM_LOCAL / "start.sh", SLURM_LOCAL / "stop.sh"
    if not start.exists():
        _slurm_unavailable(f"{start} not found (GLMTRAIN_SLURM_LOCAL={os.environ.get('GLMTRAIN_SLURM_LOCAL')})")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        _slurm_unavailable(f"not root; {HOW}")
    base = Path(os.environ.get("SLURM_LOCAL_BASE", "/tmp/slurm-local"))
    # One test session at a time owns the machine's local SLURM (start --fresh / stop would pull the cluster
    # from under a concurrent session's jobs): an exclusive lock, released at the end or when we die.
    lock = open(f"{base}.tests.lock", "a+")
    t0, waited = time.time(), False
    while True:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if not waited:
                print(f"\n[slurm] another test session holds {lock.name}; waiting (up to {LOCK_WAIT_S} s)")
                waited = True
            if time.time() - t0 > LOCK_WAIT_S:
                lock.close()
                _slurm_unavailable(f"another test session has held the local SLURM ({lock.name}) for {LOCK_WAIT_S} s")
            time.sleep(1)
    try:
        t0 = time.time()
        res = subprocess.run(["bash", str(start), "--fresh"], capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            _slurm_unavailable(f"{start} failed ({res.returncode}): {(res.stderr or res.stdout).strip()[-600:]}; {HOW}")
        print(f"\n[slurm] started in {time.time() - t0:.1f} s: {res.stdout.strip().splitlines()[-1]}")
        yield LocalSlurm(base)
    except subprocess.TimeoutExpired:
        _slurm_unavailable("start.sh did not finish in 300 s")
    finally:  # also after failures, and after a half-done start
        if stop.exists():
            r = subprocess.run(["bash", str(stop)], capture_output=True, text=True, timeout=180)
            print(f"\n[slurm] stopped (rc {r.returncode}): {r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ''}")
        lock.close()  # releases the lock


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-shape tests (many small ops: a second thread on a shared 2-core
    machine only adds OpenMP hand-offs; training runs use trainer.threads=1 too). Restored afterwards.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

