"""Model families. Each entry: family -> (module, config class, model class).

Adding a family = one file in this package + one line here (+ a sharding plan
in ``glmtrain/parallel/plans.py`` to join the distributed strategies).
"""

from __future__ import annotations

import importlib
from typing import Any

from glmtrain.models.base import GenomicModel, ModelConfig

FAMILIES: dict[str, tuple[str, str, str]] = {
    "transformer": ("glmtrain.models.transformer", "TransformerConfig", "Transformer"),
    "hyena": ("glmtrain.models.hyena", "HyenaConfig", "HyenaDNA"),
    "evo2": ("glmtrain.models.evo2", "Evo2Config", "Evo2"),
}


def family_names() -> list[str]:
    return sorted(FAMILIES)


def config_class(family: str) -> type[ModelConfig]:
    if family not in FAMILIES:
        raise KeyError(f"model.family={family!r}: allowed values are {', '.join(family_names())}")
    mod, cfg_cls, _ = FAMILIES[family]
    return getattr(importlib.import_module(mod), cfg_cls)


def model_class(family: str) -> type[GenomicModel]:
    config_class(family)
    mod, _, model_cls = FAMILIES[family]
    return getattr(importlib.import_module(mod), model_cls)


def build_model(cfg: Any, vocab_size: int, *, seed: int | None = None, meta: bool = False,
                device: Any = "cpu") -> GenomicModel:
    """Build from a validated family config dataclass instance.

    ``meta=True``: parameters on the meta device (no memory), to be materialised later, shard by shard
    (:func:`glmtrain.models.init.materialize` with ``seed``).  ``seed`` without ``meta``: the plain build,
    materialised at once on ``device`` by the same name-seeded rules -- identical to any sharded
    materialisation with that seed.  Neither: the classic constructor (torch's global RNG).
    """
    cls = model_class(cfg.family)
    if seed is None and not meta:
        return cls(cfg, vocab_size)
    from glmtrain.models.init import materialize, meta_parameters

    with meta_parameters():
        model = cls(cfg, vocab_size)
    if not meta:
        materialize(model, device, seed)
    return model
