"""Training objectives: turn a batch of token ids into (model input, labels, weights).

Both objectives return ``labels`` aligned with the model's output positions and a
float ``weights`` tensor that is zero wherever no loss is taken (pad, specials,
N, unselected MLM positions) and carries per-base loss weights elsewhere (e.g.
0.1 for soft-masked bases).  The loss is ``sum(w * CE) / sum(w)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glmtrain.tokenizers import Tokenizer


@dataclass
class Prepared:
    inputs: torch.Tensor  # [B, L] ids fed to the model
    labels: torch.Tensor  # [B, L'] target ids aligned with the scored logits
    weights: torch.Tensor  # [B, L'] float loss weights (0 = ignored)
    shift: bool  # True: logits[:, :-1] predict labels (next token)


class Objective:
    name: str

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        special = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
        special[list(tokenizer.special_ids)] = True
        self._special = special
        self._bases = torch.as_tensor(tokenizer.bases_per_id, dtype=torch.float32)
        self.unigram_logp: torch.Tensor | None = None  # set by set_unigram: a baseline scored on the same tokens

    def set_unigram(self, logp: torch.Tensor | None) -> None:
        """log-probabilities [vocab] of a unigram model; :meth:`loss` then also reports its nats
        (``unigram_nats``) on exactly the positions the model is scored on."""
        self.unigram_logp = None if logp is None else logp.to(torch.float64)

    def _lut(self, t: torch.Tensor, device) -> torch.Tensor:
        return t.to(device) if t.device != device else t

    def prepare(self, input_ids: torch.Tensor, loss_weight: torch.Tensor | None, generator: torch.Generator | None) -> Prepared:
        raise NotImplementedError

    def logits_for_loss(self, logits: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        return logits[:, :-1] if prepared.shift else logits

    def loss(self, logits: torch.Tensor, prepared: Prepared) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted mean cross-entropy and sums for exact bits/base bookkeeping."""
        lg = self.logits_for_loss(logits, prepared)
        ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), prepared.labels.reshape(-1), reduction="none").view_as(prepared.labels)
        w = prepared.weights
        wsum = w.sum()
        loss = (ce * w).sum() / wsum.clamp_min(1e-8)
        scored = w > 0
        bases = self._lut(self._bases, prepared.labels.device)[prepared.labels] * scored
        stats = {
            "nats": (ce.detach() * scored).sum(),
            "bases": bases.sum(),
            "tokens": scored.sum().to(torch.float32),
            "weight": wsum.detach(),
        }
        if self.unigram_logp is not None:
            logp = self._lut(self.unigram_logp, prepared.labels.device)[prepared.labels]
            stats["unigram_nats"] = -(logp * scored).sum()
        return loss, stats


class NextToken(Objective):
    """Causal LM: position t predicts token t+1; pad, specials and zero-weight bases ignored."""

    name = "clm"

    def prepare(self, input_ids, loss_weight, generator=None) -> Prepared:
        labels = input_ids[:, 1:]
        w = torch.ones_like(labels, dtype=torch.float32) if loss_weight is None else loss_weight[:, 1:].float()
        w = w * (~self._lut(self._special, input_ids.device)[labels])
        return Prepared(inputs=input_ids, labels=labels, weights=w, shift=True)


class MaskedLM(Objective):
    """BERT-style MLM: select ``mask_prob`` of maskable positions; 80 % [MASK], 10 % random nucleotide, 10 % kept.

    Tokenizers whose tokens overlap (DNABERT's k-mers, ``tokenizer.mlm_span = k``) are masked in
    contiguous spans of k tokens, as DNABERT did: with single masked k-mers every masked base would still
    be visible in the neighbouring k-mers.  Span starts are drawn with probability 1 - (1 - p)^(1/k) so
    that a fraction p of the tokens is selected; overlapping or touching spans merge into one run, and
    the 80/10/10 choice is made once per run (a run that is partly kept would reveal the rest).
    """

    name = "mlm"

    def __init__(self, tokenizer: Tokenizer, mask_prob=0.15, mask_token_prob=0.8, random_token_prob=0.1):
        super().__init__(tokenizer)
        if tokenizer.mask_id is None:
            raise ValueError(f"the {tokenizer.name} tokenizer has no [MASK] token; MLM needs one")
        self.mask_prob = mask_prob
        self.p_mask = mask_token_prob
        self.p_random = random_token_prob
        self._nuc = torch.as_tensor(tokenizer.nucleotide_ids, dtype=torch.long)

    def prepare(self, input_ids, loss_weight, generator=None) -> Prepared:
        dev = input_ids.device
        w = torch.ones_like(input_ids, dtype=torch.float32) if loss_weight is None else loss_weight.float()
        # maskable: not special/pad and carrying loss weight (N bases have weight 0: never selected)
        maskable = (~self._lut(self._special, dev)[input_ids]) & (w > 0)
        u = torch.rand(input_ids.shape, generator=generator, device=dev)
        v = torch.rand(input_ids.shape, generator=generator, device=dev)
        span = getattr(self.tok, "mlm_span", 1)
        if span > 1:
            selected, v = self._spans(maskable, u, v, span)
        else:
            selected = maskable & (u < self.mask_prob)
        to_mask = selected & (v < self.p_mask)
        to_random = selected & (v >= self.p_mask) & (v < self.p_mask + self.p_random)
        nuc = self._lut(self._nuc, dev)
        random_ids = nuc[torch.randint(len(nuc), input_ids.shape, generator=generator, device=dev)]
        inputs = torch.where(to_mask, torch.full_like(input_ids, self.tok.mask_id), input_ids)
        inputs = torch.where(to_random, random_ids, inputs)
        return Prepared(inputs=inputs, labels=input_ids, weights=w * selected, shift=False)

    def _spans(self, maskable: torch.Tensor, u: torch.Tensor, v: torch.Tensor, span: int):
        """(selected positions, per-position 80/10/10 draw shared by every position of a run)."""
        q = 1.0 - (1.0 - self.mask_prob) ** (1.0 / span)
        start = (maskable & (u < q)).to(torch.int32)
        c = torch.nn.functional.pad(start.cumsum(1), (span, 0))
        covered = (c[:, span:] - c[:, :-span]) > 0  # a start among the last `span` positions
        selected = covered & maskable
        idx = torch.arange(selected.shape[1], device=selected.device).expand_as(selected)
        prev = torch.nn.functional.pad(selected[:, :-1], (1, 0), value=False)
        run_start = torch.where(selected & ~prev, idx, torch.zeros_like(idx)).cummax(1).values
        return selected, v.gather(1, run_start)


def build_objective(cfg, tokenizer: Tokenizer) -> Objective:
    if cfg.name == "clm":
        return NextToken(tokenizer)
    if cfg.name == "mlm":
        return MaskedLM(tokenizer, cfg.mask_prob, cfg.mask_token_prob, cfg.random_token_prob)
    raise ValueError(f"objective.name={cfg.name!r}: allowed values are clm, mlm")


def bits_per_base(nats: float, bases: float) -> float:
    return float(nats) / math.log(2) / max(float(bases), 1e-9)
