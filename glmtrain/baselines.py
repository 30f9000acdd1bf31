"""Baselines for held-out bits per base: order-k Markov models over bases and a unigram model over tokens.

Fit on the training windows, scored on exactly the positions the model is scored
on: every unambiguous base (A, C, G, T) of a held-out window except the first,
predicted from the bases before it *within the same window*.  Near the start of
a window, or where N sits in the context, the model backs off to the longest
clean context available (order k-1, ..., 0).  Additive smoothing (alpha=0.5).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

_CODE = np.full(256, -1, dtype=np.int64)
for _i, _b in enumerate(b"ACGT"):
    _CODE[_b] = _i
    _CODE[_b + 32] = _i  # lowercase


def _codes(seq: np.ndarray) -> np.ndarray:
    return _CODE[np.asarray(seq, dtype=np.uint8)]


def _context_index(c: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """For positions t >= order: context id of c[t-order:t] and whether it (and c[t]) is clean."""
    n = len(c)
    if n <= order:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    ctx = np.zeros(n - order, dtype=np.int64)
    ok = c[order:] >= 0
    for j in range(order):
        part = c[j : n - order + j]
        ok &= part >= 0
        ctx = ctx * 4 + np.maximum(part, 0)
    return ctx, ok


class MarkovModel:
    def __init__(self, order: int, alpha: float = 0.5):
        self.order, self.alpha = order, alpha
        self.tables = [np.zeros((4**k, 4), dtype=np.float64) for k in range(order + 1)]

    def fit(self, seqs: Sequence[np.ndarray]) -> "MarkovModel":
        for s in seqs:
            c = _codes(s)
            for k in range(self.order + 1):
                ctx, ok = _context_index(c, k)
                nxt = c[k:]
                idx = ctx[ok] * 4 + nxt[ok]
                self.tables[k] += np.bincount(idx, minlength=4 ** (k + 1)).reshape(-1, 4)
        self.logp = [np.log((t + self.alpha) / (t + self.alpha).sum(1, keepdims=True)) for t in self.tables]
        return self

    def score(self, seqs: Sequence[np.ndarray]) -> tuple[float, int]:
        """(total nats, number of scored bases) over positions 1.. of every window."""
        nats, count = 0.0, 0
        for s in seqs:
            c = _codes(s)
            n = len(c)
            done = np.zeros(n, dtype=bool)
            done[0] = True  # the first base of a window has no context: not scored (as for the model)
            done |= c < 0  # N and ambiguous bases are not scored
            for k in range(self.order, -1, -1):
                ctx, ok = _context_index(c, k)
                pos = np.arange(k, n)
                use = ok & ~done[k:]
                if use.any():
                    nats -= self.logp[k][ctx[use], c[pos[use]]].sum()
                    count += int(use.sum())
                    done[pos[use]] = True
        return nats, count

    def bits_per_base(self, seqs: Sequence[np.ndarray]) -> float:
        nats, count = self.score(seqs)
        return nats / math.log(2) / max(count, 1)


def markov_baselines(train: Sequence[np.ndarray], held_out: Sequence[np.ndarray], orders: Sequence[int]) -> dict[int, float]:
    return {k: MarkovModel(k).fit(train).bits_per_base(held_out) for k in orders}


def unigram_logp(counts: np.ndarray, scorable: np.ndarray, alpha: float = 0.5):
    """log p(token) of a unigram model over the tokens a run scores (``scorable`` ids), fit on ``counts``
    (token counts of the training windows, from the run's own tokenizer), additive smoothing ``alpha``.

    Scored on the held-out positions the model is scored on and divided by the bases those tokens cover,
    it is the context-free reference for any tokenizer: a 6-mer model must beat the 6-mer frequencies,
    a BPE model the BPE token frequencies.  Ids that are never scored get a finite floor.
    """
    import torch

    c = np.zeros(len(counts), dtype=np.float64)
    c[scorable] = counts[scorable] + alpha
    logp = np.full(len(counts), -1e4, dtype=np.float64)
    logp[scorable] = np.log(c[scorable] / c[scorable].sum())
    return torch.from_numpy(logp)
