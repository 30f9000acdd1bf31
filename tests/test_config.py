"""The schema rejects bad configs with one line, before anything runs."""

import pytest

from glmtrain.config import ConfigError
from tests._util import compose_cfg, compose_run, run_cli
from glmtrain.config import validate


def _err(overrides):
    with pytest.raises(ConfigError) as e:
        compose_run(overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_default_composes_and_validates():
    run = compose_run(["run_dir=/tmp/x"])
    assert run.model.family == "hyena" and run.objective.name == "clm"
    assert run.model.tokenizer.kind == "char"


def test_groups_compose():
    run = compose_run(["model=transformer_encoder", "objective=mlm", "strategy=ddp", "trainer.devices=2", "logger=wandb"])
    assert run.model.causal is False and run.objective.mask_prob == 0.15
    assert run.strategy.name == "ddp" and run.logger.kind == "wandb"


def test_unknown_key_names_key_and_allowed():
    msg = _err(["+model.d_modle=64"])
    assert "model.d_modle" in msg and "d_model" in msg and "allowed" in msg
    msg = _err(["+trainer.max_step=3"])
    assert "trainer.max_step" in msg and "max_steps" in msg


def test_wrong_type():
    msg = _err(["trainer.max_steps=lots"])
    assert "trainer.max_steps" in msg


def test_bad_choice_lists_allowed_values():
    msg = _err(["objective.name=span"])
    assert "objective.name" in msg and "clm, mlm" in msg
    msg = _err(["model.tokenizer.kind=wordpiece"])
    assert "char, kmer, kmer_overlap, bpe, byte" in msg


def test_impossible_combinations():
    assert "bidirectional" in _err(["model=transformer_encoder", "objective=clm"])
    assert "causal" in _err(["model=transformer", "objective=mlm"])
    msg = _err(["model=transformer_encoder", "objective=mlm", "model.tokenizer.kind=byte"])
    assert "MASK" in msg


def test_unknown_family():
    msg = _err(["model.family=rnn"])
    assert "model.family" in msg and "transformer" in msg


def test_cli_fails_before_anything_runs(tmp_path):
    run_dir = tmp_path / "never"
    r = run_cli([f"run_dir={run_dir}", "model=transformer_encoder"], timeout=120)
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "glmtrain: error: config:" in err[0] and "objective=clm" in err[0]
    assert not run_dir.exists()


def test_help_lists_groups():
    r = run_cli(["--help"], timeout=120)
    assert r.returncode == 0
    for group in ("model:", "data:", "objective:", "strategy:", "trainer:", "logger:", "experiment:"):
        assert group in r.stdout
    assert "transformer_encoder" in r.stdout and "mlm" in r.stdout


@pytest.mark.parametrize("overrides, says", [
    (["strategy=ddp", "+strategy.zero_stage=3"], "strategy.zero_stage=3 has no effect here: it applies only with strategy=deepspeed"),
    (["strategy=ddp", "+strategy.checkpoint=full"], "strategy.checkpoint='full' has no effect here"),
    (["+objective.mask_prob=0.3"], "objective.mask_prob=0.3 has no effect here: it applies only with objective=mlm"),
    (["optim.schedule=constant", "optim.min_lr_ratio=0.5"], "optim.min_lr_ratio=0.5 has no effect"),
    (["data.softmask_weight=0.5"], "data.softmask_weight=0.5 has no effect here: it applies only with data.softmask=weight"),
    (["data.split.kind=fraction", "data.split.valid_records=[chr1]"], "data.split.valid_records=['chr1'] has no effect"),
    (["data.format=memory", "data.shards=/x"], "data.shards='/x' has no effect here"),
    (["+logger.mode=online"], "logger.mode='online' has no effect here: it applies only with logger=wandb"),
    (["trainer.max_steps=10", "trainer.stop_at_step=10"], "trainer.stop_at_step=10 never takes effect"),
    (["strategy=ddp", "+strategy.tp_size=2", "trainer.devices=2"], "needs strategy=tp or strategy=fsdp"),
])
def test_settings_that_cannot_take_effect_together_are_refused(overrides, says):
    from glmtrain.cli import given_keys

    from glmtrain.schedule import check

    with pytest.raises(ConfigError) as e:  # as typed on the command line; the strategy per stage: schedule.check
        check(validate(compose_cfg(overrides), given=given_keys(overrides)))
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_preset_may_set_keys_for_other_cases_only_typed_ones_are_judged():
    from glmtrain.cli import given_keys

    ovs = ["data.split.kind=fraction"]  # data=sample lists valid_records for its own records split
    assert validate(compose_cfg(ovs), given=given_keys(ovs)).data.split.valid_records == ["chr4"]
