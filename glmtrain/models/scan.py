"""Mamba's selective scan (S6) in plain torch, with the CUDA kernel of ``mamba_ssm`` when present.

The recurrence, per batch element b, channel d and state n (``A`` diagonal, ``A < 0``)::

    a[t]  = exp(delta[t] * A)                      # decay in (0, 1]
    h[t]  = a[t] * h[t-1] + delta[t] * B[t] * u[t]
    y[t]  = sum_n C[t] * h[t]  (+ D * u[t]) (* silu(z[t]))

with ``delta = softplus(delta_raw + delta_bias)`` when ``delta_softplus``.  Shapes follow
``mamba_ssm.selective_scan_fn``: u, delta, z ``[B, D, L]``; A ``[D, N]``; B, C ``[B, N, L]``;
D, delta_bias ``[D]``.

Three implementations with one contract (:func:`selective_scan`):

* ``sequential`` -- :func:`selective_scan_ref`, a loop over positions; the reference the
  tests compare with (in float64).
* ``chunked`` (the default off CUDA-with-mamba_ssm) -- :class:`_ChunkedScan`: the sequence
  is cut into blocks that bound memory; inside a block, a two-level scan runs the
  recurrence over chunk positions for all chunks at once (vectorised over chunks) and then
  carries the chunk-end states across chunks, so the Python loop has ``chunk + block/chunk``
  steps per block instead of ``block``.  It only ever multiplies decays ``a <= 1`` together
  (no cumulative sums of logs exponentiated back, no division by a prefix product), so it
  cannot overflow: a decay that underflows to 0 is the exact limit.  Backward is its own
  reverse-time scan over the same blocks, recomputing each block's states from the saved
  block-start states: memory is O(block) whatever the sequence length, never
  ``[B, D, L, N]``.
* ``mamba_ssm`` -- ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` (CUDA only),
  used by ``auto`` when importable and the tensors are on a GPU (fed float32 inputs).

Everything is computed in float32 (float64 if an input is float64) with autocast off, and
returned in ``u``'s dtype, as ``mamba_ssm`` does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from glmtrain.models.ops import _compute_dtype

IMPLS = ("auto", "chunked", "sequential", "mamba_ssm")

# ----------------------------------------------------------------------------- optional kernel
_MAMBA_SCAN = None
_MAMBA_CHECKED = False


def mamba_ssm_scan():
    """``mamba_ssm``'s ``selective_scan_fn`` if the package (and its CUDA extension) imports, else None."""
    global _MAMBA_SCAN, _MAMBA_CHECKED
    if not _MAMBA_CHECKED:
        _MAMBA_CHECKED = True
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # type: ignore

            _MAMBA_SCAN = selective_scan_fn
        except Exception:  # ImportError, or a build without its CUDA extension
            _MAMBA_SCAN = None
    return _MAMBA_SCAN


