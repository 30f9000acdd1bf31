"""HyenaDNA: single-nucleotide causal LM built from order-2 Hyena operators.

Architecture (Nguyen et al. 2023, arXiv 2306.15794; shapes from the released
``LongSafari/hyenadna-*`` configs):

* token embedding (vocabulary padded to 16), no positional embedding;
* ``n_layers`` pre-norm blocks: ``x += Hyena(LN(x))``, ``x += MLP(LN(x))`` with a
  4*d GELU(tanh) MLP; residual stream kept in fp32; final LayerNorm;
* LM head tied to the embedding;
* Hyena operator of order 2: ``in_proj`` d->3d, depthwise causal conv of length
  3 (with bias), split into (post, pre, v) -- stored channel-interleaved (row 3c+j = component j of
  channel c: a tensor-parallel shard is a contiguous slice; see ``layers.split_interleaved``); ``y = post * (h * (pre * v) + D * (pre * v))``
  with the long convolution ``h *`` computed by FFT of size ~2L in fp32;
  ``out_proj`` d->d;
* implicit long filter ``h[t] = MLP(z(t)) * window(t)``: positional features
  ``z(t) = [t/(l_max-1), cos(f_i w t), -sin(f_i w t)]`` (emb_dim 5 = 1 + 2 bands,
  ``w = 2*pi/l_max``), ``Linear(5, 64) -> Sin -> 2 x [Linear(64, 64) -> Sin] ->
  Linear(64, d, bias=False)``, ``Sin(x) = sin(freq * x)`` with a trainable
  frequency (init 10) shared by the three activations, times exponential decay
  windows (fast 0.3, slow 1.5, target 1e-2).

Long-context design: the positional features are computed on the fly for any
length from frozen buffers (band frequencies) -- nothing of size ``l_max`` is
stored; the filter MLP runs in position chunks under activation checkpointing
so only the [d, L] filter is kept for backward; the gated FFT core is one
autograd function that saves just its input projection, the filter and D
(:func:`glmtrain.models.ops.hyena_gated_conv`).

Optimizer: every parameter under ``mixer.filter.`` (the implicit-filter MLP,
its Sin frequency and the D skip) goes to its own group with
``filter_weight_decay`` (0) and ``filter_lr_scale`` (see
:meth:`HyenaDNA.param_groups_overrides`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from glmtrain.models.base import GenomicModel, ModelConfig
from glmtrain.models.layers import gpt2_init, gpt2_init_module, split_interleaved
from glmtrain.models.ops import gelu_linear, hyena_gated_conv


@dataclass
class HyenaConfig(ModelConfig):
    family: str = "hyena"
    name: str = "hyena-tiny-1k"
    d_model: int = 128
    n_layers: int = 2
    d_inner: int = 0  # MLP width; 0 = 4 * d_model
    # --- Hyena operator
    short_filter_order: int = 3  # depthwise causal conv on the 3d projection
    filter_order: int = 64  # width of the implicit-filter MLP
    emb_dim: int = 5  # positional features: t + 2 * bands (odd, >= 3)
    num_inner_mlps: int = 2
    filter_w: float = 10.0  # initial frequency of the Sin activation
    train_freq: bool = True
    modulate: bool = True  # exponential decay window on the filter
    decay_fast: float = 0.3
    decay_slow: float = 1.5
    decay_target: float = 1e-2
    modulation_shift: float = 0.0
    # Length that normalises the positional features (published l_max).  The
    # filter is defined for any length; positions beyond max_seq_len extrapolate.
    max_seq_len: int = 1026
    # --- block
    norm_eps: float = 1e-5
    embed_dropout: float = 0.1
    resid_dropout: float = 0.0
    initializer_range: float = 0.02
    # --- optimizer group for the implicit filter
    filter_lr_scale: float = 1.0
    filter_weight_decay: float = 0.0
    # --- memory / speed knobs (no effect on the maths)
    checkpoint_policy: str = "block"  # block | mlp (used when activation_checkpointing)
    checkpoint_layers: int = 0  # 0 = every layer; n = only the first n layers
    filter_chunk: int = 65536  # positions per checkpointed chunk of the filter MLP
    fft_channel_chunk: int = 0  # 0 = automatic
    fused_hyena: bool = True  # fused autograd core (saves memory); False = plain composition
    mlp_recompute_gelu: bool = True  # recompute the MLP's GELU in backward instead of storing [L, 4d]

    SPEED_ONLY: ClassVar[tuple[str, ...]] = ModelConfig.SPEED_ONLY + (
        "checkpoint_policy", "checkpoint_layers", "filter_chunk", "fft_channel_chunk", "fused_hyena", "mlp_recompute_gelu")

    def resolved_d_inner(self) -> int:
        return self.d_inner or 4 * self.d_model


class Sin(nn.Module):
    """sin(freq * x) with a (optionally trainable) per-feature frequency."""

    def __init__(self, dim: int, w: float = 10.0, train_freq: bool = True):
        super().__init__()
        self.w = w
        if train_freq:
            self.freq = nn.Parameter(w * torch.ones(1, dim))
        else:
            self.register_buffer("freq", w * torch.ones(1, dim))

    def reset_parameters(self) -> None:
        if isinstance(self.freq, nn.Parameter):
            nn.init.constant_(self.freq, self.w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class ImplicitFilter(nn.Module):
    """Long filter h [d, L] generated by a small sine MLP of positional features."""

    def __init__(self, cfg: HyenaConfig):
        super().__init__()
        if cfg.emb_dim < 3 or cfg.emb_dim % 2 == 0:
            raise ValueError(f"model.emb_dim={cfg.emb_dim} must be odd and >= 3 (t + sin/cos bands)")
        if cfg.max_seq_len < 2:
            raise ValueError("model.max_seq_len must be >= 2: it normalises the filter's positional features")
        self.cfg = cfg
        d, order = cfg.d_model, cfg.filter_order
        bands = (cfg.emb_dim - 1) // 2
        # frozen positional-feature parameters (buffers): band frequencies and the normaliser
        self.register_buffer("band_freqs", torch.linspace(1e-4, bands - 1, bands, dtype=torch.float64).float())
        self.l_max = cfg.max_seq_len
        self.act = Sin(order, cfg.filter_w, cfg.train_freq)  # shared by all activations, as published
        layers: list[nn.Module] = [nn.Linear(cfg.emb_dim, order)]
        for _ in range(cfg.num_inner_mlps):
            layers.append(nn.Linear(order, order))
        self.mlp = nn.ModuleList(layers)
        self.out = nn.Linear(order, d, bias=False)
        self.bias = nn.Parameter(torch.randn(d))  # the D skip term
        if cfg.modulate:
            max_decay = math.log(cfg.decay_target) / cfg.decay_fast
            min_decay = math.log(cfg.decay_target) / cfg.decay_slow
            self.register_buffer("deltas", torch.linspace(min_decay, max_decay, d))
        else:
            self.deltas = None

    def reset_parameters(self) -> None:
        nn.init.normal_(self.bias)  # the D skip term, N(0, 1) as published

    def features(self, start: int, stop: int, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Positional features z [n, emb_dim] and normalised time t [n, 1] for positions [start, stop)."""
        pos = torch.arange(start, stop, device=device, dtype=torch.float64)
        t = pos / (self.l_max - 1)
        w = 2 * math.pi * pos / self.l_max
        ang = w[:, None] * self.band_freqs.to(device=device, dtype=torch.float64)[None, :]
        z = torch.cat([t[:, None], torch.cos(ang), -torch.sin(ang)], dim=-1)
        return z.to(dtype), t[:, None].to(dtype)

    def _chunk(self, start: int, stop: int, anchor: torch.Tensor) -> torch.Tensor:
        dt = torch.float64 if anchor.dtype == torch.float64 else torch.float32
        z, t = self.features(start, stop, anchor.device, dt)
        h = z
        # The filter is computed in fp32 even when the parameters are stored in bf16 (FSDP2
        # mixed precision, bf16-true): casting the weights keeps 1M-position features exact.
        for lin in self.mlp:
            h = self.act(F.linear(h, lin.weight.to(dt), None if lin.bias is None else lin.bias.to(dt)))
        h = F.linear(h, self.out.weight.to(dt))  # [n, d]
        if self.deltas is not None:
            h = h * (torch.exp(-t * self.deltas.abs()[None, :]) + self.cfg.modulation_shift)
        return h

    def forward(self, seq_len: int) -> torch.Tensor:
        """Filter [d, L] in fp32 (autocast disabled)."""
        anchor = self.out.weight
        with torch.autocast(device_type=anchor.device.type, enabled=False):
            chunk = self.cfg.filter_chunk or seq_len
            if seq_len <= chunk:
                return self._chunk(0, seq_len, anchor).t().contiguous()
            parts = []
            for s in range(0, seq_len, chunk):
                e = min(seq_len, s + chunk)
                if torch.is_grad_enabled():
                    parts.append(checkpoint(self._chunk, s, e, anchor, use_reentrant=False).t())
                else:
                    parts.append(self._chunk(s, e, anchor).t())
            # [d, L] contiguous: the FFT core reads it channel-first
            return torch.cat(parts, dim=1)


