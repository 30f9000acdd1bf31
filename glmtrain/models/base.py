"""The contract every model family fulfils.

A family lives in ``glmtrain/models/<family>.py`` and provides

* a config dataclass (fields = the Hydra ``model/*.yaml`` keys, plus ``family``,
  ``name`` and ``tokenizer``) registered in :data:`glmtrain.models.FAMILIES`;
* an ``nn.Module`` subclass of :class:`GenomicModel`, built as ``Model(cfg, vocab_size)``.

Models are plain modules: no parallelism, no Lightning, no optimizer.  Sharding
plans live in ``glmtrain/parallel``; training logic in ``glmtrain/module.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from glmtrain.tokenizers import TokenizerConfig


@dataclass
class ModelConfig:
    """Fields every family shares. Family configs subclass this."""

    family: str = "transformer"
    name: str = "custom"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Published shape this config reproduces, for the parameter-count check (0 = none).
    published_params: int = 0
    activation_checkpointing: bool = False

    #: Knobs that change speed or memory but not the function computed (up to floating-point
    #: reduction order): they may change between restarts of a run.  Every other field is part of
    #: the model's mathematics and a resume with a different value is refused.
    SPEED_ONLY: ClassVar[tuple[str, ...]] = ("activation_checkpointing",)
    #: Fields a context-extension stage may set (``context.stages[i].<knob>``); checked against the schedule.
    STAGE_KNOBS: ClassVar[tuple[str, ...]] = ()


class GenomicModel(nn.Module):
    """Base class: ``forward(input_ids) -> logits [B, L, vocab]``."""

    #: True for next-token (causal) models, False for bidirectional encoders.
    causal: bool = True
    #: True if ``forward(input_ids, attention_mask=...)`` takes a padding mask [B, L] (1 = real token).
    accepts_attention_mask: bool = False

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, L, d] (for fine-tuning heads and embeddings)."""
        raise NotImplementedError

    def init_module(self, name: str, module: nn.Module) -> None:
        """Initialise the parameters ``module`` (qualified ``name``) owns directly, after a meta-device
        build (:func:`glmtrain.models.init.materialize`; torch's RNG is already seeded by name).
        Default: the module's ``reset_parameters()``; families add their own rules (GPT-2 init)."""
        from glmtrain.models.init import reset_module

        reset_module(name, module)

    def no_decay_param_names(self) -> set[str]:
        """Parameters excluded from weight decay beyond norms/biases/embeddings."""
        return set()

    def param_groups_overrides(self) -> dict[str, dict]:
        """Optional extra optimizer groups: {param-name-prefix-or-suffix: {lr_scale, weight_decay}}."""
        return {}

    def num_params(self, non_embedding: bool = False) -> int:
        seen, n = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if non_embedding and ("embed" in name or "lm_head" in name):
                continue
            n += p.numel()
        return n
