"""Numerical faults: a NaN/inf loss or gradient is detected and the policy applied, never silently trained on."""

from __future__ import annotations

import pytest
import torch

from glmtrain.ckpt_formats import load_file
from glmtrain.checkpointing import list_checkpoints
from glmtrain.faults import NumericalFault
from glmtrain.module import GLMModule
from glmtrain.train import train
from tests._util import compose_run

BASE = ["experiment=smoke", "model=transformer", "trainer.max_steps=5", "trainer.ckpt_every=1", "trainer.keep_last=0",
        "trainer.val_every=0", "eval.final=false", "trainer.progress=none", "trainer.log_every=1",
        "trainer.threads=1", "trainer.accelerator=cpu", "logger=none", "optim.warmup_steps=1"]


def _inject(monkeypatch, kind: str, steps: set[int]) -> None:
    """Make optimizer step(s) ``steps`` (1-based) produce a NaN loss or an inf gradient."""
    if kind == "loss":
        orig = GLMModule.training_step

        def training_step(self, batch, batch_idx):
            loss = orig(self, batch, batch_idx)
            return loss * float("nan") if self.trainer.global_step + 1 in steps else loss

        monkeypatch.setattr(GLMModule, "training_step", training_step)
    else:
        orig = GLMModule.on_after_backward

        def on_after_backward(self):
            orig(self)
            if self.trainer.global_step + 1 in steps:
                p = next(q for q in self.parameters() if q.grad is not None)
                p.grad.view(-1)[0] = float("inf")

        monkeypatch.setattr(GLMModule, "on_after_backward", on_after_backward)


def _ckpts(run_dir):
    return {s: load_file(p) for s, p in list_checkpoints(run_dir / "checkpoints")}


def _same_weights(a, b) -> bool:
    return all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def _finite(ck) -> bool:
    return all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())


def test_skip_policy_drops_the_faulty_update_and_counts_it(tmp_path, monkeypatch, capsys):
    _inject(monkeypatch, "loss", {3})
    result = train(compose_run([*BASE, f"run_dir={tmp_path}", "trainer.nonfinite=skip"]))
    assert result["steps"] == 5
    ck = _ckpts(tmp_path)
    assert sorted(ck) == [1, 2, 3, 4, 5]
    assert _same_weights(ck[2], ck[3])  # step 3 changed nothing: weights ...
    o2, o3 = ck[2]["optimizer_states"][0]["state"], ck[3]["optimizer_states"][0]["state"]
    assert all(torch.equal(o2[i]["exp_avg"], o3[i]["exp_avg"]) and torch.equal(o2[i]["step"], o3[i]["step"]) for i in o2)  # ... nor moments
    assert not _same_weights(ck[3], ck[4])  # and training goes on
    assert all(_finite(c) for c in ck.values())
    state = next(v for k, v in ck[5]["callbacks"].items() if "NonFiniteGuard" in k)
    assert state == {"skipped": 1, "consecutive": 0}  # counted, and kept in the checkpoint
    assert "non-finite loss and gradient at optimizer step 3: update skipped (1 skipped so far" in capsys.readouterr().err


def test_stop_policy_checkpoints_pre_fault_weights_and_raises(tmp_path, monkeypatch):
    _inject(monkeypatch, "grad", {3})
    with pytest.raises(NumericalFault, match=r"non-finite gradient at optimizer step 3; training stopped "
                                             r"\(trainer.nonfinite=stop\); .*step-00000003.ckpt holds the weights from before the fault"):
        train(compose_run([*BASE, f"run_dir={tmp_path}", "trainer.nonfinite=stop"]))
    ck = _ckpts(tmp_path)
    assert sorted(ck) == [1, 2, 3]  # nothing after the fault
    assert _same_weights(ck[2], ck[3]) and _finite(ck[3])
    assert not (tmp_path / "final.json").exists()


def test_skip_policy_gives_up_after_consecutive_faults(tmp_path, monkeypatch):
    _inject(monkeypatch, "loss", {2, 3, 4, 5})
    with pytest.raises(NumericalFault, match=r"at optimizer step 4 \(3 consecutive steps skipped, trainer.nonfinite_max_consecutive=3\)"):
        train(compose_run([*BASE, f"run_dir={tmp_path}", "trainer.nonfinite_max_consecutive=3"]))
    ck = _ckpts(tmp_path)
    assert max(ck) == 4 and _same_weights(ck[1], ck[4]) and _finite(ck[4])


def test_config_rejects_unknown_policy_and_signal():
    from glmtrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"trainer.nonfinite='ignore': allowed values are skip, stop"):
        compose_run([*BASE, "trainer.nonfinite=ignore"])
    with pytest.raises(ConfigError, match=r"trainer.signals.KILL: not a signal that can be handled"):
        compose_run([*BASE, "+trainer.signals.KILL=stop"])
    with pytest.raises(ConfigError, match=r"trainer.signals.USR1='restart': allowed values are requeue, stop, ignore"):
        compose_run([*BASE, "trainer.signals.USR1=restart"])
