"""Plain pre-norm Transformer with RoPE and torch SDPA: causal LM or bidirectional encoder.

The baseline every genomic-LM paper compares against.  SDPA dispatches to the
flash / memory-efficient kernels on GPU and to the math kernel on CPU; when the
optional ``flash-attn`` package is present and ``attention=flash_attn`` it is used
instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from glmtrain.models.base import GenomicModel, ModelConfig
from glmtrain.models.layers import GeluMLP, RopeAttention, SwiGLU, gpt2_init, gpt2_init_module, make_norm
from glmtrain.models.ops import flash_attn_func


@dataclass
class TransformerConfig(ModelConfig):
    family: str = "transformer"
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    ffn_dim: int = 0  # 0 = 4 * d_model (gelu) or 8/3 * d_model rounded to 64 (swiglu)
    causal: bool = True
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # gelu | swiglu
    bias: bool = True
    dropout: float = 0.0
    rope_base: float = 10000.0
    rope_interpolation: float = 1.0
    tie_embeddings: bool = True
    max_seq_len: int = 0  # 0 = unbounded (RoPE); >0 refuses longer inputs
    attention: str = "sdpa"  # sdpa | flash_attn (optional package)

    def resolved_ffn_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        if self.mlp == "swiglu":
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.attn = RopeAttention(cfg.d_model, cfg.n_heads, causal=cfg.causal, qkv_bias=cfg.bias, out_bias=cfg.bias,
                                  rope_base=cfg.rope_base, rope_interpolation=cfg.rope_interpolation,
                                  dropout=cfg.dropout, flash=flash_attn_func() if cfg.attention == "flash_attn" else None)
        self.norm2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        hidden = cfg.resolved_ffn_dim()
        self.mlp = SwiGLU(cfg.d_model, hidden, bias=cfg.bias) if cfg.mlp == "swiglu" else GeluMLP(cfg.d_model, hidden, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class Transformer(GenomicModel):
    def __init__(self, cfg: TransformerConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        if cfg.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"model.mlp={cfg.mlp!r}: allowed values are gelu, swiglu")
        self.causal = cfg.causal
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    RESIDUAL = ("attn.out", "mlp.fc2", "mlp.down")

    def reset_parameters(self) -> None:
        gpt2_init(self, 0.02, self.cfg.n_layers, self.RESIDUAL)

    def init_module(self, name: str, module: nn.Module) -> None:
        if not gpt2_init_module(name, module, 0.02, self.cfg.n_layers, self.RESIDUAL):
            super().init_module(name, module)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.cfg.max_seq_len and input_ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(input_ids)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm_f(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids))
