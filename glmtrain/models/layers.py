"""Building blocks shared by model families (plain torch, no parallelism)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from glmtrain.models.ops import causal_conv_forward, is_plain


class RMSNorm(nn.Module):
    """RMS normalisation with a learned scale, computed in (at least) fp32.

    ``formula``: ``rsqrt`` = x * rsqrt(mean(x^2) + eps) (Llama, T5); ``vortex`` = x / (rms(x) + eps), the
    eps outside the root, as Evo 2's vortex/savanna code computes it (the two differ by ~1e-3 relative
    at the small activation scales of those models).
    """

    def __init__(self, dim: int, eps: float = 1e-6, formula: str = "rsqrt"):
        super().__init__()
        if formula not in ("rsqrt", "vortex"):
            raise ValueError(f"rmsnorm formula {formula!r}: allowed values are rsqrt, vortex")
        self.eps = eps
        self.formula = formula
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # compute in fp32 for bf16 stability (fp64 stays fp64), return the input dtype
        xf = x if x.dtype == torch.float64 else x.float()
        if self.formula == "vortex":
            y = xf / (xf.norm(2, dim=-1, keepdim=True) * xf.shape[-1] ** -0.5 + self.eps)
        else:
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)


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

    ``stored=True`` keeps the frequencies as a persistent fp32 buffer ``freqs``, initialised the
    way vortex computes it, so that a released checkpoint's stored values are used bit for bit; the
    angles are then computed in the buffer's dtype (fp32, or fp64 after ``.double()``), as vortex does.
    ``stored=False`` computes them from ``base`` in fp64.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, interpolation_factor: float = 1.0, stored: bool = False):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.base = float(base)
        self.interpolation_factor = float(interpolation_factor)
        self.stored = stored
        if stored:
            self.register_buffer("freqs", 1.0 / (self.base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)))
        self._cache: tuple | None = None

    def inv_freq(self, device=None) -> torch.Tensor:
        """The frequencies: the stored buffer, or computed from ``base`` in fp64."""
        if self.stored:  # angles in the buffer's dtype, at least fp32
            return self.freqs.to(device=device, dtype=torch.float64 if self.freqs.dtype == torch.float64 else torch.float32)
        return 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim))

    def cos_sin(self, seq_len: int, device, dtype, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        n = seq_len + offset
        if self.stored:  # the buffer may be reloaded or cast: part of the cache key
            key = (n, str(device), dtype, self.freqs.dtype, self.freqs.data_ptr(), self.freqs._version)
        else:
            key = (n, str(device), dtype)
        if self._cache is None or self._cache[0] != key:
            inv = self.inv_freq(device)
            pos = torch.arange(n, dtype=inv.dtype, device=device) / self.interpolation_factor
            freqs = torch.outer(pos, inv)
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cache = (key, emb.cos().to(dtype), emb.sin().to(dtype))
        return self._cache[1][offset:], self._cache[2][offset:]

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: [batch, heads, seq, head_dim]. ``offset`` = position of the first token (KV cache)."""
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        cos, sin = self.cos_sin(q.shape[-2], q.device, dt, offset)
        qf = self.rotate(q.to(dt), cos, sin).to(q.dtype)
        kf = self.rotate(k.to(dt), cos, sin).to(k.dtype)
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


