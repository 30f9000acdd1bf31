"""Starting weights for the downstream tasks: a glmtrain run directory / checkpoint, or nothing.

The architecture comes from the checkpoint (its compatibility record holds the model config without
its speed-only knobs, and the per-stage knobs of the stage it was written in),
so ``task.init_from=<run dir>`` is all a user gives; the composed ``model=`` is used only when
there is no checkpoint (random initialisation: the no-pretraining baseline).  Checkpoints are read
through :mod:`glmtrain.checkpointing` (tensors only, ``weights_only``).  Loading into a model that
has more (a new head, adapters) or less reports both lists instead of failing or staying silent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmtrain import ckpt_formats
from glmtrain.checkpointing import CheckpointError, read_meta, resolve_checkpoint


@dataclass
class Pretrained:
    model_cfg: Any  # the family's config dataclass
    state_dict: dict[str, torch.Tensor] | None  # body tensors (names relative to the model); None = random init
    source: str  # what was loaded, for the logs
    step: int = 0


def load_pretrained(spec: str, composed_model_cfg: Any, what: str = "task.init_from") -> Pretrained:
    """The model config and body weights named by ``spec`` ('' = the composed model, random weights)."""
    if not spec:
        return Pretrained(composed_model_cfg, None, "random initialisation (no task.init_from)")
    if not Path(spec).exists():
        raise CheckpointError(f"{what}={spec}: no such file or directory (a glmtrain run directory or checkpoint, "
                              "or released weights)")
    released = _load_released(spec, what)
    if released is not None:
        return released
    try:
        path = resolve_checkpoint(spec)
    except CheckpointError:
        raise CheckpointError(f"{what}={spec}: no readable glmtrain checkpoint there (a run directory or a "
                              ".ckpt file, or released weights glmtrain.convert can import)") from None
    meta = read_meta(path)
    compat = meta.get("compat") or {}
    model_raw = dict(compat.get("model") or {})
    if "family" not in model_raw:
        raise CheckpointError(f"{what}={path}: the checkpoint's compatibility record has no model family")
    from glmtrain.config import _merge
    from glmtrain.models import config_class

    try:
        cls = config_class(model_raw["family"])
        # the family's per-stage knobs (e.g. RoPE) are recorded with the stage the checkpoint was written in
        stage = (compat.get("stages") or [{}])[-1]
        for k in cls.STAGE_KNOBS:
            if stage.get(k) is not None:
                model_raw.setdefault(k, stage[k])
        cfg = _merge(cls, model_raw, "model.")
    except KeyError as e:
        raise CheckpointError(f"{what}={path}: {e.args[0]}") from None
    sd = {k[len("model."):]: v for k, v in ckpt_formats.load_full(Path(path))["state_dict"].items() if k.startswith("model.")}
    if not sd:
        raise CheckpointError(f"{what}={path}: no model tensors in the checkpoint")
    return Pretrained(cfg, sd, str(path), int(meta.get("global_step", 0)))


def _load_released(spec: str, what: str) -> Pretrained | None:
    """Released weights (HyenaDNA, Evo 2, a Hugging Face export, ...) through :mod:`glmtrain.convert`, which
    recognises the layout and builds the model config from the release; None for glmtrain's own checkpoints."""
    import importlib.util

    if importlib.util.find_spec("glmtrain.convert") is None:
        return None
    from glmtrain import convert

    if not convert.is_released(spec):
        return None
    try:
        imp = convert.load_released(spec)
        model, cfg, _, _ = convert.build_imported_model(imp)
    except convert.ConvertError as e:
        raise CheckpointError(f"{what}={spec}: {e}") from None
    return Pretrained(cfg, model.state_dict(), f"{spec} (imported, {imp.layout} layout)", 0)


def load_into(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, source: str) -> dict[str, list[str]]:
    """Load ``state_dict`` (names relative to the body) into ``module`` under ``prefix``; returns
    ``{"loaded": [...], "not_loaded": [...] (module tensors left as initialised), "unused": [...]
    (checkpoint tensors with no place)}``.  A shape mismatch is refused with one line."""
    own = module.state_dict()
    wanted = {prefix + k: v for k, v in state_dict.items()}
    for k, v in wanted.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: tensor {k[len(prefix):]} has shape {list(v.shape)} in the checkpoint, "
                                  f"{list(own[k].shape)} in the model")
    result = module.load_state_dict({k: v for k, v in wanted.items() if k in own}, strict=False)
    loaded = sorted(k for k in wanted if k in own)
    return {"loaded": loaded, "not_loaded": sorted(result.missing_keys), "unused": sorted(k for k in wanted if k not in own)}


def describe_load(report: dict[str, list[str]], source: str, step: int) -> str:
    def names(xs: list[str]) -> str:
        return ", ".join(xs) if xs else "none"

    return (f"loaded {len(report['loaded'])} tensors from {source} (step {step}) into the body; "
            f"not loaded (new, initialised here): {names(report['not_loaded'])}; "
            f"checkpoint tensors not used: {names(report['unused'])}")


def build_from(run: Any, what: str = "task.init_from"):
    """(model, tokenizer, :class:`Pretrained`) for ``run.task.init_from``: the model is built (weights as
    initialised; load with :func:`load_into`), on the CPU; nothing is written.  Applies ``trainer.threads``."""
    from omegaconf import OmegaConf

    from glmtrain.models import build_model
    from glmtrain.tokenizers import build_tokenizer

    if run.trainer.threads > 0:
        torch.set_num_threads(run.trainer.threads)
    pre = load_pretrained(run.task.init_from, run.model, what)
    tok = build_tokenizer(OmegaConf.to_container(OmegaConf.structured(pre.model_cfg.tokenizer)))
    return build_model(pre.model_cfg, tok.vocab_size), tok, pre


def load_model(run: Any, what: str = "task.init_from"):
    """(model in eval mode on the run's device, tokenizer, :class:`Pretrained`) with every tensor from the checkpoint."""
    from glmtrain.train import resolve_accelerator

    model, tok, pre = build_from(run, what)
    report = load_into(model, pre.state_dict or {}, "", pre.source)
    if report["not_loaded"]:
        raise CheckpointError(f"{what}={pre.source}: tensors missing from the checkpoint: {', '.join(report['not_loaded'][:5])}")
    model.to("cuda" if resolve_accelerator(run) == "gpu" else "cpu").eval()
    return model, tok, pre
