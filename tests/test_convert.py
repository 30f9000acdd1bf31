"""Released weights in and out (glmtrain.convert), checked against the reference implementations' golden
fixtures in ../shared/data/reference (HyenaDNA's standalone code, Evo 2's vortex) and transformers' classes.

Point 1: one import path (CLI and trainer.init_from), layouts (Lightning weights.ckpt, -hf, vortex),
         one-line refusals, no pickle execution.
Point 2: Evo 2 exactly (vortex numerics, weak MR decay preset).
Point 3: HyenaDNA exactly (shift 0.05, dropped positional buffers, official tokenizer conventions).
Point 5: Hugging Face export per family, AutoModel/AutoTokenizer parity, round trip.
Point 6: continue training from the released weights: first-step loss = reference loss.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from glmtrain.convert import ConvertError, build_imported_model, load_released
from glmtrain.tokenizers import CharTokenizer
from tests._util import SHARED, compose_run

# transformers' from_pretrained patches torch.linspace for a moment; if torch first fills its (cached) list of
# factory functions that `with torch.device(...)` redirects during that moment, torch.linspace stays
# un-redirected for the rest of the process (and later meta-device builds mix devices).  Fill it now.
with torch.device("meta"):
    torch.empty(0)

REF = SHARED / "data" / "reference"
HYENA_FIX, EVO2_FIX = REF / "hyenadna_tiny", REF / "evo2_vortex_tiny"
needs_hyena = pytest.mark.skipif(not HYENA_FIX.is_dir(), reason=f"golden fixture {HYENA_FIX} is absent")
needs_evo2 = pytest.mark.skipif(not EVO2_FIX.is_dir(), reason=f"golden fixture {EVO2_FIX} is absent")


def mean_loglik(logits: torch.Tensor, ids: torch.Tensor) -> float:
    lp = torch.log_softmax(logits.double(), -1)[:-1].gather(-1, ids[1:, None])
    return float(lp.mean())


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def hyena_import():
    imp = load_released(HYENA_FIX)
    return imp, build_imported_model(imp)


@pytest.fixture(scope="module")
def evo2_import():
    imp = load_released(EVO2_FIX)
    return imp, build_imported_model(imp)


# ----------------------------------------------------------------------------- point 3: HyenaDNA exactly
def test_official_tokenizer_conventions_are_options():
    t = CharTokenizer(add_cls=True, add_sep=True, lowercase="unk", iupac="unk", unknown="unk")
    ids, n_body = t.encode_window("ACgtNnR!")
    assert ids.tolist() == [0, 7, 8, 6, 6, 11, 6, 6, 6, 1] and n_body == 8
    assert t.max_tokens(5) == 7 and t.n_wrap == 2
    assert CharTokenizer().encode("ACgtNnR").tolist() == [7, 8, 9, 10, 11, 11, 11]  # glmtrain's default is unchanged


@needs_hyena
def test_hyenadna_fixture_parity_fp32_fp64(hyena_import):
    imp, (model, cfg, tok_cfg, recomputed) = hyena_import
    assert cfg.modulation_shift == 0.05 and imp.config["modulation_shift"] == 0.05  # recorded by the importer
    dropped = [n for n, _ in imp.dropped]
    assert sum(".pos_emb." in n for n in dropped) == 4 and recomputed == [f"blocks.{i}.mixer.filter.band_freqs" for i in (0, 1)]
    ref = load_file(HYENA_FIX / "logits.safetensors")
    tok = CharTokenizer(**{k: v for k, v in vars(tok_cfg).items() if k in ("lowercase", "iupac", "unknown", "add_cls", "add_sep")})
    for i, seq in enumerate(json.loads((HYENA_FIX / "inputs.json").read_text())["sequences"]):
        ids = ref[f"seq{i}.input_ids"]
        assert tok.encode_window(seq["text"])[0].tolist() == ids.tolist() == seq["input_ids"]  # [CLS] ... [SEP], lowercase -> [UNK]
        with torch.no_grad():
            lg32 = model.float()(ids[None])[0]
        assert (lg32 - ref[f"seq{i}.logits.float32"]).abs().max() < 1e-5
        assert abs(mean_loglik(lg32, ids) - ref[f"seq{i}.mean_next_token_loglik.float32"].item()) < 1e-6
    with torch.no_grad():  # float64 on the longer sequence (l_max tokens); scripts/parity_released.py measures both
        lg64 = model.double()(ids[None])[0]
    model.float()
    assert (lg64 - ref["seq1.logits.float64"]).abs().max() < 1e-7  # the reference rounds its residual to fp32
    assert (lg64 - ref["seq1.logits.float64_residual_fp64_zt_fp64"]).abs().max() < 1e-10
    assert abs(mean_loglik(lg64, ids) - ref["seq1.mean_next_token_loglik.float64"].item()) < 1e-9


def _hf_layout(tmp: Path) -> Path:
    """The fixture rewritten as a LongSafari/hyenadna-*-hf repository stores it (names, config, one Sin copy)."""
    sd = load_file(HYENA_FIX / "model.safetensors")
    out = {}
    for k, v in sd.items():
        if k.endswith(("implicit_filter.3.freq", "implicit_filter.5.freq")):
            continue  # safetensors keeps one copy of a shared tensor
        out[k.replace("model.backbone.", "hyena.backbone.").replace("model.lm_head.", "lm_head.")] = v
    d = tmp / "hyenadna-tiny-1k-seqlen-hf"
    d.mkdir()
    save_file(out, d / "model.safetensors")
    orig = json.loads((HYENA_FIX / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({
        "model_type": "hyenadna", "d_model": 128, "n_layer": 2, "d_inner": 512, "vocab_size": 12, "max_seq_len": 1026,
        "emb_dim": 5, "filter_order": 64, "short_filter_order": 3, "num_inner_mlps": 2, "hyena_order": 2,
        "activation_freq": orig["layer"]["w"], "train_freq": True, "layer_norm_epsilon": 1e-5,
        "pad_vocab_size_multiple": 8, "embed_dropout": 0.1, "use_bias": True}))
    return d


class Payload:
    """A pickled object that would create a file if anything ever executed it."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        import subprocess

        return (subprocess.run, (["touch", self.target],))


