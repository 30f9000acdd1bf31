"""Building blocks shared by model families (plain torch, no parallelism)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

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
    """Gated MLP: down(act(gate(x)) * up(x)).  ``activation="gelu"`` is GeGLU (DNABERT-2 / MosaicBERT),
    ``"silu"`` SwiGLU (NT-v2, Llama).  ``out_bias`` defaults to ``bias`` (DNABERT-2: no bias on the gated
    projection, a bias on the output)."""

    def __init__(self, dim: int, hidden: int, bias: bool = False, activation: str = "silu", out_bias: bool | None = None):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias if out_bias is None else out_bias)
        self.act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
                    "identity": lambda t: t}[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


class GeluMLP(nn.Module):
    """fc2(gelu(fc1(x))); ``approximate="tanh"`` (GPT-2) or ``"none"`` (exact erf GELU: BERT, ESM)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True, approximate: str = "tanh", out_bias: bool | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias if out_bias is None else out_bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022): a geometric sequence 2^(-8/n), 2^(-16/n), ... for a power-of-two
    head count; otherwise those of the next lower power of two followed by every other slope of twice that."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if n_heads & (n_heads - 1) == 0:
        slopes = power_of_two(n_heads)
    else:
        low = 1 << (n_heads.bit_length() - 1)
        slopes = power_of_two(low) + power_of_two(2 * low)[0::2][: n_heads - low]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, seq_len: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """[heads, L, L] additive scores -slope * |i - j| (symmetric: bidirectional and, under a causal mask, causal)."""
    pos = torch.arange(seq_len, device=device)
    dist = (pos[None, :] - pos[:, None]).abs().to(dtype)
    return -slopes.to(device=device, dtype=dtype)[:, None, None] * dist


@dataclass(frozen=True)
class FlashKernels:
    """The optional flash-attn entry points: ``func`` (dense batches), ``varlen`` (unpadded batches)."""

    func: Callable | None
    varlen: Callable | None = None


def _full_key_mask(key_mask: torch.Tensor) -> torch.Tensor:
    # a sample with no real token at all (a blanked corrupt sample) attends to everything: finite output
    # (its positions carry no loss) instead of a softmax over an empty set (NaN, which would poison the loss)
    return key_mask | ~key_mask.any(-1, keepdim=True)


