# Modeling code for a model exported by glmtrain (`python -m glmtrain.convert export`).
# Self-contained: depends only on torch and transformers.  Load with
#   AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)   (causal families)
#   AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)   (bidirectional encoders)
# The weights keep glmtrain's parameter names under the prefix "model.", so an export reads back
# into glmtrain unchanged.  The networks below are plain, unfused re-statements of glmtrain's
# families (the Transformer family: baseline, NT, DNABERT-2, GENERator; HyenaDNA; Evo 2 / StripedHyena 2;
# Caduceus) in float32 (or float64).
"""glmtrain export: configuration and models for transformers' Auto classes (trust_remote_code)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import EsmForMaskedLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput, MaskedLMOutput


class GlmtrainConfig(PretrainedConfig):
    model_type = "glmtrain"

    def __init__(self, family: str = "transformer", glmtrain: dict | None = None, vocab_size: int = 16, **kwargs):
        self.family = family
        self.glmtrain = dict(glmtrain or {})
        self.vocab_size = vocab_size
        kwargs.setdefault("tie_word_embeddings", bool(self.glmtrain.get("tie_embeddings", True)))
        super().__init__(**kwargs)


# ----------------------------------------------------------------------------- shared pieces
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _causal_fft_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """y[..., t] = sum_{s<=t} k[..., s] u[..., t-s]: zero-padded FFT of size 2L."""
    n = 2 * u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., : u.shape[-1]]


def _depthwise_causal(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal FIR in nn.Conv1d layout (weight[..., -1] multiplies the current token)."""
    return F.conv1d(F.pad(u, (weight.shape[-1] - 1, 0)), weight.to(u.dtype), None if bias is None else bias.to(u.dtype),
                    groups=u.shape[1])


