"""Evo 2-style StripedHyena 2: a striped multi-hybrid of three Hyena operators and attention.

Shapes and options follow the released Evo 2 checkpoints (Brixi et al. 2025;
the vortex/savanna configs ``evo2-{1b-8k,7b-1m,40b-1m}.yml`` and the small
``shc-evo2-{50m,100m}-8k`` configs):

* byte tokenizer (vocabulary 512), tied embedding / LM head, final RMSNorm (eps 1e-6);
* the block order is a pattern string, one character per layer:
  ``S`` = Hyena-SE (explicit short filter, length 7), ``D`` = Hyena-MR
  (explicit length-128 filter with a fixed exponential-decay window, plus a D
  skip), ``H`` = Hyena-LI (implicit *modal* filter ``h[t] = sum_n R_n p_n^t`` of
  order ``state_size`` = 16, FFT convolution, D skip), ``*`` = multi-head
  attention with RoPE; e.g. Evo 2 1B is ``SDH*SDHSDH*SDHSDH*SDHSDH*``;
* every block is ``x += mixer(RMSNorm(x)); x += MLP(RMSNorm(x))`` with a gated
  MLP ``l3(act(l1 x) * l2 x)``; RMSNorm as vortex computes it, ``scale * x / (rms(x) + eps)``
  (``rmsnorm: vortex``; ``rsqrt`` = the Llama formula);
* Hyena blocks: projection d->3d (no bias), depthwise causal featurizer conv of
  length 3 (no bias), split (post, pre, v) -- rows stored channel-interleaved (3c+j = component j of
  channel c; tensor-parallel-native, see ``layers.split_interleaved``), ``y = post * (h * (pre * v) [+ D * (pre * v)])``,
  output projection d->d with bias;
* attention: fused qkv without bias, output projection *with* bias;
* released-checkpoint quirks as options: ``mlp_act_first_layer_only`` (GELU only in
  layer 0's MLP, identity elsewhere), ``qkv_bias=false`` / ``attn_out_bias=true``.

Filter grouping (``se_filter_groups``, ``mr_filter_groups``, ``li_filter_groups``):
G filters shared by contiguous runs of d/G channels (channel c uses filter
``c // (d // G)``), as in the released checkpoints.  The convolution is then
run depthwise on the expanded [d, K] filter -- the conservative, obviously
correct implementation.

Hyena-MR decay (training from scratch): ``mr_decay_preset`` follows savanna's
``explicit_filter_decay_preset`` -- per filter group g a window ``exp(-r_g * t)`` with
``t = linspace(0, 1, K)`` and ``r_g = logspace(lo, 2, G)``, lo = -2 (``weak``, the Evo 2
7B/40B training configs), -1 (``normal``) or 0 (``strong``); ``linear`` is the older
HyenaDNA-style linear spread of rates (``mr_decay_fast/slow/target``).  Released
checkpoints store the MR filters with the decay already applied: imported weights
run with the window off (or set to one), never applied twice.

RoPE (``rope_freqs: stored``) keeps its frequencies as a buffer, initialised as vortex
computes them, so that a released checkpoint's stored values are used as they are.

The fused layouts are vortex's own: the Hyena projection and featurizer rows are
channel-interleaved (vortex ``interleave``) and the attention qkv rows head-major (``column_split``),
so released weights load without any permutation.  Not reproduced: FP8 projections.  Hyena-LI poles are real and parametrised as
``p = exp(-exp(log_rate))`` so that every mode decays (``li_poles: log_rate``); the released
weights store ``log p`` directly, which ``li_poles: log_pole`` keeps as it is (the importer maps
either way; ``log_rate = log(-log p)`` rounds to the parameter's dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from glmtrain.models.base import GenomicModel, ModelConfig
from glmtrain.models.layers import RMSNorm, RopeAttention, SwiGLU, gpt2_init, gpt2_init_module, hyena_inputs
from glmtrain.models.ops import (
    direct_causal_conv,
    fft_causal_conv,
    flash_attn_func,
    grouped_filter,
    hyena_gated_conv,
    short_causal_conv,
)

BLOCK_KINDS = {"S": "hyena_se", "D": "hyena_mr", "H": "hyena_li", "*": "attention"}


@dataclass
class Evo2Config(ModelConfig):
    family: str = "evo2"
    name: str = "evo2-tiny"
    d_model: int = 128
    pattern: str = "SDH*SDH*"  # one char per layer: S (SE), D (MR), H (LI), * (attention)
    n_layers: int = 0  # 0 = len(pattern); otherwise must equal it
    n_heads: int = 4
    mlp_dim: int = 0  # 0 = 8/3 * d rounded up to mlp_multiple_of
    mlp_multiple_of: int = 128
    mlp_activation: str = "gelu"  # gelu | silu
    mlp_act_first_layer_only: bool = True  # Evo 2 quirk: identity activation after layer 0
    norm_eps: float = 1e-6
    rmsnorm: str = "vortex"  # vortex: scale * x / (rms + eps) (released Evo 2) | rsqrt: x * rsqrt(mean(x^2) + eps)
    # --- Hyena operators
    short_filter_length: int = 3  # featurizer conv on the 3d projection
    short_filter_bias: bool = False
    se_filter_length: int = 7
    se_filter_groups: int = 16
    mr_filter_length: int = 128
    mr_filter_groups: int = 16
    mr_decay: bool = True  # fixed exponential-decay window on the MR filter
    mr_decay_preset: str = "weak"  # weak | normal | strong (savanna: rates logspace(-2|-1|0, 2) over groups) | linear
    mr_decay_fast: float = 0.3  # linear preset: fraction of the filter length where the fastest group reaches target
    mr_decay_slow: float = 1.5
    mr_decay_target: float = 1e-2
    li_filter_groups: int = 0  # 0 = d_model (one modal filter per channel)
    state_size: int = 16  # order of the modal (Hyena-LI) filter
    li_rate_min: float = 1e-4  # initial decay rates of the modes (per token), log-spaced
    li_rate_max: float = 1.0
    li_poles: str = "log_rate"  # log_rate: p = exp(-exp(theta)) (savanna training) | log_pole: theta = log p (vortex files)
    hyena_out_bias: bool = True
    # --- attention
    qkv_bias: bool = False
    attn_out_bias: bool = True
    rope_base: float = 10000.0
    rope_interpolation: float = 1.0  # linear position interpolation factor (positions / factor)
    rope_freqs: str = "stored"  # stored: a buffer (vortex's fp32 values; released checkpoints carry theirs) | computed
    attention: str = "sdpa"  # sdpa | flash_attn (optional package)
    # --- misc
    tie_embeddings: bool = True
    initializer_range: float = 0.02
    filter_lr_scale: float = 1.0
    filter_weight_decay: float = 0.0
    checkpoint_layers: int = 0  # with activation_checkpointing: 0 = every block, n = first n
    fft_channel_chunk: int = 0

    SPEED_ONLY: ClassVar[tuple[str, ...]] = ModelConfig.SPEED_ONLY + ("checkpoint_layers", "fft_channel_chunk", "attention")
    STAGE_KNOBS: ClassVar[tuple[str, ...]] = ("rope_base", "rope_interpolation")

    def layer_kinds(self) -> list[str]:
        bad = sorted(set(self.pattern) - set(BLOCK_KINDS))
        if bad or not self.pattern:
            raise ValueError(f"model.pattern={self.pattern!r}: use only the characters S, D, H, * (got {bad})")
        if self.n_layers and self.n_layers != len(self.pattern):
            raise ValueError(f"model.n_layers={self.n_layers} but model.pattern has {len(self.pattern)} layers")
        return [BLOCK_KINDS[c] for c in self.pattern]

    def resolved_n_layers(self) -> int:
        return self.n_layers or len(self.pattern)

    def resolved_li_filter_groups(self) -> int:
        return self.li_filter_groups or self.d_model

    def resolved_mlp_dim(self) -> int:
        if self.mlp_dim:
            return self.mlp_dim
        m = self.mlp_multiple_of
        return m * math.ceil(int(2 * self.d_model * 4 / 3) / m)


# ----------------------------------------------------------------------------- filters


MR_DECAY_PRESETS = {"strong": (0.0, 2.0), "normal": (-1.0, 2.0), "weak": (-2.0, 2.0)}  # savanna: log10 rate range


def mr_decay_window(cfg: "Evo2Config") -> torch.Tensor | None:
    """The fixed MR decay window [G, K] of a config (None when ``mr_decay`` is off)."""
    if not cfg.mr_decay:
        return None
    groups, length = cfg.mr_filter_groups, cfg.mr_filter_length
    if cfg.mr_decay_preset == "linear":
        return linear_decay_window(groups, length, cfg.mr_decay_fast, cfg.mr_decay_slow, cfg.mr_decay_target)
    if cfg.mr_decay_preset not in MR_DECAY_PRESETS:
        raise ValueError(f"model.mr_decay_preset={cfg.mr_decay_preset!r}: allowed values are "
                         f"{', '.join([*MR_DECAY_PRESETS, 'linear'])}")
    lo, hi = MR_DECAY_PRESETS[cfg.mr_decay_preset]
    # as savanna's ExplicitSingleDecayFilter builds it (fp32): rates log-spaced over the groups, t in [0, 1]
    rates = torch.logspace(lo, hi, groups)[:, None]
    return torch.exp(-rates * torch.linspace(0, 1, length, device=rates.device)[None])


def linear_decay_window(groups: int, length: int, fast: float, slow: float, target: float) -> torch.Tensor:
    """Rates spread linearly so that the slowest group reaches ``target`` at ``slow`` and the fastest at
    ``fast`` (fractions of the filter length)."""
    t = torch.arange(length, dtype=torch.float64) / length
    rates = torch.linspace(math.log(1 / target) / slow, math.log(1 / target) / fast, groups, dtype=torch.float64,
                           device=t.device)
    return torch.exp(-rates[:, None] * t[None, :]).float()


class ExplicitFilter(nn.Module):
    """Grouped explicit FIR filter [G, K] (Hyena-SE / Hyena-MR).

    ``decay``: None, a window [G, K], or (fast, slow, target) for :func:`linear_decay_window`.
    """

    def __init__(self, d: int, length: int, groups: int, decay: tuple[float, float, float] | torch.Tensor | None,
                 skip: bool):
        super().__init__()
        if d % groups:
            raise ValueError(f"d_model={d} is not divisible by filter groups={groups}")
        self.d, self.groups, self.length = d, groups, length
        self.h = nn.Parameter(torch.empty(groups, length))
        if isinstance(decay, tuple):
            decay = linear_decay_window(groups, length, *decay)
        if decay is not None:
            self.register_buffer("window", decay.float())
        else:
            self.window = None
        self.D = nn.Parameter(torch.zeros(d)) if skip else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.h, 0.0, 1 / math.sqrt(self.length))
        if self.D is not None:
            nn.init.zeros_(self.D)

    def materialize(self) -> torch.Tensor:
        """Effective per-group filter [G, K] (window applied); index 0 = current token."""
        h = self.h.float() if self.h.dtype != torch.float64 else self.h
        return h * self.window.to(h.dtype) if self.window is not None else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, d, L] -> causal FIR, channel-wise, plus optional D skip."""
        k = grouped_filter(self.materialize(), self.d).to(x.dtype)
        return direct_causal_conv(x, k, self.D)