# ----------------------------------------------------------------------------- sequential reference
def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The recurrence one position at a time (slow; the reference for tests and benchmarks)."""
    dtype_in = u.dtype
    dt = _compute_dtype(u, delta, A, B, C)
    with torch.autocast(device_type=u.device.type, enabled=False):
        u, delta, A, B, C = (t.to(dt) for t in (u, delta, A, B, C))
        if delta_bias is not None:
            delta = delta + delta_bias.to(dt)[:, None]
        if delta_softplus:
            delta = F.softplus(delta)
        h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
        ys = []
        for t in range(u.shape[2]):
            dl = delta[:, :, t, None]
            h = torch.exp(dl * A) * h + dl * B[:, None, :, t] * u[:, :, t, None]
            ys.append((h * C[:, None, :, t]).sum(-1))
        y = torch.stack(ys, dim=2) if ys else u.new_zeros(u.shape)
        if D is not None:
            y = y + u * D.to(dt)[:, None]
        if z is not None:
            y = y * F.silu(z.to(dt))
    return y.to(dtype_in)


# ----------------------------------------------------------------------------- two-level linear scan
# A block of T positions is stored "chunk-interleaved": position k*c + j (chunk k, offset j) sits at
# [j, k], so that the loop over offsets touches one contiguous slab of all chunks at a time.
def _layout(x: torch.Tensor, c: int, n: int) -> torch.Tensor:
    """[T, ...] time-major -> [c, n, ...] chunk-interleaved, zero-padded to n*c positions."""
    pad = n * c - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    return x.view(n, c, *x.shape[1:]).transpose(0, 1).contiguous()


def _unlayout(x: torch.Tensor, T: int) -> torch.Tensor:
    """Inverse of :func:`_layout`: [c, n, ...] -> [T, ...]."""
    c, n = x.shape[:2]
    return x.transpose(0, 1).reshape(c * n, *x.shape[2:])[:T]


def _scan_(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """All states of ``h[t] = a[t] * h[t-1] + b[t]`` (``h[-1] = h0``), or with ``reverse``
    ``h[t] = a[t] * h[t+1] + b[t]`` (``h[T] = h0``), for a, b in the chunk-interleaved layout
    ``[c, n, *S]``.  In place, no autograd: returns ``b`` holding the states; ``a`` is left
    holding the running decay products.

    First every chunk is scanned from a zero state, all chunks side by side (``c`` steps); then
    the state entering each chunk is carried across the chunks (``n`` steps) and added back,
    scaled by the chunk's running decay product.
    """
    c, n = a.shape[:2]
    for j in (range(c - 2, -1, -1) if reverse else range(1, c)):
        p = j + 1 if reverse else j - 1
        b[j].addcmul_(a[j], b[p])
        a[j].mul_(a[p])
    last = 0 if reverse else c - 1  # the offset whose state leaves a chunk
    carry = torch.empty_like(b[0])
    prev = h0
    for k in (range(n - 1, -1, -1) if reverse else range(n)):
        carry[k] = prev
        prev = torch.addcmul(b[last, k], a[last, k], prev)
    b.addcmul_(a, carry.unsqueeze(0))
    return b


def _block_len(batch: int, channels: int, states: int, seq_len: int, budget: int = 1 << 19) -> int:
    """Positions per block: one [block, B, D, N] tensor of about ``budget`` elements (2 MB in fp32) stays
    in cache through the ~10 passes a block takes; larger blocks measured slower on CPU."""
    return max(16, min(seq_len, budget // max(1, batch * channels * states)))


def _chunking(T: int, chunk: int) -> tuple[int, int]:
    """(positions per chunk, chunks) for a block of T positions; ~sqrt(T) balances the two loops."""
    if chunk <= 0:
        n = max(1, round(math.sqrt(T)))
        return -(-T // n), n
    return chunk, -(-T // chunk)


class _ChunkedScan(torch.autograd.Function):
    """y = C . h with h the selective-scan states; inputs already in the compute dtype.

    u, delta [B, D, L]; A [D, N]; B, C [B, N, L].  Saves its inputs and the state at the start
    of every block; backward recomputes a block's states and runs the adjoint recurrence
    ``g[t] = a[t+1] * g[t+1] + gy[t] C[t]`` backwards through the blocks.
    """

    @staticmethod
    def _block(u, delta, A, B, t0, t1, c, n):
        lay = lambda x: _layout(x[:, :, t0:t1].permute(2, 0, 1), c, n)  # noqa: E731
        dl, ut, Bt = lay(delta), lay(u), lay(B)  # [c, n, B, D], [c, n, B, D], [c, n, B, N]
        a = torch.exp(dl.unsqueeze(-1) * A)  # [c, n, B, D, N]; padding: delta 0 -> decay 1
        b = (dl * ut).unsqueeze(-1) * Bt.unsqueeze(-2)  # padding: input 0
        return dl, ut, Bt, a, b

    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk: int, block: int):
        bsz, d, L = u.shape
        n_state = A.shape[1]
        block = block or _block_len(bsz, d, n_state, L)
        y = torch.empty_like(u)
        h = u.new_zeros(bsz, d, n_state)
        starts = []
        for t0 in range(0, L, block):
            t1 = min(L, t0 + block)
            c, n = _chunking(t1 - t0, chunk)
            starts.append(h)
            _, _, _, a, b = _ChunkedScan._block(u, delta, A, B, t0, t1, c, n)
            hs = _scan_(a, b, h)
            del a
            Ct = _layout(C[:, :, t0:t1].permute(2, 0, 1), c, n)
            y[:, :, t0:t1] = _unlayout((hs @ Ct.unsqueeze(-1)).squeeze(-1), t1 - t0).permute(1, 2, 0)
            h = hs[c - 1, n - 1].clone()  # padded positions carry the last state unchanged
            del hs
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(starts) if starts else u.new_zeros(0, bsz, d, n_state))
        ctx.chunk, ctx.block = chunk, block
        return y

    @staticmethod
    def backward(ctx, gy):
        u, delta, A, B, C, starts = ctx.saved_tensors
        chunk, block = ctx.chunk, ctx.block
        bsz, d, L = u.shape
        n_state = A.shape[1]
        gy = gy.to(u.dtype)
        gu, gdelta = torch.empty_like(u), torch.empty_like(delta)
        gB, gC = torch.empty_like(B), torch.empty_like(C)
        gA = torch.zeros_like(A)
        g_next = u.new_zeros(bsz, d, n_state)  # adjoint state at the first position of the following block
        a_next = u.new_ones(bsz, d, n_state)  # decay at that position
        for k in range(len(starts) - 1, -1, -1):
            t0 = k * block
            t1 = min(L, t0 + block)
            T = t1 - t0
            c, n = _chunking(T, chunk)
            dl, ut, Bt, a, b = _ChunkedScan._block(u, delta, A, B, t0, t1, c, n)
            # the adjoint's decay is one step later: shifted[t] = a[t+1] (the following block's first
            # decay after the last position; padded positions have decay 1 and pass it through)
            shifted = torch.empty_like(a)
            shifted[:-1] = a[1:]
            shifted[-1, :-1] = a[0, 1:]
            shifted[-1, -1] = a_next
            a_next = a[0, 0].clone()
            hs = _scan_(a, b.clone(), starts[k])
            del a
            lay = lambda x: _layout(x[:, :, t0:t1].permute(2, 0, 1), c, n)  # noqa: E731
            Ct, gyt = lay(C), lay(gy)
            gC[:, :, t0:t1] = _unlayout((gyt.unsqueeze(-2) @ hs).squeeze(-2), T).permute(1, 2, 0)
            g = _scan_(shifted, gyt.unsqueeze(-1) * Ct.unsqueeze(-2), g_next, reverse=True)
            del shifted
            g_next = g[0, 0].clone()
            # d loss / d(delta * A) = g[t] * a[t] * h[t-1] = g[t] * (h[t] - b[t])
            ga = hs.sub_(b).mul_(g)
            del b
            g_dl = (ga * A).sum(-1)
            gA += ga.mul_(dl.unsqueeze(-1)).sum(dim=(0, 1, 2))
            del ga, hs
            gBu = (g @ Bt.unsqueeze(-1)).squeeze(-1)  # sum over states of g * B: [c, n, B, D]
            gu[:, :, t0:t1] = _unlayout(gBu * dl, T).permute(1, 2, 0)
            gdelta[:, :, t0:t1] = _unlayout(g_dl + gBu * ut, T).permute(1, 2, 0)
            gB[:, :, t0:t1] = _unlayout(((dl * ut).unsqueeze(-2) @ g).squeeze(-2), T).permute(1, 2, 0)
            del g
        return gu, gdelta, gA, gB, gC, None, None


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   impl: str = "auto", chunk: int = 0, block: int = 0):
    """Selective scan with the ``mamba_ssm.selective_scan_fn`` contract; ``impl`` in :data:`IMPLS`.

    ``auto``: the ``mamba_ssm`` CUDA kernel for GPU tensors when it imports, else ``chunked``.
    ``chunk`` / ``block`` (0 = automatic) tune the chunked scan only; they never change the result
    beyond rounding.
    """
    if impl not in IMPLS:
        raise ValueError(f"model.scan_impl={impl!r}: allowed values are {', '.join(IMPLS)}")
    if impl == "auto":
        impl = "mamba_ssm" if (u.is_cuda and mamba_ssm_scan() is not None and u.dtype != torch.float64) else "chunked"
    if impl == "mamba_ssm":
        fn = mamba_ssm_scan()
        if fn is None:
            raise RuntimeError("model.scan_impl=mamba_ssm: the mamba_ssm package (CUDA) is not importable; "
                               "pip install mamba-ssm on a GPU machine, or use scan_impl=auto|chunked")
        # the kernel wants u, delta, B, C, z in one dtype: all float32 (as our scans compute), so that a
        # delta carrying its bias (~ -7) is not rounded to bf16; A, D, delta_bias are float32 anyway
        f32 = lambda t: None if t is None else t.float()  # noqa: E731
        y = fn(f32(u), f32(delta), f32(A), f32(B), f32(C), f32(D), z=f32(z), delta_bias=f32(delta_bias),
               delta_softplus=delta_softplus)
        return y.to(u.dtype)
    if impl == "sequential":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    dtype_in = u.dtype
    dt = _compute_dtype(u, delta, A, B, C)
    with torch.autocast(device_type=u.device.type, enabled=False):
        uf, delta = u.to(dt), delta.to(dt)
        if delta_bias is not None:
            delta = delta + delta_bias.to(dt)[:, None]
        if delta_softplus:
            delta = F.softplus(delta)
        y = _ChunkedScan.apply(uf.contiguous(), delta.contiguous(), A.to(dt).contiguous(), B.to(dt).contiguous(),
                               C.to(dt).contiguous(), chunk, block)
        if D is not None:
            y = y + uf * D.to(dt)[:, None]
        if z is not None:
            y = y * F.silu(z.to(dt))
    return y.to(dtype_in)


__all__ = ["IMPLS", "mamba_ssm_scan", "selective_scan", "selective_scan_ref"]
