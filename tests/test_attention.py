"""One attention module for every family: every path against a naive fp64 softmax attention with masks.

Paths: torch SDPA without a mask, with a padding mask, with ALiBi, causal or not, and the flash-attn
path (dense kernel; unpadded variable-length kernel under padding).  flash-attn cannot run on a CPU, so
its path is exercised with stand-in kernels that compute each sequence naively: what is tested is
glmtrain's own part of that path -- unpadding, cumulative sequence lengths, ALiBi slopes handed over,
re-padding -- not the CUDA kernel.
"""

from __future__ import annotations

import math

import pytest
import torch

from glmtrain.models.layers import FlashKernels, SelfAttention, alibi_slopes, attend

B, H, L, D = 3, 4, 11, 8


def naive(q, k, v, causal, key_mask=None, slopes=None):
    """softmax(q k^T / sqrt(d) + bias) v, written out in fp64 with explicit loops over nothing clever."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    i = torch.arange(q.shape[2])
    if slopes is not None:
        s = s - slopes.double()[None, :, None, None] * (i[None, :] - i[:, None]).abs().double()
    if causal:
        s = s.masked_fill(i[None, :] > i[:, None], float("-inf"))
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    y = s.softmax(-1) @ v
    return y.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _stand_in_kernels():
    """Naive stand-ins with flash-attn's signatures ([tokens, heads, dim] layouts)."""

    def dense(q, k, v, dropout_p=0.0, causal=False, alibi_slopes=None):
        y = naive(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, None, alibi_slopes)
        return y.view(q.shape)

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, causal=False, alibi_slopes=None):
        assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and int(max_q) == int((cu_q[1:] - cu_q[:-1]).max())
        out = torch.empty_like(q)
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
            out[a:b] = naive(qs, ks, vs, causal, None, alibi_slopes)[0].view(b - a, *q.shape[1:])
        return out

    return FlashKernels(dense, varlen)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for _ in range(3))
    lengths = torch.tensor([L, 7, 4])
    key_mask = torch.arange(L)[None, :] < lengths[:, None]
    return q, k, v, key_mask


def _rel(a, b, mask=None):
    if mask is not None:  # padded query rows are free (not compared); real rows must agree
        a, b = a[mask], b[mask]
    return float(((a - b).norm() / b.norm()).detach())


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("alibi", [False, True], ids=["no-alibi", "alibi"])
@pytest.mark.parametrize("path", ["sdpa", "flash"])
def test_every_path_matches_naive_fp64_attention(causal, masked, alibi, path):
    q, k, v, key_mask = _inputs()
    km = key_mask if masked else None
    slopes = alibi_slopes(H) if alibi else None
    ref = naive(q, k, v, causal, km, slopes)
    if path == "sdpa":
        got = attend(q, k, v, causal, key_mask=km, alibi=slopes)
    else:
        from glmtrain.models.layers import _attend_flash

        got = _attend_flash(q, k, v, causal, 0.0, _stand_in_kernels(), km, slopes)
        if km is not None:  # the variable-length path leaves padded positions at zero
            assert (got[~km] == 0).all()
    assert _rel(got, ref, km) < 1e-6


def test_dispatch_uses_the_varlen_kernel_only_for_cuda_half_precision():
    q, k, v, key_mask = _inputs()
    calls = []
    kern = _stand_in_kernels()
    spy = FlashKernels(lambda *a, **kw: calls.append("dense") or kern.func(*a, **kw),
                       lambda *a, **kw: calls.append("varlen") or kern.varlen(*a, **kw))
    attend(q, k, v, False, flash=spy, key_mask=key_mask)  # fp64 CPU tensors: SDPA, never flash
    assert calls == []


def test_fully_padded_sample_stays_finite():
    q, k, v, key_mask = _inputs()
    key_mask[1] = False  # a blanked (corrupt, skipped) sample: no real token at all
    y = attend(q, k, v, False, key_mask=key_mask)
    assert torch.isfinite(y).all()
    assert _rel(y[[0, 2]], naive(q, k, v, False, key_mask)[[0, 2]], key_mask[[0, 2]]) < 1e-6


def test_alibi_slopes_are_the_published_sequences():
    # Press et al.: 8 heads -> 1/2, 1/4, ..., 1/256; 12 heads -> the 8-head slopes, then every other 16-head one
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    sixteen = [2.0 ** (-(i + 1) / 2) for i in range(16)]
    assert torch.allclose(alibi_slopes(12), torch.tensor([2.0 ** -(i + 1) for i in range(8)] + sixteen[0::2][:4]))


@pytest.mark.parametrize("position", ["rope", "alibi", "none"])
def test_module_forward_matches_naive_with_padding(position):
    torch.manual_seed(0)
    attn = SelfAttention(H * D, H, causal=False, qkv_bias=True, out_bias=True, position=position).double()
    x = torch.randn(B, L, H * D, dtype=torch.float64)
    _, _, _, key_mask = _inputs()
    q, k, v = attn.qkv(x).view(B, L, H, 3, D).permute(3, 0, 2, 1, 4)  # head-major fused layout
    if position == "rope":
        q, k = attn.rope(q, k)
    ref = attn.out(naive(q, k, v, False, key_mask, attn.alibi_slopes))
    assert _rel(attn(x, key_mask), ref, key_mask) < 1e-6
