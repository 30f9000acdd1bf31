"""The real slurm/ scripts against a real (local, one-node) SLURM: submit, preempt, requeue, chain.

The ``slurm`` fixture (conftest.py) starts the cluster once and always stops it.  Every job runs the
tiny deterministic CPU config of the recovery tests, so a job's final checkpoint can be compared bit
for bit with an uninterrupted local run (``reference_1p`` / ``reference_ddp``).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from glmtrain import cluster
from tests.conftest import ROOT, TINY, assert_same_training_state, child_env, final_checkpoint, losses, steps_saved

CPU = ["--gpus-per-node=0", "--cpus-per-task=1"]  # the scripts' GPU defaults, overridden for this CPU node
SCRIPT = str(ROOT / "slurm" / "train_1node.sbatch")


def _env() -> dict:
    env = child_env()
    env["GLMTRAIN_PYTHON"] = sys.executable
    return env


def _submit(slurm, tmp_path: Path, ntasks: int, overrides: list[str], script: str = SCRIPT, opts=()) -> str:
    return slurm.sbatch([f"--output={tmp_path}/slurm-%j.out", *CPU, f"--ntasks-per-node={ntasks}", *opts, script, *overrides],
                        env=_env())


def _log(run_dir: Path, job: str) -> str:
    return (run_dir / "slurm" / f"job-{job}.log").read_text()


# ----------------------------------------------------------------------------- units (no cluster needed)
def test_signal_handler_only_records_and_handlers_are_restored():
    flag = cluster.SignalFlag()
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)}
    assert flag.install({"USR2": "stop", "SIGUSR1": "requeue", "HUP": "ignore"}) is True
    assert flag.install({"USR2": "stop", "SIGUSR1": "requeue", "HUP": "ignore"}) is False  # re-install: not fresh
    assert flag.pending() == (None, None)
    os.kill(os.getpid(), signal.SIGHUP)  # ignored
    os.kill(os.getpid(), signal.SIGUSR2)
    assert flag.pending() == ("stop", "SIGUSR2")
    os.kill(os.getpid(), signal.SIGUSR1)  # the strongest action wins
    assert flag.pending() == ("requeue", "SIGUSR1")
    flag.uninstall()
    assert {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(ValueError, match="allowed actions"):
        cluster.validate_signal_actions({"USR1": "restart"})


def test_requeue_uses_the_array_task_id_and_never_raises(monkeypatch):
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    assert cluster.slurm_job_id() is None and cluster.requeue_job() is False
    monkeypatch.setenv("SLURM_JOB_ID", "91")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "90")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    calls = []
    assert cluster.requeue_job(run=lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", ""))
    assert calls == [["scontrol", "requeue", "90_3"]]
    assert cluster.requeue_job(run=lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "denied")) is False

    def boom(cmd, **kw):
        raise FileNotFoundError("scontrol")

    assert cluster.requeue_job(run=boom) is False


def test_cluster_environment_is_ours_under_slurm_and_torchelastic_under_torchrun(monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    for k in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_"))]:
        monkeypatch.delenv(k)
    assert cluster.launcher() == "local" and cluster.cluster_environment() is None
    for k, v in {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0",
                 "SLURM_JOB_NAME": "glmtrain"}.items():
        monkeypatch.setenv(k, v)
    env = cluster.cluster_environment()
    assert cluster.launcher() == "srun" and isinstance(env, SLURMEnvironment) and env.auto_requeue is False
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # torchrun inside a SLURM job
    assert isinstance(cluster.cluster_environment(), TorchElasticEnvironment)


# ----------------------------------------------------------------------------- real SLURM
@pytest.mark.slow
def test_sbatch_job_completes_with_logs_in_run_dir(slurm, tmp_path, reference_1p):
    """The multi-node script (on the one node there is: --nodes=1) runs a job to completion."""
    run_dir = tmp_path / "run"
    job = _submit(slurm, tmp_path, 1, [*TINY, f"run_dir={run_dir}"], str(ROOT / "slurm" / "train_multinode.sbatch"),
                  ["--nodes=1"])
    slurm.wait(job)
    log = _log(run_dir, job)
    assert "1 node(s) x 1 task(s)" in log and "training exited with status 0" in log
    assert slurm.job(job)["JobName"] == "glmtrain-mn"
    assert (tmp_path / f"slurm-{job}.out").read_text().startswith(f"glmtrain-launch: job {job} (restart 0) logs to")
    assert_same_training_state(final_checkpoint(reference_1p), final_checkpoint(run_dir))


def _preempt_and_requeue(slurm, tmp_path, ntasks, extra, reference, seed):
    run_dir = tmp_path / "run"
    job = _submit(slurm, tmp_path, ntasks, [*TINY, *extra, f"run_dir={run_dir}"])
    after = random.Random(seed).choice([2, 4])
    slurm.wait_for(lambda: (run_dir / "checkpoints" / f"step-{after:08d}.ckpt").exists() or slurm.state(job) not in ("PENDING", "RUNNING"),
                   f"job {job} to write the checkpoint of step {after}")
    assert slurm.state(job) == "RUNNING", slurm.job(job)
    res = subprocess.run(["scancel", "--signal=USR1", "--batch", job], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    slurm.wait(job)
    info = slurm.job(job)
    assert info["Restarts"] == "1", info  # requeued exactly once, by the job itself
    log = _log(run_dir, job)
    stop_line = next(ln for ln in log.splitlines() if "SIGUSR1 received: saving a checkpoint at step" in ln)
    stopped_at = int(stop_line.split("at step ")[1].split()[0])
    assert "(the job requeues itself)" in stop_line and f"requeueing job {job}" in log
    assert f"job {job} restart 1 on" in log
    assert f"resuming from {run_dir}/checkpoints/step-{stopped_at:08d}.ckpt" in log
    assert stopped_at in steps_saved(run_dir) and after <= stopped_at < 12
    a, b = final_checkpoint(reference), final_checkpoint(run_dir)
    assert_same_training_state(a, b)
    la, lb = losses(reference), losses(run_dir)
    assert all(lb[s] == la[s] for s in la if s in lb) and set(range(12)) <= set(lb)
    print(f"[slurm] job {job}: USR1 after checkpoint {after}, stopped at step {stopped_at}, requeued, "
          f"resumed, bit-identical to the uninterrupted run")
    return run_dir, job, log


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_bit_exact(slurm, tmp_path, reference_1p, recovery_seed):
    _preempt_and_requeue(slurm, tmp_path, 1, [], reference_1p, recovery_seed + 2)


@pytest.mark.slow
def test_two_task_srun_ddp_job_preempted_and_requeued_bit_exact(slurm, tmp_path, reference_ddp, recovery_seed):
    """srun starts 2 tasks = 2 DDP ranks (gloo); the USR1 reaches both through srun, both agree on the same
    step boundary, the job requeues and the result equals Lightning-launched 2-process DDP bit for bit."""
    run_dir, job, log = _preempt_and_requeue(slurm, tmp_path, 2, [], reference_ddp, recovery_seed + 3)
    assert "1 node(s) x 2 task(s)" in log and "world 2 = 1 node(s) x 2 (slurm)" in log
    assert log.count("All distributed processes registered. Starting with 2 processes") == 2  # first run + requeued run
    assert final_checkpoint(run_dir)["glmtrain"]["world_size"] == 2


@pytest.mark.slow
def test_schedule_chain_runs_one_job_per_stage_in_order(slurm, tmp_path):
    """slurm/chain.sh: a two-stage context schedule as two afterok-chained jobs of one run directory; the first
    stops at its stage's end, the second resumes with the next stage from the first stage's final weights."""
    import json

    run_dir = tmp_path / "run"
    common = [t for t in TINY if not t.startswith("trainer.max_steps")]
    overrides = [*common, "context=tiny_64_to_1k", "trainer.max_steps=0",
                 "context.stages=[{window:64,steps:2},{window:128,steps:2}]", f"run_dir={run_dir}"]
    res = subprocess.run(
        ["bash", str(ROOT / "slurm" / "chain.sh"), "-n", "ctx",
         "-b", f"--output={tmp_path}/slurm-%j.out --ntasks-per-node=1 {' '.join(CPU)}", "--", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env())
    assert res.returncode == 0, res.stderr
    j1, j2 = res.stdout.split()
    assert slurm.job(j2)["Dependency"] in (f"afterok:{j1}(unfulfilled)", f"afterok:{j1}")
    slurm.wait(j2, timeout=300)
    i1, i2 = slurm.job(j1), slurm.job(j2)
    assert i1["JobState"] == "COMPLETED" and i1["JobName"] == "ctx-s1" and i2["JobName"] == "ctx-s2"
    assert i2["StartTime"] >= i1["EndTime"]
    assert "stopped before stage 2 (2-128) (trainer.stop_at_step=2)" in _log(run_dir, j1)
    log2 = _log(run_dir, j2)
    assert "resuming in stage 2 (2-128)" in log2 and f"initialised weights from {run_dir}/checkpoints/step-00000002.ckpt" in log2
    assert steps_saved(run_dir)[-1] == 4 and (run_dir / "checkpoints" / "step-00000002.ckpt.keep").exists()
    stages = json.loads((run_dir / "run.json").read_text())["stages"]
    assert [s["status"] for s in stages] == ["complete", "complete"]
    assert stages[1]["init_sha256"] == stages[0]["final_sha256"]  # stage 2 started from stage 1's final weights
    c2 = final_checkpoint(run_dir)
    assert c2["glmtrain"]["stage"] == 1 and c2["global_step"] == 2 and c2["glmtrain"]["consumed_samples"] == 2 * 8
    assert c2["hyper_parameters"]["config"]["data"]["window"] == 128
