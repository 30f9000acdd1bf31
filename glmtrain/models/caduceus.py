"""Caduceus: bidirectional Mamba (BiMamba) with reverse-complement equivariance, as an MLM encoder.

Architecture (Schiff et al. 2024, arXiv 2403.03234; shapes and numerics from the released
``kuleshov-group/caduceus-*`` configs and the reference code, mamba-ssm 1.2):

* **Mamba (S6) mixer** :class:`Mamba`: ``in_proj`` d -> 2*d_inner (x, z; no bias), depthwise
  causal conv (width ``d_conv`` 4, bias) + SiLU on x, ``x_proj`` d_inner -> (dt_rank, B, C),
  ``dt_proj`` dt_rank -> d_inner (bias), ``delta = softplus(dt_proj(dt))``, ``A = -exp(A_log)``,
  the selective scan (:mod:`glmtrain.models.scan`), ``y = (scan + D * x) * silu(z)``,
  ``out_proj`` d_inner -> d.  d_state 16, expand 2, dt_rank ceil(d/16).
* **BiMamba** :class:`BiMamba`: ``mamba_fwd(x) + flip(mamba_rev(flip(x)))`` along the length
  ("add"; or "ew_multiply"); with ``bidirectional_weight_tie`` the two directions share
  ``in_proj`` and ``out_proj`` (most of the parameters) and keep their own conv, x/dt
  projections, A_log and D.
* **Block**: Mamba's pre-norm ordering ``residual = hidden + residual; hidden =
  mixer(RMSNorm(residual))``, no MLP; a final add + norm; LM head tied to the embedding.
* **Caduceus-PS** (``rcps: true``, parameter sharing): the hidden state has 2*d channels: the
  embedding of x and, flipped along length and channels, the embedding of rc(x) (the
  tokenizer's complement map applied to the reversed ids).  Norms and mixers run with shared
  weights on the first half and on the flipped second half; the LM head adds
  ``W h_fwd`` and the complement-permuted ``W flip_channels(h_rc)``.  The whole model is then
  exactly RC-equivariant: ``logits(rc(x))[l, v] = logits(x)[L-1-l, comp(v)]``.
  ``fused_add_norm: true`` reproduces the released checkpoints, whose fused (Triton) add-norm
  branch feeds the second half to the "forward" norm, i.e. swaps the halves at every block; it
  is as equivariant as the unfused branch but a different function of the same weights.
* **Caduceus-Ph** (``rcps: false``, post hoc): a plain BiMamba LM trained with RC augmentation
  (``data.rc_prob``); ``rc_average: eval`` averages the logits of x and of rc(x) (mapped back)
  at evaluation, ``always`` also in training.

The released configs' ``fused_add_norm`` is only a kernel choice for Caduceus-Ph (identical
maths).  Parameter counts: see ``conf/model/caduceus_*.yaml`` and tests/test_caduceus.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from glmtrain.models.base import GenomicModel, ModelConfig
from glmtrain.models.layers import make_norm
from glmtrain.models.ops import _get_causal_conv1d
from glmtrain.models.scan import IMPLS, selective_scan


@dataclass
class CaduceusConfig(ModelConfig):
    family: str = "caduceus"
    name: str = "caduceus-ps-tiny"
    d_model: int = 64
    n_layers: int = 2
    rcps: bool = True  # true: Caduceus-PS (RC-equivariant by parameter sharing); false: Caduceus-Ph
    # --- Mamba (S6) mixer
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0 = ceil(d_model / 16) (the reference's "auto")
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init: str = "random"  # random | constant
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False  # in_proj / out_proj biases
    # --- BiMamba
    bidirectional: bool = True
    bidirectional_strategy: str = "add"  # add | ew_multiply
    bidirectional_weight_tie: bool = True  # share in_proj / out_proj between the two directions
    # --- block
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    residual_in_fp32: bool = False
    fused_add_norm: bool = True  # PS: the released checkpoints' half order (see the module docstring)
    # --- init (mamba-ssm / Caduceus)
    initializer_range: float = 0.02  # embedding std
    rescale_prenorm_residual: bool = True  # out_proj / sqrt(n_residuals_per_layer * n_layers)
    n_residuals_per_layer: int = 1
    # --- post-hoc RC equivariance (Caduceus-Ph): average logits of x and rc(x)
    rc_average: str = "none"  # none | eval | always
    # --- speed knobs (no change of the maths beyond rounding)
    scan_impl: str = "auto"  # auto (mamba_ssm kernel on GPU if installed, else chunked) | chunked | sequential | mamba_ssm
    scan_chunk: int = 0  # positions per chunk of the chunked scan (0 = automatic)
    scan_block: int = 0  # positions per block of the chunked scan (0 = automatic, ~2 MB per block tensor)

    SPEED_ONLY: ClassVar[tuple[str, ...]] = ModelConfig.SPEED_ONLY + ("scan_impl", "scan_chunk", "scan_block")

    def resolved_dt_rank(self) -> int:
        return self.dt_rank or math.ceil(self.d_model / 16)

    def d_inner(self) -> int:
        return self.expand * self.d_model

    def check(self) -> str | None:
        """The first problem with this config (one line), or None; called by config validation."""
        for key, allowed in (("bidirectional_strategy", ("add", "ew_multiply")), ("norm", ("rmsnorm", "layernorm")),
                             ("dt_init", ("random", "constant")), ("rc_average", ("none", "eval", "always")),
                             ("scan_impl", IMPLS)):
            if getattr(self, key) not in allowed:
                return f"model.{key}={getattr(self, key)!r}: allowed values are {', '.join(allowed)}"
        for key in ("d_model", "n_layers", "d_state", "d_conv", "expand"):
            if getattr(self, key) < 1:
                return f"model.{key}={getattr(self, key)}: must be >= 1"
        if self.rcps or self.rc_average != "none":
            from glmtrain.tokenizers import TokenizerError, build_tokenizer, complement_map

            try:
                complement_map(build_tokenizer(dataclasses.asdict(self.tokenizer)))
            except TokenizerError as e:
                what = "model.rcps=true" if self.rcps else f"model.rc_average={self.rc_average}"
                return f"{what} needs a complement map: {e}"
        return None


def _compute(t: torch.Tensor) -> torch.Tensor:
    """float32, or float64 when the tensor is float64 (the reference's .float(), kept exact in fp64 runs)."""
    return t if t.dtype == torch.float64 else t.float()


@torch.no_grad()
def init_dt_proj(dt_proj: nn.Linear, cfg: CaduceusConfig) -> None:
    """mamba-ssm's dt projection: variance-preserving weight (uniform or constant at dt_rank^-0.5 * dt_scale)
    and bias = softplus^-1 of a log-uniform dt in [dt_min, dt_max] (floored at dt_init_floor)."""
    std = dt_proj.in_features ** -0.5 * cfg.dt_scale
    if cfg.dt_init == "constant":
        nn.init.constant_(dt_proj.weight, std)
    else:
        nn.init.uniform_(dt_proj.weight, -std, std)
    n = dt_proj.out_features
    dt = torch.exp(torch.rand(n) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
    dt = dt.clamp(min=cfg.dt_init_floor)
    dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class Mamba(nn.Module):
    """The Mamba (S6) mixer of mamba-ssm 1.2 (``Mamba`` in mamba_simple.py), without the step cache."""

    def __init__(self, cfg: CaduceusConfig):
        super().__init__()
        d, di, n, r = cfg.d_model, cfg.d_inner(), cfg.d_state, cfg.resolved_dt_rank()
        self.cfg = cfg
        self.d_inner, self.d_state, self.dt_rank = di, n, r
        self.in_proj = nn.Linear(d, 2 * di, bias=cfg.bias)
        self.conv1d = nn.Conv1d(di, di, cfg.d_conv, groups=di, bias=cfg.conv_bias)  # causal: left-padded in _conv
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=True)
        self.A_log = nn.Parameter(torch.empty(di, n))
        self.D = nn.Parameter(torch.empty(di))
        self.out_proj = nn.Linear(di, d, bias=cfg.bias)
        self.reset_parameters()
        init_dt_proj(self.dt_proj, cfg)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The parameters the mixer owns directly: S4D-real A (A_log = log 1..N for every channel) and D = 1,
        as in mamba-ssm (the dt projection's init is :func:`init_dt_proj`)."""
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(self.d_inner, -1))
        self.D.fill_(1.0)

    flops_label = "scan"

    def flops_per_token(self, seq_len: int, batch: int) -> float:
        """Forward FLOPs per token of the selective scan (its projections and conv are counted per module)."""
        from glmtrain.flops import mamba_scan_flops

        return mamba_scan_flops(self.d_inner, self.d_state)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """Depthwise causal conv + SiLU on [B, d_inner, L]; the causal-conv1d kernel on CUDA when installed."""
        fn = _get_causal_conv1d() if x.is_cuda else None
        if fn is not None and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
            w = self.conv1d.weight.squeeze(1).to(x.dtype)
            b = None if self.conv1d.bias is None else self.conv1d.bias.to(x.dtype)
            return fn(x, w, b, activation="silu")
        return F.silu(self.conv1d(F.pad(x, (self.conv1d.kernel_size[0] - 1, 0))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, d] -> [B, L, d]."""
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs = self._conv(xs.transpose(1, 2))  # [B, d_inner, L]
        dt, B, C = torch.split(self.x_proj(xs.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # delta before softplus, bias included; in fp32 even under autocast: the bias (~ -7) dwarfs the
        # projection, and bf16 would round it to ~3 % of softplus(delta)
        with torch.autocast(device_type=x.device.type, enabled=False):
            delta = self.dt_proj(dt.to(self.dt_proj.weight.dtype))
        A = -torch.exp(_compute(self.A_log))
        y = selective_scan(xs, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D=_compute(self.D),
                           z=z.transpose(1, 2), delta_softplus=True, impl=self.cfg.scan_impl,
                           chunk=self.cfg.scan_chunk, block=self.cfg.scan_block)
        return self.out_proj(y.transpose(1, 2))


class BiMamba(nn.Module):
    """Forward Mamba plus a Mamba over the length-flipped sequence (flipped back), combined."""

    def __init__(self, cfg: CaduceusConfig):
        super().__init__()
        self.strategy = cfg.bidirectional_strategy
        self.mamba_fwd = Mamba(cfg)
        self.mamba_rev = Mamba(cfg) if cfg.bidirectional else None
        if self.mamba_rev is not None and cfg.bidirectional_weight_tie:
            for proj in ("in_proj", "out_proj"):  # shared parameters, separate modules (as the reference)
                fwd, rev = getattr(self.mamba_fwd, proj), getattr(self.mamba_rev, proj)
                rev.weight = fwd.weight
                if fwd.bias is not None:
                    rev.bias = fwd.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mamba_fwd(x)
        if self.mamba_rev is None:
            return out
        rev = self.mamba_rev(x.flip(1)).flip(1)
        return out + rev if self.strategy == "add" else out * rev


def _flip_rc(x: torch.Tensor) -> torch.Tensor:
    """The RC map of an RC-equivariant hidden state half: flip length and channels."""
    return x.flip(-2, -1)


def rc_apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An RC-equivariant use of ``module`` on x = [fwd | rc] halves: the module on the first half and on
    the flipped second half (shared weights, one call on a doubled batch), the second output flipped back."""
    d = x.shape[-1] // 2
    fwd, rc = module(torch.cat([x[..., :d], _flip_rc(x[..., d:])], dim=0)).chunk(2, dim=0)
    return torch.cat([fwd, _flip_rc(rc)], dim=-1)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return torch.cat([x[..., d:], x[..., :d]], dim=-1)


class CaduceusBlock(nn.Module):
    """``residual += hidden; hidden = mixer(norm(residual))``; under RCPS both on [fwd | rc] halves."""

    def __init__(self, cfg: CaduceusConfig):
        super().__init__()
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.mixer = BiMamba(cfg)
        self.rcps = cfg.rcps
        self.swap = cfg.rcps and cfg.fused_add_norm
        self.residual_in_fp32 = cfg.residual_in_fp32

    def _on_halves(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return rc_apply(module, x) if self.rcps else module(x)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.swap:  # the released (fused add-norm) half order
            hidden = _swap_halves(hidden)
            residual = None if residual is None else _swap_halves(residual)
        residual = hidden if residual is None else hidden + residual
        normed = self._on_halves(self.norm, residual.to(self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.float()
        return self._on_halves(self.mixer, normed), residual


class Caduceus(GenomicModel):
    """Caduceus-PS / Caduceus-Ph MLM: ``forward(input_ids) -> logits [B, L, vocab]``."""

    causal = False

    def __init__(self, cfg: CaduceusConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        problem = cfg.check()
        if problem:
            raise ValueError(problem)
        from glmtrain.tokenizers import TokenizerError, build_tokenizer, complement_map

        try:
            comp = torch.as_tensor(complement_map(build_tokenizer(dataclasses.asdict(cfg.tokenizer))))
        except TokenizerError:
            comp = torch.arange(vocab_size)  # unused: check() refused rcps / rc_average without a map
        if comp.numel() != vocab_size:
            raise ValueError(f"the complement map has {comp.numel()} ids but the vocabulary {vocab_size}")
        self.register_buffer("complement", comp, persistent=False)
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(CaduceusBlock(cfg) for _ in range(cfg.n_layers))
        self.norm_f = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every module by :meth:`init_module` (a plain build; a meta build runs the same rule per module,
        seeded by its name)."""
        done: set[int] = set()
        for name, m in self.named_modules():
            own = [p for p in m.parameters(recurse=False) if id(p) not in done]
            if own:
                done.update(id(p) for p in own)
                self.init_module(name, m)

    @torch.no_grad()
    def init_module(self, name: str, module: nn.Module) -> None:
        """Caduceus / mamba-ssm init of the parameters ``module`` owns: embedding N(0, initializer_range);
        the dt projection by :func:`init_dt_proj`; other linear layers the nn default with biases 0, and
        out_proj divided by sqrt(n_residuals_per_layer * n_layers) when rescale_prenorm_residual; the
        mixer's A_log and D, norms and convolutions their own ``reset_parameters``."""
        cfg = self.cfg
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=cfg.initializer_range)
        elif isinstance(module, nn.Linear) and name.endswith("dt_proj"):
            init_dt_proj(module, cfg)
        elif isinstance(module, nn.Linear):
            module.reset_parameters()
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            if name.endswith("out_proj") and cfg.rescale_prenorm_residual:
                module.weight /= math.sqrt(cfg.n_residuals_per_layer * cfg.n_layers)
        else:
            super().init_module(name, module)

    flops_label = "second_strand"

    def flops_per_token(self, seq_len: int, batch: int) -> float:
        """The passes beyond the first that :func:`glmtrain.flops.count` counts per module: Caduceus-PS runs
        blocks, final norm and head on both strands; ``rc_average: always`` runs the model twice in training."""
        from glmtrain.flops import count

        passes = (2 if self.cfg.rcps else 1) * (2 if self.cfg.rc_average == "always" else 1)
        if passes == 1:
            return 0.0
        one = sum(count(m, seq_len, batch).forward for m in (self.blocks, self.lm_head))
        return (passes - 1) * one

    def no_decay_param_names(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith(("A_log", ".D"))}

    def rc_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Reverse complement of id sequences [B, L] (the tokenizer's complement map)."""
        return self.complement[input_ids.flip(-1)]

    def rc_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Map logits of rc(x) onto x's positions and tokens: out[l, v] = logits[L-1-l, comp(v)]."""
        return logits.flip(1)[..., self.complement]

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden states: [B, L, d] (Ph) or [B, L, 2d] = [fwd | flipped rc] halves (PS)."""
        cfg = self.cfg
        if cfg.rcps:
            e_fwd, e_rc = self.embed(torch.cat([input_ids, self.rc_ids(input_ids)], dim=0)).chunk(2, dim=0)
            hidden = torch.cat([e_fwd, _flip_rc(e_rc)], dim=-1)
        else:
            hidden = self.embed(input_ids)
        residual = None
        for block in self.blocks:
            if cfg.activation_checkpointing and self.training:
                hidden, residual = checkpoint(block, hidden, residual, use_reentrant=False)
            else:
                hidden, residual = block(hidden, residual)
        residual = (hidden if residual is None else hidden + residual).to(self.norm_f.weight.dtype)
        return rc_apply(self.norm_f, residual) if cfg.rcps else self.norm_f(residual)

    def _logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.hidden_states(input_ids)
        if not self.cfg.rcps:
            return self.lm_head(h)
        d = h.shape[-1] // 2
        fwd, rc = self.lm_head(torch.cat([h[..., :d], h[..., d:].flip(-1)], dim=0)).chunk(2, dim=0)
        return fwd + rc[..., self.complement]  # W[comp] v == (W v)[comp]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self._logits(input_ids)
        mode = self.cfg.rc_average
        if mode == "always" or (mode == "eval" and not self.training):
            logits = (logits + self.rc_logits(self._logits(self.rc_ids(input_ids)))) / 2
        return logits


__all__ = ["BiMamba", "Caduceus", "CaduceusBlock", "CaduceusConfig", "Mamba"]
