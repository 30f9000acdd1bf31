"""Issue 13, point 2: no silent no-ops. Every module an adapter targets changes the output; an adapter
that targets nothing is refused with one line; trainable / total parameters are reported."""

from __future__ import annotations

import pytest
import torch

import glmtrain.models.ops as ops
from glmtrain.config import ConfigError
from glmtrain.downstream import peft_methods
from glmtrain.downstream.families import inspect_model
from glmtrain.downstream.heads import SequenceClassifier
from glmtrain.downstream.peft_methods import adapter_parameters, apply_method

from _downstream import task, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["transformer", "encoder", "hyena", "evo2", "caduceus", "dnabert2"]  # the last two once they land


def build(family: str, before: list | None = None, **kw):
    """Classifier + method; ``before`` receives the logits of the unadapted classifier (autograd on, off)."""
    model, tok = tiny(family)
    anatomy = inspect_model(model, tok.nucleotide_ids.tolist())
    clf = SequenceClassifier(model, anatomy.hidden, 2, anatomy.default_pooling(), 0.0)
    ids = torch.as_tensor(tok.nucleotide_ids)[torch.randint(0, 4, (2, 24), generator=torch.Generator().manual_seed(1))]
    if before is not None:
        for grad_mode in (True, False):
            with torch.set_grad_enabled(grad_mode):
                before.append(clf.eval()(ids).logits.detach())
    applied = apply_method(clf, task(**kw), anatomy, model.cfg.name, max_steps=100)
    return applied, ids


def _norm(name: str) -> str:
    return name.removeprefix("base_model.model.")


def assert_every_adapter_matters(applied, ids, expect_groups: int) -> None:
    # float64: a bypassed adapter leaves the output exactly unchanged, a used one moves it far above rounding
    # (in float32 a real but weak path -- Mamba's dt projection in a tiny model -- can sit near 1e-6)
    net = applied.net.double().eval()
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
                assert changed > 1e-12, f"{applied.method}: perturbing the adapter of {key} does not change the output (grad={grad_mode})"


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


def test_a_bypassed_adapter_is_caught(monkeypatch):
    """Control: with the old behaviour (fused ops read .weight whatever wraps the module) LoRA on the
    Hyena MLP's fc2 is ignored in training (autograd) mode.  apply_method's own check refuses it in one
    line; without that check, the perturbation test above would fail."""
    monkeypatch.setattr(ops, "is_plain", lambda module, cls: True)
    with pytest.raises(ConfigError) as e:
        build("hyena", method="lora", target_modules=["mlp.fc2"])
    msg = str(e.value)
    assert "\n" not in msg and "body.blocks.0.mlp.fc2" in msg and "never called in training mode" in msg
    monkeypatch.setattr(peft_methods, "check_adapters_called", lambda *a, **k: None)
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


class _ForeignBlock(torch.nn.Module):
    """Built unlike any family here: returns (hidden, residual), reads one Linear's weight directly, and
    has a position-wise filter MLP (no batch dimension) -- the shapes a new family may bring."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.mix = torch.nn.Linear(d, 2 * d)
        self.gate = torch.nn.Linear(d, d)  # read as .weight in forward: never a target
        self.filt = torch.nn.Linear(1, d)  # on positions only
        self.proj = torch.nn.Linear(2 * d, d)

    def forward(self, hidden, residual=None):
        residual = hidden if residual is None else hidden + residual
        x = self.norm(residual)
        pos = torch.linspace(0, 1, x.shape[1], dtype=x.dtype).unsqueeze(-1)
        x = x * torch.sigmoid(self.filt(pos)) * torch.sigmoid(torch.nn.functional.linear(x, self.gate.weight))
        return self.proj(torch.nn.functional.gelu(self.mix(x))), residual


class _ForeignModel(torch.nn.Module):
    causal = False

    def __init__(self, vocab: int = 16, d: int = 8):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList(_ForeignBlock(d) for _ in range(2))
        self.out_norm = torch.nn.LayerNorm(d)

    def hidden_states(self, ids):
        hidden, residual = self.tok(ids), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        h = self.out_norm(hidden + residual)
        return torch.cat([h, h.flip(1)], dim=-1)  # two halves, like Caduceus-PS: the head sees 2·d


@pytest.mark.parametrize("method", ["lora", "ia3", "adapter", "prompt"])
def test_a_new_family_plugs_in_without_a_table_entry(method):
    torch.manual_seed(0)
    model, tok = _ForeignModel(), tiny("hyena")[1]
    anatomy = inspect_model(model, tok.nucleotide_ids.tolist(), family="foreign")
    assert (anatomy.blocks, anatomy.hidden, anatomy.block_widths, anatomy.default_pooling()) == ("layers", 16, [8, 8], "mean")
    assert sorted({n.split(".", 2)[2] for n in anatomy.token_linears}) == ["mix", "proj"]  # not gate, not filt
    assert anatomy.never_called == ["layers.0.gate", "layers.1.gate"]
    clf = SequenceClassifier(model, anatomy.hidden, 3, anatomy.default_pooling(), 0.0)
    applied = apply_method(clf, task(method=method), anatomy, "foreign", max_steps=100)
    ids = torch.as_tensor(tok.nucleotide_ids)[torch.randint(0, 4, (2, 12))]
    assert_every_adapter_matters(applied, ids, {"prompt": 1, "adapter": 2}.get(method, 4))
    if method == "lora":
        with pytest.raises(ConfigError) as e:
            apply_method(SequenceClassifier(_ForeignModel(), 16, 3, "mean", 0.0), task(method="lora", target_modules=["gate"]),
                         anatomy, "foreign", max_steps=100)
        assert "\n" not in str(e.value) and "'gate' (layers.0.gate) is never called through its forward" in str(e.value)
