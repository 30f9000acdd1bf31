"""Fine-tuning methods: which parameters train, and the adapters that add some.

* ``full``: every parameter trains;
* ``probe``: the body is frozen (and kept in eval mode); only the head trains (linear probe);
* ``lora`` / ``adalora`` / ``ia3``: ``peft`` adapters on the linear layers that act on every token
  inside the blocks (found by :func:`glmtrain.downstream.families.inspect_model`), or on
  ``task.target_modules``; a name that matches nothing, or a module whose ``forward`` the model
  never calls, is refused with one line;
* ``prompt``: prompt tuning -- ``task.prompt_tokens`` learned vectors prepended to the hidden
  states entering the first block (a forward pre-hook).  Prepending suits every family: causal
  attention and causal convolutions let every real position see the prefix, and RoPE / Hyena
  filters depend only on relative positions, so the sequence itself is processed as before;
* ``adapter``: a bottleneck adapter after every block (Houlsby-style ``h + up(gelu(down(h)))``
  with ``up`` zero-initialised, so training starts from the pretrained function), attached with
  forward hooks on the blocks (on the first output of a block that returns several).

In every method except ``full`` the body's own weights stay frozen; ``task.train_body_norms``
also trains its normalisation layers.  The head always trains.  After attaching, one tiny
forward pass in training and one in inference mode check that every adapter is called
(:func:`check_adapters_called`): an operator that bypassed a wrapped module would be refused here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glmtrain.config import ConfigError
from glmtrain.downstream.families import Anatomy, is_contracting

PEFT_METHODS = ("lora", "adalora", "ia3")
ADAPTER_MARKERS = (".lora_", ".ia3_l")  # peft parameter names: <module>.lora_A.default.weight, <module>.ia3_l.default


def _replace_first(value: Any, new: torch.Tensor) -> Any:
    return new if torch.is_tensor(value) else (new, *value[1:])


class SoftPrompt(nn.Module):
    """Learned vectors prepended to the hidden states entering the first block (initialised from real ones)."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.tokens = nn.Parameter(init.detach().clone())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        p = self.tokens.to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)
        return torch.cat([p, h], dim=1)

    def pre_hook(self, module: nn.Module, args: tuple) -> tuple:
        if not args or not torch.is_tensor(args[0]):
            raise TypeError(f"{type(module).__name__} takes no positional hidden-state tensor; prompt tuning needs one")
        return (self(args[0]), *args[1:])


