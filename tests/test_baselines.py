import math

import numpy as np
import torch

from glmtrain.baselines import MarkovModel
from glmtrain.objectives import NextToken
from glmtrain.tokenizers import CharTokenizer


def _arr(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), dtype=np.uint8)


def test_order0_is_the_composition_entropy():
    rng = np.random.default_rng(0)
    p = np.array([0.4, 0.1, 0.2, 0.3])
    train = [_arr("".join(rng.choice(list("ACGT"), size=20000, p=p)))]
    held = [_arr("".join(rng.choice(list("ACGT"), size=20000, p=p)))]
    bpb = MarkovModel(0).fit(train).bits_per_base(held)
    entropy = -(p * np.log2(p)).sum()
    assert abs(bpb - entropy) < 0.02


def test_order2_learns_a_deterministic_pattern():
    train = [_arr("ACGTTGCA" * 500)]
    held = [_arr("ACGTTGCA" * 50)]
    assert MarkovModel(2).fit(train).bits_per_base(held) < 0.05
    assert MarkovModel(0).fit(train).bits_per_base(held) > 1.9


def test_scores_exactly_the_positions_the_model_scores():
    """Same held-out positions as NextToken: every base but the window's first, N excluded."""
    window = "ACGTNNACGTacgtN" + "GATTACA"
    _, count = MarkovModel(2).fit([_arr("ACGT" * 100)]).score([_arr(window)])
    tok = CharTokenizer()
    ids = torch.as_tensor(tok.encode(window))[None]
    w = torch.as_tensor([[0.0 if c in "Nn" else 1.0 for c in window]])
    prepared = NextToken(tok).prepare(ids, w)
    assert count == int((prepared.weights > 0).sum())


def test_uniform_when_untrained():
    bpb = MarkovModel(2).fit([]).bits_per_base([_arr("ACGTACGTAC")])
    assert math.isclose(bpb, 2.0, rel_tol=1e-9)


def test_each_baseline_is_reported_once():
    """MLM runs get Markov order 0 only; the token-unigram baseline is added where it is another model
    (multi-base tokens), and for a masked single base only when order 0 (the same model) is not asked for."""
    from types import SimpleNamespace as NS

    from glmtrain.train import _markov_orders, _unigram_wanted

    def run(obj, orders, unigram=True):
        return NS(objective=NS(name=obj), eval=NS(baselines=orders, unigram=unigram))

    assert _markov_orders(run("clm", [0, 2])) == [0, 2] and _markov_orders(run("mlm", [0, 2])) == [0]
    assert _unigram_wanted(run("mlm", [0, 2]), "kmer") and _unigram_wanted(run("clm", [0, 2]), "bpe")
    assert not _unigram_wanted(run("mlm", [0, 2]), "char") and _unigram_wanted(run("mlm", []), "char")
    assert not _unigram_wanted(run("clm", []), "char") and not _unigram_wanted(run("mlm", [], False), "kmer")
