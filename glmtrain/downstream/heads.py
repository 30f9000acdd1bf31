"""A pretrained body under a new classification head.

``SequenceClassifier(body, ...)`` pools the body's final hidden states (``hidden_states(ids)``
of any :class:`~glmtrain.models.base.GenomicModel`) and applies dropout + a linear layer:

* ``mean``: average over the sequence's positions (every family);
* ``last``: the last position -- for a causal model the only one that has seen the whole sequence;
* ``cls``: the first position, where the data preparation put the tokenizer's CLS token (encoders).

Soft prompt tokens (prompt tuning) add positions in front of the sequence; they are never pooled.
Batches never hold padding (:mod:`glmtrain.downstream.data` buckets by length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ClassifierOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # AdaLoRA (peft) adds its orthogonality penalty to it


def pool(h: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "mean":
        return h.mean(1)
    if mode == "last":
        return h[:, -1]
    if mode == "cls":
        return h[:, 0]
    raise ValueError(f"pooling={mode!r}: allowed values are mean, last, cls")


class SequenceClassifier(nn.Module):
    def __init__(self, body: nn.Module, hidden: int, n_classes: int, pooling: str, dropout: float = 0.1):
        super().__init__()
        self.body = body
        self.pooling = pooling
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.body_eval = False  # linear probe: the frozen body always runs in eval mode (no dropout)

    def train(self, mode: bool = True) -> "SequenceClassifier":
        super().train(mode)
        if self.body_eval:
            self.body.eval()
        return self

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> ClassifierOutput:
        h = self.body.hidden_states(input_ids)
        h = h[:, h.shape[1] - input_ids.shape[1]:]  # drop soft-prompt positions (prompt tuning prepends them)
        logits = self.head(self.drop(pool(h, self.pooling)).to(self.head.weight.dtype)).float()
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ClassifierOutput(logits, loss)
