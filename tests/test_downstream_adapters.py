"""Issue 13, point 2: no silent no-ops. Every module an adapter targets changes the output; an adapter
that targets nothing is refused with one line; trainable / total parameters are reported."""

from __future__ import annotations

import pytest
import torch

import glmtrain.models.ops as ops
from glmtrain.config import ConfigError
from glmtrain.downstream.families import spec_for
from glmtrain.downstream.heads import SequenceClassifier
from glmtrain.downstream.peft_methods import adapter_parameters, apply_method

from _downstream import one_thread, task, tiny  # noqa: F401  (autouse fixture)

FAMILIES = ["transformer", "encoder", "hyena", "evo2"]


def build(family: str, before: list | None = None, **kw):
    """Classifier + method; ``before`` receives the logits of the unadapted classifier (autograd on, off)."""
    model, tok = tiny(family)
    spec = spec_for(model.cfg.family)
    clf = SequenceClassifier(model, spec.hidden_size(model), 2, "mean" if family in ("hyena", "encoder") else "last", 0.0)
    ids = torch.as_tensor(tok.nucleotide_ids)[torch.randint(0, 4, (2, 24), generator=torch.Generator().manual_seed(1))]
    if before is not None:
        for grad_mode in (True, False):
            with torch.set_grad_enabled(grad_mode):
                before.append(clf.eval()(ids).logits.detach())
    applied = apply_method(clf, task(**kw), spec, model.cfg.name, max_steps=100, nucleotide_ids=tok.nucleotide_ids.tolist())
    return applied, ids


def _norm(name: str) -> str:
    return name.removeprefix("base_model.model.")


def assert_every_adapter_matters(applied, ids, expect_groups: int) -> None:
    net = applied.net.eval()
    groups = adapter_parameters(net)
    assert len(groups) == expect_groups, sorted(groups)
    if applied.targets and applied.method in ("lora", "adalora", "ia3"):
        assert {_norm(g) for g in groups} == set(applied.targets)
    g = torch.Generator().manual_seed(2)
    for grad_mode in (True, False):  # fused (autograd) and plain (inference) paths of the Hyena operators
        with torch.set_grad_enabled(grad_mode):
            base = net(ids).logits.detach()
            for key, params in groups.items():
                saved = [p.detach().clone() for _, p in params]
                with torch.no_grad():
                    for _, p in params:
                        p.add_(torch.randn(p.shape, generator=g) * 0.5)
                changed = (net(ids).logits.detach() - base).abs().max().item()
                with torch.no_grad():
                    for (_, p), s in zip(params, saved):
                        p.copy_(s)
                assert changed > 1e-6, f"{applied.method}: perturbing the adapter of {key} does not change the output (grad={grad_mode})"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["lora", "adalora", "ia3", "prompt", "adapter"])
def test_every_adapter_changes_the_output(family, method):
    applied, ids = build(family, method=method)
    n_layers = len(applied.net.get_base_model().body.blocks if hasattr(applied.net, "get_base_model") else applied.net.body.blocks)
    expect = {"prompt": 1, "adapter": n_layers}.get(method, len(applied.targets))
    assert len(applied.targets) >= (1 if method == "prompt" else n_layers)
    assert_every_adapter_matters(applied, ids, expect)
    train, total = applied.trainable()
    assert 0 < train < total


@pytest.mark.parametrize("family,r", [("hyena", 48), ("evo2", 96)])
def test_adapters_on_fused_operator_inputs_are_honoured(family, r):
    """Targets whose weights the fused Hyena/Evo 2 operators read directly (short featurizer conv,
    implicit-filter MLP, the memory-light MLP's fc2): with an adapter the module is called instead."""
    targets = ["short_conv"] + (["mlp.fc2", "filter.mlp.0", "filter.out"] if family == "hyena" else ["mlp.down"])
    before: list = []
    applied, ids = build(family, before, method="lora", target_modules=targets, **{"lora.r": r})
    # LoRA starts as a zero update: the module-forward paths compute exactly what the fused paths did
    for grad_mode, ref in zip((True, False), before):
        with torch.set_grad_enabled(grad_mode):
            assert torch.allclose(applied.net.eval()(ids).logits, ref, atol=1e-6, rtol=0)
    assert_every_adapter_matters(applied, ids, len(applied.targets))


def test_the_check_catches_a_bypassed_adapter(monkeypatch):
    """Control: with the old behaviour (fused ops read .weight whatever wraps the module) LoRA on the
    Hyena MLP's fc2 is ignored in training (autograd) mode -- the test above would fail."""
    monkeypatch.setattr(ops, "is_plain", lambda module, cls: True)
    applied, ids = build("hyena", method="lora", target_modules=["mlp.fc2"])
    with pytest.raises(AssertionError, match="does not change the output"):
        assert_every_adapter_matters(applied, ids, 2)


def test_adapter_targeting_nothing_is_refused_in_one_line():
    with pytest.raises(ConfigError) as e:
        build("hyena", method="lora", target_modules=["mixer.in_proj", "attn.qkv"])
    msg = str(e.value)
    assert "\n" not in msg and "'attn.qkv' matches no module of" in msg and "mixer.in_proj" in msg


def test_frozen_methods_train_only_head_and_adapters():
    applied, _ = build("hyena", method="probe")
    names = [n for n, p in applied.net.named_parameters() if p.requires_grad]
    assert names == ["head.weight", "head.bias"]
    applied.net.train()
    assert not applied.net.body.training  # probe: frozen body without dropout
    applied, _ = build("hyena", method="lora", train_body_norms=True)
    names = {_norm(n) for n, p in applied.net.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias", "body.norm_f.weight"} <= names
    assert all("lora_" in n or n.startswith("head.") or "norm" in n for n in names)
