"""End to end through the CLI: 2 DDP ranks x 2 DataLoader workers, stopped at step k and resumed.

Every rank records the keys of the batches it trains on (GLMTRAIN_DATA_TRACE).  The
stopped-and-resumed run must see exactly the samples the uninterrupted stream gives
(computed in-process from the same config: the stream is a pure function of the global
index), with no repeats and no skips.  The runs are subprocesses; Lightning relaunches
`python -m glmtrain` for rank 1, never pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MICRO, WORLD, K = 4, 2, 3


def _cli(run_dir: Path, cache: Path, trace: Path, steps: int) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "glmtrain", "experiment=smoke", "model=transformer", "strategy=ddp", "trainer.devices=2",
        "trainer.accelerator=cpu", f"trainer.max_steps={steps}", f"trainer.micro_batch_size={MICRO}",
        f"trainer.ckpt_every={K}", "trainer.val_every=0", "trainer.threads=1", "eval.final=false", "logger=none",
        "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "data.num_workers=2", "data.rc_prob=0.5",
        f"data.cache_dir={cache}", f"run_dir={run_dir}",
    ]
    env = {**os.environ, "GLMTRAIN_DATA_TRACE": str(trace), "PYTHONUNBUFFERED": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _trace(trace: Path, rank: int) -> list[tuple[int, str]]:
    rows = (trace / f"train.rank{rank}.tsv").read_text().splitlines()
    return [(int(a), b) for a, b in (r.split("\t") for r in rows)]


@pytest.mark.slow
def test_ddp_two_ranks_two_workers_stop_and_resume_sees_the_uninterrupted_stream(tmp_path):
    cache, run_dir, trace = tmp_path / "cache", tmp_path / "run", tmp_path / "trace"
    trace.mkdir()
    first = _cli(run_dir, cache, trace, K)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (run_dir / "checkpoints" / f"step-{K:08d}.ckpt").exists()
    second = _cli(run_dir, cache, trace, 2 * K)  # same run_dir: resumes from step K
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout + second.stderr

    # the uninterrupted stream, from the same config, in this process
    from hydra import compose, initialize_config_dir

    from glmtrain.cli import CONF_DIR
    from glmtrain.config import validate
    from glmtrain.data.genome import GenomeDataModule
    from glmtrain.tokenizers import build_tokenizer

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        c = compose("config", overrides=["experiment=smoke", "data.rc_prob=0.5", f"data.cache_dir={cache}",
                                         "name=x", "run_dir=x"])
    run = validate(c)
    dm = GenomeDataModule(run.data, build_tokenizer({"kind": "char"}), MICRO, run.seed)
    dm.setup()
    for rank in range(WORLD):
        got = _trace(trace, rank)
        idx = [t * WORLD * MICRO + rank * MICRO + j for t in range(2 * K) for j in range(MICRO)]
        assert [g for g, _ in got] == idx  # steps 0..K-1 from the first run, K..2K-1 after the resume
        assert [k for _, k in got] == [dm.train_set[g]["key"] for g in idx]
    keys = [k for r in range(WORLD) for _, k in _trace(trace, r)]
    assert len(keys) == len(set(keys)) == 2 * K * WORLD * MICRO
