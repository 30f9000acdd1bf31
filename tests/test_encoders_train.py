"""Short learning runs of the Transformer designs on the bundled genome (issue 9, points 5, 7, 9).

Tiny on purpose (a few steps, 128-base windows): they prove that each design trains through the real
config -> data -> Lightning path with its tokenizer, padding masks and held-out report, not how well it
learns (the measured runs are in the README / docs/encoders.md).
"""

from __future__ import annotations

import hashlib
import json

import pytest

from glmtrain.train import train
from tests._util import compose_run

FAST = ["experiment=smoke", "trainer.progress=none", "trainer.max_steps=4", "trainer.val_every=0", "trainer.ckpt_every=2",
        "data.window=64", "data.max_val_windows=8", "eval.baselines=[]", "eval.unigram_bases=100000", "logger=none"]


@pytest.mark.parametrize("model,objective", [("nt_v2", "mlm"), ("dnabert1", "mlm"), ("generator", "clm")])
def test_designs_train_and_report_beside_baselines(tmp_path, model, objective):
    result = train(compose_run([*FAST, f"model={model}", f"objective={objective}", f"run_dir={tmp_path}"]))
    assert result["steps"] == 4 and result["val_bases"] > 0 and result["val_tokens"] > 0
    base = result["baselines_bits_per_base"]
    assert set(base) == {"unigram"}
    # k-mer tokens cover 6 bases (6-mer frequencies: ~2 bits per base; counted on 100 kb here, so a little
    # worse); DNABERT's overlapping tokens count one base each (the 6-mer frequencies cost ~11 bits per token)
    assert (8 < base["unigram"] < 12.5) if model == "dnabert1" else (1.7 < base["unigram"] < 2.4), base
    assert result["val_bits_per_base"] > 0


def test_dnabert2_trains_its_bpe_vocabulary_once_and_reuses_it_on_resume(tmp_path, capsys):
    args = [*FAST, "model=dnabert2", "objective=mlm", f"run_dir={tmp_path}", "model.tokenizer.train_bases=100000",
            "model.tokenizer.vocab_size=512"]
    first = train(compose_run([*args, "trainer.stop_at_step=2"]))
    vocab = tmp_path / "tokenizer.json"
    assert first["steps"] == 2 and vocab.is_file()
    assert "training a BPE vocabulary" in capsys.readouterr().out
    digest = hashlib.sha256(vocab.read_bytes()).hexdigest()
    second = train(compose_run(args))  # the same command resumes, with the same vocabulary
    assert second["steps"] == 4 and "training a BPE vocabulary" not in capsys.readouterr().out
    assert hashlib.sha256(vocab.read_bytes()).hexdigest() == digest
    assert json.loads((tmp_path / "final.json").read_text())["consumed_samples"] == 4 * 4
    assert set(second["baselines_bits_per_base"]) == {"unigram"}
    # masked tokens cover several bases each: the figure is per base, not per token
    assert second["val_bases"] > 2 * second["val_tokens"]
    # the batches the run trained on: variable-length BPE windows, padded to the longest (multiple of 8),
    # padding masked out of attention and loss
    from glmtrain.data.genome import GenomeDataModule
    from glmtrain.module import GLMModule

    run = compose_run(args)
    dm = GenomeDataModule(run.data, GLMModule(run).tokenizer, 4, run.seed)
    batch = next(iter(dm.train_loader(0)))
    mask, ids = batch["attention_mask"], batch["input_ids"]
    assert ids.shape[1] % 8 == 0 and ids.shape[1] < run.data.window and not mask.all()
    assert ((ids == 3) == ~mask).all() and (batch["loss_weight"][~mask] == 0).all()
    assert (ids[:, 0] == 1).all() and (ids.gather(1, mask.sum(1, keepdim=True) - 1) == 2).all()  # [CLS] ... [SEP]


def test_encoder_runs_a_context_schedule_in_token_windows(tmp_path):
    """NT-v2 (6-mer tokens, MLM) through a two-stage schedule: each stage's samples are what its window
    becomes in tokens (96 bases -> 17 with <cls>, 192 -> 33), the held-out figure and its unigram baseline
    come from the last stage, and a fixed data.window_tokens is refused under a schedule."""
    from glmtrain.config import ConfigError

    stages = ("context.name=enc2", "context.stages=[{window:96,steps:2,global_batch_tokens:68},"
              "{window:192,steps:2,global_batch_tokens:66}]")
    args = [*FAST, "model=nt_v2", "objective=mlm", "data.window=192", "trainer.max_steps=0", "optim.warmup_steps=1", *stages]
    result = train(compose_run([*args, f"run_dir={tmp_path}"]))
    assert result["steps"] == 4 and [s["tokens_per_step"] for s in result["stages"]] == [68, 66]
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert [s["samples_per_step"] for s in manifest["stages"]] == [4, 2]
    assert all(s["status"] == "complete" and s["val_bits_per_base"] > 0 for s in manifest["stages"])
    assert set(result["baselines_bits_per_base"]) == {"unigram"} and result["val_bases"] > 5 * result["val_tokens"]
    with pytest.raises(ConfigError, match=r"data\.window_tokens=33 fixes every stage's sample length"):
        compose_run([*args, "data.window_tokens=33", f"run_dir={tmp_path / 'b'}"])
