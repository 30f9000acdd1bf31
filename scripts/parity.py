#!/usr/bin/env python
"""Run several glmtrain trainings one after another in one launch (single process or torchrun).

    python scripts/parity.py SPEC.json                          # one process
    torchrun --nproc_per_node 2 scripts/parity.py SPEC.json     # every rank runs every job

SPEC is JSON: ``{"jobs": [{"overrides": ["model=hyena", ...], "run_dir": "...", "resume_from": "..."}, ...],
"ports": [...]}`` (``resume_from``, optional: a checkpoint copied into the job's run directory first);
(under torchrun, job i > 0 rendezvouses on ``ports[i]``, or ``port_base + i``); each job
is composed from ``conf/`` with the overrides (as on the command line), validated, and trained by
:func:`glmtrain.train.train` -- exactly what ``python -m glmtrain`` does.  Each ``train`` ends with
``destroy_process_group()``; the next job's trainer initialises a new one.  One launch thus pays
the interpreter, import and process-group start-up once for several runs (the strategy parity and
resharded-resume tests in ``tests/test_parallel.py`` use it).

A job that fails is reported (rank 0: ``JOB FAILED <run_dir>: <error>``) and the launch exits 1
after the remaining jobs are skipped (a half-failed collective cannot be continued safely).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _copy_checkpoint(src: Path, ckpt_dir: Path, rank: int, timeout: float = 120.0) -> None:
    """Rank 0 copies (under a temporary name, then renamed); the other ranks wait until it is in place."""
    import time

    dst = ckpt_dir / src.name
    if rank == 0 and src.exists() and not dst.exists():
        tmp = ckpt_dir / f".{src.name}.copy"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp)
        os.replace(tmp, dst)
    t0 = time.time()
    while src.exists() and not dst.exists() and time.time() - t0 < timeout:
        time.sleep(0.05)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    from hydra import compose, initialize_config_dir

    from glmtrain.cli import CONF_DIR
    from glmtrain.config import validate
    from glmtrain.train import train

    spec = json.loads(Path(argv[0]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    for i, job in enumerate(spec["jobs"]):
        port = spec["ports"][i] if i < len(spec.get("ports", [])) else (int(spec["port_base"]) + i if spec.get("port_base") else 0)
        if torchrun and i and port:
            # a fresh rendezvous store per job: re-initialising on torchrun's agent store would meet the
            # previous group's keys (rank 0 serves the new store on this port)
            os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
            os.environ["MASTER_PORT"] = str(port)
        overrides = ["name=parity", *job["overrides"], f"run_dir={job['run_dir']}"]
        if job.get("resume_from"):  # resume another job's checkpoint (resharded): copy it in first
            _copy_checkpoint(Path(job["resume_from"]), Path(job["run_dir"]) / "checkpoints", rank)
        try:
            with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
                cfg = compose("config", overrides=overrides)
            train(validate(cfg))
            if rank == 0:
                print(f"JOB DONE {job['run_dir']}", flush=True)
        except Exception as e:  # noqa: BLE001 - report and stop the launch
            print(f"JOB FAILED {job['run_dir']} (rank {rank}): {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
