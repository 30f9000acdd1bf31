"""Sharding plans: how each model family is split by tensor parallelism and wrapped by FSDP2.

This is the one place in glmtrain that knows about device meshes.  Model code
(``glmtrain/models``) stays plain ``nn.Module``; a family joins every
distributed strategy by declaring a :class:`FamilyPlan` here, nothing else.

A plan names, per block, what each sub-module does under tensor parallelism
(Megatron-style: column-parallel then row-parallel linear layers, so that one
block costs one all-reduce -- or one all-gather + one reduce-scatter with
sequence parallelism -- in forward and in backward):

* :class:`Colwise` -- ``nn.Linear`` whose output features are split over the
  tensor-parallel ranks as one contiguous slice of rows per rank.  Fused
  projections are laid out by the models so that this slice is complete: the
  attention ``qkv`` is head-major (a slice = whole heads with their q, k, v) and the
  Hyena projections are channel-interleaved (a slice = whole channels with their
  post, pre, v; ``models.layers.split_interleaved``).  So nothing is permuted when
  sharding, and checkpoints (the same layout under every strategy) need no
  relayout or full-tensor gather on save or load.
* :class:`Rowwise` -- ``nn.Linear`` whose input features are split; its output is
  summed over the ranks (all-reduce, or reduce-scatter onto the sequence
  dimension with sequence parallelism).
* :class:`Norm` -- a normalisation layer; with sequence parallelism it runs on
  the local slice of the sequence (its weight replicated, gradients summed).
* :class:`Local` -- parameters that a module uses in its own channel-wise
  arithmetic (depthwise short convolutions, the long filters of Hyena, the D
  skip terms).  They are split by channel (dim 0, contiguous: the featurizer
  convolution is channel-interleaved like its projection) and the module sees
  the local slice during its forward, so the FFT convolution runs on local
  channels with no communication at all.  Replicated parameters that feed
  such arithmetic (the small MLP generating Hyena's implicit filter, whose last
  layer is split by channel) are listed in ``summed``: identity in forward,
  gradient all-reduced over the tensor-parallel ranks in backward (Megatron's
  "copy to tensor-parallel region").  Buffers derived from the channel
  index (decay windows) are sliced the same way; ``attrs`` adjusts plain
  attributes that hold a global width (e.g. the number of channels a grouped
  filter is expanded to).

The plan also names the FSDP2 units (one per block; embeddings, final norm and
the tied head stay in the root unit) and the sizes the tensor-parallel degree
must divide (checked before any process starts, :func:`tp_problems`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


# ----------------------------------------------------------------------------- plan vocabulary
@dataclass(frozen=True)
class Colwise:
    pass


@dataclass(frozen=True)
class Rowwise:
    pass


@dataclass(frozen=True)
class Norm:
    # block -> whether the norm's sequence-parallel output must be a plain local tensor: in a post-norm
    # block the norm's output is the residual stream itself and meets row-parallel (local) outputs
    local_output: Callable[[nn.Module], bool] | None = None


@dataclass(frozen=True)
class Local:
    params: tuple[str, ...] = ()  # names (relative) of parameters split by channel (dim 0)
    # glob patterns of parameter names (relative) that stay replicated but feed channel-local arithmetic:
    # their gradient on each rank covers only its channels, so it is summed over the tensor-parallel ranks
    summed: tuple[str, ...] = ()
    buffers: tuple[str, ...] = ()  # names (relative) of buffers split by channel (dim 0)
    # name (relative, dotted) -> function(old value, tp) -> new value, for attributes holding a global width
    attrs: dict[str, Callable[[Any, int], Any]] = field(default_factory=dict)


Style = Colwise | Rowwise | Norm | Local


@dataclass(frozen=True)
class FamilyPlan:
    """How one family is sharded.  ``block_styles`` maps glob patterns relative to a block to styles;
    patterns that match nothing in a given block are skipped (blocks of one family may differ, e.g.
    Evo 2's attention and Hyena blocks)."""

    family: str
    block_styles: dict[str, Style]
    tp_divisors: Callable[[Any, int], list[tuple[str, int]]]  # (model cfg, vocab) -> [(what, size)]
    blocks: str = "blocks"  # ModuleList: one FSDP unit per element
    embed: str = "embed"
    head: str = "lm_head"
    final_norm: str = "norm_f"  # may be None in a model (post-norm stacks end normalised)
    # modules between the final norm and the head (an MLM head's dense + norm), in order; absent ones skipped
    head_transform: tuple[str, ...] = ()
    tensor_parallel: bool = True  # False: FSDP/DDP only; strategy=tp is refused for the family
    tp_refusal: str = ""  # why a family without tensor parallelism has none (shown in the refusal)
    cp_refusal: str = ""  # non-empty: strategy.cp_size > 1 is refused for the family, for this reason
    # glob patterns (relative to a block) of linear layers deliberately left replicated under TP
    replicated: tuple[str, ...] = ()


def _cfg_copy(cfg: Any, tp: int) -> Any:
    """A per-module copy of a family config whose d_model is the local channel count."""
    return dataclasses.replace(cfg, d_model=cfg.d_model // tp)


# ----------------------------------------------------------------------------- families
def _transformer_divisors(cfg: Any, vocab: int) -> list[tuple[str, int]]:
    return [("model.n_heads", cfg.n_heads), ("the MLP width (model.ffn_dim)", cfg.resolved_ffn_dim())]


def _hyena_divisors(cfg: Any, vocab: int) -> list[tuple[str, int]]:
    return [("model.d_model (Hyena channels)", cfg.d_model), ("model.d_inner", cfg.resolved_d_inner())]


def _evo2_divisors(cfg: Any, vocab: int) -> list[tuple[str, int]]:
    out = [("model.d_model (Hyena channels)", cfg.d_model), ("the MLP width (model.mlp_dim)", cfg.resolved_mlp_dim())]
    pattern = cfg.pattern
    if "*" in pattern:
        out.append(("model.n_heads", cfg.n_heads))
    if "S" in pattern:
        out.append(("model.se_filter_groups", cfg.se_filter_groups))
    if "D" in pattern:
        out.append(("model.mr_filter_groups", cfg.mr_filter_groups))
    if "H" in pattern:
        out.append(("model.li_filter_groups", cfg.li_filter_groups or cfg.d_model))
    return out


def _post_norm(block: nn.Module) -> bool:
    return bool(getattr(block, "post", False))


PLANS: dict[str, FamilyPlan] = {
    # Plain pre-norm Transformer: head-major fused qkv -> whole heads per rank; GELU or SwiGLU MLP.
    "transformer": FamilyPlan(
        family="transformer",
        block_styles={
            "norm1": Norm(_post_norm), "norm2": Norm(_post_norm),
            "attn.qkv": Colwise(), "attn.out": Rowwise(),
            "mlp.fc1": Colwise(), "mlp.fc2": Rowwise(),
            "mlp.gate": Colwise(), "mlp.up": Colwise(), "mlp.down": Rowwise(),
            # ALiBi: each rank keeps the slopes of its own (contiguous) heads
            "attn": Local(buffers=("alibi_slopes",)),
        },
        tp_divisors=_transformer_divisors,
        head_transform=("head_dense", "head_norm"),
    ),
    # HyenaDNA: the (channel-interleaved) input projection and the depthwise short conv shard by channel,
    # the long convolution too; the implicit filter's MLP is replicated and only its last layer (one
    # output per channel) is column-parallel.
    "hyena": FamilyPlan(
        family="hyena",
        block_styles={
            "norm1": Norm(), "norm2": Norm(),
            "mixer.in_proj": Colwise(), "mixer.out_proj": Rowwise(),
            "mixer": Local(params=("short_conv.weight", "short_conv.bias", "filter.bias", "filter.out.weight"),
                           buffers=("filter.deltas",),
                           summed=("filter.mlp.*", "filter.act.*")),
            "mlp.fc1": Colwise(), "mlp.fc2": Rowwise(),
            # the memory-light MLP applies fc2's weight inside a custom autograd function (no module call,
            # so no row-parallel hooks): under tensor parallelism the plain fc2 call is used instead
            "mlp": Local(attrs={"recompute_gelu": lambda v, tp: False}),
        },
        tp_divisors=_hyena_divisors,
    ),
    # StripedHyena 2 (Evo 2): attention blocks like the Transformer's; Hyena blocks like HyenaDNA's with
    # explicit (SE/MR) or modal (LI) filters split by filter group; gated MLP.
    "evo2": FamilyPlan(
        family="evo2",
        block_styles={
            "norm1": Norm(), "norm2": Norm(),
            "mixer.qkv": Colwise(), "mixer.proj": Colwise(), "mixer.out": Rowwise(),
            "mixer": Local(
                params=("short_conv.weight", "short_conv.bias", "filter.h", "filter.D", "filter.log_rate",
                        "filter.log_poles", "filter.residues"),
                buffers=("filter.window",),
                attrs={"filter.d": lambda v, tp: v // tp, "cfg": _cfg_copy},
            ),
            "mlp.gate": Colwise(), "mlp.up": Colwise(), "mlp.down": Rowwise(),
        },
        tp_divisors=_evo2_divisors,
    ),
    # Caduceus: FSDP2 per block (the tied in/out projections of the two directions live in one block unit);
    # no tensor parallelism (see tp_refusal).
    "caduceus": FamilyPlan(
        family="caduceus",
        block_styles={},
        tp_divisors=lambda cfg, vocab: [],
        tensor_parallel=False,
        tp_refusal=("the selective scan's input-dependent dt, B and C project all d_inner channels, which needs an "
                    "extra all-reduce inside each direction of every block, and Caduceus-PS flips its hidden state "
                    "along length and channels, across sequence and channel shards"),
        cp_refusal=("both scan directions of every BiMamba run over the whole sequence, and Caduceus-PS (and "
                    "Caduceus-Ph's RC averaging) reverse the sequence, which a rank holding one chunk cannot do locally"),
    ),
}


def plan_for(family: str) -> FamilyPlan | None:
    return PLANS.get(family)


def sequence_parallel_problem(model_cfg: Any) -> str | None:
    """Why the model's embedding stage cannot run on a slice of the sequence (one line), or None."""
    if getattr(model_cfg, "embed_norm", False) or getattr(model_cfg, "position", "") == "learned":
        return ("strategy.sequence_parallel=true: this model normalises or adds learned positions to the whole "
                "embedded sequence before the blocks (model.embed_norm / model.position=learned); set "
                "strategy.sequence_parallel=false")
    return None


def tp_problems(model_cfg: Any, vocab: int, tp: int, seq_len: int, sequence_parallel: bool, vocab_parallel: bool) -> list[str]:
    """Sizes that the tensor-parallel degree does not divide (empty = fine)."""
    plan = plan_for(model_cfg.family)
    if plan is None or tp <= 1:
        return []
    out = [f"{what}={size}" for what, size in plan.tp_divisors(model_cfg, vocab) if size % tp]
    if sequence_parallel and seq_len % tp:
        out.append(f"the sequence length ({seq_len} tokens per window; strategy.sequence_parallel=true)")
    if vocab_parallel and vocab % tp:
        out.append(f"the vocabulary ({vocab} ids; strategy.vocab_parallel=true)")
    return out


# ----------------------------------------------------------------------------- application
def _resolve(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *path, attr = dotted.split(".")
    mod = root
    for p in path:
        mod = getattr(mod, p)
    return mod, attr


def _has(root: nn.Module, dotted: str) -> bool:
    try:
        mod, attr = _resolve(root, dotted)
    except AttributeError:
        return False
    return hasattr(mod, attr) and getattr(mod, attr) is not None


def _matches(block: nn.Module, pattern: str) -> list[str]:
    names = [n for n, _ in block.named_modules() if n]
    if any(ch in pattern for ch in "*?["):
        return [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return [pattern] if pattern in names else []


class _SumGradOverTP(torch.autograd.Function):
    """Identity in forward; all-reduce (sum) of the gradient over the tensor-parallel group in backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        torch.distributed.all_reduce(g, group=ctx.group)
        return g, None


class _LocalSwap:
    """Forward pre/post hooks: DTensor parameters -> their local shard during the module's forward.

    The local tensor comes from ``DTensor.to_local()``, so gradients flow back into
    the sharded parameter (each rank owns the gradient of its channels: nothing to
    reduce).  Works under FSDP2 as well: FSDP2 installs the unsharded (TP-sharded)
    parameter before the block's forward, this hook swaps in its local view and
    puts the parameter back afterwards.
    """

    def __init__(self, module: nn.Module, names: list[str], summed: list[str] = (), group=None):
        self.slots = [_resolve(module, n) for n in names]
        self.summed = [_resolve(module, n) for n in summed]
        self.group = group
        self.saved: list[tuple[nn.Module, str, Any]] = []

    def pre(self, module, args):
        from torch.distributed.tensor import DTensor

        for owner, attr in self.slots:
            p = owner._parameters.get(attr)
            if isinstance(p, DTensor):
                self.saved.append((owner, attr, p))
                owner._parameters[attr] = p.to_local()
        if torch.is_grad_enabled():
            for owner, attr in self.summed:
                p = owner._parameters.get(attr)
                if p is not None and p.requires_grad:
                    self.saved.append((owner, attr, p))
                    local = p.to_local() if isinstance(p, DTensor) else p
                    owner._parameters[attr] = _SumGradOverTP.apply(local, self.group)

    def post(self, module, args, output):
        while self.saved:
            owner, attr, p = self.saved.pop()
            owner._parameters[attr] = p
        return output


def _slice_buffer(owner: nn.Module, attr: str, tp: int, rank: int) -> None:
    full = getattr(owner, attr)
    local = full.chunk(tp, dim=0)[rank].clone()
    owner._buffers[attr] = local
    key_attr = attr

    def save_full(module, state_dict, prefix, local_metadata):
        k = prefix + key_attr
        if k in state_dict:
            state_dict[k] = full.to(state_dict[k].device)
        return state_dict

    def load_local(module, state_dict, prefix, *args):
        k = prefix + key_attr
        if k in state_dict and state_dict[k].shape == full.shape:
            full.copy_(state_dict[k])
            state_dict[k] = state_dict[k].chunk(tp, dim=0)[rank].clone()

    owner._register_state_dict_hook(save_full)
    owner._register_load_state_dict_pre_hook(load_local, with_module=True)


def _tp_block(block: nn.Module, plan: FamilyPlan, tp_mesh, sequence_parallel: bool) -> None:
    """Shard one block in place over ``tp_mesh`` (column / row / channel-local styles of the plan)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

    tp = tp_mesh.size()
    rank = tp_mesh.get_local_rank()
    act_in = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream between blocks
    styles: dict[str, Any] = {}
    locals_: list[tuple[str, Local]] = []
    for pattern, style in plan.block_styles.items():
        for name in _matches(block, pattern):
            if isinstance(style, Local):
                locals_.append((name, style))
            elif isinstance(style, Colwise):
                # the implicit filter's output layer sits outside the residual stream: plain input
                inner = name.endswith("filter.out")
                styles[name] = ColwiseParallel(input_layouts=Replicate() if inner else act_in)
            elif isinstance(style, Rowwise):
                styles[name] = RowwiseParallel(output_layouts=act_in)
            elif isinstance(style, Norm) and sequence_parallel:
                local = bool(style.local_output and style.local_output(block))
                styles[name] = SequenceParallel(use_local_output=local)
    for name, style in locals_:
        sub = block.get_submodule(name)
        present = [n for n in style.params if _has(sub, n)]
        for pn in present:
            owner, attr = _resolve(sub, pn)
            p = getattr(owner, attr)
            owner.register_parameter(attr, nn.Parameter(
                distribute_tensor(p.detach(), tp_mesh, [Shard(0)], src_data_rank=None), requires_grad=p.requires_grad))
        for bn in style.buffers:
            if _has(sub, bn):
                owner, attr = _resolve(sub, bn)
                _slice_buffer(owner, attr, tp, rank)
        for an, fn in style.attrs.items():
            if _has(sub, an):
                owner, attr = _resolve(sub, an)
                setattr(owner, attr, fn(getattr(owner, attr), tp))
        summed = [n for n, _ in sub.named_parameters() if any(fnmatch.fnmatchcase(n, pat) for pat in style.summed)]
        if present or summed:
            swap = _LocalSwap(sub, present, summed, tp_mesh.get_group())
            sub.register_forward_pre_hook(swap.pre)
            sub.register_forward_hook(swap.post)
    parallelize_module(block, tp_mesh, styles, src_data_rank=None)


def _tp_top(model: nn.Module, plan: FamilyPlan, tp_mesh, sequence_parallel: bool, vocab_parallel: bool) -> None:
    """Embedding, final norm and head under tensor parallelism."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    seq = Shard(1)
    act_in = seq if sequence_parallel else Replicate()
    top: dict[str, Any] = {}
    tied = getattr(model, plan.head).weight is getattr(model, plan.embed).weight
    # an MLM head's transform (dense + norm) runs replicated on the gathered sequence
    pre = [n for n in plan.head_transform if getattr(model, n, None) is not None]
    gather = PrepareModuleInput(input_layouts=act_in, desired_input_layouts=Replicate(), use_local_output=True)
    if vocab_parallel:
        top[plan.embed] = RowwiseParallel(input_layouts=Replicate(), output_layouts=act_in)
        if pre:
            top[pre[0]] = gather
        top[plan.head] = ColwiseParallel(input_layouts=Replicate() if pre else act_in, output_layouts=Replicate())
    elif sequence_parallel:
        top[plan.embed] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=seq)
        top[pre[0] if pre else plan.head] = gather
    if sequence_parallel and getattr(model, plan.final_norm, None) is not None:
        top[plan.final_norm] = SequenceParallel()
    if top:
        parallelize_module(model, tp_mesh, top, src_data_rank=None)
    if vocab_parallel and tied:
        getattr(model, plan.head).weight = getattr(model, plan.embed).weight


def shard_model(model: nn.Module, plan: FamilyPlan, *, dp_mesh=None, tp_mesh=None, fsdp: bool = True,
                sequence_parallel: bool = False, vocab_parallel: bool = False, mp_policy=None,
                reshard_after_forward: bool = True, materialize: Callable[[str], None] | None = None,
                offload: bool = False) -> None:
    """Tensor parallelism over ``tp_mesh`` (size > 1) and FSDP2 over ``dp_mesh`` (``fsdp``), block by block.

    ``materialize(prefix)``: for a model built on the meta device, called with ``"blocks.<i>"`` right
    before block i is sharded and with ``""`` (everything left: embedding, final norm, head) before
    the root -- so a rank never holds more than its shards plus one full block.  ``offload``: FSDP2
    keeps parameters, gradients and optimizer states on the CPU (one GPU, a model that does not fit).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    tp = tp_mesh is not None and tp_mesh.size() > 1
    kw: dict[str, Any] = {"mesh": dp_mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    if offload:
        from torch.distributed.fsdp import CPUOffloadPolicy

        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    blocks = getattr(model, plan.blocks)
    n = len(blocks)
    for i, block in enumerate(blocks):
        if materialize is not None:
            materialize(f"{plan.blocks}.{i}")
        if tp:
            _tp_block(block, plan, tp_mesh, sequence_parallel)
        if fsdp:
            # the last block's parameters are needed again right away by backward: keep them gathered
            fully_shard(block, reshard_after_forward=reshard_after_forward and i < n - 1, **kw)
    if materialize is not None:
        materialize("")
    if tp:
        _tp_top(model, plan, tp_mesh, sequence_parallel, vocab_parallel)
    if fsdp:
        # embedding, tied head and final norm in the root unit
        fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
