"""End-to-end training through the real config, data and Lightning stack (tiny shapes, CPU)."""

import csv
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from glmtrain.ckpt_formats import load_file
from glmtrain.checkpointing import CheckpointError, list_checkpoints
from glmtrain.train import train
from tests._util import compose_run, run_cli

SMOKE = ["experiment=smoke", "trainer.log_every=1", "trainer.progress=none"]


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for f in sorted((run_dir / "logs").glob("version_*/metrics.csv")):
        for row in csv.DictReader(open(f)):
            if row.get("loss"):
                out[int(float(row["step"]))] = float(row["loss"])
    return out


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    step, path = list_checkpoints(run_dir / "checkpoints")[-1]
    return load_file(path)["state_dict"]


def test_smoke_run_writes_config_metrics_checkpoints(tmp_path):
    result = train(compose_run([*SMOKE, f"run_dir={tmp_path}"]))
    assert result["steps"] == 6
    assert (tmp_path / "config.yaml").read_text().startswith("model:")
    assert json.loads((tmp_path / "final.json").read_text())["steps"] == 6
    assert set(result["baselines_bits_per_base"]) == {"order0", "order2"}
    assert 1.5 < result["baselines_bits_per_base"]["order0"] < 2.01
    assert result["val_bases"] == 8 * 127  # 8 held-out windows of 128 bases, all scored but each window's first
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [3, 6]
    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(6))


@pytest.mark.parametrize("extra", [[], ["objective=mlm", "model=transformer_encoder", "trainer.accumulate=2"]],
                         ids=["clm", "mlm-accumulate"])
def test_stop_and_resume_equals_uninterrupted(tmp_path, extra):
    base = [*SMOKE, "trainer.max_steps=8", "trainer.ckpt_every=100", "optim.warmup_steps=2", *extra]
    full = tmp_path / "full"
    train(compose_run([*base, f"run_dir={full}"]))
    part = tmp_path / "part"
    first = train(compose_run([*base, f"run_dir={part}", "trainer.stop_at_step=3"]))
    assert first["steps"] == 3
    second = train(compose_run([*base, f"run_dir={part}"]))  # same command again: resumes
    assert second["steps"] == 8
    a, b = _losses(full), _losses(part)
    assert sorted(a) == sorted(b) == list(range(8))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    wa, wb = _weights(full), _weights(part)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    ca = load_file(list_checkpoints(full / "checkpoints")[-1][1])
    cb = load_file(list_checkpoints(part / "checkpoints")[-1][1])
    assert ca["glmtrain"]["consumed_samples"] == cb["glmtrain"]["consumed_samples"]
    assert ca["lr_schedulers"][0]["last_epoch"] == cb["lr_schedulers"][0]["last_epoch"] == 8


def test_kmer_encoder_mlm_and_wandb_offline(tmp_path):
    result = train(compose_run([*SMOKE, "model=transformer_kmer", "objective=mlm", "logger=wandb", f"run_dir={tmp_path}"]))
    assert result["steps"] == 6
    assert 0.10 < result["val_bases"] / (8 * 128) < 0.20  # bits/base over the 15 % masked positions only
    assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb offline run directory missing"


def test_incompatible_checkpoint_is_refused_and_nothing_is_touched(tmp_path):
    train(compose_run([*SMOKE, f"run_dir={tmp_path}"]))

    def files():  # all but the run-dir lock, which records its latest holder (glmtrain.locks)
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*")
                if p.is_file() and p.name != ".glmtrain.lock"}

    before = files()
    with pytest.raises(CheckpointError, match=r"model\.d_model was 128 in the checkpoint, is 64 now"):
        train(compose_run([*SMOKE, f"run_dir={tmp_path}", "model.d_model=64"]))
    assert files() == before


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, capsys):
    train(compose_run([*SMOKE, f"run_dir={tmp_path}"]))
    latest = list_checkpoints(tmp_path / "checkpoints")[-1][1]
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated by a crash outside glmtrain
    result = train(compose_run([*SMOKE, f"run_dir={tmp_path}", "trainer.max_steps=7"]))
    assert result["steps"] == 7
    assert "unreadable" in capsys.readouterr().err
    assert latest.exists()  # reported, never deleted by the resume logic