class ModalFilter(nn.Module):
    """Hyena-LI filter h[g, t] = sum_n R[g, n] * p[g, n]**t with real poles.

    ``param``: ``log_rate`` -- p = exp(-exp(log_rate)), every mode decays whatever the update (savanna
    trains the poles this way); ``log_pole`` -- the parameter ``log_poles`` is log p itself, as vortex
    stores released checkpoints (imports keep those values exactly).
    """

    def __init__(self, d: int, groups: int, state_size: int, rate_min: float, rate_max: float, param: str = "log_rate"):
        super().__init__()
        if d % groups:
            raise ValueError(f"d_model={d} is not divisible by li_filter_groups={groups}")
        if param not in ("log_rate", "log_pole"):
            raise ValueError(f"model.li_poles={param!r}: allowed values are log_rate, log_pole")
        self.d, self.groups, self.state_size, self.param = d, groups, state_size, param
        self.rate_range = (rate_min, rate_max)
        if param == "log_rate":
            self.log_rate = nn.Parameter(torch.empty(groups, state_size))
        else:
            self.log_poles = nn.Parameter(torch.empty(groups, state_size))
        self.residues = nn.Parameter(torch.empty(groups, state_size))
        self.D = nn.Parameter(torch.zeros(d))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        lo, hi = (math.log(r) for r in self.rate_range)
        g, n = self.residues.shape
        # each group gets modes spread log-uniformly over [rate_min, rate_max], with jitter
        jitter = (torch.rand(g, n, dtype=torch.float64) - 0.5) * (hi - lo) / max(1, n)
        base = torch.linspace(lo, hi, n, dtype=torch.float64, device=jitter.device)
        log_rate = (base[None, :] + jitter).float()
        rate = log_rate.exp()
        # residues scaled so that every mode has O(1/sqrt(N)) L1 gain: |R| / (1 - p) ~ 1 / sqrt(N)
        residues = torch.randn(g, n) * (1 - torch.exp(-rate)) / math.sqrt(n)
        theta = log_rate if self.param == "log_rate" else -rate  # log p = -rate
        self.theta.copy_(theta.to(self.theta.device))
        self.residues.copy_(residues.to(self.residues.device))
        nn.init.zeros_(self.D)

    @property
    def theta(self) -> nn.Parameter:
        """The pole parameter (``log_rate`` or ``log_poles``)."""
        return self.log_rate if self.param == "log_rate" else self.log_poles

    def poles(self) -> torch.Tensor:
        if self.param == "log_pole":
            return torch.exp(self.log_poles)
        return torch.exp(-torch.exp(self.log_rate))

    def _materialize(self, theta: torch.Tensor, residues: torch.Tensor, seq_len: int) -> torch.Tensor:
        t = torch.arange(seq_len, device=theta.device, dtype=theta.dtype)
        log_p = -torch.exp(theta) if self.param == "log_rate" else theta  # [G, N]
        h = torch.zeros(theta.shape[0], seq_len, device=theta.device, dtype=theta.dtype)
        for n in range(self.state_size):  # accumulate mode by mode: never a [G, N, L] tensor
            h = h + residues[:, n, None] * torch.exp(log_p[:, n, None] * t)
        return h

    def materialize(self, seq_len: int, dtype=torch.float32) -> torch.Tensor:
        """Explicit per-group filter [G, L]: sum_n R_n p_n^t, in ``dtype``.

        Under autograd the computation is checkpointed, so only the [G, L] result is kept.
        """
        theta = self.theta
        args = (theta.to(dtype), self.residues.to(dtype), seq_len)
        with torch.autocast(device_type=theta.device.type, enabled=False):
            if torch.is_grad_enabled() and theta.requires_grad:
                return checkpoint(self._materialize, *args, use_reentrant=False)
            return self._materialize(*args)

    def forward_recurrent(self, x: torch.Tensor) -> torch.Tensor:
        """Same output as the FFT path, by the modal recurrence s_n[t] = p_n s_n[t-1] + x[t]; y = sum_n R_n s_n (+ D x).

        O(L * N) sequential steps; the reference for tests and the basis of a cached decoder.
        """
        b, d, seq_len = x.shape
        dt = x.dtype
        p = grouped_filter(self.poles().to(dt), d)  # [d, N]
        r = grouped_filter(self.residues.to(dt), d)
        s = torch.zeros(b, d, self.state_size, dtype=dt, device=x.device)
        ys = []
        for t in range(seq_len):
            s = p * s + x[:, :, t, None]
            ys.append((s * r).sum(-1))
        return torch.stack(ys, dim=-1) + x * self.D.to(dt)[:, None]