class BottleneckAdapter(nn.Module):
    """``h + up(gelu(down(h)))`` on a block's output; ``up`` starts at zero (identity at initialisation)."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)

    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        h = output if torch.is_tensor(output) else (output[0] if isinstance(output, (tuple, list)) and output else None)
        if not torch.is_tensor(h):
            raise TypeError(f"{type(module).__name__} returns {type(output).__name__}; the bottleneck adapter needs a tensor")
        return _replace_first(output, self(h))


@dataclass
class Applied:
    net: nn.Module  # what to call: the classifier, or the peft model wrapping it
    method: str
    targets: list[str] = field(default_factory=list)  # adapted modules (peft) or hooked modules
    adalora: Any = None  # the AdaLoRA tuner (update_and_allocate after every step)

    def trainable(self) -> tuple[int, int]:
        seen, train, total = set(), 0, 0
        for p in self.net.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            train += p.numel() if p.requires_grad else 0
        return train, total


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def resolve_targets(anatomy: Anatomy, requested: list[str], model_name: str) -> list[str]:
    """Module names (relative to the body) an adapter goes on: ``requested`` (name suffixes) or the linear
    layers acting on every token; refuses a name that matches nothing or a module never called."""
    def short(n: str) -> str:
        return n.split(".", 2)[2] if n.count(".") >= 2 else n

    adaptable = ", ".join(sorted({short(n) for n in anatomy.called}))
    if not requested:
        if not anatomy.token_linears:
            raise ConfigError(f"task.method: no linear layer of {model_name} acts on the tokens (an adapter would do "
                              f"nothing); set task.target_modules from: {adaptable or 'none'}")
        return list(anatomy.token_linears)
    out: list[str] = []
    for pat in requested:
        bypassed = [n for n in anatomy.never_called if _matches(n, pat)]
        if bypassed:
            raise ConfigError(f"task.target_modules: {pat!r} ({bypassed[0]}) is never called through its forward in "
                              f"{model_name} (its weights are read directly), so an adapter there would be ignored; "
                              f"adaptable names in the blocks: {adaptable}")
        hit = [n for n in anatomy.called if _matches(n, pat)]
        if not hit:
            raise ConfigError(f"task.target_modules: {pat!r} matches no module of {model_name} (an adapter there "
                              f"would do nothing); adaptable names in the blocks: {adaptable}")
        out += [n for n in hit if n not in out]
    return out


def _peft_config(method: str, task: Any, targets: list[str], contracting: list[str], max_steps: int):
    import peft

    if method == "lora":
        return peft.LoraConfig(r=task.lora.r, lora_alpha=task.lora.alpha, lora_dropout=task.lora.dropout,
                               target_modules=targets, bias="none")
    if method == "adalora":
        a = task.adalora
        tinit = a.tinit or max(1, max_steps // 10)
        tfinal = a.tfinal or max(1, max_steps // 5)
        if tinit + tfinal >= max_steps:
            raise ConfigError(f"task.adalora: tinit ({tinit}) + tfinal ({tfinal}) must be below trainer.max_steps ({max_steps})")
        return peft.AdaLoraConfig(init_r=a.init_r, target_r=a.target_r, tinit=tinit, tfinal=tfinal, deltaT=a.delta_t,
                                  lora_alpha=task.lora.alpha, lora_dropout=task.lora.dropout,
                                  orth_reg_weight=a.orth_reg_weight, total_step=max_steps, target_modules=targets)
    if task.ia3_feedforward:
        ff = [t for t in targets if any(_matches(t, p) for p in task.ia3_feedforward)]
    else:
        ff = contracting
    return peft.IA3Config(target_modules=targets, feedforward_modules=ff)


def _norm_params(body: nn.Module) -> list[nn.Parameter]:
    out = []
    for m in body.modules():
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or type(m).__name__.endswith("Norm"):
            out += list(m.parameters())
    return out


def check_adapters_called(net: nn.Module, sentinels: dict[str, nn.Module], ids: torch.Tensor, method: str) -> None:
    """One forward pass with autograd in training mode and one without in eval mode (the fused operators
    take different paths in each); every sentinel module (the adapter, or the module it wraps) must run."""
    seen: set[str] = set()
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: seen.add(n)) for n, m in sentinels.items()]
    was = net.training
    try:
        with torch.random.fork_rng(devices=[]):
            for training in (True, False):
                seen.clear()
                net.train(training)
                with torch.set_grad_enabled(training):
                    try:
                        net(ids)
                    except TypeError as e:  # a hook met a block it cannot adapt (see SoftPrompt / BottleneckAdapter)
                        raise ConfigError(f"task.method={method}: {e}") from None
                missed = [n for n in sentinels if n not in seen]
                if missed:
                    raise ConfigError(f"task.method={method}: the adapter on {missed[0]} (and {len(missed) - 1} more) is "
                                      f"never called in {'training' if training else 'inference'} mode -- the model reads "
                                      "that module's weights directly; choose other task.target_modules")
    finally:
        net.train(was)
        for h in handles:
            h.remove()


def apply_method(classifier: nn.Module, task: Any, anatomy: Anatomy, model_name: str, max_steps: int,
                 seed: int = 0) -> Applied:
    """Freeze / adapt ``classifier`` (a :class:`~glmtrain.downstream.heads.SequenceClassifier` over the body
    ``anatomy`` describes) for ``task.method``."""
    method = task.method
    body = classifier.body
    if method == "full":
        for p in classifier.parameters():
            p.requires_grad_(True)
        return Applied(classifier, method)
    for p in body.parameters():
        p.requires_grad_(False)
    applied = Applied(classifier, method)
    sentinels: dict[str, nn.Module] = {}
    if method in PEFT_METHODS:
        import peft

        names = resolve_targets(anatomy, list(task.target_modules), model_name)
        targets = ["body." + n for n in names]
        contracting = ["body." + n for n in names if is_contracting(anatomy.called[n])]
        try:
            net = peft.get_peft_model(classifier, _peft_config(method, task, targets, contracting, max_steps))
        except (ValueError, TypeError, NotImplementedError) as e:  # e.g. a module kind the method cannot adapt
            raise ConfigError(f"task.method={method}: {str(e).splitlines()[0]}") from None
        applied = Applied(net, method, targets, net.base_model if method == "adalora" else None)
        # the peft layer that replaced each target: its forward applies the adapter
        sentinels = {t: classifier.get_submodule(t) for t in targets}
    elif method == "prompt":
        init = anatomy.first_block_input
        if init is None:
            raise ConfigError(f"task.method=prompt: the first block of {model_name} takes no hidden-state tensor")
        g = torch.Generator().manual_seed(seed)
        classifier.prompt = SoftPrompt(init[torch.randint(len(init), (task.prompt_tokens,), generator=g)])
        first = body.get_submodule(anatomy.blocks)[0]
        first.register_forward_pre_hook(classifier.prompt.pre_hook)
        applied.targets = [f"body.{anatomy.blocks}.0"]
        sentinels = {"prompt": classifier.prompt}
    elif method == "adapter":
        blocks = body.get_submodule(anatomy.blocks)
        if not all(anatomy.block_widths):
            raise ConfigError(f"task.method=adapter: a block of {model_name} returns no hidden-state tensor to adapt")
        classifier.adapters = nn.ModuleList(BottleneckAdapter(w, task.adapter_dim) for w in anatomy.block_widths)
        for block, adapter in zip(blocks, classifier.adapters):
            block.register_forward_hook(adapter.hook)
        applied.targets = [f"body.{anatomy.blocks}.{i}" for i in range(len(blocks))]
        sentinels = {t: a for t, a in zip(applied.targets, classifier.adapters)}
    elif method == "probe":
        classifier.body_eval = True
        classifier.train(classifier.training)
    else:
        raise ConfigError(f"task.method={method!r}: unknown")
    for p in classifier.head.parameters():
        p.requires_grad_(True)
    if task.train_body_norms and method != "probe":
        for p in _norm_params(body):
            p.requires_grad_(True)
    if sentinels and anatomy.probe_ids is not None:
        check_adapters_called(applied.net, sentinels, anatomy.probe_ids.to(next(body.parameters()).device), method)
    return applied


def adapter_parameters(net: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters that belong to an adapter, grouped by the module they adapt
    (peft: the target module; prompt: the soft prompt; adapter: each block's adapter)."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        key = None
        for marker in ADAPTER_MARKERS:
            if marker in name:
                key = name.split(marker)[0]
        if key is None and (name.startswith("prompt.") or ".prompt." in name):
            key = "prompt"
        if key is None and "adapters." in name:
            key = name.rsplit(".", 2)[0]
        if key is not None:
            groups.setdefault(key, []).append((name, p))
    return groups