@needs_hyena
def test_hyenadna_layouts_lightning_ckpt_and_hf(tmp_path, hyena_import):
    _, (model, *_) = hyena_import
    # -hf layout
    imp = load_released(_hf_layout(tmp_path), family="hyena")
    assert imp.layout == "hyenadna-hf" and state_equal(build_imported_model(imp)[0], model)
    # Lightning weights.ckpt: checkpoint_mixer spelling, OmegaConf hyper-parameters and a pickled command
    from omegaconf import OmegaConf

    sd = {k.replace(".mixer.", ".mixer.layer.").replace(".mlp.", ".mlp.layer."): v
          for k, v in load_file(HYENA_FIX / "model.safetensors").items()}
    marker = tmp_path / "executed"
    d = tmp_path / "hyenadna-tiny-1k-seqlen"
    d.mkdir()
    torch.save({"state_dict": sd, "epoch": 3, "hyper_parameters": OmegaConf.create({"model": {"d_model": 128}}),
                "callbacks": {"x": Payload(str(marker))}}, d / "weights.ckpt")
    (d / "config.json").write_bytes((HYENA_FIX / "config.json").read_bytes())
    imp = load_released(d)
    assert imp.layout == "hyenadna" and not marker.exists()
    assert any("nothing executed" in n for n in imp.notes)
    assert state_equal(build_imported_model(imp)[0], model)


@needs_hyena
@pytest.mark.parametrize("change,expected", [
    ("unknown", "unknown tensors for the hyenadna layout: model.backbone.layers.0.mixer.extra.weight"),
    ("missing", "tensor model.backbone.layers.1.mixer.out_proj.weight is missing"),
    ("trained_z", "pos_emb.z differs from the positional features"),
    ("untied_head", "model.lm_head.weight should equal the word embedding"),
])
def test_import_refusals_name_the_tensor(tmp_path, change, expected):
    sd = load_file(HYENA_FIX / "model.safetensors")
    if change == "unknown":
        sd["model.backbone.layers.0.mixer.extra.weight"] = torch.zeros(2)
    elif change == "missing":
        del sd["model.backbone.layers.1.mixer.out_proj.weight"]
    elif change == "trained_z":
        sd["model.backbone.layers.0.mixer.filter_fn.pos_emb.z"][0, 5, 1] += 1e-3
    else:
        sd["model.lm_head.weight"] = sd["model.lm_head.weight"] + 1e-3
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((HYENA_FIX / "config.json").read_bytes())
    with pytest.raises(ConvertError, match=expected) as e:
        load_released(tmp_path)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- point 2: Evo 2 exactly