# ----------------------------------------------------------------------------- mixers


class HyenaMixer(nn.Module):
    """Projection -> featurizer conv -> gated inner filter (SE / MR / LI) -> output projection."""

    decode_state = None  # set by glmtrain.models.decode while decoding with a cache

    def __init__(self, cfg: Evo2Config, kind: str):
        super().__init__()
        d = cfg.d_model
        self.cfg, self.kind = cfg, kind
        self.proj = nn.Linear(d, 3 * d, bias=False)
        self.short_conv = nn.Conv1d(3 * d, 3 * d, cfg.short_filter_length, groups=3 * d, bias=cfg.short_filter_bias)
        if kind == "hyena_se":
            self.filter = ExplicitFilter(d, cfg.se_filter_length, cfg.se_filter_groups, None, skip=False)
        elif kind == "hyena_mr":
            self.filter = ExplicitFilter(d, cfg.mr_filter_length, cfg.mr_filter_groups, mr_decay_window(cfg), skip=True)
        elif kind == "hyena_li":
            self.filter = ModalFilter(d, cfg.li_filter_groups or d, cfg.state_size, cfg.li_rate_min, cfg.li_rate_max,
                                      cfg.li_poles)
        else:
            raise ValueError(kind)
        self.out = nn.Linear(d, d, bias=cfg.hyena_out_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decode_state is not None:
            return self.decode_state.step(self, x)
        seq_len = x.shape[1]
        # proj / short_conv rows are channel-interleaved (tensor-parallel-native; layers.split_interleaved)
        z, w_short, b_short = hyena_inputs(self.proj(x), self.short_conv)  # an adapted short_conv is called
        if self.kind == "hyena_li":
            k = grouped_filter(self.filter.materialize(seq_len, torch.float64 if z.dtype == torch.float64 else torch.float32), self.cfg.d_model)
            y = hyena_gated_conv(z, w_short, b_short, k, self.filter.D, self.cfg.fft_channel_chunk)
        else:
            zc = z if w_short is None else short_causal_conv(z, w_short, b_short)
            post, pre, v = zc.chunk(3, dim=1)
            y = post * self.filter(pre * v)
        return self.out(y.transpose(1, 2))


class Evo2Block(nn.Module):
    def __init__(self, cfg: Evo2Config, kind: str, layer_idx: int):
        super().__init__()
        self.kind = kind
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.rmsnorm)
        if kind == "attention":
            # Evo 2 quirk: bias on the attention output projection only (released checkpoints)
            self.mixer = RopeAttention(cfg.d_model, cfg.n_heads, causal=True, qkv_bias=cfg.qkv_bias,
                                       out_bias=cfg.attn_out_bias, rope_base=cfg.rope_base,
                                       rope_interpolation=cfg.rope_interpolation, rope_stored=cfg.rope_freqs == "stored",
                                       flash=flash_attn_func() if cfg.attention == "flash_attn" else None)
        else:
            self.mixer = HyenaMixer(cfg, kind)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.rmsnorm)
        act = cfg.mlp_activation if (layer_idx == 0 or not cfg.mlp_act_first_layer_only) else "identity"
        self.mlp = SwiGLU(cfg.d_model, cfg.resolved_mlp_dim(), bias=False, activation=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x)).to(x.dtype)
        return x + self.mlp(self.norm2(x)).to(x.dtype)


