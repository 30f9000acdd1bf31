"""Cached (incremental) decoding for the causal families: each sequence mixer keeps a state.

Inside ``with decoding(model, batch, max_len):`` every sequence-mixing module of the model
(attention, the HyenaDNA operator, the StripedHyena 2 mixers) carries a ``decode_state`` and its
``forward`` consumes only the *new* positions: ``model(ids[:, t0:t1])`` returns the logits of
those positions given everything fed before.  Every other module (embeddings, norms, MLPs, the
LM head) is position-wise and runs unchanged.  The states:

* attention (:class:`KVCache`): keys and values of past positions; RoPE at the absolute position;
* HyenaDNA's implicit long filter (:class:`HyenaCache`): the filter materialised once for
  ``max_len`` positions and the history of the gated input ``pre * v``; a new token costs one
  direct convolution sum, O(L d), instead of a full O(L log L) pass;
* the short featurizer convolutions and Evo 2's explicit SE/MR filters: a rolling window of the
  last K-1 inputs (FIR state);
* Evo 2's modal Hyena-LI filter (:class:`Evo2MixerCache`): the recurrent form
  ``s_n <- p_n s_n + x; y = sum_n R_n s_n + D x`` (O(d N) per token); after a prompt the state is
  set from the closed form ``s_n = sum_t p_n^(T-1-t) x_t``.

A prompt (several positions at once) is processed with the same FFT/direct convolutions as the
full forward pass, so prefill costs what a forward pass costs.  Models whose blocks hold a mixer
without a cache here (e.g. bidirectional encoders) are refused with one line.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from glmtrain.models.layers import interleaved_to_chunks
from glmtrain.models.ops import fft_causal_conv, grouped_filter


class DecodeError(ValueError):
    """The model cannot be decoded with a cache (one line)."""


def _causal_window(conv: nn.Module, tail: torch.Tensor | None, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Hyena featurizer over new projection outputs ``u`` [B, 3c, t] (channel-interleaved rows, as the
    conv module's weights are) given the previous K-1 of them in ``tail``.

    Calls the conv module (unpadded, so an adapter attached to it is honoured); returns (output
    [B, 3c, t] in ``[post; pre; v]`` chunk order, new tail)."""
    k = conv.weight.shape[-1]
    if tail is None:
        tail = u.new_zeros(u.shape[0], u.shape[1], k - 1)
    window = torch.cat([tail, u], dim=-1)
    y = interleaved_to_chunks(conv(window))  # nn.Conv1d(padding=0): exactly t outputs
    return y, window[..., window.shape[-1] - (k - 1):] if k > 1 else window[..., :0]


class _State:
    def __init__(self, max_len: int):
        self.pos = 0
        self.max_len = max_len

    def _advance(self, t: int) -> int:
        start = self.pos
        if start + t > self.max_len:
            raise DecodeError(f"decoding past the cache length ({start + t} > {self.max_len} positions)")
        self.pos += t
        return start


class KVCache(_State):
    """Keys/values of :class:`glmtrain.models.layers.RopeAttention` (causal only)."""

    def __init__(self, module: nn.Module, batch: int, max_len: int, device, dtype):
        super().__init__(max_len)
        if not module.causal:
            raise DecodeError("a KV cache needs causal attention; this model is a bidirectional encoder")
        self.k = self.v = None
        self.cos, self.sin = module.rope.cos_sin(max_len, device, torch.float32)

    def step(self, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        start = self._advance(t)
        q, k, v = mod.heads(x)  # the module's own projection and layout
        cos, sin = self.cos[start:start + t], self.sin[start:start + t]
        q = mod.rope.rotate(q.float(), cos, sin).to(q.dtype)
        k = mod.rope.rotate(k.float(), cos, sin).to(k.dtype)
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        mask = None
        if t > 1:  # positions start..start+t-1 see keys 0..their own position
            qpos = torch.arange(start, start + t, device=x.device)[:, None]
            mask = torch.arange(start + t, device=x.device)[None, :] <= qpos
        y = F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=mask)
        return mod.out(y.transpose(1, 2).reshape(b, t, -1))


