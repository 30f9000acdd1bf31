"""Issue 13, point 1 (and 3's data): the fine-tuning command on GUE-format tasks, its metrics,
configuration errors and the real GUE splits."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from glmtrain import cli
from glmtrain.config import ConfigError, validate
from glmtrain.downstream.data import read_split
from glmtrain.downstream.metrics import binary_auroc, classification_metrics, mcc

from _downstream import GUE_TINY, fabricate_run
from _util import SHARED, compose_cfg, compose_run

pytestmark = pytest.mark.usefixtures("one_thread")

GUE = SHARED / "data" / "benchmarks" / "gue"


# ----------------------------------------------------------------------------- metrics
def _auroc_pairs(y, s):
    """Brute force: P(score of a random positive > a random negative), ties 1/2."""
    pos, neg = s[y == 1], s[y == 0]
    return ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))


def test_metrics_hand_computed():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    pred = np.array([1, 0, 1, 0, 0, 1, 0, 1])  # TP 3, FN 1, FP 1, TN 3
    probs = np.stack([1 - pred * 0.8 - 0.1, pred * 0.8 + 0.1], 1)
    m = classification_metrics(y, probs)
    assert m["mcc"] == pytest.approx((3 * 3 - 1 * 1) / 16)
    assert m["accuracy"] == pytest.approx(0.75) and m["f1"] == pytest.approx(6 / 8)
    assert binary_auroc(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.4, 0.4])) == pytest.approx(2.5 / 4)
    # 3 classes: confusion [[2,1,0],[0,2,1],[1,0,3]] -> (7*10 - 34) / (100 - 34)
    yt = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    yp = np.array([0, 0, 1, 1, 1, 2, 0, 2, 2, 2])
    assert mcc(yt, yp, 3) == pytest.approx(36 / 66)
    assert mcc(yt, np.zeros_like(yt), 3) == 0.0  # undefined -> 0
    rng = np.random.default_rng(0)
    yy, ss = rng.integers(0, 2, 300), rng.integers(0, 20, 300).astype(float)  # many ties
    assert binary_auroc(yy, ss) == pytest.approx(_auroc_pairs(yy, ss))


def test_metrics_match_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics", reason="scikit-learn not installed (optional cross-check)")
    rng = np.random.default_rng(1)
    for c in (2, 4):
        y = rng.integers(0, c, 500)
        logits = rng.normal(size=(500, c)) + 1.5 * np.eye(c)[y] * rng.random((500, 1))
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        m = classification_metrics(y, p)
        assert m["mcc"] == pytest.approx(sk.matthews_corrcoef(y, p.argmax(1)))
        assert m["f1"] == pytest.approx(sk.f1_score(y, p.argmax(1), average="binary" if c == 2 else "macro"))
        auc = sk.roc_auc_score(y, p[:, 1]) if c == 2 else sk.roc_auc_score(y, p, multi_class="ovr", average="macro")
        assert m["auroc"] == pytest.approx(auc)


# ----------------------------------------------------------------------------- configuration
def test_task_config_errors_are_one_line(tmp_path, monkeypatch, capsys):
    cfg = compose_cfg(["task=finetune", f"task.data_dir={GUE_TINY}"])
    run = validate(cfg)
    assert run.task.method == "lora" and run.run_dir == "runs/finetune/test"  # name=test (compose_cfg)
    for changes, msg in [({"task.method": "bitfit"}, "task.method='bitfit': allowed values are full, probe"),
                         ({"strategy.name": "ddp", "trainer.devices": 2}, "task=finetune runs on one device"),
                         ({"task.lora.r": 0}, "task.lora.r=0: must be >= 1"),
                         ({"task.bogus": 1}, "task.bogus: unknown key"),
                         ({"task.data_dir": "???"}, "task.data_dir")]:
        bad = cfg.copy()
        OmegaConf.set_struct(bad, False)
        for k, v in changes.items():
            OmegaConf.update(bad, k, v, force_add=True)
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(")) as e:
            validate(bad)
        assert "\n" not in str(e.value)
    # settings typed on the command line that a downstream task would ignore are refused
    with_ckpt = cfg.copy()
    OmegaConf.update(with_ckpt, "task.init_from", str(tmp_path), force_add=True)
    for given, msg in [({"model.d_model"}, "model.d_model has no effect with task=finetune: the architecture comes from"),
                       ({"objective", "trainer.max_steps"}, "objective has no effect with task=finetune"),
                       ({"data.window"}, "data.window has no effect with task=finetune")]:
        with pytest.raises(ConfigError, match=msg):
            validate(with_ckpt, given=given)
    validate(with_ckpt, given={"model", "task.init_from", "trainer.max_steps"})  # the group choice is fine
    # the CLI (in-process: a subprocess costs more than the check): a task's own error -> exit status 2,
    # one line on stderr, nothing written
    monkeypatch.setattr(sys, "argv", ["glmtrain", "task=score", f"task.init_from={tmp_path / 'absent'}",
                                      f"task.vcf={tmp_path / 'v.vcf'}", f"task.fasta={tmp_path / 'r.fa'}",
                                      f"run_dir={tmp_path / 'x'}"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.entry()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().count("\n") == 0 and "task.init_from=" in err and "no such file" in err
    assert not (tmp_path / "x").exists()


def test_real_gue_splits_read():
    if not GUE.is_dir():
        pytest.skip(f"{GUE} absent (the shared GUE benchmark data; the tiny sample in tests/data covers the code)")
    seqs, labels = read_split(GUE / "tf" / "0", "dev")
    assert len(seqs) == 1000 and set(labels.tolist()) == {0, 1} and {len(s) for s in seqs} == {101}


# ----------------------------------------------------------------------------- end to end
def test_finetune_from_run_directory(tmp_path, capsys):
    """A glmtrain run directory -> body under a new head (unloaded tensors listed), LoRA, dev selection,
    test metrics (with reverse-complement averaging) in metrics.json -- equal to re-scoring the saved weights."""
    from glmtrain.downstream.finetune import predict, run_finetune
    from glmtrain.downstream.data import encode

    model = ["model=transformer", "model.d_model=32", "model.n_layers=2", "model.n_heads=2"]
    ckpt = fabricate_run(tmp_path / "pre", compose_run(model), step=7)
    n_tensors = len(torch.load(ckpt, weights_only=True)["state_dict"])
    run = compose_run([*model, "task=finetune", f"task.data_dir={GUE_TINY}", f"task.init_from={tmp_path / 'pre'}",
                       "task.rc_average=true", "task.max_train_samples=96", f"run_dir={tmp_path / 'ft'}", "logger=none",
                       "trainer.max_steps=6", "trainer.val_every=3", "trainer.micro_batch_size=16", "trainer.progress=none",
                       "task.lora.r=4", "optim.lr=0.01"])
    result = run_finetune(run)
    out = capsys.readouterr().out
    assert f"loaded {n_tensors} tensors from" in out and "not loaded (new, initialised here): head.bias, head.weight" in out
    assert "checkpoint tensors not used: none" in out and "trainable parameters" in out
    saved = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert [h["step"] for h in saved["dev_history"]] == [3, 6] and saved["best_step"] in (3, 6)
    assert set(saved["test"]) >= {"mcc", "accuracy", "f1", "auroc"} and saved["test"]["n"] == 80
    report = json.loads((tmp_path / "ft" / "load_report.json").read_text())
    assert report["not_loaded"] == ["head.bias", "head.weight"] and report["step"] == 7
    # the saved best weights reproduce the reported test metrics
    from safetensors.torch import load_file

    from glmtrain.downstream.families import inspect_model
    from glmtrain.downstream.pretrained import build_from
    from glmtrain.downstream.heads import SequenceClassifier
    from glmtrain.downstream.peft_methods import apply_method
    from glmtrain.downstream.pretrained import load_into

    body, tok, pre = build_from(run)
    load_into(body, pre.state_dict, "", pre.source)
    anatomy = inspect_model(body, tok.nucleotide_ids.tolist())
    clf = SequenceClassifier(body, anatomy.hidden, 2, result["pooling"], 0.1)
    applied = apply_method(clf, run.task, anatomy, "t", 6)
    best = load_file(tmp_path / "ft" / "best.safetensors")
    assert best and all("lora_" in k or "head" in k for k in best)
    applied.net.load_state_dict(best, strict=False)
    seqs, labels = read_split(GUE_TINY, "test")
    probs = predict(applied.net, encode(seqs, labels, tok, [], True, "test"), 64, True, "cpu")
    assert classification_metrics(labels, probs)["auroc"] == pytest.approx(saved["test"]["auroc"], abs=1e-9)
    with pytest.raises(ConfigError, match="already holds a finished fine-tuning"):
        run_finetune(run)  # nothing already written is overwritten


RELEASED = SHARED / "data" / "reference" / "hyenadna_tiny"


@pytest.mark.skipif(not RELEASED.is_dir(), reason=f"golden fixture {RELEASED} not found (../shared/data/reference)")
def test_finetune_from_released_weights(tmp_path, capsys):
    """task.init_from = a released HyenaDNA checkpoint (the reference code's own layout): imported through
    glmtrain.convert, every body tensor loaded, only the new head initialised here."""
    from glmtrain.downstream.finetune import run_finetune

    run = compose_run(["task=finetune", f"task.data_dir={GUE_TINY}", f"task.init_from={RELEASED}",
                       "task.max_train_samples=32", f"run_dir={tmp_path / 'ft'}", "logger=none", "trainer.max_steps=2",
                       "trainer.val_every=2", "trainer.micro_batch_size=16", "trainer.progress=none", "task.method=full"])
    run_finetune(run)
    out = capsys.readouterr().out
    assert "imported" in out and "checkpoint tensors not used: none" in out
    report = json.loads((tmp_path / "ft" / "load_report.json").read_text())
    assert report["not_loaded"] == ["head.bias", "head.weight"]
    saved = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert set(saved["test"]) >= {"mcc", "accuracy"}