@pytest.mark.parametrize("case", ["missing", "empty", "no_records", "garbage"])
def test_bad_fasta_one_line(tmp_path, case, capsys):
    """Through the CLI's own run function in-process (tests/test_cli.py checks the process's exit status)."""
    from glmtrain import cli
    from glmtrain.cluster import FLAG
    from tests._util import compose_cfg

    fasta = tmp_path / "genome.fa"
    if case == "empty":
        fasta.write_text("")
    elif case == "no_records":
        fasta.write_text(">chr1\n\n>chr2\n")
    elif case == "garbage":
        fasta.write_text("this is not a fasta file\n")
    src = f"data.sources=[{{path: '{fasta}', species: x}}]"
    try:
        with pytest.raises(SystemExit) as e:
            cli.run_config(compose_cfg([*SMOKE, src, "data.split.kind=fraction", f"run_dir={tmp_path / 'run'}"]))
    finally:
        FLAG.uninstall()
    assert e.value.code == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("glmtrain: error")]
    assert len(err) == 1 and str(fasta) in err[0], stderr[-2000:]
    assert "Traceback" not in stderr


def test_ddp_two_processes_on_cpu(tmp_path):
    """`strategy=ddp trainer.devices=2` with gloo, launched as a real subprocess (not by relaunching pytest)."""
    r = run_cli([*SMOKE, "strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", f"run_dir={tmp_path}"],
                timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["steps"] == 6 and final["consumed_samples"] == 6 * 4 * 2
    ckpt = load_file(list_checkpoints(tmp_path / "checkpoints")[-1][1])
    assert ckpt["glmtrain"]["world_size"] == 2


def test_time_cap_says_not_finished_and_each_rerun_gets_a_fresh_budget(tmp_path, capsys):
    """trainer.max_time_s stops at the first step boundary past the cap: the report and final.json say
    so and the CLI exits 75; the rerun resumes with a fresh budget (Lightning's Timer kept the spent time
    in the checkpoint, so each rerun added 0-1 steps); without the cap the run finishes normally."""
    import sys

    from glmtrain import cli
    from glmtrain.cluster import FLAG
    from tests._util import compose_cfg

    args = [*SMOKE, "logger=none", "trainer.val_every=0", "eval.final=false", "trainer.ckpt_every=100",
            f"run_dir={tmp_path}"]
    try:
        with pytest.raises(SystemExit) as e:
            cli.run_config(compose_cfg([*args, "trainer.max_time_s=1e-6"]))
    finally:
        FLAG.uninstall()
    assert e.value.code == cli.EX_TEMPFAIL
    out = capsys.readouterr().out
    assert "NOT FINISHED: stopped by trainer.max_time_s=1e-06 at step 1 of 6" in out
    final = json.loads((tmp_path / "final.json").read_text())
    assert (final["stopped"], final["steps"], final["max_steps"]) == ("max_time_s", 1, 6)
    again = train(compose_run([*args, "trainer.max_time_s=1e-6"]))  # a fresh budget: one more step, not zero
    assert again["steps"] == 2 and again["stopped"] == "max_time_s"
    done = train(compose_run(args))
    assert done["steps"] == 6 and "stopped" not in done and "stopped" not in json.loads((tmp_path / "final.json").read_text())
    assert "Timer" not in load_file(list_checkpoints(tmp_path / "checkpoints")[-1][1])["callbacks"]


def test_wandb_mode_follows_the_environment_unless_given(tmp_path, monkeypatch):
    from glmtrain.train import build_logger

    monkeypatch.setenv("WANDB_MODE", "online")
    lg = build_logger(compose_run(["logger=wandb", f"run_dir={tmp_path}"]), tmp_path)  # mode: auto
    assert lg._offline is False and os.environ["WANDB_MODE"] == "online"
    lg = build_logger(compose_run(["logger=wandb", "logger.mode=offline", f"run_dir={tmp_path}"]), tmp_path)
    assert lg._offline is True and os.environ["WANDB_MODE"] == "offline"
    monkeypatch.delenv("WANDB_MODE")
    lg = build_logger(compose_run(["logger=wandb", f"run_dir={tmp_path}"]), tmp_path)
    assert lg._offline is True  # no environment: offline, as documented