@needs_evo2
def test_evo2_fixture_parity_fp32_fp64(evo2_import):
    imp, (model, cfg, _, _) = evo2_import
    assert (cfg.pattern, cfg.rmsnorm, cfg.rope_freqs, cfg.li_poles, cfg.mr_decay) == ("SDH*SDH*", "vortex", "stored", "log_pole", False)
    assert [n for n, _ in imp.dropped] == ["unembed.weight"]
    ref = load_file(EVO2_FIX / "logits.safetensors")
    for j, ids in enumerate(json.loads((EVO2_FIX / "inputs.json").read_text())["input_ids"]):
        x = torch.tensor(ids)
        with torch.no_grad():
            lg32 = model.float()(x[None])[0]
        assert (lg32 - ref[f"seq{j}.logits_f32"]).abs().max() < 1e-4
        assert abs(mean_loglik(lg32, x) - ref["mean_loglik_f32"][j].item()) < 1e-5
    with torch.no_grad():  # float64 on the longer sequence
        lg64 = model.double()(x[None])[0]
    model.float()
    assert (lg64 - ref["seq1.logits_f64"]).abs().max() < 1e-9
    assert abs(mean_loglik(lg64, x) - ref["mean_loglik_f64"][1].item()) < 1e-9


def test_evo2_numerics_options():
    from glmtrain.models.evo2 import Evo2Config, mr_decay_window
    from glmtrain.models.layers import RMSNorm

    x = torch.randn(3, 16, dtype=torch.float64) * 0.05
    norm = RMSNorm(16, 1e-6, "vortex").double()
    with torch.no_grad():
        norm.weight.normal_()
    rms = x.norm(dim=-1, keepdim=True) / 4
    assert torch.allclose(norm(x), norm.weight * x / (rms + 1e-6), rtol=1e-13, atol=0)
    assert not torch.allclose(RMSNorm(16, 1e-6, "rsqrt").double()(x), x / (rms + 1e-6), rtol=1e-4)
    # savanna's "weak" preset (Evo 2 7B/40B): rates log-spaced 0.01..100 over the groups, t in [0, 1]
    w = mr_decay_window(Evo2Config(mr_filter_groups=8, mr_filter_length=128))
    rates, t = torch.logspace(-2, 2, 8, dtype=torch.float64), torch.arange(128, dtype=torch.float64) / 127
    assert torch.allclose(w.double(), torch.exp(-rates[:, None] * t[None, :]), rtol=1e-5, atol=1e-12)
    assert Evo2Config().mr_decay_preset == "weak" and Evo2Config().rmsnorm == "vortex"


@needs_evo2
def test_evo2_released_extras_and_training_parametrisation(tmp_path, evo2_import):
    """TE _extra_state and leftover filter.t are dropped; a model that trains with log_rate poles and a
    decay window (the shipped configs) takes the release with window ones and log_rate = log(-log p)."""
    from glmtrain.convert import fit
    from glmtrain.models import build_model

    _, (ref_model, cfg, _, _) = evo2_import
    sd = load_file(EVO2_FIX / "model.safetensors")
    sd["blocks.2.mixer.mixer.filter.t"] = torch.arange(4.0)
    torch.save({**sd, "blocks.3.inner_mha_cls.Wqkv._extra_state": Payload(str(tmp_path / "executed"))}, tmp_path / "evo2.pt")
    (tmp_path / "config.yml").write_bytes((EVO2_FIX / "config.yml").read_bytes())
    imp = load_released(tmp_path / "evo2.pt")
    assert not (tmp_path / "executed").exists()
    assert {why.split(" (")[0] for _, why in imp.dropped} >= {"Transformer Engine FP8 metadata", "leftover filter time grid"}
    import dataclasses

    train_cfg = dataclasses.replace(cfg, li_poles="log_rate", mr_decay=True)
    model = build_model(train_cfg, 512)
    state, _ = fit(imp, model)
    model.load_state_dict(state)
    assert torch.equal(model.blocks[1].mixer.filter.window, torch.ones(16, 128))
    x = torch.tensor(json.loads((EVO2_FIX / "inputs.json").read_text())["input_ids"][0][:200])[None]
    with torch.no_grad():
        assert (model.eval()(x) - ref_model(x)).abs().max() < 1e-4


