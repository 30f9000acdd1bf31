"""One line for every bad input, before anything runs; environment failures name cause and path;
signals that arrive before training are honoured.

Most cases call the CLI's own functions in-process (``precheck``: Hydra composition; ``run_config``:
validation, machine checks, the run and its error mapping) -- the same code ``python -m glmtrain``
runs, without paying a Python start per case.  Two cases need a real process: the exit status of
an unknown key, and a signal that lands while Python is still importing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glmtrain import cli
from glmtrain.cluster import FLAG
from tests._util import ROOT, compose_cfg, run_cli


@pytest.fixture
def one_line(capsys):
    """Run f(*a); it must exit with ``status`` and exactly one ``glmtrain: error`` line; return that line."""

    def check(f, *a, status: int = 2) -> str:
        with pytest.raises(SystemExit) as e:
            f(*a)
        assert e.value.code == status
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("glmtrain: error")]
        assert len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    yield check
    FLAG.uninstall()  # run_config installs the run's signal handlers: give the test process its own back
    FLAG.clear()


# ----------------------------------------------------------------------------- Hydra's side
def test_unknown_key_is_one_line_and_status_2_with_or_without_plus(one_line):
    a = one_line(cli.precheck, ["trainer.max_step=3"])  # Hydra refuses it: precheck asks the schema
    b = one_line(cli.run_config, compose_cfg(["+trainer.max_step=3"]))  # Hydra takes it: the schema refuses it
    assert a == b and "trainer.max_step: unknown key" in a and "max_steps" in a
    assert "foo: unknown key" in one_line(cli.precheck, ["foo.bar=1"])
    # a key the schema knows but the chosen option's YAML does not list is taken, not refused
    assert cli.precheck(["strategy=fsdp", "strategy.vocab_parallel=true"]) == ["strategy=fsdp", "+strategy.vocab_parallel=true"]


def test_group_typo_parse_errors_and_words_for_numbers_are_one_line(one_line):
    line = one_line(cli.precheck, ["model=hyenna"])
    assert "model/hyenna" in line and "available:" in line and "hyena_small_32k" in line
    line = one_line(cli.precheck, ["trainer.init_from=/runs/a=b"])
    assert "trainer.init_from=\"/runs/a=b\"" in line  # says how to quote it
    for override, key in (("trainer.max_steps=ten", "trainer.max_steps"), ("optim.lr=fast", "optim.lr"),
                          ("data.window=1k", "data.window"), ("eval.baselines=[two]", "eval.baselines")):
        assert key in one_line(cli.run_config, compose_cfg([override]))


def test_cli_exit_status_2_for_an_unknown_key_without_plus(tmp_path):
    r = run_cli(["trainer.max_step=3", f"run_dir={tmp_path / 'never'}"], timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("glmtrain: error: config: trainer.max_step: unknown key"), r.stderr
    assert not (tmp_path / "never").exists()


# ----------------------------------------------------------------------------- values and this machine
@pytest.mark.parametrize("override, says", [
    ("trainer.max_time_s=-5", "trainer.max_time_s=-5.0: must be >= 0"),
    ("trainer.val_batches=0", "trainer.val_batches=0: must be > 0"),
    ("optim.lr=0", "optim.lr=0.0: must be > 0"),
    ("model.d_model=0", "model.d_model=0: must be > 0"),
    ("model.embed_dropout=1.5", "model.embed_dropout=1.5: must lie in [0, 1)"),
    ("optim.betas=[0.9]", "optim.betas=[0.9]: two values in [0, 1)"),
    ("seed=-1", "seed=-1: must be >= 0"),
    ("data.sources.0.weight=-1", "must be >= 0"),
    ("model.emb_dim=4", "model.emb_dim=4 must be odd"),  # the model's own rule, checked by building it on meta
])
def test_values_are_checked_for_range_before_anything_runs(one_line, tmp_path, override, says):
    line = one_line(cli.run_config, compose_cfg([override, f"run_dir={tmp_path / 'never'}"]))
    assert says in line, line
    assert not (tmp_path / "never").exists()


def test_devices_and_backends_this_machine_does_not_have(one_line, monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no usable CUDA GPU" in one_line(cli.run_config, compose_cfg(["trainer.accelerator=gpu"]))
    assert "strategy.backend=nccl needs GPUs" in one_line(cli.run_config, compose_cfg(["strategy=ddp", "strategy.backend=nccl"]))
    assert "16-mixed needs a GPU" in one_line(cli.run_config, compose_cfg(["trainer.precision=16-mixed"]))
    for k in ("MASTER_ADDR", "NODE_RANK", "WORLD_SIZE", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    assert "wait for them forever" in one_line(cli.run_config, compose_cfg(["trainer.num_nodes=2"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    line = one_line(cli.run_config, compose_cfg(["trainer.accelerator=gpu", "trainer.devices=8"]))
    assert "trainer.devices=8: this machine has 2 visible GPU(s)" in line


# ----------------------------------------------------------------------------- environment failures
def _tmpfs(where: Path, size: str, ro: bool = False):
    where.mkdir(parents=True)
    opts = f"size={size}" + (",ro" if ro else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mounting a small tmpfs needs root with CAP_SYS_ADMIN ({r.stderr.strip()}); run as root to enable")


@pytest.mark.parametrize("case", ["read-only", "disk-full"])
def test_read_only_or_full_run_dir_is_one_line_naming_cause_and_path(one_line, tmp_path, case):
    mnt = tmp_path / "mnt"
    _tmpfs(mnt, "96k", ro=case == "read-only")
    try:
        run_dir = mnt / "run"
        cfg = compose_cfg(["experiment=smoke", "trainer.progress=none", "logger=none", "trainer.max_steps=2",
                           "trainer.ckpt_every=1", "trainer.val_every=0", "eval.final=false", f"run_dir={run_dir}"])
        line = one_line(cli.run_config, cfg)
        if case == "read-only":
            assert f"read-only file system: {run_dir}" in line, line
        else:  # config.yaml fits, the first checkpoint does not
            assert f"disk full: {run_dir}/checkpoints/step-00000001.ckpt" in line, line
            assert not list((run_dir / "checkpoints").glob("*.tmp-*"))  # no partial file left
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ----------------------------------------------------------------------------- signals before training
def _catches(pid: int, sig: signal.Signals) -> bool:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_usr1_while_python_is_still_importing_is_honoured_not_fatal(tmp_path):
    """SLURM's USR1 in a job's first second: recorded during the imports, acted on at the first step
    boundary (checkpoint, stop, status 75); the rerun resumes and finishes."""
    run_dir = tmp_path / "run"
    args = ["experiment=smoke", "trainer.progress=none", "logger=none", "trainer.val_every=0", "eval.final=false",
            "trainer.max_steps=3", f"run_dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.Popen([sys.executable, "-m", "glmtrain", *args], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    t0 = time.time()
    while not _catches(p.pid, signal.SIGUSR1):  # glmtrain/__main__.py's first statement
        assert p.poll() is None and time.time() - t0 < 30, "the early handler never appeared"
        time.sleep(0.002)
    p.send_signal(signal.SIGUSR1)  # seconds before torch, Lightning and the config are loaded
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 75, out[-3000:]
    assert "SIGUSR1 received: saving a checkpoint at step 1 and stopping" in out
    assert (run_dir / "checkpoints" / "step-00000001.ckpt").exists()