class HyenaOperator(nn.Module):
    def __init__(self, cfg: HyenaConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.in_proj = nn.Linear(d, 3 * d)
        self.short_conv = nn.Conv1d(3 * d, 3 * d, cfg.short_filter_order, groups=3 * d, padding=0)
        self.filter = ImplicitFilter(cfg)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, d] -> [B, L, d]."""
        seq_len = x.shape[1]
        # in_proj / short_conv rows are channel-interleaved (tensor-parallel-native; layers.split_interleaved)
        z, w_short, b_short = split_interleaved(self.in_proj(x), self.short_conv.weight, self.short_conv.bias)
        k = self.filter(seq_len)
        y = hyena_gated_conv(
            z, w_short, b_short, k, self.filter.bias,
            channel_chunk=self.cfg.fft_channel_chunk, fused=self.cfg.fused_hyena,
        )
        return self.out_proj(y.transpose(1, 2))


class HyenaMLP(nn.Module):
    """fc2(GELU_tanh(fc1(x))); optionally recomputes the GELU in backward (saves L * 4d activations)."""

    def __init__(self, d: int, hidden: int, recompute_gelu: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.recompute_gelu = recompute_gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.recompute_gelu and torch.is_grad_enabled():
            return gelu_linear(h, self.fc2.weight, self.fc2.bias, "tanh")
        return self.fc2(F.gelu(h, approximate="tanh"))


class HyenaBlock(nn.Module):
    def __init__(self, cfg: HyenaConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = HyenaOperator(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = HyenaMLP(cfg.d_model, cfg.resolved_d_inner(), cfg.mlp_recompute_gelu)
        self.drop = nn.Dropout(cfg.resid_dropout)
        self.checkpoint_mlp = False

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.mixer(self.norm1(x))).to(x.dtype)
        if self.checkpoint_mlp and torch.is_grad_enabled():
            return x + checkpoint(self._mlp, x, use_reentrant=False).to(x.dtype)
        return x + self._mlp(x).to(x.dtype)


class HyenaDNA(GenomicModel):
    causal = True

    def __init__(self, cfg: HyenaConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        if cfg.checkpoint_policy not in ("block", "mlp"):
            raise ValueError(f"model.checkpoint_policy={cfg.checkpoint_policy!r}: allowed values are block, mlp")
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.embed_drop = nn.Dropout(cfg.embed_dropout)
        self.blocks = nn.ModuleList(HyenaBlock(cfg) for _ in range(cfg.n_layers))
        self.norm_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        self.reset_parameters()

    RESIDUAL = ("mixer.out_proj", "mlp.fc2")

    def reset_parameters(self) -> None:
        # GPT-2 style as in HyenaDNA: every Linear N(0, 0.02) (the filter MLP too),
        # biases 0, residual projections scaled by 1/sqrt(2 * n_layers).
        gpt2_init(self, self.cfg.initializer_range, self.cfg.n_layers, self.RESIDUAL)

    def init_module(self, name: str, module: nn.Module) -> None:
        if not gpt2_init_module(name, module, self.cfg.initializer_range, self.cfg.n_layers, self.RESIDUAL):
            super().init_module(name, module)

    def param_groups_overrides(self) -> dict[str, dict]:
        return {"mixer.filter.": {"weight_decay": self.cfg.filter_weight_decay, "lr_scale": self.cfg.filter_lr_scale}}

    def _checkpointed(self, i: int) -> bool:
        n = self.cfg.checkpoint_layers
        return self.cfg.activation_checkpointing and self.training and (n <= 0 or i < n)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_drop(self.embed(input_ids))
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # residual stream kept in (at least) fp32
        for i, block in enumerate(self.blocks):
            ckpt = self._checkpointed(i)
            if ckpt and self.cfg.checkpoint_policy == "block":
                x = checkpoint(block, x, use_reentrant=False)
            else:
                block.checkpoint_mlp = ckpt and self.cfg.checkpoint_policy == "mlp"
                x = block(x)
        return self.norm_f(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids))

    def filters(self, seq_len: int) -> list[torch.Tensor]:
        """The long filters [d, L] of every layer (for inspection)."""
        return [b.mixer.filter(seq_len) for b in self.blocks]


__all__ = ["HyenaConfig", "HyenaDNA", "HyenaOperator", "ImplicitFilter"]