def _attend_flash(q, k, v, causal, dropout_p, kernels: FlashKernels, key_mask, slopes) -> torch.Tensor:
    """flash-attn path; with a padding mask the batch is unpadded and run by the variable-length kernel."""
    b, h, seq_len, d = q.shape
    kw = {"dropout_p": dropout_p, "causal": causal}
    if slopes is not None:
        kw["alibi_slopes"] = slopes.to(device=q.device, dtype=torch.float32)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, L, H, D]
    if key_mask is None:
        return kernels.func(qt, kt, vt, **kw).reshape(b, seq_len, h * d)
    lengths = key_mask.sum(-1, dtype=torch.int32)
    idx = key_mask.reshape(-1).nonzero(as_tuple=True)[0]
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    longest = int(lengths.max())
    unpad = lambda t: t.reshape(b * seq_len, h, d).index_select(0, idx)  # noqa: E731
    y = kernels.varlen(unpad(qt), unpad(kt), unpad(vt), cu, cu, longest, longest, **kw)
    out = y.new_zeros(b * seq_len, h, d).index_copy(0, idx, y)  # padded positions: zeros
    return out.reshape(b, seq_len, h * d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float = 0.0, flash=None,
           key_mask: torch.Tensor | None = None, alibi: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention core: q, k, v [batch, heads, seq, head_dim] -> [batch, seq, heads * head_dim].

    ``key_mask`` [batch, seq] bool (True = a real token): padded keys get no weight, so padding changes no
    other position's output.  ``alibi`` [heads] ALiBi slopes (scores -slope * |i - j|).

    ``flash`` (:class:`FlashKernels`, or the bare ``flash_attn_func``) is used for fp16/bf16 CUDA tensors:
    the dense kernel without padding, the variable-length kernel on the unpadded tokens with padding.
    Otherwise torch SDPA: no mask -> flash / memory-efficient kernels on GPU, math on CPU; with padding or
    ALiBi an explicit additive mask (memory-efficient or math kernel).
    """
    b, _, seq_len, _ = q.shape
    if flash is not None and not isinstance(flash, FlashKernels):
        flash = FlashKernels(flash)
    if key_mask is not None:
        key_mask = _full_key_mask(key_mask.bool())
    if (flash is not None and flash.func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and (key_mask is None or flash.varlen is not None)):
        return _attend_flash(q, k, v, causal, dropout_p, flash, key_mask, alibi)
    mask = None
    if alibi is not None:
        mask = alibi_bias(alibi, seq_len, q.dtype, q.device)[None]  # [1, H, L, L]
    if key_mask is not None:
        neg = torch.zeros(b, 1, 1, seq_len, dtype=q.dtype, device=q.device).masked_fill(~key_mask[:, None, None, :], float("-inf"))
        mask = neg if mask is None else mask + neg
    if mask is not None and causal:
        mask = mask.masked_fill(torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        causal = False
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
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


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and :func:`attend`: one module for every family.

    ``position``: ``rope`` (rotary, with ``rope_base`` and ``rope_interpolation`` as separate knobs;
    ``rope_stored``: the frequencies are a persistent buffer, as in released Evo 2 checkpoints),
    ``alibi`` (per-head linear biases; the slopes are a non-persistent buffer that a tensor-parallel plan
    slices with the heads) or ``none`` (positions come from the embedding, e.g. learned absolute ones).
    ``forward(x, key_mask)`` takes the padding mask [batch, seq] (True = real token).

    Shared by the Transformer family (NT-v1/v2, DNABERT-1/2, GENERator configs) and Evo 2's attention
    blocks.  The fused projection is laid out **head-major**: output rows
    ``[h * 3 * head_dim + j * head_dim + i]`` hold component ``j`` (0 = q, 1 = k, 2 = v) of head ``h`` --
    so any contiguous slice of whole heads is a complete attention over those heads, and a
    tensor-parallel shard of ``qkv`` (column) is a contiguous row slice, with no permutation on sharding
    or on save/load (checkpoints hold exactly this layout).  ``out`` is row-parallel; the head count is
    inferred from the local width.
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool, qkv_bias: bool, out_bias: bool,
                 rope_base: float = 10000.0, rope_interpolation: float = 1.0, dropout: float = 0.0, flash=None,
                 position: str = "rope", rope_stored: bool = False):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"model.d_model={d_model} must be divisible by model.n_heads={n_heads}")
        if position not in ("rope", "alibi", "none"):
            raise ValueError(f"attention position={position!r}: allowed values are rope, alibi, none")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=qkv_bias)
        self.out = nn.Linear(d_model, d_model, bias=out_bias)
        if rope_stored and position != "rope":
            raise ValueError(f"attention rope_stored=True needs position=rope (got {position!r})")
        self.rope = RotaryEmbedding(self.head_dim, rope_base, rope_interpolation, stored=rope_stored) if position == "rope" else None
        if position == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(n_heads), persistent=False)
        else:
            self.alibi_slopes = None
        self.flash = flash

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [batch, heads, seq, head_dim] from the fused projection (RoPE not applied)."""
        qkv = self.qkv(x)
        # shapes from the projection, not from x: under sequence parallelism x may be a slice of the sequence
        # that the column-parallel projection gathers; head-major layout (see the class docstring); -1
        # instead of n_heads: a tensor-parallel shard holds a subset of the heads
        b, seq_len = qkv.shape[:2]
        q, k, v = qkv.view(b, seq_len, -1, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        return q, k, v

    decode_state = None  # a KV cache, set by glmtrain.models.decode while decoding

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.decode_state is not None:
            return self.decode_state.step(self, x)
        q, k, v = self.heads(x)
        if self.rope is not None:
            q, k = self.rope(q, k)
        y = attend(q, k, v, self.causal, self.dropout if self.training else 0.0, self.flash, key_mask, self.alibi_slopes)
        return self.out(y)


RopeAttention = SelfAttention  # the name Evo 2's blocks import