class Evo2(GenomicModel):
    causal = True

    def __init__(self, cfg: Evo2Config, vocab_size: int):
        super().__init__(cfg, vocab_size)
        if cfg.mlp_activation not in ("gelu", "silu"):
            raise ValueError(f"model.mlp_activation={cfg.mlp_activation!r}: allowed values are gelu, silu")
        for key, allowed in (("rmsnorm", ("vortex", "rsqrt")), ("rope_freqs", ("stored", "computed")),
                             ("li_poles", ("log_rate", "log_pole")),
                             ("mr_decay_preset", (*MR_DECAY_PRESETS, "linear"))):
            if getattr(cfg, key) not in allowed:
                raise ValueError(f"model.{key}={getattr(cfg, key)!r}: allowed values are {', '.join(allowed)}")
        kinds = cfg.layer_kinds()
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Evo2Block(cfg, kind, i) for i, kind in enumerate(kinds))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.rmsnorm)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    RESIDUAL = ("mixer.out", "mlp.down")

    def reset_parameters(self) -> None:
        gpt2_init(self, self.cfg.initializer_range, len(self.blocks), self.RESIDUAL)

    def init_module(self, name: str, module: nn.Module) -> None:
        if not gpt2_init_module(name, module, self.cfg.initializer_range, len(self.blocks), self.RESIDUAL):
            super().init_module(name, module)

    def param_groups_overrides(self) -> dict[str, dict]:
        return {"mixer.filter.": {"weight_decay": self.cfg.filter_weight_decay, "lr_scale": self.cfg.filter_lr_scale}}

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        n = self.cfg.checkpoint_layers
        for i, block in enumerate(self.blocks):
            if self.cfg.activation_checkpointing and self.training and (n <= 0 or i < n):
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm_f(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids))


__all__ = ["Evo2Config", "Evo2", "ExplicitFilter", "ModalFilter", "HyenaMixer", "fft_causal_conv", "mr_decay_window"]