# ----------------------------------------------------------------------------- points 1, 5: CLI import, HF export
@needs_hyena
@needs_evo2
def test_cli_import_then_hf_export_parity_and_round_trip(tmp_path, hyena_import, evo2_import, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glmtrain.convert.__main__ import main
    from glmtrain.tokenizers import build_tokenizer

    for family, fix, (_, (model, _, tok_cfg, _)) in (("hyena", HYENA_FIX, hyena_import), ("evo2", EVO2_FIX, evo2_import)):
        out = tmp_path / family
        assert main(["import", family, str(fix), str(out)]) == 0
        text = capsys.readouterr().out
        assert "tensors mapped" in text and f"trainer.init_from={out}" in text
        report = json.loads((out / "import.json").read_text())
        assert report["dropped"] and report["mapped"] and report["checked_config"]
        hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
        seq = json.loads((fix / "inputs.json").read_text())["sequences"][1]
        seq = seq["text"] if isinstance(seq, dict) else seq
        ids = build_tokenizer(vars(tok_cfg)).encode_window(seq)[0]  # hyena: [CLS] ... [SEP] as released
        assert tok(seq)["input_ids"] == ids.tolist()
        x = torch.as_tensor(ids[:300])[None]
        with torch.no_grad():
            a, b = hf(x).logits, model(x)
        assert float((a - b).norm() / b.norm()) < 1e-5
        again = load_released(out, family=family)  # the export reads back into glmtrain unchanged
        assert again.layout == "glmtrain-hf" and state_equal(build_imported_model(again)[0], model)
    single = tmp_path / "hyena.safetensors"  # one file instead of a directory
    assert main(["import", "hyena", str(HYENA_FIX), str(single)]) == 0
    assert state_equal(build_imported_model(load_released(single))[0], hyena_import[1][0])


def test_transformer_exports_to_gpt_neox_and_encoder_to_masked_lm(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, GPTNeoXForCausalLM

    from glmtrain.convert.hf import export_model
    from glmtrain.models.transformer import Transformer, TransformerConfig
    from glmtrain.tokenizers import TokenizerConfig, build_tokenizer

    torch.manual_seed(0)
    x = torch.randint(7, 12, (2, 40))
    for causal, auto in ((True, AutoModelForCausalLM), (False, AutoModelForMaskedLM)):
        cfg = TransformerConfig(d_model=32, n_layers=2, n_heads=4, causal=causal, tokenizer=TokenizerConfig(kind="kmer"))
        model = Transformer(cfg, build_tokenizer(vars(cfg.tokenizer)).vocab_size).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        out = tmp_path / f"causal{causal}"
        export_model(model, out, cfg.tokenizer)
        hf = auto.from_pretrained(out, trust_remote_code=True).eval()
        assert isinstance(hf, GPTNeoXForCausalLM) == causal  # the built-in class where it fits
        with torch.no_grad():
            a, b = hf(x).logits, model(x)
        assert float((a - b).norm() / b.norm()) < 1e-5
        assert state_equal(build_imported_model(load_released(out, family="transformer"))[0], model)
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)  # NT-v2 6-mers
    assert tok("ATTCCGATTCCGATTCCAACGGATNATTCC")["input_ids"] == [367, 367, 364, 757, 4104, 4100, 4101, 4101, 4102, 4102]


# ----------------------------------------------------------------------------- point 6 (+1, 5): init_from a release
@needs_hyena
def test_init_from_fixture_first_step_loss_equals_reference_then_export_run(tmp_path):
    from glmtrain.checkpointing import CheckpointError
    from glmtrain.convert.__main__ import main
    from glmtrain.train import train

    seqs = json.loads((HYENA_FIX / "inputs.json").read_text())["sequences"]
    fa = tmp_path / "fixture.fa"
    fa.write_text("".join(f">{s['name']}\n{s['text']}\n" for s in seqs))
    args = [
        "model=hyena_tiny_1k", f"trainer.init_from={HYENA_FIX}", f"run_dir={tmp_path / 'run'}",
        f'data.sources=[{{path: "{fa}", species: fixture}}]', "data.split.valid_records=[seq1]", "data.window=1000",
        "data.format=memory", "data.softmask=keep", "data.max_val_windows=1", "+model.tokenizer.add_cls=true", "+model.tokenizer.add_sep=true",
        "+model.tokenizer.lowercase=unk", "+model.tokenizer.iupac=unk", "+model.tokenizer.unknown=unk",
        "model.embed_dropout=0", "trainer.max_steps=1", "trainer.micro_batch_size=1", "trainer.log_every=1",
        "trainer.val_every=0", "trainer.progress=none", "eval.final=false", "trainer.threads=1",
    ]
    with pytest.raises(CheckpointError, match="model.modulation_shift=0.0, but .* was published with 0.05") as e:
        train(compose_run([*args, "model.modulation_shift=0.0", f"run_dir={tmp_path / 'refused'}"]))
    assert "\n" not in str(e.value)
    assert train(compose_run(args))["steps"] == 1
    rows = [r for f in (tmp_path / "run" / "logs").glob("version_*/metrics.csv") for r in csv.DictReader(open(f)) if r.get("loss")]
    first = float(rows[0]["loss"])
    # the reference model's loss on that batch: its logits, glmtrain's loss weights (A/C/G/T targets only)
    ref = load_file(HYENA_FIX / "logits.safetensors")
    ids, logits = ref["seq0.input_ids"], ref["seq0.logits.float32"].double()
    nll = -torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None])[:, 0]
    scored = (ids[1:] >= 7) & (ids[1:] <= 10)
    assert first == pytest.approx(float(nll[scored].mean()), rel=1e-6)
    # the trained run exports too (remote code), and its tokenizer keeps the run's conventions
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    run_model = build_imported_model(load_released(out))[0]
    with torch.no_grad():
        a, b = hf(ids[None]).logits, run_model(ids[None])
    assert float((a - b).norm() / b.norm()) < 1e-5 and not torch.allclose(b[0], logits.float(), atol=1e-6)
    assert json.loads((out / "tokenizer_config.json").read_text())["glmtrain_tokenizer"]["add_sep"] is True
    assert np.isfinite(first)


