"""Transformer encoders (issue 9): tokenizers as published, padding masks, published shapes, HF parity.

Each model config is loaded through the same path a run takes (Hydra compose -> validate -> GLMModule).
Comparisons against code no one here wrote: ``transformers.EsmTokenizer`` (NT's k-mer ids),
``transformers.EsmForMaskedLM`` (NT-v1 / ESM logits, both conversion directions, an exported directory
loaded back by ``AutoModelForMaskedLM`` / ``AutoTokenizer``), HF ``tokenizers`` (BPE).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from glmtrain.config import ConfigError
from glmtrain.models import build_model, config_class
from glmtrain.objectives import MaskedLM
from glmtrain.tokenizers import BpeTokenizer, build_tokenizer, main as tokenizers_main, train_bpe
from tests._util import compose_run

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
NT_REF = "ATTCCGATTCCGATTCCAACGGATNATTCC"
NT_IDS = [3, 367, 367, 364, 757, 4104, 4100, 4101, 4101, 4102, 4102]
TINY = ["nt_v2", "nt_v1", "dnabert2", "dnabert1", "generator"]


def load(name: str):
    raw = OmegaConf.load(CONF / f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(config_class(raw.family)), raw))


def _random_dna(rng: random.Random, n: int, n_rate: float = 0.05) -> str:
    return "".join("N" if rng.random() < n_rate else rng.choice("ACGT") for _ in range(n))


# ------------------------------------------------------------------------------------------- point 1
def test_nt_tokenizer_on_the_path_every_run_takes(tmp_path):
    """model=nt_v2 -> validate -> GLMModule: NT's ids with <cls>, 4,107 ids, 4,112 embedding rows."""
    from glmtrain.data.stream import WindowEncoder
    from glmtrain.module import GLMModule

    run = compose_run(["model=nt_v2", "objective=mlm", f"run_dir={tmp_path}"])
    module = GLMModule(run)
    tok = module.tokenizer
    assert tok.n_tokens == 4107 and tok.vocab_size == 4112  # vocabulary vs embedding rows (padded to 8)
    assert module.model.embed.num_embeddings == 4112 and module.model.lm_head.out_features == 4112
    assert set(range(4107, 4112)) <= tok.special_ids  # padding rows: never an input, never a label
    ids, w = WindowEncoder(run.data, tok)(np.frombuffer(NT_REF.encode(), dtype=np.uint8))
    n = len(NT_IDS)
    assert ids[:n].tolist() == NT_IDS and (ids[n:] == tok.pad_id).all()
    assert w[0] == 0 and w[5] == 0  # <cls> and the N token carry no loss
    assert [tok.id_to_token(i) for i in NT_IDS[1:5]] == ["ATTCCG", "ATTCCG", "ATTCCA", "ACGGAT"]


def test_nt_ids_equal_huggingface_esm_tokenizer(tmp_path):
    """NT's Hugging Face tokenizer is an EsmTokenizer over NT's vocab.txt; ours must give the same ids."""
    from transformers import EsmTokenizer

    tok = build_tokenizer({"kind": "kmer", "k": 6, "add_cls": True})
    (tmp_path / "vocab.txt").write_text("\n".join(tok.vocab()) + "\n")
    hf = EsmTokenizer(str(tmp_path / "vocab.txt"), eos_token=None)
    assert hf(NT_REF)["input_ids"] == NT_IDS
    rng = random.Random(0)
    for _ in range(300):
        s = _random_dna(rng, rng.randint(0, 40), n_rate=0.1)
        assert hf(s)["input_ids"] == tok.encode_window(s)[0].tolist(), s


