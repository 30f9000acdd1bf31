"""Shared operators for the long-convolution families (HyenaDNA, StripedHyena 2).

Conventions: sequences are *channel-first* here, ``[batch, channels, length]``,
because every long/short convolution is channel-wise (depthwise).  A
tensor-parallel plan can therefore shard the channel dimension without touching
this code.

* :func:`fft_causal_conv` -- causal long convolution through ``torch.fft`` with an
  FFT of size >= 2L-1 (the classic "pad to 2L" trick; we take the next fast
  size), always computed in fp32 (fp64 inputs stay fp64) even under bf16
  autocast.  A custom autograd function saves only the real inputs and
  recomputes the spectra in backward, and channels are processed in chunks, so
  a 1M-token layer never holds more than one chunk of complex spectra.
* :func:`direct_causal_conv` -- the O(L*K) reference (``F.conv1d``), used by the
  tests and for short explicit filters.
* :func:`short_causal_conv` -- depthwise causal FIR (length 3/7/128) with an
  optional ``causal-conv1d`` kernel on CUDA and a plain torch fallback.
* :class:`HyenaGatedConv` -- the fused order-2 Hyena core
  ``y = post * (h * (pre * v) + D * (pre * v))`` after the short featurizer
  convolution, as one autograd function that saves only its inputs (the
  featurizer input, the filter, D) and recomputes everything else in backward.
  This is what lets the 1M-token HyenaDNA layer keep ~2.5 bytes/channel/token.
* :func:`flash_attn_func` / :func:`flash_attn_varlen_func` / :func:`causal_conv1d_fn` -- optional-import hooks
  returning ``None`` when the package is absent.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- optional kernels


def flash_attn_func():
    """``flash_attn.flash_attn_func`` if installed, else ``None``."""
    try:
        from flash_attn import flash_attn_func as fn  # type: ignore

        return fn
    except Exception:  # ImportError, or a broken CUDA build
        return None


def flash_attn_varlen_func():
    """``flash_attn.flash_attn_varlen_func`` (unpadded variable-length batches) if installed, else ``None``."""
    try:
        from flash_attn import flash_attn_varlen_func as fn  # type: ignore

        return fn
    except Exception:
        return None


def causal_conv1d_fn():
    """``causal_conv1d.causal_conv1d_fn`` if installed, else ``None``."""
    try:
        from causal_conv1d import causal_conv1d_fn as fn  # type: ignore

        return fn
    except Exception:
        return None


_CAUSAL_CONV1D = None
_CAUSAL_CONV1D_CHECKED = False


def _get_causal_conv1d():
    global _CAUSAL_CONV1D, _CAUSAL_CONV1D_CHECKED
    if not _CAUSAL_CONV1D_CHECKED:
        _CAUSAL_CONV1D = causal_conv1d_fn()
        _CAUSAL_CONV1D_CHECKED = True
    return _CAUSAL_CONV1D


# ----------------------------------------------------------------------------- sizes


def next_fast_len(n: int) -> int:
    """Smallest integer >= n whose prime factors are 2, 3 and 5 (fast for cuFFT/pocketfft)."""
    if n <= 1:
        return 1
    best = 1 << (n - 1).bit_length()  # power of two: always a candidate
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            # smallest power of two times p35 that is >= n
            q = -(-n // p35)
            p2 = 1 << (q - 1).bit_length()
            cand = p2 * p35
            if cand < best:
                best = cand
            p35 *= 3
        p5 *= 5
    return best


def fft_size(seq_len: int, filter_len: int | None = None) -> int:
    """FFT length for a linear (non-circular) causal convolution: >= L + K - 1 (K <= L: ~2L)."""
    k = seq_len if filter_len is None else min(filter_len, seq_len)
    return next_fast_len(seq_len + k - 1)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _auto_chunk(batch: int, channels: int, n: int, budget: int = 1 << 26) -> int:
    """Channels per chunk so that one chunk's complex spectrum has <= ``budget`` elements."""
    per_channel = max(1, batch * (n // 2 + 1))
    return max(1, min(channels, budget // per_channel))


# ----------------------------------------------------------------------------- long convolution


def _fft_conv_raw(u: torch.Tensor, k: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    """Causal conv of u [B, C, L] with k [C, K] (both already in the compute dtype)."""
    u_f = torch.fft.rfft(u, n=n)
    k_f = torch.fft.rfft(k, n=n)
    return torch.fft.irfft(u_f * k_f, n=n)[..., :seq_len]


def _fft_xcorr_raw(g: torch.Tensor, x: torch.Tensor, n: int, out_len: int) -> torch.Tensor:
    """Adjoint of the causal conv: out[s] = sum_t g[t] x[t - s] (x zero outside [0, len))."""
    g_f = torch.fft.rfft(g, n=n)
    x_f = torch.fft.rfft(x, n=n)
    return torch.fft.irfft(g_f * x_f.conj(), n=n)[..., :out_len]


class _FFTCausalConv(torch.autograd.Function):
    """y[b, c, t] = sum_{s <= t} k[c, s] u[b, c, t - s]; saves u and k only."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, k: torch.Tensor, chunk: int) -> torch.Tensor:
        b, c, seq_len = u.shape
        klen = k.shape[-1]
        n = fft_size(seq_len, klen)
        chunk = chunk or _auto_chunk(b, c, n)
        y = torch.empty_like(u)
        for c0 in range(0, c, chunk):
            c1 = min(c, c0 + chunk)
            y[:, c0:c1] = _fft_conv_raw(u[:, c0:c1], k[c0:c1], n, seq_len)
        ctx.save_for_backward(u, k)
        ctx.chunk = chunk
        ctx.n = n
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        u, k = ctx.saved_tensors
        b, c, seq_len = u.shape
        klen = k.shape[-1]
        n, chunk = ctx.n, ctx.chunk
        gy = gy.to(u.dtype)
        gu = torch.empty_like(u) if ctx.needs_input_grad[0] else None
        gk = torch.empty_like(k) if ctx.needs_input_grad[1] else None
        for c0 in range(0, c, chunk):
            c1 = min(c, c0 + chunk)
            g_f = torch.fft.rfft(gy[:, c0:c1], n=n)
            if gu is not None:
                k_f = torch.fft.rfft(k[c0:c1], n=n)
                gu[:, c0:c1] = torch.fft.irfft(g_f * k_f.conj(), n=n)[..., :seq_len]
            if gk is not None:
                u_f = torch.fft.rfft(u[:, c0:c1], n=n)
                gk[c0:c1] = torch.fft.irfft((g_f * u_f.conj()).sum(0), n=n)[..., :klen]
        return gu, gk, None


def fft_causal_conv(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None, channel_chunk: int = 0) -> torch.Tensor:
    """Causal long convolution ``y = k * u (+ D * u)`` via FFT.

    u: [B, C, L]; k: [C, K] with K <= L (a longer filter is truncated to L);
    D: optional [C] skip term.  Computed in fp32 (fp64 if an input is fp64) with
    autocast disabled; returns the compute dtype.
    """
    seq_len = u.shape[-1]
    if k.shape[-1] > seq_len:
        k = k[..., :seq_len]
    dt = _compute_dtype(u, k)
    with torch.autocast(device_type=u.device.type, enabled=False):
        uf, kf = u.to(dt), k.to(dt)
        y = _FFTCausalConv.apply(uf, kf, channel_chunk)
        if D is not None:
            y = y + uf * D.to(dt)[:, None]
    return y


def direct_causal_conv(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """Reference causal convolution with ``F.conv1d`` (O(L*K)); same contract as :func:`fft_causal_conv`."""
    seq_len = u.shape[-1]
    k = k[..., :seq_len]
    c, klen = k.shape
    w = k.flip(-1).unsqueeze(1).to(u.dtype)  # conv1d is a cross-correlation
    y = F.conv1d(F.pad(u, (klen - 1, 0)), w, groups=c)
    if D is not None:
        y = y + u * D.to(u.dtype)[:, None]
    return y


def short_causal_conv(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal FIR. u: [B, C, L]; weight: [C, 1, K] in ``nn.Conv1d`` layout
    (``weight[..., -1]`` multiplies the current token); bias: [C] or None."""
    klen = weight.shape[-1]
    fn = _get_causal_conv1d() if u.is_cuda else None
    if fn is not None and klen <= 4 and u.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return fn(u, weight.squeeze(1).to(u.dtype), None if bias is None else bias.to(u.dtype))
    w = weight.to(u.dtype)
    b = None if bias is None else bias.to(u.dtype)
    return F.conv1d(F.pad(u, (klen - 1, 0)), w, b, groups=u.shape[1])


def grouped_filter(h: torch.Tensor, channels: int) -> torch.Tensor:
    """Expand [G, K] group filters to [C, K]: channel c uses filter ``c // (C // G)``."""
    g = h.shape[0]
    if g == channels:
        return h
    if channels % g:
        raise ValueError(f"{channels} channels cannot be split into {g} filter groups")
    return h.repeat_interleave(channels // g, dim=0)


# ----------------------------------------------------------------------------- fused Hyena core


def _hyena_core_forward(z, w_short, b_short, k, D, n, chunk, out_dtype):
    """z: [B, 3C, L] featurizer input.  Returns y [B, C, L] (out_dtype)."""
    b, c3, seq_len = z.shape
    c = c3 // 3
    zc = short_causal_conv(z, w_short, b_short)
    y = torch.empty(b, c, seq_len, device=z.device, dtype=out_dtype)
    dt = k.dtype
    for c0 in range(0, c, chunk):
        c1 = min(c, c0 + chunk)
        post = zc[:, c0:c1].to(dt)
        pre = zc[:, c + c0 : c + c1].to(dt)
        v = zc[:, 2 * c + c0 : 2 * c + c1].to(dt)
        x = pre * v
        conv = _fft_conv_raw(x, k[c0:c1], n, seq_len) + x * D[c0:c1, None]
        y[:, c0:c1] = (post * conv).to(out_dtype)
    return y


class _HyenaGatedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, w_short, b_short, k, D, chunk, out_dtype):
        b, c3, seq_len = z.shape
        n = fft_size(seq_len, k.shape[-1])
        chunk = chunk or _auto_chunk(b, c3 // 3, n)
        with torch.no_grad():
            y = _hyena_core_forward(z, w_short, b_short, k, D, n, chunk, out_dtype)
        ctx.save_for_backward(z, w_short, b_short if b_short is not None else torch.empty(0), k, D)
        ctx.has_bias = b_short is not None
        ctx.n, ctx.chunk = n, chunk
        return y

    @staticmethod
    def backward(ctx, gy):
        z, w_short, b_short, k, D = ctx.saved_tensors
        b_short = b_short if ctx.has_bias else None
        n, chunk = ctx.n, ctx.chunk
        bsz, c3, seq_len = z.shape
        c = c3 // 3
        klen = k.shape[-1]
        dt = k.dtype
        # recompute the featurizer convolution with autograd for its own backward
        with torch.enable_grad():
            z_ = z.detach().requires_grad_(ctx.needs_input_grad[0])
            w_ = w_short.detach().requires_grad_(ctx.needs_input_grad[1])
            b_ = None if b_short is None else b_short.detach().requires_grad_(ctx.needs_input_grad[2])
            zc = short_causal_conv(z_, w_, b_)
        gzc = torch.empty(zc.shape, device=zc.device, dtype=zc.dtype)
        gk = torch.zeros_like(k) if ctx.needs_input_grad[3] else None
        gD = torch.zeros_like(D) if ctx.needs_input_grad[4] else None
        zd = zc.detach()
        for c0 in range(0, c, chunk):
            c1 = min(c, c0 + chunk)
            post = zd[:, c0:c1].to(dt)
            pre = zd[:, c + c0 : c + c1].to(dt)
            v = zd[:, 2 * c + c0 : 2 * c + c1].to(dt)
            g = gy[:, c0:c1].to(dt)
            x = pre * v
            x_f = torch.fft.rfft(x, n=n)
            k_f = torch.fft.rfft(k[c0:c1], n=n)
            conv = torch.fft.irfft(x_f * k_f, n=n)[..., :seq_len] + x * D[c0:c1, None]
            gpost = g * conv
            gconv = g * post
            del conv
            g_f = torch.fft.rfft(gconv, n=n)
            gx = torch.fft.irfft(g_f * k_f.conj(), n=n)[..., :seq_len] + gconv * D[c0:c1, None]
            if gk is not None:
                gk[c0:c1] = torch.fft.irfft((g_f * x_f.conj()).sum(0), n=n)[..., :klen]
            if gD is not None:
                gD[c0:c1] = (gconv * x).sum(dim=(0, 2))
            del g_f, x_f, k_f, gconv
            gzc[:, c0:c1] = gpost.to(gzc.dtype)
            gzc[:, c + c0 : c + c1] = (gx * v).to(gzc.dtype)
            gzc[:, 2 * c + c0 : 2 * c + c1] = (gx * pre).to(gzc.dtype)
        inputs = [t for t in (z_, w_, b_) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(zc, inputs, gzc) if inputs else []
        it = iter(grads)
        gz = next(it) if z_.requires_grad else None
        gw = next(it) if w_.requires_grad else None
        gb = next(it) if (b_ is not None and b_.requires_grad) else None
        return gz, gw, gb, gk, gD, None, None


def hyena_gated_conv(
    z: torch.Tensor,
    short_weight: torch.Tensor,
    short_bias: torch.Tensor | None,
    k: torch.Tensor,
    D: torch.Tensor,
    channel_chunk: int = 0,
    fused: bool = True,
) -> torch.Tensor:
    """Order-2 Hyena core on the input projection ``z`` [B, 3C, L].

    ``zc = short_causal_conv(z)``; ``post, pre, v = zc.split(C)``;
    ``y = post * (k * (pre * v) + D * (pre * v))`` with the long convolution
    done by FFT in fp32.  Returns [B, C, L] in z's dtype (fp32 if z is fp32).

    ``fused=True`` runs it as one autograd function that saves only z, the
    short filter, k and D (recomputing the rest in backward); ``fused=False`` is
    the plain composition, kept as a reference for the tests.  ``short_weight=None``:
    ``z`` is already featurized (an adapted featurizer, see ``layers.hyena_inputs``); plain composition.
    """
    seq_len = z.shape[-1]
    if k.shape[-1] > seq_len:
        k = k[..., :seq_len]
    dt = _compute_dtype(z, k)
    out_dtype = z.dtype if z.dtype != torch.float32 or dt == torch.float32 else dt
    if not fused or short_weight is None:
        zc = z if short_weight is None else short_causal_conv(z, short_weight, short_bias)
        post, pre, v = zc.chunk(3, dim=1)
        y = fft_causal_conv(pre * v, k, D, channel_chunk)
        return (post.to(y.dtype) * y).to(out_dtype)
    with torch.autocast(device_type=z.device.type, enabled=False):
        return _HyenaGatedConv.apply(z, short_weight, short_bias, k.to(dt), D.to(dt), channel_chunk, out_dtype)


# ----------------------------------------------------------------------------- memory-light MLP


class _GeluLinear(torch.autograd.Function):
    """``linear(gelu(h), w, b)`` saving only h and w: the activation is recomputed in backward.

    In a 4*d MLP this drops the largest saved tensor (the [L, 4d] GELU output).
    """

    @staticmethod
    def forward(ctx, h, w, b, approximate):
        a = F.gelu(h, approximate=approximate)
        out = F.linear(a, w, b)  # autocast (if on) casts a, w, b as for any linear
        ctx.save_for_backward(h, w)
        ctx.has_bias = b is not None
        ctx.approximate = approximate
        return out

    @staticmethod
    def backward(ctx, g):
        h, w = ctx.saved_tensors
        with torch.enable_grad():
            h_ = h.detach().requires_grad_(True)
            a = F.gelu(h_, approximate=ctx.approximate)
        dt = g.dtype
        g2 = g.reshape(-1, g.shape[-1])
        a2 = a.detach().reshape(-1, a.shape[-1]).to(dt)
        gw = (g2.t() @ a2).to(w.dtype) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0).to(w.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        ga = (g @ w.to(dt)).to(a.dtype)
        (gh,) = torch.autograd.grad(a, h_, ga)
        return gh, gw, gb, None


def gelu_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str = "tanh") -> torch.Tensor:
    """``F.linear(F.gelu(h), weight, bias)`` with the GELU output recomputed in backward."""
    return _GeluLinear.apply(h, weight, bias, approximate)


def gelu_linear_module(h: torch.Tensor, linear: torch.nn.Module, approximate: str = "tanh") -> torch.Tensor:
    """``linear(gelu(h))``: memory-light (:func:`gelu_linear`) for a plain ``nn.Linear`` under autograd,
    the module's own forward otherwise (an adapter on ``linear`` is never bypassed, see :func:`is_plain`)."""
    if torch.is_grad_enabled() and is_plain(linear, torch.nn.Linear):
        return _GeluLinear.apply(h, linear.weight, linear.bias, approximate)
    return linear(F.gelu(h, approximate=approximate))


# ----------------------------------------------------------------------------- adapters


def is_plain(module: torch.nn.Module, cls: type) -> bool:
    """True when ``module`` is exactly ``cls`` with no forward hooks or parametrizations.

    Fused operators (:func:`hyena_gated_conv`, :func:`gelu_linear`, the fp32 implicit filter) read
    a module's ``weight`` instead of calling it, which is exact only for the plain module.  Anything
    that changes what the module computes -- a PEFT adapter (LoRA/AdaLoRA/IA3 replace the module by
    a wrapper class), a parametrization (changes the class), a hook -- makes this False, and the
    callers then call the module through ``forward`` so that the change is never silently bypassed.
    """
    return type(module) is cls and not module._forward_hooks and not module._forward_pre_hooks


def causal_conv_forward(conv: torch.nn.Module, u: torch.Tensor) -> torch.Tensor:
    """Depthwise causal convolution through a conv module: the plain ``nn.Conv1d`` goes to
    :func:`short_causal_conv` (optional CUDA kernel); an adapted one is called (left-padded)."""
    if is_plain(conv, torch.nn.Conv1d):
        return short_causal_conv(u, conv.weight, conv.bias)
    return conv(F.pad(u, (conv.weight.shape[-1] - 1, 0)))


# ----------------------------------------------------------------------------- misc


def exponential_decay_window(t: torch.Tensor, channels: int, fast: float, slow: float, target: float) -> torch.Tensor:
    """HyenaDNA-style decay windows: exp(-t * |delta_c|), delta_c spread between
    log(target)/slow and log(target)/fast, for normalised time ``t`` in [0, 1]."""
    max_decay = math.log(target) / fast
    min_decay = math.log(target) / slow
    deltas = torch.linspace(min_decay, max_decay, channels, dtype=t.dtype, device=t.device)
    return torch.exp(-t[:, None] * deltas.abs()[None, :])
