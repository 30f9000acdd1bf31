"""Context parallelism: one sequence split into contiguous chunks over ``strategy.cp_size`` ranks.

torch's ``context_parallel`` has no CPU sharding rule for SDPA, so glmtrain has its own, written
with plain ``torch.distributed`` collectives and autograd (runs on gloo and NCCL alike):

* **attention** (:func:`ring_attention`): every rank holds the queries of its chunk; the keys and
  values of all chunks are all-gathered (autograd-aware: the backward sums the K/V gradients of
  every rank and returns each rank its own slice) and consumed block by block with an online
  softmax (running max, log-sum-exp rescaling), so no rank ever holds more than one
  ``[chunk x chunk]`` block of scores.  Causal attention skips the blocks above the diagonal and
  masks the diagonal one; bidirectional attention uses every block.  RoPE is applied with the
  chunk's global offset.  Memory per rank: O(L d) for K/V (not O(L^2)); the cost of causal
  attention is unbalanced across ranks (rank r computes r+1 blocks) -- a zig-zag chunk order would
  balance it and is not done here.
* **Hyena long convolutions** (HyenaDNA's operator, Evo 2's SE/MR/LI mixers): documented gather.
  The mixer's input is all-gathered along the sequence, the (FFT or direct) convolution runs on
  the whole sequence, and each rank keeps its chunk of the output; the backward sums the gradients
  of the gathered input over the ranks.  Everything else in a block (norms, MLPs, embeddings, the
  LM head) is per token and runs on the local chunk only, so activations outside the mixers are
  split cp-fold.  A sequence-sharded FFT (a distributed transform) would also split the mixer.

The model code stays plain: :func:`apply_context_parallel` re-routes the attention modules'
forward and hooks the Hyena mixers.  Training (``strategy=fsdp strategy.cp_size=N``): the ranks of
one context-parallel group read the same samples, each takes its chunk of every sequence
(:func:`sequence_chunk`), and their FSDP2 gradients are reduced over data x context ranks; see
:mod:`glmtrain.module`.
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class _GatherSeq(torch.autograd.Function):
    """All-gather along ``dim`` in forward; in backward the gradient is summed over the ranks and each
    rank gets its own slice (every rank used every slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        ctx.rank, ctx.size = dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g.chunk(ctx.size, dim=ctx.dim)[ctx.rank].contiguous(), None, None


def gather_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    return _GatherSeq.apply(x, dim, group)


def sequence_chunk(t: torch.Tensor, rank: int, size: int, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous chunk of ``t`` along ``dim`` (the length must divide by ``size``)."""
    n = t.shape[dim]
    if n % size:
        raise ValueError(f"sequence length {n} is not divisible by the context-parallel degree {size}")
    return t.narrow(dim, rank * (n // size), n // size)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, group) -> torch.Tensor:
    """Attention of this rank's query chunk over the whole sequence, blockwise with an online softmax.

    q, k, v: [batch, heads, chunk, head_dim] of this rank's chunk (RoPE already applied with the
    chunk's global positions).  Returns [batch, chunk, heads * head_dim] like
    :func:`glmtrain.models.layers.attend`.
    """
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    b, h, n, hd = q.shape
    ks = gather_sequence(k, group, dim=2).split(n, dim=2)
    vs = gather_sequence(v, group, dim=2).split(n, dim=2)
    qs = q * (1.0 / math.sqrt(hd))
    acc = lse = None  # running output and log-sum-exp of the scores so far, [b, h, n, .]
    blocks = range(rank + 1) if causal else range(size)
    diag = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    for j in blocks:
        s = qs @ ks[j].transpose(-1, -2)  # [b, h, n, n]
        if causal and j == rank:
            s = s.masked_fill(~diag, float("-inf"))
        bm = s.amax(dim=-1, keepdim=True)
        p = torch.exp(s - bm)
        bl = bm + torch.log(p.sum(dim=-1, keepdim=True))
        o = (p @ vs[j]) / p.sum(dim=-1, keepdim=True)  # this block's normalised output
        if acc is None:
            acc, lse = o, bl
        else:
            new = torch.logaddexp(lse, bl)
            acc = acc * torch.exp(lse - new) + o * torch.exp(bl - new)
            lse = new
    return acc.transpose(1, 2).reshape(b, n, h * hd)


def _attention_forward(group):
    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        if key_mask is not None:  # refused before launch (glmtrain.parallel.strategy_problem); never silently dropped
            raise ValueError("context-parallel ring attention has no padding masks")
        rank = dist.get_rank(group)
        q, k, v = self.heads(x)
        q, k = self.rope(q, k, offset=rank * x.shape[1])  # global positions of this chunk
        return self.out(ring_attention(q, k, v, self.causal, group))
    return forward


class _GatherMixer:
    """Forward pre-hook: the mixer sees the whole sequence; forward hook: it returns this rank's chunk."""

    def __init__(self, group):
        self.group = group

    def pre(self, module, args):
        return (gather_sequence(args[0], self.group, dim=1), *args[1:])

    def post(self, module, args, output):
        return sequence_chunk(output, dist.get_rank(self.group), dist.get_world_size(self.group), dim=1)


def apply_context_parallel(model: nn.Module, group) -> dict[str, int]:
    """Route ``model``'s sequence mixers through the context-parallel group (in place).
    Returns how many modules of each kind were converted."""
    from glmtrain.models.layers import RopeAttention

    done = {"attention": 0, "gathered_mixers": 0}
    hook = _GatherMixer(group)
    for m in model.modules():
        if isinstance(m, RopeAttention):
            m.forward = types.MethodType(_attention_forward(group), m)
            done["attention"] += 1
        elif type(m).__name__ in GATHERED_MIXERS:
            m.register_forward_pre_hook(hook.pre)
            m.register_forward_hook(hook.post)
            done["gathered_mixers"] += 1
    return done


# sequence mixers that see the whole sequence under context parallelism (long convolutions);
# a new family whose mixer mixes positions adds its class name here (or gets its own ring)
GATHERED_MIXERS = {"HyenaOperator", "HyenaMixer"}


def cp_groups(mesh_ranks: list[list[int]], cp: int) -> list[list[int]]:
    """Context-parallel groups: consecutive blocks of ``cp`` ranks along each data-parallel column."""
    out = []
    for column in mesh_ranks:
        for i in range(0, len(column), cp):
            out.append(column[i:i + cp])
    return out


def new_cp_group(dp_columns: list[list[int]], cp: int) -> Any:
    """Create every context-parallel group (collectively, same order on every rank); return this rank's."""
    me = dist.get_rank()
    mine = None
    for ranks in cp_groups(dp_columns, cp):
        g = dist.new_group(ranks)
        if me in ranks:
            mine = g
    return mine


def chunk_prepared(prepared: Any, rank: int, size: int) -> Any:
    """An objective's prepared batch (glmtrain.objectives.Prepared) cut to this rank's chunk of positions.
    Next-token labels are aligned with the positions first (the last position predicts nothing), so
    the chunk boundaries lose no label."""
    import dataclasses

    labels, weights = prepared.labels, prepared.weights
    if prepared.shift:
        pad = prepared.inputs.shape[1] - labels.shape[1]
        labels = torch.nn.functional.pad(labels, (0, pad))
        weights = torch.nn.functional.pad(weights, (0, pad))
    return dataclasses.replace(prepared, inputs=sequence_chunk(prepared.inputs, rank, size),
                               labels=sequence_chunk(labels, rank, size), weights=sequence_chunk(weights, rank, size),
                               shift=False)
