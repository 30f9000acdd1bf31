"""Cluster operation: preemption signals, all-rank agreement, self-requeue, launcher detection.

Signals (``trainer.signals``, e.g. ``{USR1: requeue, TERM: stop}``):

* The handler only records the signal in a flag -- nothing is saved, logged or
  communicated inside it (a handler can run between any two bytecodes, also in
  the middle of a collective or of ``torch.save``).
* At every optimizer-step boundary the ranks agree on the flag (one tiny
  all-reduce, MAX over ranks, so a signal seen by any rank counts for all).  If
  it is set, every rank takes part in saving a checkpoint of that step, and
  training stops.
* ``requeue``: after the checkpoint, global rank 0 runs ``scontrol requeue
  <job>``; the requeued job re-runs the same command, which resumes from that
  checkpoint.  ``stop``: checkpoint and exit without requeueing.  SIGTERM
  defaults to ``stop`` because ``scontrol requeue`` after a user's ``scancel``
  brings the cancelled job back (measured on slurm 22.05); preemption with
  ``PreemptMode=REQUEUE`` is requeued by SLURM itself.

Lightning's own SLURM handling must not compete: :func:`cluster_environment`
returns ``SLURMEnvironment(auto_requeue=False)`` under ``srun``/``sbatch`` and the
callback re-installs its handlers after Lightning registered its SIGTERM
handler (which would otherwise raise ``SIGTERMException`` mid-epoch, without
our checkpoint).

``python -m glmtrain.cluster info`` prints how the current process sees the
cluster (launcher, ranks, world, master address/port) -- for job logs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import Any, Callable

import lightning as L
import torch

ACTIONS = ("requeue", "stop", "ignore")
_SEVERITY = {None: 0, "ignore": 0, "stop": 1, "requeue": 2}
_BY_CODE = {0: None, 1: "stop", 2: "requeue"}


def parse_signal(name: str) -> signal.Signals:
    """``USR1``, ``SIGUSR1`` or ``10`` -> ``signal.SIGUSR1``."""
    s = str(name).strip().upper()
    if s.isdigit():
        return signal.Signals(int(s))
    if not s.startswith("SIG"):
        s = "SIG" + s
    try:
        return signal.Signals[s]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}") from None


def validate_signal_actions(actions: dict[str, str]) -> None:
    """Raise ValueError naming the bad entry (used by config validation)."""
    for name, action in actions.items():
        sig = parse_signal(name)
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"{name}: cannot be handled (SIGKILL/SIGSTOP)")
        if action not in ACTIONS:
            raise ValueError(f"{name}={action!r}: allowed actions are {', '.join(ACTIONS)}")


class SignalFlag:
    """Process-wide record of received signals; handlers only set it."""

    def __init__(self) -> None:
        self.actions: dict[signal.Signals, str] = {}
        self.received: list[signal.Signals] = []  # in arrival order (appending is async-signal safe enough in CPython)
        self._previous: dict[signal.Signals, Any] = {}

    # -- the handler: record and return, nothing else
    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signal.Signals(signum))

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self, actions: dict[str, str]) -> bool:
        """(Re-)install handlers for ``actions`` (main thread only); True if they were not installed before."""
        if threading.current_thread() is not threading.main_thread():
            return False
        fresh = not self.installed
        wanted = {parse_signal(k): v for k, v in actions.items()}
        self.actions = {sig: v for sig, v in wanted.items() if v != "ignore"}
        for sig, action in wanted.items():
            prev = signal.signal(sig, signal.SIG_IGN if action == "ignore" else self._handler)
            if sig not in self._previous:
                self._previous[sig] = prev
        return fresh

    def uninstall(self) -> None:
        """Restore the handlers that were there before :meth:`install`."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def pending(self) -> tuple[str | None, str | None]:
        """(strongest action requested so far, name of the signal that requested it)."""
        best, name = None, None
        for sig in list(self.received):
            action = self.actions.get(sig)
            if _SEVERITY[action] > _SEVERITY[best]:
                best, name = action, sig.name
        return best, name

    def clear(self) -> None:
        self.received.clear()


FLAG = SignalFlag()  # one per process: signal dispositions are process-wide


# ----------------------------------------------------------------------------- environment
def under_slurm() -> bool:
    return "SLURM_JOB_ID" in os.environ


def slurm_job_id() -> str | None:
    """The id to requeue: ``<array>_<task>`` for array tasks, else SLURM_JOB_ID."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def launcher() -> str:
    """How this process was started: torchrun | srun | sbatch | local."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    if "SLURM_STEP_ID" in os.environ and "SLURM_PROCID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return "srun"
    if "SLURM_JOB_ID" in os.environ:
        return "sbatch"
    return "local"


def cluster_environment():
    """The Lightning cluster-environment plugin for this process, or None to let Lightning choose.

    * torchrun (also inside a SLURM job): TorchElasticEnvironment -- Lightning would otherwise
      pick SLURMEnvironment first and give every worker SLURM_PROCID's rank.
    * srun / sbatch: SLURMEnvironment(auto_requeue=False) -- requeueing is ours (:class:`Preemption`).
    """
    kind = launcher()
    if kind == "torchrun":
        from lightning.fabric.plugins.environments import TorchElasticEnvironment

        return TorchElasticEnvironment()
    if kind in ("srun", "sbatch"):
        from lightning.fabric.plugins.environments import SLURMEnvironment

        if SLURMEnvironment.detect():
            return SLURMEnvironment(auto_requeue=False)
    return None


