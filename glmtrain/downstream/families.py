"""What fine-tuning needs to know about a model, found by looking at the built model (no per-family list).

:func:`inspect_model` runs one tiny forward pass (3 random sequences of 8 nucleotide tokens) of
``hidden_states`` with forward hooks on the modules and reads off:

* the block list (``model.blocks``, else the largest ``nn.ModuleList``) and the width of each
  block's output -- bottleneck adapters go after the blocks;
* the width of the final hidden states -- the classification head's input (Caduceus-PS, for one,
  returns two halves: 2·d);
* the hidden vectors entering the first block -- prompt tuning prepends learned vectors there
  (after embeddings, learned positions and embedding norms, so the prompt never meets a
  length-dependent layer), initialised from these real ones;
* the ``nn.Linear`` / ``nn.Conv1d`` modules inside the blocks that are called through their
  ``forward``, and among them the linear layers that act on every token (their input holds
  batch x length rows).  Those are the default LoRA / AdaLoRA / IA³ targets.  A module whose
  weights an operator reads directly is never called, so it is never a target, and naming it in
  ``task.target_modules`` is refused (an adapter there would be ignored); so is a module of the
  implicit Hyena filter MLP by default (it acts on positions, not tokens).

IA³ scales the *input* of contracting projections (more inputs than outputs: the MLP's
down-projection, as the IA³ paper does for the feed-forward layer) and the output of the others.

Pooling: ``last`` for a causal model (the only position that has seen the whole sequence),
``mean`` for an encoder; :data:`POOLING` overrides a family where its published fine-tuning
code does otherwise.  A new family therefore needs no entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# families whose published fine-tuning code pools differently from the rule above
POOLING: dict[str, str] = {
    "hyena": "mean",  # HyenaDNA's released fine-tuning code pools by mean ("pool" decoder mode)
}

PROBE_BATCH, PROBE_LEN = 3, 8  # rows of a token-wise input: a multiple of 24; the Hyena filter MLP sees 8


@dataclass
class Anatomy:
    family: str
    causal: bool
    blocks: str  # name of the block ModuleList in the model
    block_widths: list[int]  # width of each block's (first) output
    hidden: int  # width of hidden_states: the head's input
    called: dict[str, nn.Module] = field(default_factory=dict)  # Linear/Conv1d in the blocks called through forward
    token_linears: list[str] = field(default_factory=list)  # of those, the Linear layers applied to every token
    never_called: list[str] = field(default_factory=list)  # Linear/Conv1d in the blocks whose forward never runs
    first_block_input: torch.Tensor | None = None  # [rows, width]: real hidden vectors entering block 0
    probe_ids: torch.Tensor | None = None  # the probe's input ids [PROBE_BATCH, PROBE_LEN]

    def default_pooling(self) -> str:
        return POOLING.get(self.family, "last" if self.causal else "mean")


def find_blocks(model: nn.Module) -> str:
    """Name of the model's block list: ``blocks`` when it is a ModuleList, else the ModuleList holding most parameters."""
    if isinstance(getattr(model, "blocks", None), nn.ModuleList):
        return "blocks"
    lists = [(sum(p.numel() for p in m.parameters()), -len(n), n) for n, m in model.named_modules()
             if n and isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks")
    return max(lists)[2]


def _first_tensor(x):
    if torch.is_tensor(x):
        return x
    if isinstance(x, (tuple, list)) and x and torch.is_tensor(x[0]):
        return x[0]
    return None


@torch.no_grad()
def inspect_model(model: nn.Module, token_ids, family: str | None = None, seed: int = 0) -> Anatomy:
    """The :class:`Anatomy` of ``model`` from one tiny forward pass over random ``token_ids`` (nucleotides)."""
    family = family or getattr(getattr(model, "cfg", None), "family", type(model).__name__.lower())
    blocks_name = find_blocks(model)
    blocks = model.get_submodule(blocks_name)
    g = torch.Generator().manual_seed(seed)
    pool = torch.as_tensor(list(token_ids), dtype=torch.long)
    device = next(iter(model.parameters())).device
    ids = pool[torch.randint(len(pool), (PROBE_BATCH, PROBE_LEN), generator=g)].to(device)
    rows_per_call: dict[str, int] = {}
    block_out: dict[int, int] = {}
    first_in: list[torch.Tensor] = []
    handles = []
    candidates = {f"{blocks_name}.{n}": m for n, m in blocks.named_modules()
                  if n and isinstance(m, (nn.Linear, nn.Conv1d))}

    def on_module(name):
        def hook(module, args, output):
            x = _first_tensor(args)
            if x is not None:
                rows_per_call.setdefault(name, x.numel() // max(1, x.shape[-1]))  # Linear: rows of features
        return hook

    def on_block(i):
        def hook(module, args, output):
            y = _first_tensor(output)
            if y is not None:
                block_out.setdefault(i, int(y.shape[-1]))
        return hook

    def before_first(module, args):
        x = _first_tensor(args)
        if x is not None and not first_in:
            first_in.append(x.detach().reshape(-1, x.shape[-1]).clone())

    try:
        for name, m in candidates.items():
            handles.append(m.register_forward_hook(on_module(name)))
        for i, b in enumerate(blocks):
            handles.append(b.register_forward_hook(on_block(i)))
        handles.append(blocks[0].register_forward_pre_hook(before_first))
        was = model.training
        model.eval()
        try:
            h = model.hidden_states(ids)
        finally:
            model.train(was)
    finally:
        for hd in handles:
            hd.remove()
    called = {n: m for n, m in candidates.items() if n in rows_per_call}
    token_rows = PROBE_BATCH * PROBE_LEN
    token_linears = [n for n, m in called.items() if isinstance(m, nn.Linear) and rows_per_call[n] % token_rows == 0]
    return Anatomy(family=family, causal=bool(getattr(model, "causal", True)), blocks=blocks_name,
                   block_widths=[block_out.get(i, 0) for i in range(len(blocks))], hidden=int(h.shape[-1]),
                   called=called, token_linears=token_linears,
                   never_called=[n for n in candidates if n not in called],
                   first_block_input=first_in[0].cpu() if first_in else None, probe_ids=ids.cpu())


def is_contracting(module: nn.Module) -> bool:
    """A projection with more inputs than outputs (the MLP's down-projection): IA³ scales its input."""
    return isinstance(module, nn.Linear) and module.in_features > module.out_features