# ------------------------------------------------------------------------------------------- point 2
@pytest.mark.parametrize("name", TINY)
def test_padding_changes_no_real_position(name):
    """Appending padding (and its mask) leaves every real token's logits unchanged (< 1e-6)."""
    torch.manual_seed(0)
    cfg = load(name)
    tok = build_tokenizer(cfg.tokenizer) if cfg.tokenizer.kind != "bpe" else None
    rows = tok.vocab_size if tok else 4096
    model = build_model(cfg, rows).double().eval()
    lengths = [23, 17, 9]
    x = torch.randint(5, 4000, (3, 23))
    mask = torch.arange(23)[None, :] < torch.tensor(lengths)[:, None]
    x = x.masked_fill(~mask, 1)
    with torch.no_grad():
        ref = [model(x[i : i + 1, :n])[0] for i, n in enumerate(lengths)]  # each sequence alone, unpadded
        padded = torch.cat([x, torch.full((3, 13), 1)], 1)
        pmask = torch.cat([mask, torch.zeros(3, 13, dtype=torch.bool)], 1)
        got = model(padded, pmask)
    for i, n in enumerate(lengths):
        err = float((got[i, :n] - ref[i]).abs().max() / ref[i].abs().max())
        assert err < 1e-6, (name, i, err)


def test_padded_positions_carry_no_loss_and_change_no_loss():
    from glmtrain.objectives import Prepared

    torch.manual_seed(0)
    cfg = load("nt_v2")
    tok = build_tokenizer(cfg.tokenizer)
    model = build_model(cfg, tok.vocab_size).double()
    obj = MaskedLM(tok)
    x = torch.randint(4, 4100, (2, 48))
    x[:, 0] = tok.cls_id
    x[1, 30:] = tok.pad_id
    mask = x != tok.pad_id
    prep = obj.prepare(x, mask.float(), torch.Generator().manual_seed(1))
    assert (prep.weights[~mask] == 0).all() and (prep.inputs[~mask] == tok.pad_id).all()
    with torch.no_grad():
        loss_padded, _ = obj.loss(model(prep.inputs, mask), prep)
    # the same masked sequences with the padding columns removed (sample 1 alone, sample 0 alone)
    total, weight = 0.0, 0.0
    with torch.no_grad():
        for i, n in ((0, 48), (1, 30)):
            p = Prepared(prep.inputs[i : i + 1, :n], prep.labels[i : i + 1, :n], prep.weights[i : i + 1, :n], False)
            loss_i, st = obj.loss(model(p.inputs), p)
            total, weight = total + float(loss_i) * float(st["weight"]), weight + float(st["weight"])
    assert weight >= 4 and abs(float(loss_padded) / (total / weight) - 1) < 1e-6  # the loss is computed in fp32


def test_kmer_windows_are_cut_to_the_token_budget_and_padded():
    from glmtrain.config import validate_data
    from glmtrain.data.stream import WindowEncoder

    tok = build_tokenizer({"kind": "kmer", "add_cls": True})
    data = validate_data({"sources": [{"path": "x.fa"}], "window": 60, "window_tokens": 12})
    enc = WindowEncoder(data, tok)
    clean = "ACGTAC" * 10  # 10 k-mers + <cls> = 11 tokens: padded to 12
    ids, w = enc(np.frombuffer(clean.encode(), dtype=np.uint8))
    assert ids.tolist() == [3] + tok.encode(clean).tolist() + [tok.pad_id]
    assert w.tolist() == [0] + [1] * 10 + [0]
    with_n = "ACGTNC" * 10  # each N splits its run into single-base tokens: many more tokens, cut at 12
    ids, w = enc(np.frombuffer(with_n.encode(), dtype=np.uint8))
    assert len(ids) == 12 and ids[0] == 3 and tok.pad_id not in ids.tolist()
    assert ids[1:].tolist() == tok.encode(with_n)[:11].tolist()


def test_bpe_batches_are_trimmed_to_their_longest_sample():
    from glmtrain.data.stream import trim_padding

    ids = torch.full((2, 40), 3)
    ids[0, :13], ids[1, :5] = 7, 7
    batch = {"input_ids": ids, "loss_weight": (ids != 3).float(), "attention_mask": ids != 3}
    out = trim_padding(batch, pad_id=3)
    assert out["input_ids"].shape == (2, 16) and out["attention_mask"].sum() == 18


