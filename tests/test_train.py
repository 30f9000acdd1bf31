"""End-to-end training through the real config, data and Lightning stack (tiny shapes, CPU)."""

import csv
import hashlib
import json
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
    assert result["val_bits_per_base"] > 0 and result["val_bases"] > 0
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
    assert result["steps"] == 6 and result["val_bits_per_base"] > 0
    assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb offline run directory missing"


def test_incompatible_checkpoint_is_refused_and_nothing_is_touched(tmp_path):
    train(compose_run([*SMOKE, f"run_dir={tmp_path}"]))
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"model\.d_model was 128 in the checkpoint, is 64 now"):
        train(compose_run([*SMOKE, f"run_dir={tmp_path}", "model.d_model=64"]))
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*") if p.is_file()}
    assert before == after


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, capsys):
    train(compose_run([*SMOKE, f"run_dir={tmp_path}"]))
    latest = list_checkpoints(tmp_path / "checkpoints")[-1][1]
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated by a crash outside glmtrain
    result = train(compose_run([*SMOKE, f"run_dir={tmp_path}", "trainer.max_steps=7"]))
    assert result["steps"] == 7
    assert "unreadable" in capsys.readouterr().err
    assert latest.exists()  # reported, never deleted by the resume logic


@pytest.mark.parametrize("case", ["missing", "empty", "no_records", "garbage"])
def test_bad_fasta_one_line(tmp_path, case):
    fasta = tmp_path / "genome.fa"
    if case == "empty":
        fasta.write_text("")
    elif case == "no_records":
        fasta.write_text(">chr1\n\n>chr2\n")
    elif case == "garbage":
        fasta.write_text("this is not a fasta file\n")
    src = f"data.sources=[{{path: '{fasta}', species: x}}]"
    r = run_cli([*SMOKE, src, "data.split.kind=fraction", f"run_dir={tmp_path / 'run'}"], timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("glmtrain: error")]
    assert len(err) == 1 and str(fasta) in err[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_ddp_two_processes_on_cpu(tmp_path):
    """`strategy=ddp trainer.devices=2` with gloo, launched as a real subprocess (not by relaunching pytest)."""
    r = run_cli([*SMOKE, "strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", f"run_dir={tmp_path}"],
                timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["steps"] == 6 and final["consumed_samples"] == 6 * 4 * 2
    ckpt = load_file(list_checkpoints(tmp_path / "checkpoints")[-1][1])
    assert ckpt["glmtrain"]["world_size"] == 2
