"""Fine-tuning methods: which parameters train, and the adapters that add some.

* ``full``: every parameter trains;
* ``probe``: the body is frozen (and kept in eval mode); only the head trains (linear probe);
* ``lora`` / ``adalora`` / ``ia3``: ``peft`` adapters on the family's target modules
  (:mod:`glmtrain.downstream.families`, or ``task.target_modules``), resolved against the built
  model first: a name that matches nothing is refused with one line;
* ``prompt``: prompt tuning -- ``task.prompt_tokens`` learned vectors prepended to the token
  embeddings (a forward hook on the embedding).  Prepending suits every family: causal attention
  and causal convolutions let every real position see the prefix, and RoPE / Hyena filters
  depend only on relative positions, so the sequence itself is processed as before;
* ``adapter``: a bottleneck adapter after every block (Houlsby-style ``h + up(gelu(down(h)))``
  with ``up`` zero-initialised, so training starts from the pretrained function), attached with
  forward hooks on the blocks.

In every method except ``full`` the body's own weights stay frozen; ``task.train_body_norms``
also trains its normalisation layers.  The head always trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glmtrain.config import ConfigError
from glmtrain.downstream.families import FamilySpec

PEFT_METHODS = ("lora", "adalora", "ia3")
ADAPTER_MARKERS = (".lora_", ".ia3_l")  # peft parameter names: <module>.lora_A.default.weight, <module>.ia3_l.default


class SoftPrompt(nn.Module):
    """Learned tokens prepended to the embedding output (initialised from embeddings of real tokens)."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.tokens = nn.Parameter(init.detach().clone())

    def hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        p = self.tokens.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)
        return torch.cat([p, output], dim=1)


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

    def hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(output):
            raise TypeError(f"{type(module).__name__} returns {type(output).__name__}; the bottleneck adapter needs a tensor")
        return output + self.up(F.gelu(self.down(output.to(self.down.weight.dtype)))).to(output.dtype)


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


def resolve_targets(classifier: nn.Module, spec: FamilySpec, requested: list[str], model_name: str) -> list[str]:
    """Full module names (relative to the classifier) an adapter goes on; refuses a target that matches nothing."""
    body = classifier.body
    kinds = (nn.Linear, nn.Conv1d)
    modules = {n: m for n, m in body.named_modules() if n and isinstance(m, kinds)}
    blocks = spec.blocks + "."
    in_blocks = [n for n in modules if n.startswith(blocks)]
    adaptable = sorted({n.split(".", 2)[2] for n in in_blocks if n.count(".") >= 2})
    if requested:
        out = []
        for pat in requested:
            hit = [n for n in modules if _matches(n, pat)]
            if not hit:
                raise ConfigError(f"task.target_modules: {pat!r} matches no module of {model_name} (an adapter there "
                                  f"would do nothing); adaptable names in the blocks: {', '.join(adaptable)}")
            out += [n for n in hit if n not in out]
    elif spec.adapter_targets:
        out = [n for n in in_blocks if any(_matches(n, p) for p in spec.adapter_targets)]
    else:  # generic family: every linear layer in the blocks
        out = [n for n in in_blocks if isinstance(modules[n], nn.Linear)]
    if not out:
        raise ConfigError(f"task.method: no adapter target in {model_name} (family defaults "
                          f"{list(spec.adapter_targets)} match nothing); set task.target_modules from: {', '.join(adaptable)}")
    return ["body." + n for n in out]


def _peft_config(method: str, task: Any, targets: list[str], spec: FamilySpec, max_steps: int):
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
    ff_patterns = task.ia3_feedforward or list(spec.ia3_feedforward)
    ff = [t for t in targets if any(_matches(t, p) for p in ff_patterns)]
    return peft.IA3Config(target_modules=targets, feedforward_modules=ff)


def _norm_params(body: nn.Module) -> list[nn.Parameter]:
    out = []
    for m in body.modules():
        if isinstance(m, nn.LayerNorm) or type(m).__name__ in ("RMSNorm",):
            out += list(m.parameters())
    return out


def apply_method(classifier: nn.Module, task: Any, spec: FamilySpec, model_name: str, max_steps: int,
                 nucleotide_ids: list[int] | None = None, seed: int = 0) -> Applied:
    """Freeze / adapt ``classifier`` (a :class:`~glmtrain.downstream.heads.SequenceClassifier`) for ``task.method``."""
    method = task.method
    body = classifier.body
    if method == "full":
        for p in classifier.parameters():
            p.requires_grad_(True)
        return Applied(classifier, method)
    for p in body.parameters():
        p.requires_grad_(False)
    applied = Applied(classifier, method)
    if method in PEFT_METHODS:
        import peft

        targets = resolve_targets(classifier, spec, list(task.target_modules), model_name)
        try:
            net = peft.get_peft_model(classifier, _peft_config(method, task, targets, spec, max_steps))
        except (ValueError, TypeError, NotImplementedError) as e:  # e.g. a module kind the method cannot adapt
            raise ConfigError(f"task.method={method}: {str(e).splitlines()[0]}") from None
        applied = Applied(net, method, targets, net.base_model if method == "adalora" else None)
    elif method == "prompt":
        embed = getattr(body, spec.embed)
        g = torch.Generator().manual_seed(seed)
        pool_ids = torch.as_tensor(nucleotide_ids if nucleotide_ids is not None else range(embed.num_embeddings))
        pick = pool_ids[torch.randint(len(pool_ids), (task.prompt_tokens,), generator=g)]
        classifier.prompt = SoftPrompt(embed.weight[pick])
        embed.register_forward_hook(classifier.prompt.hook)
        applied.targets = [f"body.{spec.embed}"]
    elif method == "adapter":
        blocks = getattr(body, spec.blocks)
        classifier.adapters = nn.ModuleList(BottleneckAdapter(spec.hidden_size(body), task.adapter_dim) for _ in blocks)
        for block, adapter in zip(blocks, classifier.adapters):
            block.register_forward_hook(adapter.hook)
        applied.targets = [f"body.{spec.blocks}.{i}" for i in range(len(blocks))]
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
