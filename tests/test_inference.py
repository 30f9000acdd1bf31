"""Log-likelihood scoring and autoregressive generation for the causal families."""

from __future__ import annotations

import pytest
import torch

from glmtrain.inference import generate, generate_dna, score_sequences, sequence_log_likelihood, token_log_probs
from glmtrain.models.evo2 import Evo2, Evo2Config
from glmtrain.models.hyena import HyenaConfig, HyenaDNA
from glmtrain.models.transformer import Transformer, TransformerConfig
from glmtrain.tokenizers import TokenizerConfig, build_tokenizer


def make(family: str):
    torch.manual_seed(0)
    if family == "hyena":
        cfg = HyenaConfig(d_model=16, n_layers=2, filter_order=16, max_seq_len=64, tokenizer=TokenizerConfig(kind="char"))
        return HyenaDNA(cfg, 16), build_tokenizer({"kind": "char"})
    if family == "evo2":
        cfg = Evo2Config(d_model=32, pattern="SDH*", n_heads=4, mlp_dim=64, se_filter_groups=4, mr_filter_groups=4,
                         mr_filter_length=16, tokenizer=TokenizerConfig(kind="byte"))
        return Evo2(cfg, 512), build_tokenizer({"kind": "byte"})
    cfg = TransformerConfig(d_model=16, n_layers=1, n_heads=2)
    return Transformer(cfg, 16), build_tokenizer({"kind": "char"})


FAMILIES = ["hyena", "evo2", "transformer"]


@pytest.mark.parametrize("family", FAMILIES)
def test_temperature_to_zero_equals_greedy(family):
    model, tok = make(family)
    prompt = torch.as_tensor(tok.encode("ACGTTGCA"))[None].repeat(2, 1)
    greedy = generate(model, prompt, 12, temperature=0.0)
    g = torch.Generator().manual_seed(0)
    cold = generate(model, prompt, 12, temperature=1e-6, generator=g)
    assert torch.equal(greedy, cold)
    assert torch.equal(generate(model, prompt, 12, temperature=1.0, top_k=1), greedy)
    # greedy picks the argmax of the recomputed logits at every step
    logits = model.eval()(greedy[:, :-1])
    assert torch.equal(logits[:, prompt.shape[1] - 1 :].argmax(-1), greedy[:, prompt.shape[1] :])


@pytest.mark.parametrize("family", ["hyena", "evo2"])
def test_sampling_respects_allowed_ids_and_seed(family):
    model, tok = make(family)
    prompt = torch.as_tensor(tok.encode("ACGT"))[None]
    allowed = tok.nucleotide_ids.tolist()
    a = generate(model, prompt, 30, temperature=1.5, top_k=3, allowed_ids=allowed, generator=torch.Generator().manual_seed(1))
    b = generate(model, prompt, 30, temperature=1.5, top_k=3, allowed_ids=allowed, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert set(a[0, 4:].tolist()) <= set(allowed)
    s = generate_dna(model, tok, "ACGT", 10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert len(s) == 14 and set(s) <= set("ACGT")


def test_eos_is_sticky():
    model, tok = make("hyena")
    prompt = torch.as_tensor(tok.encode("ACGT"))[None]
    out = generate(model, prompt, 8, temperature=0.0, eos_id=int(generate(model, prompt, 1, temperature=0.0)[0, -1]))
    assert len(set(out[0, 4:].tolist())) == 1


@pytest.mark.parametrize("family", ["hyena", "evo2"])
def test_log_likelihood_matches_manual_and_ignores_right_padding(family):
    model, tok = make(family)
    model = model.double()
    seqs = ["ACGTACGGT", "TTGACA"]
    ids = torch.as_tensor(tok.encode_batch(seqs))
    ll = sequence_log_likelihood(model, ids, pad_id=tok.pad_id)
    for i, s in enumerate(seqs):
        single = torch.as_tensor(tok.encode(s))[None]
        logp = torch.log_softmax(model.eval()(single)[0, :-1], -1)
        manual = logp.gather(-1, single[0, 1:, None]).sum()
        assert torch.allclose(ll[i].double(), manual, atol=1e-5)
    lp = token_log_probs(model, ids)
    assert lp.shape == (2, ids.shape[1] - 1)
    manual = torch.log_softmax(model.eval()(ids)[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(lp.double(), manual.double(), rtol=0, atol=1e-5)  # per token, at the label's id
    mean = sequence_log_likelihood(model, ids, pad_id=tok.pad_id, reduction="mean")
    assert torch.allclose(mean[1], ll[1] / (len(seqs[1]) - 1))
    scored = score_sequences(model, tok, seqs, batch_size=1)
    assert [r["tokens"] for r in scored] == [8, 5]
    assert scored[0]["log_likelihood"] == pytest.approx(float(ll[0]), abs=1e-4)


def test_rejects_non_causal_models():
    cfg = TransformerConfig(d_model=16, n_layers=1, n_heads=2, causal=False)
    model = Transformer(cfg, 16)
    with pytest.raises(ValueError, match="causal"):
        generate(model, torch.tensor([[7, 8]]), 2)
