"""Meta-device construction and deterministic, order-free initialisation.

A model built inside :func:`meta_parameters` has all its parameters on the ``meta`` device (no
memory, no initialisation work; buffers -- small derived constants such as decay windows -- stay
real).  :func:`materialize` then allocates the parameters of one sub-tree at a time on a device and
initialises them with the model's own rules (:meth:`GenomicModel.init_module`) under torch's RNG
seeded by **(run seed, module name)** (:func:`name_seed`).  Every module's values therefore depend
only on the seed and its name -- not on which other modules were built before it, on which rank,
or in which order -- so a model materialised block by block while being sharded (FSDP2 / tensor
parallel, :func:`glmtrain.parallel.plans.shard_model`) has exactly the initial weights of a plain
build (``build_model(cfg, vocab, seed=s)``, which is the same path on one device).  The values are
a function of the device type too (torch's CPU and CUDA generators differ).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


@contextmanager
def meta_parameters() -> Iterator[None]:
    """Inside: every parameter a module registers is moved to the meta device (buffers are kept)."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def name_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run seed and a module's qualified name (stable across runs and machines)."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def has_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def materialize(model: nn.Module, device: torch.device | str, seed: int, prefix: str = "",
                init: Callable[[str, nn.Module], None] | None = None) -> int:
    """Allocate and initialise the meta parameters of ``model``'s sub-tree ``prefix`` ("" = all) on
    ``device``; move the sub-tree's buffers there.  Tied parameters stay tied.  Returns the number of
    parameter values initialised."""
    device = torch.device(device)
    init = init or getattr(model, "init_module", None) or _reset
    done: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id(meta param) -> (meta param, new param)
    count = 0
    for name, mod in model.named_modules():
        if prefix and not (name == prefix or name.startswith(prefix + ".")):
            continue
        fresh = False
        for key, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) in done:  # a tied parameter already materialised under another name
                mod._parameters[key] = done[id(p)][1]
                continue
            new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad)
            done[id(p)] = (p, new)
            mod._parameters[key] = new
            count += new.numel()
            fresh = True
        for key, b in list(mod._buffers.items()):
            if b is not None and b.device != device:
                mod._buffers[key] = b.to(device)
        if fresh:
            cuda = [device.index or 0] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda), torch.no_grad():
                torch.manual_seed(name_seed(seed, name))
                init(name, mod)
    return count


def _reset(name: str, module: nn.Module) -> None:
    if not hasattr(module, "reset_parameters"):
        raise TypeError(f"module {name or '<root>'} ({type(module).__name__}) owns parameters but defines no "
                        "reset_parameters(): it cannot be initialised after a meta-device build")
    module.reset_parameters()


def reset_module(name: str, module: nn.Module) -> None:
    """The default rule: the module's own ``reset_parameters()`` (torch's layers, glmtrain's filters)."""
    _reset(name, module)