def _short_conv_chunks(z: torch.Tensor, conv: nn.Conv1d, dt: torch.dtype):
    """Fused d -> 3d projection [B, L, 3d] and its depthwise conv, stored channel-interleaved (row 3c + j =
    component j of channel c) -> the convolved (post, pre, v), each [B, d, L]."""
    b, n, c3 = z.shape
    z = z.view(b, n, c3 // 3, 3).permute(0, 3, 2, 1).reshape(b, c3, n)
    k = conv.weight.shape[-1]
    w = conv.weight.view(c3 // 3, 3, 1, k).transpose(0, 1).reshape(c3, 1, k)
    bias = None if conv.bias is None else conv.bias.view(c3 // 3, 3).t().reshape(c3)
    return _depthwise_causal(z, w, bias).to(dt).chunk(3, dim=1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, formula: str):
        super().__init__()
        self.eps, self.formula = eps, formula
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.to(_compute_dtype(x))
        if self.formula == "vortex":  # scale * x / (rms + eps)
            y = xf / (torch.sqrt(xf.pow(2).mean(-1, keepdim=True)) + self.eps)
        else:
            y = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)


class Rope(nn.Module):
    """Rotary embedding, rotate-half layout; ``stored`` keeps the frequencies as the buffer ``freqs``."""

    def __init__(self, head_dim: int, base: float, interpolation: float, stored: bool):
        super().__init__()
        self.head_dim, self.base, self.interpolation, self.stored = head_dim, float(base), float(interpolation), stored
        if stored:
            self.register_buffer("freqs", torch.zeros(head_dim // 2))

    def forward(self, q, k):
        n, dev = q.shape[-2], q.device
        if self.stored:
            inv = self.freqs.to(device=dev, dtype=_compute_dtype(self.freqs))
        else:
            inv = 1.0 / self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=dev) / self.head_dim)
        ang = torch.outer(torch.arange(n, dtype=inv.dtype, device=dev) / self.interpolation, inv)
        ang = torch.cat((ang, ang), dim=-1)
        dt = _compute_dtype(q)
        cos, sin = ang.cos().to(dt), ang.sin().to(dt)

        def rot(x):
            x = x.to(dt)
            x1, x2 = x.chunk(2, dim=-1)
            return x * cos + torch.cat((-x2, x1), dim=-1) * sin

        return rot(q).to(q.dtype), rot(k).to(k.dtype)


def _alibi_slopes(n: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al.): 2^(-8/n), 2^(-16/n), ... for a power-of-two head count; otherwise those
    of the next lower power of two followed by every other slope of twice that."""

    def pow2(m):
        return [(2 ** (-8 / m)) ** (i + 1) for i in range(m)]

    if n & (n - 1) == 0:
        return torch.tensor(pow2(n), dtype=torch.float32)
    low = 1 << (n.bit_length() - 1)
    return torch.tensor(pow2(low) + pow2(2 * low)[0::2][: n - low], dtype=torch.float32)


class Attention(nn.Module):
    """Fused-qkv self-attention; ``position``: rope (rotate-half), alibi (scores - slope * |i - j|) or none."""

    def __init__(self, d, heads, causal, qkv_bias, out_bias, rope_base, rope_interpolation, rope_stored, position="rope"):
        super().__init__()
        self.heads, self.hd, self.causal = heads, d // heads, causal
        self.qkv = nn.Linear(d, 3 * d, bias=qkv_bias)
        self.out = nn.Linear(d, d, bias=out_bias)
        self.rope = Rope(d // heads, rope_base, rope_interpolation, rope_stored) if position == "rope" else None
        self.alibi = position == "alibi"  # slopes computed in forward (from_pretrained builds modules on meta)

    def forward(self, x, key_padding=None):
        b, n, d = x.shape
        # fused rows head-major: [head, (q, k, v), head_dim]
        q, k, v = self.qkv(x).view(b, n, self.heads, 3, self.hd).permute(3, 0, 2, 1, 4)
        if self.rope is not None:
            q, k = self.rope(q, k)
        mask = None
        if self.alibi:
            pos = torch.arange(n, device=x.device)
            dist = (pos[None, :] - pos[:, None]).abs().to(q.dtype)
            mask = (-_alibi_slopes(self.heads).to(device=x.device, dtype=q.dtype)[:, None, None] * dist)[None]
        if key_padding is not None and not bool(key_padding.bool().all()):
            real = key_padding.bool()
            real = real | ~real.any(-1, keepdim=True)  # a row of padding only attends to everything (finite)
            pad = torch.zeros(b, 1, 1, n, dtype=q.dtype, device=x.device).masked_fill(~real[:, None, None, :], float("-inf"))
            mask = pad if mask is None else mask + pad
        causal = self.causal
        if mask is not None and causal:
            mask = mask.masked_fill(torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


_ACT = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "identity": lambda t: t}


class GatedMLP(nn.Module):
    def __init__(self, d, hidden, bias, act, out_bias=None):
        super().__init__()
        self.gate, self.up = nn.Linear(d, hidden, bias=bias), nn.Linear(d, hidden, bias=bias)
        self.down = nn.Linear(hidden, d, bias=bias if out_bias is None else out_bias)
        self.act = act

    def forward(self, x):
        return self.down(_ACT[self.act](self.gate(x)) * self.up(x))


class GeluMLP(nn.Module):
    def __init__(self, d, hidden, bias, out_bias=None, approximate="tanh"):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, d, bias=bias if out_bias is None else out_bias)
        self.approximate = approximate

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


def _norm(kind, d, eps):
    return nn.LayerNorm(d, eps=eps) if kind == "layernorm" else RMSNorm(d, eps, "rsqrt")


class Block(nn.Module):
    """Pre-norm residual block: x += mixer(norm1(x)); x += mlp(norm2(x)).  ``mixer_name`` keeps glmtrain's
    parameter names (``attn`` in the Transformer, ``mixer`` elsewhere)."""

    def __init__(self, norm1, mixer, norm2, mlp, mixer_name="mixer"):
        super().__init__()
        self.norm1, self.norm2, self.mlp, self.mixer_name = norm1, norm2, mlp, mixer_name
        setattr(self, mixer_name, mixer)

    def forward(self, x, key_padding=None):
        mixer = getattr(self, self.mixer_name)
        h = self.norm1(x)
        x = x + (mixer(h, key_padding) if isinstance(mixer, Attention) else mixer(h))
        return x + self.mlp(self.norm2(x))


class LMNet(nn.Module):
    """Embedding -> blocks -> final norm -> LM head (tied to the embedding when the config says so)."""

    def __init__(self, vocab, d, blocks, norm_f):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(blocks)
        self.norm_f = norm_f
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids, key_padding=None):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x, key_padding)
        return self.lm_head(self.norm_f(x))


# ----------------------------------------------------------------------------- Transformer family
class TransformerBlock(nn.Module):
    """Pre-norm (GPT, ESM, NT, Llama) or post-norm (BERT, DNABERT-2: norm after each residual add)."""

    def __init__(self, c):
        super().__init__()
        d, b = c["d_model"], c["bias"]
        attn_bias = b if c.get("attn_bias") is None else c["attn_bias"]
        mlp_bias = b if c.get("mlp_bias") is None else c["mlp_bias"]
        out_bias = mlp_bias if c.get("mlp_out_bias") is None else c["mlp_out_bias"]
        pos = c.get("position", "rope")
        self.post = c.get("norm_position", "pre") == "post"
        self.norm1, self.norm2 = _norm(c["norm"], d, c["norm_eps"]), _norm(c["norm"], d, c["norm_eps"])
        self.attn = Attention(d, c["n_heads"], c["causal"], attn_bias, attn_bias, c["rope_base"], c["rope_interpolation"],
                              False, pos if pos in ("rope", "alibi") else "none")
        exact = c.get("gelu", "tanh") == "exact"
        if c["mlp"] == "gelu":
            self.mlp = GeluMLP(d, _ffn(c), mlp_bias, out_bias, "none" if exact else "tanh")
        else:
            act = "silu" if c["mlp"] == "swiglu" else ("gelu" if exact else "gelu_tanh")
            self.mlp = GatedMLP(d, _ffn(c), mlp_bias, act, out_bias)

    def forward(self, x, key_padding=None):
        if self.post:
            x = self.norm1(x + self.attn(x, key_padding))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x), key_padding)
        return x + self.mlp(self.norm2(x))


def _ffn(c):
    if c["ffn_dim"]:
        return c["ffn_dim"]
    return 64 * math.ceil(8 * c["d_model"] / 3 / 64) if c["mlp"] in ("swiglu", "geglu") else 4 * c["d_model"]


class TransformerNet(nn.Module):
    """Embedding (+ learned positions, + ESM token dropout, + embedding norm) -> blocks -> final norm (pre-norm
    stacks) -> LM head (linear, or the ESM/BERT MLM head: dense -> exact GELU -> norm -> decoder + bias)."""

    def __init__(self, c, vocab):
        super().__init__()
        d = c["d_model"]
        self.c = c
        self.embed = nn.Embedding(vocab, d)
        if c.get("position") == "learned":
            self.pos_embed = nn.Embedding(c["max_seq_len"], d)
        if c.get("embed_norm"):
            self.embed_norm = _norm(c["norm"], d, c["norm_eps"])
        self.blocks = nn.ModuleList(TransformerBlock(c) for _ in range(c["n_layers"]))
        if c.get("norm_position", "pre") == "pre":
            self.norm_f = _norm(c["norm"], d, c["norm_eps"])
        mlm = c.get("head", "linear") == "mlm"
        if mlm:
            self.head_dense, self.head_norm = nn.Linear(d, d), _norm(c["norm"], d, c["norm_eps"])
        self.lm_head = nn.Linear(d, vocab, bias=mlm)

    def forward(self, ids, key_padding=None):
        c = self.c
        x = self.embed(ids)
        if c.get("token_dropout"):  # ESM: <mask> rows zeroed, the rest rescaled to the training-time expectation
            is_mask = ids == c.get("mask_token_id", 2)
            x = x.masked_fill(is_mask[..., None], 0.0)
            n = key_padding.sum(-1) if key_padding is not None else torch.full_like(ids[:, 0], ids.shape[1])
            observed = is_mask.sum(-1).to(x.dtype) / n.to(x.dtype)
            x = x * ((1 - 0.15 * 0.8) / (1 - observed))[:, None, None].to(x.dtype)
        if hasattr(self, "pos_embed"):
            x = x + self.pos_embed(torch.arange(ids.shape[1], device=ids.device))
        if hasattr(self, "embed_norm"):
            x = self.embed_norm(x)
        for b in self.blocks:
            x = b(x, key_padding)
        if hasattr(self, "norm_f"):
            x = self.norm_f(x)
        if hasattr(self, "head_dense"):
            x = self.head_norm(F.gelu(self.head_dense(x)))
        return self.lm_head(x)


# ----------------------------------------------------------------------------- HyenaDNA
class Sin(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.freq = nn.Parameter(torch.ones(1, dim))

    def forward(self, x):
        return torch.sin(self.freq * x)


class HyenaFilter(nn.Module):
    """h[c, t] = MLP(z(t))[c] * (exp(-t |delta_c|) + shift), z = [t, cos(f w t), -sin(f w t)] for l_max."""

    def __init__(self, c):
        super().__init__()
        order, d, emb = c["filter_order"], c["d_model"], c["emb_dim"]
        self.l_max, self.shift, self.modulate = c["max_seq_len"], c["modulation_shift"], c["modulate"]
        self.register_buffer("band_freqs", torch.zeros((emb - 1) // 2))
        self.act = Sin(order)
        self.mlp = nn.ModuleList([nn.Linear(emb, order)] + [nn.Linear(order, order) for _ in range(c["num_inner_mlps"])])
        self.out = nn.Linear(order, d, bias=False)
        self.bias = nn.Parameter(torch.zeros(d))
        if self.modulate:
            self.register_buffer("deltas", torch.zeros(d))

    def forward(self, n, dtype):
        pos = torch.arange(n, dtype=torch.float64, device=self.bias.device)
        t = pos / (self.l_max - 1)
        ang = (2 * math.pi * pos / self.l_max)[:, None] * self.band_freqs.double()[None, :]
        h = torch.cat([t[:, None], ang.cos(), -ang.sin()], dim=-1).to(dtype)
        t = t[:, None].to(dtype)
        freq = self.act.freq.to(dtype)
        for lin in self.mlp:
            h = torch.sin(freq * F.linear(h, lin.weight.to(dtype), lin.bias.to(dtype)))
        h = F.linear(h, self.out.weight.to(dtype))
        if self.modulate:
            h = h * (torch.exp(-t * self.deltas.to(dtype).abs()[None, :]) + self.shift)
        return h.t()


class HyenaOperator(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["d_model"]
        self.in_proj = nn.Linear(d, 3 * d)
        self.short_conv = nn.Conv1d(3 * d, 3 * d, c["short_filter_order"], groups=3 * d)
        self.filter = HyenaFilter(c)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):
        dt = _compute_dtype(x)
        post, pre, v = _short_conv_chunks(self.in_proj(x), self.short_conv, dt)
        u = pre * v
        y = post * (_causal_fft_conv(u, self.filter(x.shape[1], dt)) + u * self.filter.bias.to(dt)[:, None])
        return self.out_proj(y.transpose(1, 2).to(x.dtype))


def hyena_net(c, vocab):
    d, eps = c["d_model"], c["norm_eps"]
    blocks = [Block(nn.LayerNorm(d, eps=eps), HyenaOperator(c), nn.LayerNorm(d, eps=eps), GeluMLP(d, c["d_inner"] or 4 * d, True))
              for _ in range(c["n_layers"])]
    return LMNet(vocab, d, blocks, nn.LayerNorm(d, eps=eps))


# ----------------------------------------------------------------------------- Evo 2 (StripedHyena 2)
class ExplicitFilter(nn.Module):
    def __init__(self, d, groups, length, window, skip):
        super().__init__()
        self.h = nn.Parameter(torch.zeros(groups, length))
        if window:
            self.register_buffer("window", torch.ones(groups, length))
        if skip:
            self.D = nn.Parameter(torch.zeros(d))

    def kernel(self, d, n, dtype):
        h = self.h.to(dtype) * (self.window.to(dtype) if hasattr(self, "window") else 1.0)
        return h.repeat_interleave(d // h.shape[0], dim=0)[:, :n]


class ModalFilter(nn.Module):
    def __init__(self, d, groups, state, param):
        super().__init__()
        self.param = param
        if param == "log_rate":
            self.log_rate = nn.Parameter(torch.zeros(groups, state))
        else:
            self.log_poles = nn.Parameter(torch.zeros(groups, state))
        self.residues = nn.Parameter(torch.zeros(groups, state))
        self.D = nn.Parameter(torch.zeros(d))

    def kernel(self, d, n, dtype):
        log_p = -torch.exp(self.log_rate.to(dtype)) if self.param == "log_rate" else self.log_poles.to(dtype)
        t = torch.arange(n, dtype=dtype, device=log_p.device)
        h = (self.residues.to(dtype)[:, :, None] * torch.exp(log_p[:, :, None] * t)).sum(1)
        return h.repeat_interleave(d // h.shape[0], dim=0)


class StripedHyenaMixer(nn.Module):
    def __init__(self, c, kind):
        super().__init__()
        d = c["d_model"]
        self.kind = kind
        self.proj = nn.Linear(d, 3 * d, bias=False)
        self.short_conv = nn.Conv1d(3 * d, 3 * d, c["short_filter_length"], groups=3 * d, bias=c["short_filter_bias"])
        if kind == "S":
            self.filter = ExplicitFilter(d, c["se_filter_groups"], c["se_filter_length"], False, False)
        elif kind == "D":
            self.filter = ExplicitFilter(d, c["mr_filter_groups"], c["mr_filter_length"], c["mr_decay"], True)
        else:
            self.filter = ModalFilter(d, c["li_filter_groups"] or d, c["state_size"], c["li_poles"])
        self.out = nn.Linear(d, d, bias=c["hyena_out_bias"])

    def forward(self, x):
        dt = _compute_dtype(x)
        d, n = x.shape[-1], x.shape[1]
        post, pre, v = _short_conv_chunks(self.proj(x), self.short_conv, dt)
        u = pre * v
        conv = _causal_fft_conv(u, self.filter.kernel(d, n, dt))
        if hasattr(self.filter, "D"):
            conv = conv + u * self.filter.D.to(dt)[:, None]
        return self.out((post * conv).transpose(1, 2).to(x.dtype))


def evo2_net(c, vocab):
    d, eps = c["d_model"], c["norm_eps"]
    hidden = c["mlp_dim"] or c["mlp_multiple_of"] * math.ceil(int(2 * d * 4 / 3) / c["mlp_multiple_of"])
    blocks = []
    for i, kind in enumerate(c["pattern"]):
        if kind == "*":
            mixer = Attention(d, c["n_heads"], True, c["qkv_bias"], c["attn_out_bias"], c["rope_base"],
                              c["rope_interpolation"], c["rope_freqs"] == "stored")
        else:
            mixer = StripedHyenaMixer(c, kind)
        act = c["mlp_activation"] if (i == 0 or not c["mlp_act_first_layer_only"]) else "identity"
        blocks.append(Block(RMSNorm(d, eps, c["rmsnorm"]), mixer, RMSNorm(d, eps, c["rmsnorm"]), GatedMLP(d, hidden, False, act)))
    return LMNet(vocab, d, blocks, RMSNorm(d, eps, c["rmsnorm"]))


# ----------------------------------------------------------------------------- Caduceus (BiMamba, RC-equivariant)
# glmtrain.models.caduceus re-stated without kernels: mamba-ssm 1.2's Mamba mixer with its selective scan as a
# plain loop over positions, BiMamba, the pre-norm residual blocks and, for Caduceus-PS (rcps), the two strand
# halves [fwd | rc] with shared weights.  The complement map (token id -> id of the complementary base) comes
# from config.json ("complement_map"), as glmtrain derives it from the tokenizer.
class MambaMixer(nn.Module):
    """in_proj -> (x, z); x: depthwise causal conv + SiLU; x_proj -> (dt, B, C); delta = softplus(dt_proj(dt));
    A = -exp(A_log); h[t] = exp(delta A) h[t-1] + delta B u; y = (C.h + D u) * silu(z); out_proj."""

    def __init__(self, c):
        super().__init__()
        d, n = c["d_model"], c["d_state"]
        di, r = c["expand"] * d, c["dt_rank"] or math.ceil(d / 16)
        self.splits = (r, n, n)
        self.in_proj = nn.Linear(d, 2 * di, bias=c["bias"])
        self.conv1d = nn.Conv1d(di, di, c["d_conv"], groups=di, bias=c["conv_bias"])
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=True)
        self.A_log = nn.Parameter(torch.zeros(di, n))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d, bias=c["bias"])

    @staticmethod
    def scan(u, delta, A, B, C, block: int = 256):
        """States h [batch, d_inner, d_state] one position at a time; decays and inputs are formed for
        ``block`` positions at once (memory O(block), not O(length)).  u, delta [b, L, di]; B, C [b, L, n]."""
        h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
        ys = []
        for t0 in range(0, u.shape[1], block):
            sl = slice(t0, t0 + block)
            decay = torch.exp(delta[:, sl, :, None] * A)
            inp = (delta[:, sl] * u[:, sl])[..., None] * B[:, sl, None, :]
            for t in range(decay.shape[1]):
                h = decay[:, t] * h + inp[:, t]
                ys.append((h * C[:, t0 + t, None, :]).sum(-1))
        return torch.stack(ys, dim=1)

    def forward(self, x):
        dt = _compute_dtype(x)
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv1d(F.pad(xs.transpose(1, 2), (self.conv1d.kernel_size[0] - 1, 0)))).transpose(1, 2)
        dtr, B, C = torch.split(self.x_proj(u), self.splits, dim=-1)
        delta = F.softplus(self.dt_proj(dtr.to(self.dt_proj.weight.dtype)).to(dt))
        A = -torch.exp(self.A_log.to(dt))
        u = u.to(dt)
        y = self.scan(u, delta, A, B.to(dt), C.to(dt)) + u * self.D.to(dt)
        return self.out_proj((y * F.silu(z.to(dt))).to(x.dtype))


class BiMamba(nn.Module):
    """mamba_fwd(x) combined ("add" or "ew_multiply") with mamba_rev run on the length-reversed sequence;
    ``bidirectional_weight_tie`` shares in_proj / out_proj between the two."""

    def __init__(self, c):
        super().__init__()
        self.strategy = c["bidirectional_strategy"]
        self.mamba_fwd = MambaMixer(c)
        self.mamba_rev = MambaMixer(c) if c["bidirectional"] else None
        if self.mamba_rev is not None and c["bidirectional_weight_tie"]:
            for proj in ("in_proj", "out_proj"):
                setattr(self.mamba_rev, proj, getattr(self.mamba_fwd, proj))

    def forward(self, x):
        out = self.mamba_fwd(x)
        if self.mamba_rev is None:
            return out
        rev = self.mamba_rev(x.flip(1)).flip(1)
        return out + rev if self.strategy == "add" else out * rev


def _rc_half(x):
    """The reverse-complement view of a strand half: length and channels reversed."""
    return x.flip(-2, -1)


def _on_strands(module, x):
    """Caduceus-PS: ``module`` on the forward half, and on the rc view of the rc half (mapped back)."""
    d = x.shape[-1] // 2
    return torch.cat([module(x[..., :d]), _rc_half(module(_rc_half(x[..., d:])))], dim=-1)


class CaduceusBlock(nn.Module):
    """residual = hidden + residual; hidden = mixer(norm(residual)).  PS with fused_add_norm (the released
    checkpoints' Triton path) exchanges the two halves of hidden and residual first."""

    def __init__(self, c):
        super().__init__()
        self.norm = _norm(c["norm"], c["d_model"], c["norm_eps"])
        self.mixer = BiMamba(c)
        self.rcps, self.swap, self.fp32 = c["rcps"], c["rcps"] and c["fused_add_norm"], c["residual_in_fp32"]

    def _halves(self, module, x):
        return _on_strands(module, x) if self.rcps else module(x)

    def forward(self, hidden, residual):
        if self.swap:
            hidden = hidden.roll(hidden.shape[-1] // 2, dims=-1)
            residual = None if residual is None else residual.roll(residual.shape[-1] // 2, dims=-1)
        residual = hidden if residual is None else hidden + residual
        normed = self._halves(self.norm, residual.to(self.norm.weight.dtype))
        if self.fp32:
            residual = residual.float()
        return self._halves(self.mixer, normed), residual


class CaduceusNet(nn.Module):
    """Embedding -> Caduceus blocks -> add + final norm -> LM head tied to the embedding.  PS: the hidden state is
    [embed(x) | rc view of embed(rc(x))] and the logits W h_fwd + (W h_rc)[complement]; ``rc_average``
    (Caduceus-Ph) averages with the logits of rc(x) mapped back (``eval``: when not training)."""

    def __init__(self, c, vocab):
        super().__init__()
        d = c["d_model"]
        self.rcps, self.rc_average = c["rcps"], c["rc_average"]
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(CaduceusBlock(c) for _ in range(c["n_layers"]))
        self.norm_f = _norm(c["norm"], d, c["norm_eps"])
        self.lm_head = nn.Linear(d, vocab, bias=False)
        # a plain list, not a buffer: transformers re-creates non-persistent buffers uninitialised
        self.complement_map = list(range(vocab))

    def configure(self, config):
        """The complement map from config.json (written by glmtrain's exporter from the tokenizer)."""
        comp = getattr(config, "complement_map", None)
        if comp is None and (self.rcps or self.rc_average != "none"):
            raise ValueError("config.json has no complement_map, which Caduceus-PS and rc_average need; "
                             "re-export with python -m glmtrain.convert export")
        self.complement_map = [int(i) for i in comp or self.complement_map]

    def _logits(self, ids):
        comp = torch.as_tensor(self.complement_map, device=ids.device)
        h = self.embed(ids)
        if self.rcps:
            h = torch.cat([h, _rc_half(self.embed(comp[ids.flip(-1)]))], dim=-1)
        residual = None
        for block in self.blocks:
            h, residual = block(h, residual)
        h = (h if residual is None else h + residual).to(self.norm_f.weight.dtype)
        if not self.rcps:
            return self.lm_head(self.norm_f(h))
        h = _on_strands(self.norm_f, h)
        d = h.shape[-1] // 2
        return self.lm_head(h[..., :d]) + self.lm_head(h[..., d:].flip(-1))[..., comp]

    def forward(self, ids, key_padding=None):  # no padding mask: like glmtrain and the reference, every id is read
        logits = self._logits(ids)
        if self.rc_average == "always" or (self.rc_average == "eval" and not self.training):
            comp = torch.as_tensor(self.complement_map, device=ids.device)
            logits = (logits + self._logits(comp[ids.flip(-1)]).flip(1)[..., comp]) / 2
        return logits


NETWORKS = {"transformer": TransformerNet, "hyena": hyena_net, "evo2": evo2_net, "caduceus": CaduceusNet}


# ----------------------------------------------------------------------------- transformers wrappers
class GlmtrainPreTrainedModel(PreTrainedModel):
    config_class = GlmtrainConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def _init_weights(self, module):
        pass  # every weight comes from model.safetensors

    def __init__(self, config):
        super().__init__(config)
        c = config.glmtrain
        self.model = NETWORKS[config.family](c, config.vocab_size)
        if hasattr(self.model, "configure"):  # values config.json holds outside the glmtrain model config
            self.model.configure(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.lm_head

    def _loss_and_logits(self, input_ids, attention_mask, labels, shift):
        logits = self.model(input_ids, attention_mask)
        loss = None
        if labels is not None:
            lg, lb = (logits[:, :-1], labels[:, 1:]) if shift else (logits, labels)
            loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), lb.reshape(-1), ignore_index=-100)
        return loss, logits


class GlmtrainForCausalLM(GlmtrainPreTrainedModel):
    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        loss, logits = self._loss_and_logits(input_ids, attention_mask, labels, shift=True)
        return CausalLMOutput(loss=loss, logits=logits)


class GlmtrainForMaskedLM(GlmtrainPreTrainedModel):
    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        loss, logits = self._loss_and_logits(input_ids, attention_mask, labels, shift=False)
        return MaskedLMOutput(loss=loss, logits=logits)


# ----------------------------------------------------------------------------- NT-v2 in its released layout
class _NtGlu(nn.Module):
    """NT-v2's MLP input: one bias-free Linear d -> 2 * ffn; silu(first half) * second half."""

    def __init__(self, d, ffn):
        super().__init__()
        self.dense = nn.Linear(d, 2 * ffn, bias=False)

    def forward(self, x):
        first, second = self.dense(x).chunk(2, dim=-1)
        return F.silu(first) * second


class NtEsmForMaskedLM(EsmForMaskedLM):
    """transformers' ESM (embeddings, rotary attention, norms, MLM head) with NT-v2's gated MLP where the
    config says ``add_bias_fnn: false`` (the layout of the InstaDeepAI nucleotide-transformer-v2 files)."""

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "add_bias_fnn", True) is False:
            for layer in self.esm.encoder.layer:
                layer.intermediate = _NtGlu(config.hidden_size, config.intermediate_size)
                layer.output.dense = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
            self.post_init()
