"""Caduceus to Hugging Face (issue 12, point 5): ``export_model`` / ``python -m glmtrain.convert export`` write a
remote-code directory that ``AutoModelForMaskedLM`` and ``AutoTokenizer`` load with glmtrain's logits, and that
reads back into glmtrain bit for bit.  The modeling file re-states the network without glmtrain (a sequential
scan instead of the chunked one), and is checked against the reference Caduceus code's golden fixtures
(``../shared/data/reference/caduceus_{ps,ph}_tiny``, or the trimmed copies in tests/fixtures).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glmtrain.convert import build_imported_model, init_from_released, load_released
from glmtrain.models.caduceus import Caduceus, CaduceusConfig
from glmtrain.tokenizers import TokenizerConfig, build_tokenizer
from tests._util import ROOT, SHARED, compose_run

# see tests/test_convert.py: fill torch's factory-function list before transformers patches torch.linspace
with torch.device("meta"):
    torch.empty(0)

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def load_hf(out: Path, dtype=torch.float32):
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True, dtype=dtype).eval()


# the two variants between them take every option of the network: PS in the released (fused add-norm) half order
# with a tokenizer whose complement map has lowercase and IUPAC tokens; Ph with LayerNorm, biases, untied directions,
# the multiplicative strategy, an fp32 residual and RC-averaged evaluation
VARIANTS = {
    "ps": dict(rcps=True, fused_add_norm=True, tokenizer=TokenizerConfig(kind="char", lowercase="keep", iupac="keep")),
    "ph": dict(rcps=False, norm="layernorm", bias=True, bidirectional_weight_tie=False, bidirectional_strategy="ew_multiply",
               residual_in_fp32=True, rc_average="eval"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_export_automodel_parity_tokenizer_and_round_trip(tmp_path, variant):
    from transformers import AutoTokenizer

    from glmtrain.convert.hf import export_model

    torch.manual_seed(0)
    cfg = CaduceusConfig(d_model=16, n_layers=2, **VARIANTS[variant])
    tok = build_tokenizer(dataclasses.asdict(cfg.tokenizer))
    model = Caduceus(cfg, tok.vocab_size).eval()
    with torch.no_grad():  # every parameter away from its init (A_log, D, dt biases, norms included)
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    out = tmp_path / variant
    files = export_model(model, out, cfg.tokenizer)
    assert {"config.json", "model.safetensors", "modeling_glmtrain.py", "tokenizer.json"} <= set(files)
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForMaskedLM"] == "modeling_glmtrain.GlmtrainForMaskedLM"

    seq = "ACGTNacgtnRYACCGGTTAAn" * 14  # 308 bases: N, lowercase, IUPAC codes
    hf_tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    ids = tok.encode(seq)
    assert hf_tok(seq)["input_ids"] == ids.tolist()
    if variant == "ps":  # lowercase and IUPAC codes have their own tokens, complemented a<->t, R<->Y, ...
        assert int(ids.max()) > 11 and not torch.equal(model.complement, torch.arange(tok.vocab_size))
    x = torch.as_tensor(ids)[None].repeat(2, 1)
    x[1] = x[1].flip(0)

    errors = {}
    hf = load_hf(out)
    for dtype in (torch.float32, torch.float64):  # float64 by .double() here (by from_pretrained(dtype=) below)
        hf, glm = hf.to(dtype), model.to(dtype)
        with torch.no_grad():
            a, b = hf(x).logits, glm(x)
        assert a.dtype == dtype and a.shape == b.shape
        errors[dtype] = rel(a, b)
    model.float()
    # measured: fp32 2.5e-7 (PS) / 2.2e-7 (Ph), fp64 4e-16
    assert errors[torch.float32] < 1e-5 and errors[torch.float64] < 1e-10, errors

    if variant == "ps":  # the complement map travels in config.json; without it the model refuses to load
        config = json.loads((out / "config.json").read_text())
        assert config.pop("complement_map") == model.complement.tolist()
        bare = tmp_path / "bare"
        bare.mkdir()
        for f in out.iterdir():
            (bare / f.name).write_bytes(f.read_bytes())
        (bare / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="no complement_map"):
            load_hf(bare)

    imp = load_released(out, family="caduceus")  # the export reads back into glmtrain unchanged
    again, cfg2, tok_cfg2, _ = build_imported_model(imp)
    assert imp.layout == "glmtrain-hf" and state_equal(again, model) and torch.equal(again.complement, model.complement)
    assert (cfg2.rcps, cfg2.fused_add_norm, cfg2.rc_average, tok_cfg2) == (cfg.rcps, cfg.fused_add_norm, cfg.rc_average, cfg.tokenizer)


def fixture(kind: str) -> Path:
    shared = SHARED / "data" / "reference" / f"caduceus_{kind}_tiny"
    return shared if shared.is_dir() else ROOT / "tests" / "fixtures" / f"caduceus_{kind}_tiny"


# the tolerance tests/test_caduceus.py holds glmtrain itself to: logits up to 109, and the reference's own
# float32-vs-float64 gap is 3.4e-5 (fixture README)
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


@pytest.mark.parametrize("kind", ["ps", "ph"])
def test_imported_fixture_exports_with_the_reference_logits(tmp_path, kind, capsys):
    """``import caduceus <fixture>`` writes the export; its AutoModel reproduces the reference code's logits
    (float32 and float64, forward and reverse-complement inputs).  PS also through the released fused add-norm
    half order: the same weights exported from a model with ``fused_add_norm=true``."""
    from glmtrain.convert.__main__ import main
    from glmtrain.convert.caduceus import load_reference
    from glmtrain.convert.hf import export_model

    fix = fixture(kind)
    out = tmp_path / "imported"
    assert main(["import", "caduceus", str(fix), str(out)]) == 0
    assert "tensors mapped" in capsys.readouterr().out
    ref = load_file(str(fix / "logits.safetensors"))
    inputs = json.loads((fix / "inputs.json").read_text())["inputs"]
    checked = 0
    for dtype, tag in ((torch.float32, "f32"), (torch.float64, "f64")):
        hf = load_hf(out, dtype)
        for x in inputs:
            for rc in ("", ".rc"):
                key = f"{x['name']}{rc}.{tag}"
                if key in ref:
                    with torch.no_grad():
                        logits = hf(torch.tensor([x["rc_input_ids" if rc else "input_ids"]])).logits[0]
                    err = (logits.double() - ref[key].double()).abs().max().item()
                    assert err < TOL[dtype], f"{fix.name} {key}: max |logit - reference| = {err:.3g}"
                    checked += 1
    assert checked >= 2
    if kind == "ps":
        fused, _ = load_reference(fix, dtype=torch.float64, fused_add_norm=True)
        export_model(fused, tmp_path / "fused", fused.cfg.tokenizer)
        hf = load_hf(tmp_path / "fused", torch.float64)
        x = inputs[0]
        with torch.no_grad():
            logits = hf(torch.tensor([x["input_ids"]])).logits[0]
        key = f"{x['name']}.fusedpath.f64"
        assert (logits - ref[key]).abs().max().item() < TOL[torch.float64]


def test_cli_exports_a_caduceus_training_run(tmp_path):
    """``python -m glmtrain.convert export <run_dir>``: the newest checkpoint of a (two-step) Caduceus-PS run."""
    from glmtrain.convert.__main__ import load_run, main
    from glmtrain.train import train

    run = compose_run([
        "model=caduceus_ps", "objective=mlm", "model.d_model=16", "model.n_layers=1", "data.window=64",
        "trainer.micro_batch_size=2", "trainer.max_steps=2", "trainer.val_every=0", "eval.final=false",
        "trainer.progress=none", "trainer.threads=1", "trainer.accelerator=cpu", "logger=none", f"run_dir={tmp_path / 'run'}",
    ])
    assert train(run)["steps"] == 2
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    model, tok_cfg, _ = load_run(tmp_path / "run")
    x = torch.as_tensor(build_tokenizer(dataclasses.asdict(tok_cfg)).encode("ACGTTGCANNACGTAGGCTA" * 5))[None]
    with torch.no_grad():
        a, b = load_hf(out)(x).logits, model(x)
    assert rel(a, b) < 1e-5
    assert state_equal(build_imported_model(load_released(out))[0], model)
    # trainer.init_from=<export>: a model differing only in init and scan-kernel knobs takes the weights
    other = Caduceus(dataclasses.replace(model.cfg, scan_impl="sequential", dt_min=0.01, dt_init="constant"), model.vocab_size)
    init_from_released(out, other, say=lambda line: None)
    assert state_equal(other, model)
