"""Building blocks shared by model families (plain torch, no parallelism)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # compute in fp32 for bf16 stability, return the input dtype
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"norm={kind!r}: allowed values are layernorm, rmsnorm")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half convention, as in GPT-NeoX / Llama).

    ``base`` and ``interpolation_factor`` are separate knobs: context extension
    may raise the base (NTK-style) and/or divide positions by a factor (linear
    position interpolation, Chen et al. 2023); the released Evo 2 weights use
    one and the savanna configs the other.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, interpolation_factor: float = 1.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.base = float(base)
        self.interpolation_factor = float(interpolation_factor)
        self._cache: tuple[int, torch.device, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def inv_freq(self, device=None) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim))

    def cos_sin(self, seq_len: int, device, dtype, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        key = (seq_len + offset, device, dtype)
        if self._cache is None or self._cache[:3] != key:
            pos = torch.arange(seq_len + offset, dtype=torch.float64, device=device) / self.interpolation_factor
            freqs = torch.outer(pos, self.inv_freq(device))
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cache = (*key, emb.cos().to(dtype), emb.sin().to(dtype))
        return self._cache[3][offset:], self._cache[4][offset:]

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: [batch, heads, seq, head_dim]. ``offset`` = position of the first token (KV cache)."""
        cos, sin = self.cos_sin(q.shape[-2], q.device, torch.float32, offset)
        qf = self.rotate(q.float(), cos, sin).to(q.dtype)
        kf = self.rotate(k.float(), cos, sin).to(k.dtype)
        return qf, kf


class SwiGLU(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, bias: bool = False, activation: str = "silu"):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.act = {"silu": F.silu, "gelu": F.gelu, "identity": lambda t: t}[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


class GeluMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float = 0.0, flash=None) -> torch.Tensor:
    """Multi-head attention core: q, k, v [batch, heads, seq, head_dim] -> [batch, seq, heads * head_dim].

    ``flash`` is ``flash_attn_func`` when the optional package is present (used for fp16/bf16 CUDA
    tensors); torch SDPA otherwise (flash / memory-efficient kernels on GPU, math kernel on CPU).
    """
    b, _, seq_len, _ = q.shape
    if flash is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        y = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, causal=causal)
        return y.reshape(b, seq_len, -1)
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
    return y.transpose(1, 2).reshape(b, seq_len, -1)


def gpt2_init(model: nn.Module, std: float, n_layers: int, residual_suffixes: tuple[str, ...]) -> None:
    """GPT-2 initialisation: every Linear and Embedding N(0, std), biases 0, and the projections that
    write into the residual stream (module names ending in ``residual_suffixes``) scaled by
    1/sqrt(2 * n_layers)."""
    scale = 1 / math.sqrt(2 * n_layers)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std * (scale if name.endswith(residual_suffixes) else 1.0))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)


class RopeAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, RoPE and :func:`attend`.

    Shared by the Transformer baseline and Evo 2's attention blocks; tensor-parallel plans shard
    ``qkv`` (column) and ``out`` (row) by name, and the head count is inferred from the local width.
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool, qkv_bias: bool, out_bias: bool,
                 rope_base: float, rope_interpolation: float, dropout: float = 0.0, flash=None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"model.d_model={d_model} must be divisible by model.n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=qkv_bias)
        self.out = nn.Linear(d_model, d_model, bias=out_bias)
        self.rope = RotaryEmbedding(self.head_dim, rope_base, rope_interpolation)
        self.flash = flash

    decode_state = None  # a KV cache, set by glmtrain.models.decode while decoding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decode_state is not None:
            return self.decode_state.step(self, x)
        b, seq_len, _ = x.shape
        # -1 instead of n_heads lets a tensor-parallel plan shard heads without touching this code
        q, k, v = self.qkv(x).view(b, seq_len, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.rope(q, k)
        y = attend(q, k, v, self.causal, self.dropout if self.training else 0.0, self.flash)
        return self.out(y)
