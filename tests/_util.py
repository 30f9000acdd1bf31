"""Shared test helpers: compose configs in-process, run the CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from glmtrain import CONF_DIR
from glmtrain.config import RunConfig, validate
from glmtrain.schedule import check

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# small real genomes shipped with the package (provenance: glmtrain/resources/genomes/README.md)
GENOMES = ROOT / "glmtrain" / "resources" / "genomes"


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("config", overrides=["name=test", *overrides])


def compose_run(overrides: list[str]) -> RunConfig:
    """What ``python -m glmtrain`` checks before anything runs: the schema, then the schedule and strategy."""
    run = validate(compose_cfg(overrides))
    check(run)
    return run


def run_cli(args: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.setdefault("PYTHONUNBUFFERED", "1")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "glmtrain", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=e)
