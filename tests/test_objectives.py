import numpy as np
import torch

from glmtrain.objectives import MaskedLM, NextToken
from glmtrain.tokenizers import CharTokenizer, KmerTokenizer


def _batch(tok, n_seq, length, seed=0):
    rng = np.random.default_rng(seed)
    ids = torch.as_tensor(rng.choice(tok.nucleotide_ids, size=(n_seq, length)))
    ids[:, 0] = tok.cls_id  # specials and pads must never be selected
    ids[:, -7:] = tok.pad_id
    w = (ids != tok.pad_id).float()
    ids[:, 5] = tok.encode("N")[0]  # N: weight 0, never selected
    w[:, 5] = 0
    return ids, w


def test_mlm_proportions_over_a_million_positions():
    tok = CharTokenizer()
    obj = MaskedLM(tok)
    ids, w = _batch(tok, 1000, 1100)
    g = torch.Generator().manual_seed(0)
    p = obj.prepare(ids, w, g)
    maskable = (w > 0) & ~torch.isin(ids, torch.tensor(sorted(tok.special_ids)))
    n_maskable = int(maskable.sum())
    assert n_maskable >= 1_000_000
    selected = p.weights > 0
    assert not (selected & ~maskable).any()  # specials, pad and N never selected
    frac = selected.sum().item() / n_maskable
    assert abs(frac - 0.15) < 0.005
    n_sel = selected.sum().item()
    masked = (p.inputs == tok.mask_id) & selected
    changed = (p.inputs != ids) & selected & ~masked
    unchanged = (p.inputs == ids) & selected
    assert abs(masked.sum().item() / n_sel - 0.8) < 0.005
    # random replacements can hit the original base (1/4 of the time): count draws, not changes
    random_drawn = changed.sum().item() / 0.75
    assert abs(random_drawn / n_sel - 0.1) < 0.005
    assert abs((unchanged.sum().item() - changed.sum().item() / 3) / n_sel - 0.1) < 0.005
    assert not (p.inputs[~selected] != ids[~selected]).any()  # unselected inputs untouched
    assert torch.equal(p.labels[selected], ids[selected])


def test_mlm_random_replacements_are_never_special():
    for tok in (CharTokenizer(), KmerTokenizer(k=6)):
        obj = MaskedLM(tok, mask_prob=1.0, mask_token_prob=0.0, random_token_prob=1.0)
        ids, w = _batch(tok, 200, 600, seed=1)
        p = obj.prepare(ids, w, torch.Generator().manual_seed(1))
        replaced = p.inputs[p.weights > 0]
        assert torch.isin(replaced, torch.as_tensor(tok.nucleotide_ids)).all()
        assert not torch.isin(replaced, torch.tensor(sorted(tok.special_ids))).any()


def test_mlm_is_deterministic_given_generator():
    tok = CharTokenizer()
    ids, w = _batch(tok, 4, 64)
    a = MaskedLM(tok).prepare(ids, w, torch.Generator().manual_seed(5))
    b = MaskedLM(tok).prepare(ids, w, torch.Generator().manual_seed(5))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.weights, b.weights)


def test_next_token_shift_and_ignore():
    tok = CharTokenizer()
    ids = torch.tensor([[7, 8, 9, 11, 10, 4, 4]])
    w = torch.tensor([[1, 1, 1, 0, 1, 0, 0]], dtype=torch.float)
    p = NextToken(tok).prepare(ids, w)
    assert torch.equal(p.labels, ids[:, 1:])
    assert p.weights.tolist() == [[1, 1, 0, 1, 0, 0]]
    logits = torch.zeros(1, 7, tok.vocab_size)
    loss, stats = NextToken(tok).loss(logits, p)
    assert torch.isclose(loss, torch.log(torch.tensor(16.0)))
    assert stats["bases"].item() == 3 and stats["tokens"].item() == 3


def test_next_token_loss_uses_position_t_for_label_t_plus_1():
    tok = CharTokenizer()
    ids = torch.tensor([[7, 8, 9, 10]])
    p = NextToken(tok).prepare(ids, None)
    logits = torch.full((1, 4, tok.vocab_size), -30.0)
    for t in range(3):
        logits[0, t, ids[0, t + 1]] = 30.0  # perfect next-token prediction
    loss, _ = NextToken(tok).loss(logits, p)
    assert loss.item() < 1e-6