# ------------------------------------------------------------------------------------------- point 3 / 5
# Published sizes. NT-v2: the 50M checkpoint's parameter count as stated for its config.json (12 x 512,
# 55,904,972); 100M/250M/500M: the released model.safetensors sizes (392 MB, 941 MB, 1.99 GB) / 4 bytes.
# The HF checkpoints hold two tensors this layout does not need: an absolute position table
# (max_position_embeddings=2050 rows) that the rotary models never read, and ESM's contact-prediction
# regression (layers x heads + 1). DNABERT-2: the 117M of its name (zhihan1996/DNABERT-2-117M).
PUBLISHED = {  # name: (layers, d, heads, ffn, published parameters, exact?)
    "nt_v2_50m": (12, 512, 16, 2048, 55_904_972, True),
    "nt_v2_100m": (22, 512, 16, 2048, 392e6 / 4, False),
    "nt_v2_250m": (24, 768, 16, 3072, 941e6 / 4, False),
    "nt_v2_500m": (29, 1024, 16, 4096, 1.99e9 / 4, False),
    "dnabert2_117m": (12, 768, 12, 3072, 117e6, False),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_shapes_and_parameter_counts(name):
    cfg = load(name)
    tok = build_tokenizer(cfg.tokenizer)
    with torch.device("meta"):
        model = build_model(cfg, tok.vocab_size)
    layers, d, heads, ffn, published, exact = PUBLISHED[name]
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.resolved_ffn_dim()) == (layers, d, heads, ffn)
    n = model.num_params()
    assert abs(n / published - 1) < 0.02, (name, n, published)
    assert abs(n / cfg.published_params - 1) < 0.02
    if name.startswith("nt_v2"):
        assert tok.n_tokens == 4107 and cfg.mlp == "swiglu" and cfg.biases() == (True, False, False)
        assert not cfg.tie_embeddings and cfg.position == "rope" and cfg.norm_position == "pre"
        # the HF checkpoint = this model with NT's 4,107 rows + the unused position table + contact head
        hf_layout = n - (tok.vocab_size - 4107) * (2 * d + 1) + 2050 * d + layers * heads + 1
        assert hf_layout == published if exact else abs(hf_layout / published - 1) < 0.003
    else:
        assert cfg.position == "alibi" and cfg.norm_position == "post" and cfg.mlp == "geglu" and cfg.tie_embeddings


def test_encoders_refuse_next_token_prediction():
    for name in ("nt_v2", "dnabert2", "dnabert1"):
        with pytest.raises(ConfigError, match="objective=clm needs a causal model"):
            compose_run([f"model={name}", "objective=clm"])


# ------------------------------------------------------------------------------------------- point 4
def _esm_model(position: str, tie: bool = False):
    from glmtrain.models.transformer import Transformer, TransformerConfig

    cfg = TransformerConfig(d_model=32, n_layers=2, n_heads=4, ffn_dim=64, causal=False, norm_eps=1e-12, mlp="gelu",
                            gelu="exact", position=position, max_seq_len=40 if position == "learned" else 0,
                            tie_embeddings=tie, head="mlm", token_dropout=True)
    tok = build_tokenizer({"kind": "kmer", "add_cls": True})
    torch.manual_seed(0)
    model = Transformer(cfg, tok.vocab_size).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # random weights everywhere (biases, norms too): nothing matches by accident
    return cfg, tok, model


def _batch(tok):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(4, 4100, (3, 30), generator=g)
    x[:, 0] = tok.cls_id
    x[0, 5], x[1, 7:9] = tok.mask_id, tok.mask_id  # token dropout sees <mask>
    am = torch.ones_like(x)
    am[2, 20:], x[2, 20:] = 0, tok.pad_id
    return x, am


def _rel(a, b, am):
    real = am.bool()
    return float((a[real] - b[real]).norm() / b[real].norm())


