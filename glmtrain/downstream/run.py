"""Dispatch of the downstream tasks (``task=finetune|score|generate``) and their run-level checks."""

from __future__ import annotations

from typing import Any


def check_run(run: Any) -> None:
    """Checks of a validated config that depend on the task (before anything runs); raise ConfigError."""
    from glmtrain.config import ConfigError

    name = run.task.name
    if run.strategy.name != "auto" or run.trainer.devices != 1 or run.trainer.num_nodes != 1:
        raise ConfigError(f"task={name} runs on one device: use strategy=auto trainer.devices=1 trainer.num_nodes=1 "
                          f"(got strategy={run.strategy.name}, devices={run.trainer.devices}, num_nodes={run.trainer.num_nodes})")
    t = run.trainer
    for key in ("max_steps", "micro_batch_size", "accumulate", "log_every"):
        if getattr(t, key) < 1:
            raise ConfigError(f"trainer.{key}={getattr(t, key)}: must be >= 1")
    if t.val_every < 0:
        raise ConfigError(f"trainer.val_every={t.val_every}: must be >= 0 (0 = only at the end)")


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