class HyenaCache(_State):
    """:class:`glmtrain.models.hyena.HyenaOperator`: featurizer FIR tail + long-convolution history."""

    def __init__(self, module: nn.Module, batch: int, max_len: int, device, dtype):
        super().__init__(max_len)
        d = module.cfg.d_model
        with torch.no_grad():
            k = module.filter(max_len)  # [d, L] fp32; per position, so any prefix of it is the filter
        self.k = k
        self.k_rev = k.flip(-1).contiguous()  # k_rev[:, L-1-s] = k[:, s]: one slice per new token
        self.hist = torch.zeros(batch, d, max_len, device=device, dtype=k.dtype)
        self.tail = None

    def step(self, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        start = self._advance(t)
        zc, self.tail = _causal_window(mod.short_conv, self.tail, mod.in_proj(x).transpose(1, 2))
        post, pre, v = zc.to(self.k.dtype).chunk(3, dim=1)
        u = pre * v
        self.hist[..., start:start + t] = u
        end = start + t
        if t == 1:  # y[end-1] = sum_j u[j] k[end-1-j]
            conv = torch.einsum("bdj,dj->bd", self.hist[..., :end], self.k_rev[:, self.max_len - end:])[..., None]
        else:
            conv = fft_causal_conv(self.hist[..., :end], self.k[:, :end])[..., start:]
        y = post * (conv + u * mod.filter.bias.to(u.dtype)[:, None])
        return mod.out_proj(y.to(x.dtype).transpose(1, 2))


class Evo2MixerCache(_State):
    """:class:`glmtrain.models.evo2.HyenaMixer`: featurizer FIR tail + SE/MR FIR tail or LI modal state."""

    def __init__(self, module: nn.Module, batch: int, max_len: int, device, dtype):
        super().__init__(max_len)
        self.tail = None
        self.inner_tail = None
        self.state = None
        self.dt = torch.float64 if dtype == torch.float64 else torch.float32  # as the FFT path computes
        if module.kind == "hyena_li":
            f = module.filter
            with torch.no_grad():
                self.p = grouped_filter(f.poles().to(self.dt), f.d)  # [d, N]
                self.r = grouped_filter(f.residues.to(self.dt), f.d)
                self.h = grouped_filter(f.materialize(max_len, self.dt), f.d)  # prefill by FFT

    def step(self, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        start = self._advance(t)
        zc, self.tail = _causal_window(mod.short_conv, self.tail, mod.proj(x).transpose(1, 2))
        post, pre, v = zc.chunk(3, dim=1)
        u = pre * v
        if mod.kind == "hyena_li":
            y = post.to(self.dt) * self._modal(mod, u.to(self.dt), start)
        else:
            f = mod.filter
            klen = f.length
            if self.inner_tail is None:
                self.inner_tail = u.new_zeros(u.shape[0], u.shape[1], klen - 1)
            window = torch.cat([self.inner_tail, u], dim=-1)
            y = post * f(window)[..., -t:]  # the filter module's own causal FIR (+ D skip)
            self.inner_tail = window[..., window.shape[-1] - (klen - 1):]
        return mod.out(y.to(x.dtype).transpose(1, 2))

    def _modal(self, mod: nn.Module, u: torch.Tensor, start: int) -> torch.Tensor:
        D = mod.filter.D.to(u.dtype)[:, None]
        t = u.shape[-1]
        if self.state is None and start == 0 and t > 1:  # prompt: FFT pass, then the closed-form state
            y = fft_causal_conv(u, self.h[:, :t]) + u * D
            log_p = torch.log(self.p)[:, :, None]
            self.state = u.new_zeros(u.shape[0], u.shape[1], self.p.shape[1])
            for c0 in range(0, t, 1024):  # s_n = sum_t p_n^(T-1-t) u_t, in chunks (never [d, N, T])
                age = torch.arange(t - 1 - c0, max(-1, t - 1 - c0 - 1024), -1, device=u.device, dtype=u.dtype)
                self.state = self.state + torch.einsum("bdt,dnt->bdn", u[..., c0:c0 + len(age)], torch.exp(log_p * age))
            return y
        if self.state is None:
            self.state = u.new_zeros(u.shape[0], u.shape[1], self.p.shape[1])
        ys = []
        for i in range(t):
            self.state = self.p * self.state + u[..., i, None]
            ys.append((self.state * self.r).sum(-1))
        return torch.stack(ys, dim=-1) + u * D


def _cache_types() -> dict[type, type]:
    from glmtrain.models.evo2 import HyenaMixer
    from glmtrain.models.hyena import HyenaOperator
    from glmtrain.models.layers import RopeAttention

    return {RopeAttention: KVCache, HyenaOperator: HyenaCache, HyenaMixer: Evo2MixerCache}


def cached_mixers(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that take a decode state; refuses (one line) a model whose blocks are
    not all covered (a mixer kind without a cache here)."""
    types = _cache_types()
    mixers = [m for m in model.modules() if type(m) in types]
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(mixers) != len(blocks):
        raise DecodeError(f"{type(model).__name__}: cached decoding covers {len(mixers)} of "
                          f"{len(blocks) if blocks is not None else '?'} blocks (no cache for its mixers); "
                          "use full recomputation (cached=false)")
    return mixers


@contextmanager
def decoding(model: nn.Module, batch: int, max_len: int):
    """Install fresh decode states on every mixer of ``model`` for ``batch`` rows of up to ``max_len``
    positions; removed on exit.  Inside, ``model(new_ids)`` returns the logits of the new positions."""
    if not getattr(model, "causal", True):
        raise DecodeError(f"{type(model).__name__} is not causal: cached decoding needs a causal model")
    types = _cache_types()
    mixers = cached_mixers(model)
    p = next(model.parameters())
    try:
        for m in mixers:
            m.decode_state = types[type(m)](m, batch, max_len, p.device, p.dtype)
        yield model
    finally:
        for m in mixers:
            m.decode_state = None