@pytest.mark.parametrize("position", ["learned", "rope"], ids=["nt_v1-absolute", "rotary"])
def test_weights_convert_both_ways_with_esm_for_masked_lm(position):
    from transformers import EsmForMaskedLM

    from glmtrain.convert.nt import esm_config, esm_to_glmtrain, glmtrain_to_esm

    cfg, tok, model = _esm_model(position)
    hf = EsmForMaskedLM(esm_config(cfg, tok.n_tokens)).double().eval()
    missing, unexpected = hf.load_state_dict(glmtrain_to_esm(cfg, model.state_dict(), tok.n_tokens), strict=False)
    assert not unexpected and all(k.endswith("inv_freq") for k in missing)
    x, am = _batch(tok)
    with torch.no_grad():
        ours = model(x, am)[..., : tok.n_tokens]
        theirs = hf(input_ids=x, attention_mask=am).logits
        assert _rel(ours, theirs, am) < 1e-5
        # and back: HF weights (randomly re-drawn) -> glmtrain
        for p in hf.parameters():
            p.normal_(0, 0.2)
        back = type(model)(cfg, tok.vocab_size).double().eval()
        back.load_state_dict(esm_to_glmtrain(hf.state_dict(), cfg, tok.vocab_size))
        assert _rel(back(x, am)[..., : tok.n_tokens], hf(input_ids=x, attention_mask=am).logits, am) < 1e-5