def requeue_job(job_id: str | None = None, run: Callable[..., Any] = subprocess.run) -> bool:
    """``scontrol requeue <job>``; True on success.  Never raises (a failed requeue must not lose the checkpoint)."""
    job_id = job_id or slurm_job_id()
    if not job_id:
        return False
    try:
        res = run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"glmtrain: warning: scontrol requeue {job_id} failed: {e}", file=sys.stderr, flush=True)
        return False
    if res.returncode != 0:
        print(f"glmtrain: warning: scontrol requeue {job_id} failed (rc {res.returncode}): {(res.stderr or '').strip()}",
              file=sys.stderr, flush=True)
        return False
    return True


def info() -> dict[str, Any]:
    env = os.environ
    return {
        "launcher": launcher(),
        "job_id": slurm_job_id(),
        "restart_count": int(env.get("SLURM_RESTART_COUNT", "0") or 0),
        "rank": env.get("RANK", env.get("SLURM_PROCID", "0")),
        "local_rank": env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")),
        "world_size": env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1")),
        "nodes": env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")),
        "node": env.get("SLURMD_NODENAME", ""),
        "master": f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}",
    }


# ----------------------------------------------------------------------------- Lightning callback
def agree_max(trainer: "L.Trainer", value: int) -> int:
    """MAX of an int over all ranks (a no-op in a single process)."""
    if trainer.world_size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int32, device=trainer.strategy.root_device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


class Preemption(L.Callback):
    """Turn a recorded signal into: all-rank agreement -> checkpoint -> stop (-> requeue, by :meth:`finish`)."""

    def __init__(self, actions: dict[str, str], save: Callable[["L.Trainer"], None], flag: SignalFlag = FLAG,
                 step_offset: int = 0):
        validate_signal_actions(actions)
        self.actions, self.save, self.flag = dict(actions), save, flag
        self.step_offset = step_offset  # steps of earlier stages: messages name global steps
        self.action: str | None = None  # what was agreed: stop | requeue
        self.signal_name: str | None = None
        self.step: int | None = None
        self._owns_handlers = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        # The CLI installs the handlers at process start (glmtrain.cli) and keeps them to the end; when
        # train() is called in-process, the handlers are ours and are restored at teardown.
        self._owns_handlers = self.flag.install(self.actions)

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning registered its own SIGTERM handler (raises SIGTERMException mid-epoch, and broadcasts
        # inside the handler) just before this hook: ours replace it; Lightning restores the originals at teardown.
        self.flag.install(self.actions)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches or self.action is not None:
            return  # mid-accumulation: not a step boundary
        local, name = self.flag.pending()
        code = agree_max(trainer, _SEVERITY[local])
        if code == 0 or 0 < trainer.max_steps <= trainer.global_step:
            return  # nothing to do, or this was the last step anyway (its checkpoint follows at train end)
        self.action, self.signal_name = _BY_CODE[code], name or "a signal to another rank"
        self.step = self.step_offset + trainer.global_step
        if trainer.is_global_zero:
            who = f"{name} received" if name else "another rank received a signal"
            print(f"glmtrain: {who}: saving a checkpoint at step {self.step} and stopping"
                  + (" (the job requeues itself)" if self.action == "requeue" and under_slurm() else ""), flush=True)
        self.flag.clear()  # handled (a later train() in this process starts clean)
        self.save(trainer)  # collective: every rank takes part
        trainer.should_stop = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._owns_handlers:
            self.flag.uninstall()
            self._owns_handlers = False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    @property
    def triggered(self) -> bool:
        return self.action is not None

    def finish(self, trainer) -> bool:
        """After fit: requeue from global rank 0 if that was agreed and we run under SLURM; True if requeued."""
        if self.action != "requeue" or not under_slurm() or not trainer.is_global_zero:
            return False
        # announced first: once scontrol succeeds, SLURM ends this step within moments
        print(f"glmtrain: requeueing job {slurm_job_id()} (scontrol requeue); the requeued job resumes from the checkpoint",
              flush=True)
        ok = requeue_job()
        return ok


class TimeLimit(L.Callback):
    """``trainer.max_time_s``: stop at the first optimizer-step boundary after this many seconds of
    training *in this invocation* (all ranks agree; the checkpoint of that step is written at train end).

    Lightning's own ``max_time`` keeps its elapsed time in checkpoints, so a rerun would start with the
    budget already spent and add 0-1 steps per invocation; this budget is fresh every time.  One instance
    serves every stage of a schedule (the clock starts with the first stage's training): the budget is the
    invocation's, across stages.  A budget spent exactly at a stage's last step lets that stage complete;
    :attr:`spent` (agreed by all ranks at that step) then stops the run before the next stage."""

    def __init__(self, max_time_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_time_s, self.clock = max_time_s, clock
        self.t0: float | None = None
        self.stopped_at: int | None = None  # the step (of its trainer) at which the time cap stopped training
        self.spent = False  # the budget was found spent at the last step boundary (all ranks agree)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.t0 is None:
            self.t0 = self.clock()
        self.stopped_at = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches or self.stopped_at is not None or self.t0 is None:
            return
        self.spent = bool(agree_max(trainer, int(self.clock() - self.t0 >= self.max_time_s)))
        if self.spent and not (0 < trainer.max_steps <= trainer.global_step):
            self.stopped_at = trainer.global_step
            trainer.should_stop = True

    @property
    def triggered(self) -> bool:
        return self.stopped_at is not None


def _main(argv: list[str]) -> int:
    if argv[:1] == ["info"]:
        for k, v in info().items():
            print(f"{k}={v}")
        return 0
    print("usage: python -m glmtrain.cluster info", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
