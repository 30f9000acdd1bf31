"""The Transformer family: one set of modules, configured as the published Transformer designs.

* the plain baseline (``transformer``): pre-norm, RoPE, GELU MLP, causal or bidirectional;
* Nucleotide Transformer v2 (``nt_v2*``): pre-LN encoder, rotary, SwiGLU without biases, ESM-style MLM
  head (dense -> GELU -> LayerNorm -> decoder + bias), untied embeddings;
* Nucleotide Transformer v1 / ESM (``nt_v1``): the same with learned absolute positions, a GELU MLP and
  biases -- the layout of ``transformers.EsmForMaskedLM`` (weights convert both ways, glmtrain.convert.nt);
* DNABERT-2 (``dnabert2*``): post-LN (BERT / MosaicBERT) encoder with ALiBi instead of positions, a
  LayerNorm after the embedding, a gated-GELU MLP (bias on its output only) and a BERT MLM head tied to the
  embedding;
* DNABERT (``dnabert1``): BERT on overlapping 6-mers with learned positions;
* GENERator (``generator``): a Llama-style causal decoder (RMSNorm, RoPE, SwiGLU, no biases) on
  non-overlapping 6-mers.

Every attention goes through :class:`glmtrain.models.layers.SelfAttention` (SDPA with the padding mask,
flash-attn's dense or variable-length kernel when installed).  ``forward(input_ids, attention_mask)``:
positions where ``attention_mask`` is 0 (padding) are ignored as keys, so they change no other position's
output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from glmtrain.models.base import GenomicModel, ModelConfig
from glmtrain.models.layers import (FlashKernels, GeluMLP, SelfAttention, SwiGLU, gpt2_init, gpt2_init_module,
                                    make_norm)
from glmtrain.models.ops import flash_attn_func, flash_attn_varlen_func

CHOICES = {
    "norm": ("layernorm", "rmsnorm"),
    "norm_position": ("pre", "post"),
    "mlp": ("gelu", "swiglu", "geglu"),
    "gelu": ("tanh", "exact"),
    "position": ("rope", "alibi", "learned", "none"),
    "head": ("linear", "mlm"),
    "attention": ("sdpa", "flash_attn"),
}


@dataclass
class TransformerConfig(ModelConfig):
    family: str = "transformer"
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    ffn_dim: int = 0  # 0 = 4 * d_model (gelu) or 8/3 * d_model rounded to 64 (swiglu, geglu)
    causal: bool = True
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_position: str = "pre"  # pre (GPT-2, ESM, NT, Llama) | post (BERT, DNABERT-2: norm after each residual add)
    embed_norm: bool = False  # a norm right after the embedding (BERT / DNABERT-2)
    mlp: str = "gelu"  # gelu | swiglu (SiLU-gated) | geglu (GELU-gated)
    gelu: str = "tanh"  # tanh (GPT-2 approximation) | exact (erf: BERT, ESM)
    bias: bool = True  # default for every linear layer of the blocks
    attn_bias: Optional[bool] = None  # qkv and attention output (None = bias)
    mlp_bias: Optional[bool] = None  # MLP input projections (None = bias)
    mlp_out_bias: Optional[bool] = None  # MLP output projection (None = mlp_bias)
    dropout: float = 0.0  # residual (hidden) dropout
    attn_dropout: Optional[float] = None  # attention-probability dropout (None = dropout; BERT/DNABERT-2: 0.0)
    position: str = "rope"  # rope | alibi | learned (absolute, max_seq_len rows) | none
    rope_base: float = 10000.0
    rope_interpolation: float = 1.0
    tie_embeddings: bool = True
    head: str = "linear"  # linear | mlm (dense -> GELU -> norm -> decoder + bias, as ESM and BERT)
    token_dropout: bool = False  # ESM: <mask> embeddings zeroed, the rest rescaled by 0.88 / (1 - observed mask ratio)
    mask_token_id: int = 2  # the <mask> id token_dropout looks for (NT layout: 2)
    max_seq_len: int = 0  # 0 = unbounded (RoPE / ALiBi); >0 refuses longer inputs (learned positions: their rows)
    attention: str = "sdpa"  # sdpa | flash_attn (optional package; unpadded variable-length kernel under padding)
    init_std: float = 0.02

    SPEED_ONLY: ClassVar[tuple[str, ...]] = ModelConfig.SPEED_ONLY + ("attention",)
    STAGE_KNOBS: ClassVar[tuple[str, ...]] = ("rope_base", "rope_interpolation")

    def resolved_ffn_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        if self.mlp in ("swiglu", "geglu"):
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model

    def biases(self) -> tuple[bool, bool, bool]:
        """(attention, MLP input, MLP output) bias flags with the defaults resolved."""
        attn = self.bias if self.attn_bias is None else self.attn_bias
        mlp = self.bias if self.mlp_bias is None else self.mlp_bias
        return attn, mlp, mlp if self.mlp_out_bias is None else self.mlp_out_bias

    def check(self) -> None:
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.{key}={getattr(self, key)!r}: allowed values are {', '.join(allowed)}")
        if self.position == "learned" and self.max_seq_len <= 0:
            raise ValueError("model.position=learned needs model.max_seq_len > 0 (the number of position rows)")


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        attn_bias, mlp_bias, out_bias = cfg.biases()
        flash = None
        if cfg.attention == "flash_attn":
            func = flash_attn_func()
            flash = FlashKernels(func, flash_attn_varlen_func()) if func is not None else None
        self.post = cfg.norm_position == "post"
        self.norm1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, causal=cfg.causal, qkv_bias=attn_bias, out_bias=attn_bias,
                                  rope_base=cfg.rope_base, rope_interpolation=cfg.rope_interpolation,
                                  dropout=cfg.dropout if cfg.attn_dropout is None else cfg.attn_dropout, flash=flash,
                                  position=cfg.position if cfg.position in ("rope", "alibi") else "none")
        self.norm2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        hidden = cfg.resolved_ffn_dim()
        if cfg.mlp == "gelu":
            self.mlp = GeluMLP(cfg.d_model, hidden, bias=mlp_bias, out_bias=out_bias,
                               approximate="none" if cfg.gelu == "exact" else "tanh")
        else:
            act = "silu" if cfg.mlp == "swiglu" else ("gelu" if cfg.gelu == "exact" else "gelu_tanh")
            self.mlp = SwiGLU(cfg.d_model, hidden, bias=mlp_bias, activation=act, out_bias=out_bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.post:  # BERT: normalise after each residual add
            x = self.norm1(x + self.drop(self.attn(x, key_mask)))
            return self.norm2(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.norm1(x), key_mask))
        return x + self.drop(self.mlp(self.norm2(x)))


class Transformer(GenomicModel):
    accepts_attention_mask = True

    def __init__(self, cfg: TransformerConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        cfg.check()
        self.causal = cfg.causal
        d = cfg.d_model
        self.embed = nn.Embedding(vocab_size, d)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, d) if cfg.position == "learned" else None
        self.embed_norm = make_norm(cfg.norm, d, cfg.norm_eps) if cfg.embed_norm else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        # pre-norm stacks end with a norm (ESM's emb_layer_norm_after); post-norm ones are normalised already
        self.norm_f = make_norm(cfg.norm, d, cfg.norm_eps) if cfg.norm_position == "pre" else None
        if cfg.head == "mlm":
            self.head_dense = nn.Linear(d, d)
            self.head_norm = make_norm(cfg.norm, d, cfg.norm_eps)
        else:
            self.head_dense = self.head_norm = None
        self.lm_head = nn.Linear(d, vocab_size, bias=cfg.head == "mlm")
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    RESIDUAL = ("attn.out", "mlp.fc2", "mlp.down")

    def reset_parameters(self) -> None:
        gpt2_init(self, self.cfg.init_std, self.cfg.n_layers, self.RESIDUAL)

    def init_module(self, name: str, module: nn.Module) -> None:
        if not gpt2_init_module(name, module, self.cfg.init_std, self.cfg.n_layers, self.RESIDUAL):
            super().init_module(name, module)

    def embed_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        x = self.embed(input_ids)
        if cfg.token_dropout:
            # ESM's "mask dropout": <mask> embeddings are zeroed and the others rescaled as if 12 % of the
            # tokens had been dropped, relative to the fraction actually masked in each sequence
            is_mask = input_ids == cfg.mask_token_id
            x = x.masked_fill(is_mask[..., None], 0.0)
            n = attention_mask.sum(-1) if attention_mask is not None else torch.full_like(input_ids[:, 0], input_ids.shape[1])
            observed = is_mask.sum(-1).to(x.dtype) / n.to(x.dtype)
            x = x * ((1 - 0.15 * 0.8) / (1 - observed))[:, None, None].to(x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(input_ids.shape[1], device=input_ids.device))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return x

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.max_seq_len and input_ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed_tokens(input_ids, attention_mask)
        key_mask = None
        if attention_mask is not None:
            key_mask = attention_mask.bool()
            if bool(key_mask.all()):  # no padding in this batch: keep the mask-free (fastest) kernels
                key_mask = None
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, key_mask, use_reentrant=False)
            else:
                x = block(x, key_mask)
        return self.norm_f(x) if self.norm_f is not None else x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.head_dense is not None:
            h = self.head_norm(F.gelu(self.head_dense(h)))
        return self.lm_head(h)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, attention_mask))
