"""``python -m glmtrain [group=option ...] [key=value ...]`` -- the Hydra entry point.

The composed config is validated against the structured schema before anything
else happens (no trainer, no process group, no subprocess): a bad key, type or
combination exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _fail(msg: str) -> None:
    print(f"glmtrain: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    from glmtrain.checkpointing import CheckpointError
    from glmtrain.config import ConfigError, validate
    from glmtrain.data.fasta import DataInputError

    try:
        run = validate(cfg)
    except ConfigError as e:
        _fail(f"config: {e}")
    if run.task.name != "pretrain":  # finetune | score | generate (glmtrain/downstream)
        from glmtrain.downstream.run import run_task
        from glmtrain.tokenizers import TokenizerError

        try:
            run_task(run)
        except (DataInputError, CheckpointError, ConfigError, TokenizerError) as e:
            _fail(str(e))
        return
    from glmtrain.cluster import FLAG
    from glmtrain.faults import NumericalFault
    from glmtrain.train import train

    # from here to the end of the process a preemption signal only sets a flag (glmtrain.cluster)
    FLAG.install(run.trainer.signals)

    try:
        result = train(run)
    except (DataInputError, CheckpointError, ConfigError, NumericalFault) as e:
        _fail(str(e))
    if result.get("interrupted"):
        # EX_TEMPFAIL: stopped by a signal after a checkpoint, not finished; rerunning (or the requeued job) resumes.
        # Non-zero so that a SLURM job that could not requeue is not COMPLETED (an afterok chain waits).
        sys.exit(75)


def entry() -> None:
    # Hydra would otherwise print a full stack trace for our one-line errors.
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main()


if __name__ == "__main__":
    entry()