def split_interleaved(z: torch.Tensor, short_weight: torch.Tensor, short_bias: torch.Tensor | None):
    """Channel-interleaved fused Hyena projection -> the operator's chunked layout.

    Hyena projections d -> 3d (and their depthwise featurizer convolution) are stored
    **channel-interleaved**: row ``3c + j`` is component ``j`` (0 = post, 1 = pre, 2 = v) of channel
    ``c``, so that a tensor-parallel shard (a contiguous slice of channels) is a contiguous row slice,
    with no permutation on sharding or on save/load.  The fused operators
    (:func:`glmtrain.models.ops.hyena_gated_conv`) take ``[post; pre; v]`` chunks: ``z`` [B, L, 3c] is
    turned into [B, 3c, L] chunk order in the one copy the channel-first layout needs anyway, and the
    small featurizer filter is reordered alongside.
    """
    b, seq_len, c3 = z.shape
    zc = z.view(b, seq_len, c3 // 3, 3).permute(0, 3, 2, 1).reshape(b, c3, seq_len)
    k = short_weight.shape[-1]
    w = short_weight.view(c3 // 3, 3, 1, k).transpose(0, 1).reshape(c3, 1, k)
    bias = None if short_bias is None else short_bias.view(c3 // 3, 3).t().reshape(c3)
    return zc, w, bias


def interleaved_to_chunks(z: torch.Tensor) -> torch.Tensor:
    """[B, 3c, L] in the channel-interleaved row order -> [B, 3c, L] in ``[post; pre; v]`` chunk order."""
    b, c3, seq_len = z.shape
    return z.view(b, c3 // 3, 3, seq_len).transpose(1, 2).reshape(b, c3, seq_len)


def hyena_inputs(proj_out: torch.Tensor, short_conv: nn.Module):
    """``(z, short_weight, short_bias)`` for the fused Hyena operators from the projection output [B, L, 3c].

    A plain ``nn.Conv1d`` featurizer is left to the fused operator (its weights reordered by
    :func:`split_interleaved`); an adapted one (``ops.is_plain`` False: a PEFT wrapper, a hook) is
    applied here through its own forward, on the interleaved rows it was built for, and
    ``(featurized z, None, None)`` is returned -- so an adapter on it is never bypassed."""
    if is_plain(short_conv, nn.Conv1d):
        return split_interleaved(proj_out, short_conv.weight, short_conv.bias)
    return interleaved_to_chunks(causal_conv_forward(short_conv, proj_out.transpose(1, 2))), None, None


def gpt2_init(model: nn.Module, std: float, n_layers: int, residual_suffixes: tuple[str, ...]) -> None:
    """GPT-2 initialisation: every Linear and Embedding N(0, std), biases 0, and the projections that
    write into the residual stream (module names ending in ``residual_suffixes``) scaled by
    1/sqrt(2 * n_layers)."""
    for name, m in model.named_modules():
        gpt2_init_module(name, m, std, n_layers, residual_suffixes)


def gpt2_init_module(name: str, m: nn.Module, std: float, n_layers: int, residual_suffixes: tuple[str, ...]) -> bool:
    """:func:`gpt2_init` for one module (True if it is a Linear or an Embedding, which the rule covers)."""
    if isinstance(m, nn.Linear):
        scale = 1 / math.sqrt(2 * n_layers) if name.endswith(residual_suffixes) else 1.0
        nn.init.normal_(m.weight, 0.0, std * scale)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
        return True
    if isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, 0.0, std)
        return True
    return False


class RopeAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, RoPE and :func:`attend`.

    Shared by the Transformer baseline and Evo 2's attention blocks.  The fused projection is laid
    out **head-major**: output rows ``[h * 3 * head_dim + j * head_dim + i]`` hold component ``j``
    (0 = q, 1 = k, 2 = v) of head ``h`` -- so any contiguous slice of whole heads is a complete
    attention over those heads, and a tensor-parallel shard of ``qkv`` (column) is a contiguous row
    slice, with no permutation on sharding or on save/load (checkpoints hold exactly this layout).
    ``out`` is row-parallel; the head count is inferred from the local width.
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool, qkv_bias: bool, out_bias: bool,
                 rope_base: float, rope_interpolation: float, dropout: float = 0.0, flash=None,
                 rope_stored: bool = False):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"model.d_model={d_model} must be divisible by model.n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=qkv_bias)
        self.out = nn.Linear(d_model, d_model, bias=out_bias)
        self.rope = RotaryEmbedding(self.head_dim, rope_base, rope_interpolation, stored=rope_stored)
        self.flash = flash

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [batch, heads, seq, head_dim] from the fused projection (RoPE not applied)."""
        b, seq_len, _ = x.shape
        # head-major layout (see the class docstring); -1 instead of n_heads: a tensor-parallel shard
        # holds a subset of the heads
        q, k, v = self.qkv(x).view(b, seq_len, -1, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        return q, k, v

    decode_state = None  # a KV cache, set by glmtrain.models.decode while decoding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decode_state is not None:
            return self.decode_state.step(self, x)
        q, k, v = self.heads(x)
        q, k = self.rope(q, k)
        y = attend(q, k, v, self.causal, self.dropout if self.training else 0.0, self.flash)
        return self.out(y)
