"""Model FLOPs per token, peak FLOP/s per device and MFU.

Convention (nanoGPT, PaLM appendix B, torchtitan, OLMo-core): *model* FLOPs of one training token,
forward + backward = 3 x forward (backward computes the gradients of inputs and of weights, each
as costly as the forward); recomputation (activation checkpointing, the fused Hyena core's
backward) is not counted, and neither are element-wise operations (norms, activations, gates,
softmax), embedding look-ups or the optimizer.  Per token, forward:

* every ``nn.Linear`` applied to every token (projections, MLPs, the LM head; tied or not):
  ``2 * in_features * out_features`` -- i.e. the classic ``6 N`` over non-embedding matmul
  parameters plus ``6 d vocab`` for the head;
* attention (:class:`~glmtrain.models.layers.RopeAttention`): ``4 d L`` (``Q K^T`` and ``A V``
  over the full L x L score matrix even when causal, as in the convention; ``12 d L`` per layer
  forward + backward);
* depthwise short convolutions (featurizer length 3, Hyena-SE length 7, Hyena-MR length 128):
  ``2 K C`` for C channels and K taps;
* FFT long convolutions (HyenaDNA's Hyena operator, Evo 2's Hyena-LI) of C channels over L
  tokens with FFT size n >= 2L-1: a real FFT of length n costs ``2.5 n log2 n``; per sequence
  the forward takes the input's rfft and the output's irfft per sample and channel plus one rfft
  of the filter per channel (shared by the batch of B samples), so per token
  ``C * 2.5 n log2 n * (2 + 1/B) / L``;
* filters generated per sequence (HyenaDNA's implicit-filter MLP): ``2 sum(in*out)`` of its
  linear layers per *position*, shared by the B samples of a micro-batch: divided by B;
* modules that define ``flops_per_token(seq_len, batch) -> float`` (forward, everything that is
  not an ``nn.Linear`` call) are asked instead; :func:`mamba_scan_flops` gives the selective-scan
  count for Mamba mixers (``9 d_inner d_state`` per token: discretisation, state update, output).

MFU = achieved model FLOP/s / (devices x peak FLOP/s of one device), with the peak taken from
:data:`PEAK_TFLOPS` (dense bf16 tensor-core numbers from the vendors' data sheets) by device name,
or from ``trainer.peak_tflops`` when set (e.g. a measured matmul peak, or a CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

# dense (no sparsity) bf16 peak TFLOP/s of one device, by a substring of torch.cuda.get_device_name()
PEAK_TFLOPS: dict[str, float] = {
    "B200": 2250.0,
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is 756
    "H800": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,  # fp16 tensor cores (no bf16)
    "MI300X": 1307.0,
    "MI250X": 383.0,
}


def fft_flops(n: int) -> float:
    """Real FLOPs of one real-input (or real-output) FFT of length n: 2.5 n log2 n."""
    return 2.5 * n * math.log2(max(n, 2))


def mamba_scan_flops(d_inner: int, d_state: int) -> float:
    """Forward FLOPs per token of a selective scan: exp(dt A), dt B x, A h + B x, C h (9 d_inner d_state)."""
    return 9.0 * d_inner * d_state


@dataclass
class FlopCount:
    """Forward FLOPs per token by kind; ``train`` = 3 x forward."""

    parts: dict[str, float] = field(default_factory=dict)

    def add(self, kind: str, v: float) -> None:
        self.parts[kind] = self.parts.get(kind, 0.0) + float(v)

    @property
    def forward(self) -> float:
        return sum(self.parts.values())

    @property
    def train(self) -> float:
        return 3.0 * self.forward

    def describe(self) -> str:
        inner = ", ".join(f"{k} {v / self.forward:.0%}" for k, v in sorted(self.parts.items(), key=lambda kv: -kv[1]) if v)
        return f"{self.train / 1e6:,.2f} MFLOP/token fwd+bwd ({inner})"


def _conv_taps(conv: nn.Conv1d) -> float:
    return 2.0 * conv.out_channels * (conv.in_channels // conv.groups) * conv.kernel_size[0]


def count(model: nn.Module, seq_len: int, batch: int = 1) -> FlopCount:
    """Forward FLOPs per token of ``model`` (plain or meta; shapes only) on windows of ``seq_len``
    tokens, ``batch`` samples per micro-batch (see the module docstring for the formula)."""
    from glmtrain.models import ops
    from glmtrain.models.layers import RopeAttention

    out = FlopCount()
    per_sequence: list[str] = []  # modules evaluated once per sequence position, not per token
    seen: set[int] = set()
    for name, m in model.named_modules():
        if id(m) in seen or any(name.startswith(p + ".") for p in per_sequence):
            continue
        seen.add(id(m))
        kind = type(m).__name__
        custom = getattr(m, "flops_per_token", None)
        if callable(custom):
            out.add(kind, custom(seq_len, batch))
        elif kind == "ImplicitFilter":  # HyenaDNA: an MLP over positions, shared by the batch
            per_sequence.append(name)
            lin = sum(2.0 * s.in_features * s.out_features for s in m.modules() if isinstance(s, nn.Linear))
            out.add("filter", lin / batch)
        elif isinstance(m, nn.Linear):
            out.add("matmul", 2.0 * m.in_features * m.out_features)
        elif isinstance(m, RopeAttention):
            out.add("attention", 4.0 * m.n_heads * m.head_dim * seq_len)
        elif isinstance(m, nn.Conv1d):
            out.add("short_conv", _conv_taps(m))
        elif kind == "HyenaOperator" or (kind == "HyenaMixer" and m.kind == "hyena_li"):
            d = m.short_conv.out_channels // 3
            out.add("fft_conv", d * fft_flops(ops.fft_size(seq_len)) * (2.0 + 1.0 / batch) / seq_len)
        elif kind == "HyenaMixer":  # Hyena-SE / -MR: explicit FIR, direct convolution
            out.add("fir", 2.0 * m.filter.d * min(m.filter.length, seq_len))
    return out


def peak_flops(device: torch.device | str, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the override, else the table by CUDA device name, else None (unknown)."""
    if override_tflops and override_tflops > 0:
        return override_tflops * 1e12
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(dev)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # longest match first ("GH200" before "H200")
        if key in name:
            return PEAK_TFLOPS[key] * 1e12
    return None


def mfu(tokens_per_s: float, flops_per_token: float, devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] (None when the peak is unknown)."""
    if not peak or devices < 1:
        return None
    return tokens_per_s * flops_per_token / (devices * peak)