# ----------------------------------------------------------------------------- point 5: every Transformer variant
def _model_from_yaml(name: str, tmp_path: Path):
    """The shipped conf/model/<name>.yaml, random (perturbed) weights; a bpe config gets a tiny trained vocabulary."""
    import dataclasses
    import random

    from glmtrain.convert.__main__ import shipped_model_config
    from glmtrain.models import build_model
    from glmtrain.tokenizers import build_tokenizer, train_bpe

    cfg = shipped_model_config(name)
    if cfg.tokenizer.kind == "bpe":
        rng = random.Random(0)
        motifs = ["".join(rng.choice("ACGT") for _ in range(rng.randint(2, 7))) for _ in range(30)]
        train_bpe(("".join(rng.choice(motifs) for _ in range(300)) for _ in range(40)), vocab_size=96,
                  out=str(tmp_path / "bpe.json"))
        cfg.tokenizer.path, cfg.tokenizer.vocab_size = str(tmp_path / "bpe.json"), 96
    tok = build_tokenizer(dataclasses.asdict(cfg.tokenizer))
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # norms, biases, gates: nothing matches by accident
    return cfg, tok, model


@pytest.mark.parametrize("name,hf_class", [
    ("nt_v1", "EsmForMaskedLM"), ("nt_v2", "NtEsmForMaskedLM"), ("dnabert2", "GlmtrainForMaskedLM"),
    ("dnabert1", "GlmtrainForMaskedLM"), ("generator", "GlmtrainForCausalLM"), ("transformer_encoder", "GlmtrainForMaskedLM"),
])
def test_every_transformer_variant_exports_to_an_auto_class(tmp_path, name, hf_class):
    """NT-v1 -> transformers' own EsmForMaskedLM; NT-v2 -> its released ESM layout + NT's gated MLP (remote
    code); DNABERT-1/2 (post-LN, ALiBi, gated GELU, BPE / overlapping k-mers), GENERator and the encoder
    baseline -> glmtrain's modeling file.  Logits on a padded batch equal glmtrain's in fp32 and fp64,
    AutoTokenizer gives glmtrain's ids, and the export reads back bit for bit."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    from glmtrain.convert.hf import export_model

    cfg, tok, model = _model_from_yaml(name, tmp_path)
    out = tmp_path / "hf"
    export_model(model, out, cfg.tokenizer)
    hf = (AutoModelForCausalLM if cfg.causal else AutoModelForMaskedLM).from_pretrained(out, trust_remote_code=True).eval()
    assert type(hf).__name__ == hf_class
    seq = "ACGTTGCAacgtNNACGTRYACGGATCCATGACGTTAGCATCGATCGGATTTACGACGATCGTAGCTAGCTAGGGCATCAGCAGCTAG" * 2
    ids = tok.encode_window(seq)[0]
    text = " ".join(seq[i:i + tok.k] for i in range(len(seq) - tok.k + 1)) if tok.name == "kmer_overlap" else seq
    assert AutoTokenizer.from_pretrained(out, trust_remote_code=True)(text)["input_ids"] == ids.tolist()
    x = torch.as_tensor(ids)[None].repeat(2, 1)
    am = torch.ones_like(x)
    x[1, -9:], am[1, -9:] = tok.pad_id, 0
    real = am.bool()
    # transformers' ESM keeps its rotary frequencies in fp32 (a buffer it computes itself): fp64 agrees to ~2e-7 there
    fp64_tol = 1e-6 if hf_class.endswith("EsmForMaskedLM") and cfg.position == "rope" else 1e-12
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, fp64_tol)):
        with torch.no_grad():
            ours = model.to(dtype)(x, am)
            theirs = hf.to(dtype)(input_ids=x, attention_mask=am).logits
        n = min(ours.shape[-1], theirs.shape[-1])
        assert n >= tok.n_tokens
        a, b = theirs[..., :n][real], ours[..., :n][real]
        assert float((a - b).norm() / b.norm()) < tol, (name, dtype)
    again = load_released(out, family="transformer")
    assert state_equal(build_imported_model(again, dtype=torch.float64)[0], model)


def _nt_v2_release(path: Path, cfg, tok):
    """A checkpoint in the released NT-v2 layout (InstaDeepAI nucleotide-transformer-v2-*: ESM names, 4,107 ids,
    ``add_bias_fnn: false``, a GLU in ``intermediate.dense``, the unused 2,050-row position table, the contact
    head), made with transformers' EsmForMaskedLM whose MLPs are swapped for NT's; returns that reference model."""
    from glmtrain.convert.nt import esm_config
    from tests.test_encoders import _nt_v2_as_esm

    conf = esm_config(cfg, tok.n_tokens, hf_class=False)
    torch.manual_seed(1)
    ref = _nt_v2_as_esm(conf)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
    path.mkdir()
    released = {k: v.float().contiguous() for k, v in ref.state_dict().items() if not k.endswith("inv_freq")}
    released["esm.embeddings.position_embeddings.weight"] = torch.randn(2050, cfg.d_model)
    released["esm.contact_head.regression.weight"] = torch.randn(1, cfg.n_layers * cfg.n_heads)
    released["esm.contact_head.regression.bias"] = torch.randn(1)
    save_file(released, path / "model.safetensors", metadata={"format": "pt"})
    c = conf.to_dict()
    c.update(max_position_embeddings=2050, add_bias_fnn=False, architectures=["EsmForMaskedLM"],
             auto_map={"AutoModelForMaskedLM": "modeling_esm.EsmForMaskedLM"})
    (path / "config.json").write_text(json.dumps(c))
    (path / "vocab.txt").write_text("\n".join(tok.vocab()) + "\n")
    return ref.float()


def test_nt_v2_release_imports_through_the_command_and_init_from(tmp_path, capsys):
    """Point 4: the released NT-v2 layout imports into model=nt_v2 (names, GLU split, the unused position table and
    contact head dropped with their reasons), logits equal the reference's; the import's export is NT's layout
    again and loads in AutoModelForMaskedLM; a model that does not fit is refused with one line."""
    from transformers import AutoModelForMaskedLM

    from glmtrain.convert import ConvertError, init_from_released
    from glmtrain.convert.__main__ import main
    from glmtrain.models import build_model

    run = compose_run(["model=nt_v2", "objective=mlm"])
    tok = __import__("glmtrain.tokenizers", fromlist=["build_tokenizer"]).build_tokenizer(vars(run.model.tokenizer))
    ref = _nt_v2_release(tmp_path / "release", run.model, tok)
    x = torch.as_tensor(np.stack([tok.encode_window("ATTCCGATTCCGATTCCAACGGATNATTCC" * 4)[0]] * 2))
    x[0, 3] = tok.mask_id
    am = torch.ones_like(x)
    x[1, -5:], am[1, -5:] = tok.pad_id, 0
    real = am.bool()
    with torch.no_grad():
        want = ref(input_ids=x, attention_mask=am).logits
    out = tmp_path / "imported"
    assert main(["import", "transformer", str(tmp_path / "release"), str(out)]) == 0
    text = capsys.readouterr().out
    assert "model=nt_v2 " in text and "dropped 2: contact-prediction head" in text
    assert "dropped 1: absolute position table a rotary model never reads" in text
    report = json.loads((out / "import.json").read_text())
    assert report["layout"] == "esm-hf" and report["tokenizer"]["kind"] == "kmer"
    # trainer.init_from's function, on the configured model=nt_v2
    model = build_model(run.model, tok.vocab_size).eval()
    init_from_released(tmp_path / "release", model, say=lambda _: None)
    hf = AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        ours, exported = model(x, am)[..., : tok.n_tokens], hf(input_ids=x, attention_mask=am).logits[..., : tok.n_tokens]
    for got in (ours, exported):
        assert float((got[real] - want[real]).norm() / want[real].norm()) < 1e-5
    assert json.loads((out / "config.json").read_text())["add_bias_fnn"] is False
    assert state_equal(build_imported_model(load_released(out))[0], model)  # import -> export -> glmtrain: unchanged
    small = compose_run(["model=nt_v2", "objective=mlm", "model.ffn_dim=256"]).model
    with pytest.raises(ConvertError, match=r"model\.ffn_dim=256, but .* was published with 512") as e:
        init_from_released(tmp_path / "release", build_model(small, tok.vocab_size))
    assert "\n" not in str(e.value)
    (tmp_path / "release" / "vocab.txt").write_text("\n".join(reversed(tok.vocab())) + "\n")
    with pytest.raises(ConvertError, match=r"vocab\.txt: token 0 is .*ids would not mean the same tokens"):
        load_released(tmp_path / "release")


def _mosaic_bert_logits(t: dict, c: dict, ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
    """DNABERT-2's masked-LM (MosaicBERT ``bert_layers.py``) restated from its published description in the
    release's own names, independent of glmtrain's modules: embedding + token type 0 -> LayerNorm; per layer
    Wqkv rows [(q, k, v), head, head_dim], scores / sqrt(head_dim) - slope * |i - j| - 10000 on padding, post-LN
    residuals, gated_layers halves gelu(first) * second -> wo; head dense -> gelu -> LayerNorm -> decoder."""
    F = torch.nn.functional
    d, heads = c["hidden_size"], c["num_attention_heads"]
    hd, n = d // heads, ids.shape[1]
    ln = lambda x, p: F.layer_norm(x, (d,), t[p + ".weight"], t[p + ".bias"], 1e-12)  # noqa: E731
    x = ln(t["bert.embeddings.word_embeddings.weight"][ids] + t["bert.embeddings.token_type_embeddings.weight"][0],
           "bert.embeddings.LayerNorm")
    slopes = torch.tensor([(2 ** (-8 / heads)) ** (i + 1) for i in range(heads)], dtype=x.dtype)
    pos = torch.arange(n)
    bias = -slopes[:, None, None] * (pos[None, :] - pos[:, None]).abs() + (1.0 - am[:, None, None, :].to(x.dtype)) * -10000.0
    for i in range(c["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}."
        qkv = F.linear(x, t[p + "attention.self.Wqkv.weight"], t[p + "attention.self.Wqkv.bias"]).view(*ids.shape, 3, heads, hd)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        att = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5 + bias, -1) @ v
        att = F.linear(att.transpose(1, 2).reshape(x.shape), t[p + "attention.output.dense.weight"], t[p + "attention.output.dense.bias"])
        x = ln(att + x, p + "attention.output.LayerNorm")
        gated, plain = F.linear(x, t[p + "mlp.gated_layers.weight"]).chunk(2, dim=-1)
        x = ln(F.linear(F.gelu(gated) * plain, t[p + "mlp.wo.weight"], t[p + "mlp.wo.bias"]) + x, p + "mlp.layernorm")
    h = ln(F.gelu(F.linear(x, t["cls.predictions.transform.dense.weight"], t["cls.predictions.transform.dense.bias"])),
           "cls.predictions.transform.LayerNorm")
    return F.linear(h, t["cls.predictions.decoder.weight"], t["cls.predictions.decoder.bias"])


def test_dnabert2_release_imports_and_exports(tmp_path, capsys):
    """A checkpoint in DNABERT-2's released names and shapes (MosaicBERT, tokenizer.json next to it): logits equal
    the MosaicBERT forward restated above (fp64), the token-type row folded in (so the import is untied and
    model=dnabert2 is refused with one line until tie_embeddings=false), and the export loads in
    AutoModelForMaskedLM with the release's own tokenizer."""
    import random

    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from glmtrain.convert import ConvertError, init_from_released
    from glmtrain.convert.__main__ import main
    from glmtrain.models import build_model
    from glmtrain.tokenizers import build_tokenizer, train_bpe

    rel = tmp_path / "DNABERT-2-117M"
    rel.mkdir()
    rng = random.Random(0)
    train_bpe(("".join(rng.choice("ACGT") for _ in range(2000)) for _ in range(30)), vocab_size=96, out=str(rel / "tokenizer.json"))
    c = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "intermediate_size": 512, "vocab_size": 96, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
         "alibi_starting_size": 512, "type_vocab_size": 2, "pad_token_id": 0, "hidden_dropout_prob": 0.1,
         "auto_map": {"AutoModelForMaskedLM": "bert_layers.BertForMaskedLM"}}
    (rel / "config.json").write_text(json.dumps(c))
    g = torch.Generator().manual_seed(0)
    shapes = {"bert.embeddings.word_embeddings.weight": (96, 128), "bert.embeddings.token_type_embeddings.weight": (2, 128),
              "cls.predictions.transform.dense.weight": (128, 128), "cls.predictions.decoder.bias": (96,)}
    for n in ("bert.embeddings.LayerNorm", "cls.predictions.transform.LayerNorm"):
        shapes.update({f"{n}.weight": (128,), f"{n}.bias": (128,)})
    shapes["cls.predictions.transform.dense.bias"] = (128,)
    for i in range(2):
        p = f"bert.encoder.layer.{i}."
        shapes.update({p + "attention.self.Wqkv.weight": (384, 128), p + "attention.self.Wqkv.bias": (384,),
                       p + "attention.output.dense.weight": (128, 128), p + "attention.output.dense.bias": (128,),
                       p + "mlp.gated_layers.weight": (1024, 128), p + "mlp.wo.weight": (128, 512), p + "mlp.wo.bias": (128,)})
        for n in ("attention.output.LayerNorm", "mlp.layernorm"):
            shapes.update({f"{p}{n}.weight": (128,), f"{p}{n}.bias": (128,)})
    t = {k: 0.1 * torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    for k in t:
        if "LayerNorm.weight" in k or "layernorm.weight" in k:
            t[k] += 1.0
    t["cls.predictions.decoder.weight"] = t["bert.embeddings.word_embeddings.weight"]  # tied, stored twice
    save_file({k: v.float().contiguous().clone() for k, v in t.items()}, rel / "model.safetensors")
    t = {k: v.float().double() for k, v in t.items()}  # the values as stored

    tok = build_tokenizer({"kind": "bpe", "vocab_size": 96, "add_cls": True, "add_sep": True, "path": str(rel / "tokenizer.json")})
    seq = "".join(rng.choice("ACGT") for _ in range(300))
    x = torch.as_tensor(np.stack([tok.encode_window(seq)[0]] * 2))
    am = torch.ones_like(x)
    x[1, -6:], am[1, -6:] = tok.pad_id, 0
    real = am.bool()
    want = _mosaic_bert_logits(t, c, x, am)

    out = tmp_path / "imported"
    assert main(["import", "transformer", str(rel), str(out)]) == 0
    text = capsys.readouterr().out
    assert "token-type row 0 folded into the input embedding" in text and "model.tie_embeddings=false" in text
    imp = load_released(rel)
    assert imp.layout == "dnabert2-hf" and imp.tokenizer["path"] == str(rel / "tokenizer.json")
    model = build_imported_model(imp, dtype=torch.float64)[0]
    with torch.no_grad():
        got = model(x, am)
    # fp64 maths; the folded embedding (word + type-0 row) is rounded to fp32 once, as it is stored: ~3e-8
    assert float((got[real] - want[real]).norm() / want[real].norm()) < 1e-6
    hf = AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True).eval()
    assert AutoTokenizer.from_pretrained(out, trust_remote_code=True)(seq)["input_ids"] == x[0].tolist()
    with torch.no_grad():
        exported = hf(input_ids=x, attention_mask=am).logits.double()
    assert float((exported[real] - want[real]).norm() / want[real].norm()) < 1e-5
    run = compose_run(["model=dnabert2", "objective=mlm"]).model
    with pytest.raises(ConvertError, match=r"model\.tie_embeddings=True, but .* was published with False") as e:
        init_from_released(rel, build_model(run, tok.vocab_size))
    assert "\n" not in str(e.value)
    untied = compose_run(["model=dnabert2", "objective=mlm", "model.tie_embeddings=false", "model.tokenizer.vocab_size=96"]).model
    target = build_model(untied, tok.vocab_size).double().eval()
    init_from_released(rel, target, say=lambda _: None)
    with torch.no_grad():
        assert float((target(x, am)[real] - want[real]).norm() / want[real].norm()) < 1e-6
    # a run whose BPE vocabulary is its own (trained on its data), not the release's: refused, not silently wrong
    own = tmp_path / "own-tokenizer.json"
    train_bpe(("".join(rng.choice("ACGT") for _ in range(2000)) for _ in range(30)), vocab_size=96, out=str(own))
    run_like = torch.nn.Module()
    run_like.model = target
    run_like.tokenizer = build_tokenizer({"kind": "bpe", "vocab_size": 96, "path": str(own)})
    with pytest.raises(ConvertError, match=r"BPE vocabulary .* is not the release's .*set model\.tokenizer\.path="):
        init_from_released(rel, run_like)


def test_every_family_has_an_exporter_and_every_import_layout_is_listed(capsys):
    """A new family without a Hugging Face exporter fails here, not in a user's hands."""
    from glmtrain.convert import exporters, layouts
    from glmtrain.convert.__main__ import main
    from glmtrain.models import family_names

    assert set(family_names()) <= set(exporters())
    assert main(["layouts"]) == 0
    text = capsys.readouterr().out
    for name in ("hyenadna", "hyenadna-hf", "evo2-vortex", "esm-hf", "dnabert2-hf", "caduceus-hf", "gpt-neox", "glmtrain-hf"):
        assert name in layouts() and f"  {name} " in text