def test_export_directory_loads_back_in_transformers(tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from glmtrain.convert.nt import export_nt, import_nt

    cfg, tok, model = _esm_model("learned")
    model = model.float()
    export_nt(cfg, model.state_dict(), tok, tmp_path)
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    hf, hf_tok = AutoModelForMaskedLM.from_pretrained(tmp_path).eval(), AutoTokenizer.from_pretrained(tmp_path)
    ids = hf_tok(NT_REF, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == NT_IDS
    with torch.no_grad():
        ref = model(ids)[..., : tok.n_tokens]
        assert float((hf(input_ids=ids).logits - ref).norm() / ref.norm()) < 1e-5
        cfg2, state = import_nt(tmp_path)
        again = type(model)(cfg2, tok.vocab_size).eval()
        again.load_state_dict(state)
        assert float((again(ids)[..., : tok.n_tokens] - ref).norm() / ref.norm()) < 1e-6


def test_nt_v2_gated_mlp_is_refused_for_esm_with_one_line():
    from glmtrain.convert.nt import ConversionError, esm_config

    with pytest.raises(ConversionError, match=r"model\.mlp='swiglu'.*gated MLP") as e:
        esm_config(load("nt_v2"), 4107)
    assert "\n" not in str(e.value)


def _nt_v2_as_esm(conf):
    """``EsmForMaskedLM`` with each MLP replaced by NT-v2's released one (the InstaDeepAI repositories'
    ``modeling_esm.py``, ``add_bias_fnn: false``): ``intermediate.dense`` is one bias-free Linear d -> 2 ffn
    whose output halves give silu(first) * second, ``output.dense`` has no bias.  Everything else
    (embeddings, rotary attention, norms, MLM head) stays transformers' own code.  This is the class NT-v2
    exports load with (``modeling_glmtrain.NtEsmForMaskedLM``)."""
    from glmtrain.convert._hf_modeling import NtEsmForMaskedLM

    return NtEsmForMaskedLM(conf).double().eval()


def test_nt_v2_layout_converts_both_ways_and_round_trips_through_its_directory(tmp_path):
    """NT-v2's released layout (issue 12 imports real checkpoints through this): logits equal to
    transformers' ESM code running NT-v2's gated MLP, the released checkpoint's extra tensors dropped,
    an unknown tensor refused, export -> import unchanged."""
    from transformers import AutoTokenizer

    from glmtrain.convert.nt import ConversionError, esm_config, esm_to_glmtrain, export_nt, glmtrain_to_esm, import_nt
    from glmtrain.models.transformer import Transformer, TransformerConfig

    cfg = TransformerConfig(d_model=32, n_layers=2, n_heads=4, ffn_dim=48, causal=False, norm_eps=1e-12, mlp="swiglu",
                            mlp_bias=False, gelu="exact", position="rope", head="mlm")
    tok = build_tokenizer({"kind": "kmer", "add_cls": True})
    torch.manual_seed(0)
    model = Transformer(cfg, tok.vocab_size).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    hf = _nt_v2_as_esm(esm_config(cfg, tok.n_tokens, hf_class=False))
    missing, unexpected = hf.load_state_dict(glmtrain_to_esm(cfg, model.state_dict(), tok.n_tokens), strict=False)
    assert not unexpected and all(k.endswith("inv_freq") for k in missing)
    x, am = _batch(tok)
    with torch.no_grad():
        ref = model(x, am)[..., : tok.n_tokens]
        assert _rel(ref, hf(input_ids=x, attention_mask=am).logits, am) < 1e-5
        for p in hf.parameters():
            p.normal_(0, 0.2)
        theirs = hf(input_ids=x, attention_mask=am).logits
        released = {**hf.state_dict(), "esm.embeddings.position_embeddings.weight": torch.zeros(2050, 32, dtype=torch.double),
                    "esm.contact_head.regression.weight": torch.zeros(1, 8), "esm.contact_head.regression.bias": torch.zeros(1)}
        back = Transformer(cfg, tok.vocab_size).double().eval()
        back.load_state_dict(esm_to_glmtrain(released, cfg, tok.vocab_size))
        assert _rel(back(x, am)[..., : tok.n_tokens], theirs, am) < 1e-5
        with pytest.raises(ConversionError, match=r"no glmtrain counterpart.*esm\.encoder\.layer\.2\."):
            esm_to_glmtrain({**released, "esm.encoder.layer.2.LayerNorm.weight": torch.ones(32)}, cfg, tok.vocab_size)
        export_nt(cfg, back.state_dict(), tok, tmp_path)
        conf = json.loads((tmp_path / "config.json").read_text())
        assert conf["add_bias_fnn"] is False and conf["position_embedding_type"] == "rotary" and conf["vocab_size"] == 4107
        assert AutoTokenizer.from_pretrained(tmp_path)(NT_REF)["input_ids"] == NT_IDS
        cfg2, state = import_nt(tmp_path)
        assert (cfg2.mlp, cfg2.mlp_bias, cfg2.position, cfg2.ffn_dim) == ("swiglu", False, "rope", 48)
        again = Transformer(cfg2, tok.vocab_size).double().eval()
        again.load_state_dict(state)
        assert _rel(again(x, am)[..., : tok.n_tokens], theirs, am) < 1e-5


# ------------------------------------------------------------------------------------------- point 5
@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    rng = random.Random(0)
    motifs = ["TATAAA", "CGCGCG", "AATTGG", "GGATCC"]
    seqs = ["".join(rng.choice(motifs) if rng.random() < 0.5 else rng.choice("ACGTN") for _ in range(300)) for _ in range(200)]
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_bpe(seqs, vocab_size=256, out=str(path))
    return path, seqs


def test_bpe_layout_roundtrip_and_bases(bpe_file):
    path, seqs = bpe_file
    tok = build_tokenizer({"kind": "bpe", "path": str(path), "vocab_size": 256, "add_cls": True, "add_sep": True})
    assert isinstance(tok, BpeTokenizer) and tok.vocab_size == 256 and tok.n_tokens <= 256
    assert [tok.unk_id, tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id] == [0, 1, 2, 3, 4]
    for s in seqs[:20]:
        ids, n_body = tok.encode_window(s)
        assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id and n_body == len(ids) - 2
        assert tok.decode(ids) == s
        assert tok.bases_per_id[ids].sum() == len(s)
    assert len(tok.encode(seqs[0])) < len(seqs[0]) / 2  # merges learned (motifs are frequent)
    assert not any("N" in tok.vocab()[i] for i in tok.acgt_ids)  # tokens holding N never carry loss


def test_train_bpe_command_writes_a_vocabulary(tmp_path, capsys):
    out = tmp_path / "tok.json"
    rc = tokenizers_main(["train-bpe", "data=sample", "data.window=256", f"out={out}", "vocab_size=64", "train_bases=20000"])
    assert rc == 0 and out.is_file() and "64 tokens" in capsys.readouterr().out
    assert tokenizers_main(["train-bpe", "data=sample"]) == 2  # no out=


def test_bpe_mlm_masks_15_percent_of_tokens_80_10_10(bpe_file):
    path, _ = bpe_file
    tok = build_tokenizer({"kind": "bpe", "path": str(path), "vocab_size": 256})
    ids = torch.as_tensor(np.random.default_rng(0).choice(tok.acgt_ids, size=(64, 2048)))
    prep = MaskedLM(tok).prepare(ids, None, torch.Generator().manual_seed(0))
    sel = prep.weights > 0
    assert abs(float(sel.float().mean()) - 0.15) < 0.005
    masked = (prep.inputs == tok.mask_id) & sel
    kept = (prep.inputs == ids) & sel
    assert abs(float(masked.sum() / sel.sum()) - 0.8) < 0.01
    assert abs(float(kept.sum() / sel.sum()) - 0.1) < 0.01  # (+ random replacements that drew the same id)


# ------------------------------------------------------------------------------------------- point 9
def test_dnabert1_spans_hide_bases_from_the_neighbouring_kmers():
    """Every position that shows [MASK] lies in a run of masked k-mers that contains at least one base
    no visible (unmasked, true) k-mer covers: the masked base cannot be copied from the neighbours."""
    tok = build_tokenizer({"kind": "kmer_overlap", "k": 6})
    k = tok.k
    rng = random.Random(0)
    seqs = [_random_dna(rng, 300, n_rate=0.0) for _ in range(16)]
    ids = torch.as_tensor(np.stack([tok.encode(s) for s in seqs]))
    prep = MaskedLM(tok).prepare(ids, None, torch.Generator().manual_seed(0))
    sel = prep.weights > 0
    frac = float(sel.float().mean())
    assert 0.12 < frac < 0.18, frac
    checked = 0
    for b in range(len(seqs)):
        visible = set()
        for j in range(ids.shape[1]):
            if not sel[b, j]:
                visible.update(range(j, j + k))  # bases shown by this true k-mer
        for j in range(ids.shape[1]):
            if prep.inputs[b, j] == tok.mask_id:
                hidden = [p for p in range(j, j + k) if p not in visible]
                assert hidden, (b, j)
                checked += 1
    assert checked > 300
    # the 80/10/10 decision is taken per run: a run is all [MASK], all kept or all random
    runs_mixed = 0
    for b in range(len(seqs)):
        j = 0
        while j < ids.shape[1]:
            if sel[b, j]:
                e = j
                while e < ids.shape[1] and sel[b, e]:
                    e += 1
                kinds = {"mask" if prep.inputs[b, i] == tok.mask_id else ("keep" if prep.inputs[b, i] == ids[b, i] else "rand")
                         for i in range(j, e)}
                runs_mixed += len(kinds - {"keep"}) > 1 or ("mask" in kinds and "keep" in kinds)
                j = e
            else:
                j += 1
    assert runs_mixed == 0


def test_overlapping_kmer_tokens_follow_the_sequence():
    tok = build_tokenizer({"kind": "kmer_overlap", "k": 6, "add_cls": True, "add_sep": True})
    s = "ACGTACGTTA"
    ids, n = tok.encode_window(s)
    assert n == len(s) - 5 and ids[0] == tok.cls_id and ids[-1] == tok.sep_id
    assert [tok.kmer(int(i)) for i in ids[1:-1]] == [s[i : i + 6] for i in range(n)]
    assert tok.decode(ids) == s
    assert tok.encode("ACGTNACGTAC").tolist()[:5] == [tok.unk_id] * 5  # every 6-mer holding N
    assert tok.n_tokens == 4101 and tok.vocab_size == 4104


def test_model_configs_validate_their_choices():
    with pytest.raises(ConfigError, match=r"model\.position='sinusoidal': allowed values are rope, alibi, learned, none"):
        compose_run(["model=nt_v2", "objective=mlm", "model.position=sinusoidal"])
    with pytest.raises(ConfigError, match="model.max_seq_len=1000"):
        compose_run(["model=nt_v1", "objective=mlm", "data.window_tokens=1024"])
    assert re.search("sequence_parallel", str(_err(["model=dnabert1", "objective=mlm", "strategy=tp", "trainer.devices=2",
                                                     "trainer.accelerator=cpu"])))


def _err(overrides):
    try:
        compose_run(overrides)
    except ConfigError as e:
        return e
    return None
