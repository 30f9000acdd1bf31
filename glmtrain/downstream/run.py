"""Dispatch of the downstream tasks (``task=finetune|score|generate``) and their run-level checks."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable


def check_run(run: Any, given: set[str] = frozenset()) -> None:
    """Checks of a validated config that depend on the task (before anything runs); raise ConfigError.
    ``given``: the keys typed on the command line; one that cannot act in this task is refused."""
    from glmtrain.config import ConfigError

    name = run.task.name
    inert = {"objective": "there is no pretraining objective", "eval": "the held-out report belongs to pretraining"}
    if name != "generate":  # generate reads the data group's splits for its k-mer statistics
        inert["data"] = "the task reads task.data_dir / task.vcf, not the pretraining data"
    if run.task.init_from:
        inert["model."] = "the architecture comes from task.init_from's checkpoint"
    for key in sorted(given):
        for prefix, why in inert.items():
            if key == prefix or key.startswith(prefix if prefix.endswith(".") else prefix + "."):
                raise ConfigError(f"{key} has no effect with task={name}: {why}; remove it")
    if run.strategy.name != "auto" or run.trainer.devices != 1 or run.trainer.num_nodes != 1:
        raise ConfigError(f"task={name} runs on one device: use strategy=auto trainer.devices=1 trainer.num_nodes=1 "
                          f"(got strategy={run.strategy.name}, devices={run.trainer.devices}, num_nodes={run.trainer.num_nodes})")
    t = run.trainer
    for key in ("max_steps", "micro_batch_size", "accumulate", "log_every"):
        if getattr(t, key) < 1:
            raise ConfigError(f"trainer.{key}={getattr(t, key)}: must be >= 1")
    if t.val_every < 0:
        raise ConfigError(f"trainer.val_every={t.val_every}: must be >= 0 (0 = only at the end)")


_held: list = []  # the run directory's lock, taken by claim_run_dir, released when the task returns


def claim_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` and take its lock (one run per run directory, :mod:`glmtrain.locks`); a task calls
    this just before its first write, so a run refused earlier leaves nothing behind."""
    from glmtrain.locks import lock_run_dir

    if not _held:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        _held.append(lock_run_dir(Path(run_dir), say=lambda m: print(f"glmtrain: {m}", file=sys.stderr, flush=True)))


def releases_run_dir(fn: Callable) -> Callable:
    """Decorator for a task's entry function: the lock :func:`claim_run_dir` took is released when it returns."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            while _held:
                lock = _held.pop()
                if lock is not None:
                    lock.release()

    return wrapper


def run_task(run: Any) -> dict:
    name = run.task.name
    if name == "finetune":
        from glmtrain.downstream.finetune import run_finetune

        return run_finetune(run)
    if name == "score":
        from glmtrain.downstream.vcf import run_score

        return run_score(run)
    if name == "generate":
        from glmtrain.downstream.generate import run_generate

        return run_generate(run)
    raise ValueError(f"task.name={name!r}")
