"""Helpers for the downstream tests: tiny models of every causal/encoder family, fabricated run dirs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from glmtrain.downstream.config import FinetuneTask
from glmtrain.models import FAMILIES
from glmtrain.models.evo2 import Evo2, Evo2Config
from glmtrain.models.hyena import HyenaConfig, HyenaDNA
from glmtrain.models.transformer import Transformer, TransformerConfig
from glmtrain.tokenizers import TokenizerConfig, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
GUE_TINY = ROOT / "tests" / "data" / "gue_mouse0_tiny"


def tiny(family: str, seed: int = 0):
    """(model, tokenizer) of a tiny CPU shape; dropout off so that outputs are deterministic."""
    torch.manual_seed(seed)
    if family == "hyena":
        cfg = HyenaConfig(d_model=16, n_layers=2, filter_order=16, max_seq_len=64, embed_dropout=0.0)
        return HyenaDNA(cfg, 16), build_tokenizer({"kind": "char"})
    if family == "evo2":
        cfg = Evo2Config(d_model=32, pattern="SDH*", n_heads=4, mlp_dim=64, se_filter_groups=4, mr_filter_groups=4,
                         mr_filter_length=16, tokenizer=TokenizerConfig(kind="byte"))
        return Evo2(cfg, 512), build_tokenizer({"kind": "byte"})
    if family == "caduceus":  # lands from its own branch; covered here as soon as it is registered
        if "caduceus" not in FAMILIES:
            pytest.skip("the caduceus family is not on this branch yet")
        from glmtrain.models.caduceus import Caduceus, CaduceusConfig

        return Caduceus(CaduceusConfig(d_model=16, n_layers=2, rcps=True), 16), build_tokenizer({"kind": "char"})
    if family == "dnabert2":  # ALiBi, post-norm, GeGLU encoder (the encoders branch's TransformerConfig fields)
        fields = {f.name for f in dataclasses.fields(TransformerConfig)}
        if not {"position", "norm_position", "embed_norm"} <= fields:
            pytest.skip("the DNABERT-2 layout of the transformer family is not on this branch yet")
        cfg = TransformerConfig(d_model=16, n_layers=2, n_heads=2, causal=False, position="alibi", norm_position="post",
                                embed_norm=True, mlp="geglu")
        return Transformer(cfg, 16), build_tokenizer({"kind": "char"})
    causal = family == "transformer"
    cfg = TransformerConfig(d_model=16, n_layers=2, n_heads=2, causal=causal, mlp="gelu" if causal else "swiglu")
    return Transformer(cfg, 16), build_tokenizer({"kind": "char"})


def task(**kw) -> FinetuneTask:
    t = FinetuneTask(data_dir=str(GUE_TINY))
    for k, v in kw.items():
        obj, key = t, k
        if "." in k:
            head, key = k.split(".")
            obj = getattr(t, head)
        setattr(obj, key, v)
    return t


def fabricate_run(run_dir: Path, run, step: int = 5, seed: int = 0) -> Path:
    """A run directory with one checkpoint in glmtrain's layout (weights of a freshly built model),
    for tests that need a starting checkpoint without paying for a pretraining run."""
    from glmtrain.models import build_model

    from glmtrain.schedule import compat, resolve

    sch = resolve(run, dp=1)
    torch.manual_seed(seed)
    tok = build_tokenizer({"kind": run.model.tokenizer.kind, "lowercase": run.model.tokenizer.lowercase})
    model = build_model(run.model, tok.vocab_size)
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": step,
            "optimizer_states": [], "loops": {},
            "glmtrain": {"consumed_samples": 0, "stage": 0, "offset": 0, "compat": compat(run, sch, sch.stages[0]),
                         "world_size": 1}}
    path = run_dir / "checkpoints" / f"step-{step:08d}.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def as_run(model_cfg) -> SimpleNamespace:
    from glmtrain.config import ObjectiveConfig

    return SimpleNamespace(model=model_cfg, objective=ObjectiveConfig(name="clm" if getattr(model_cfg, "causal", True) else "mlm"))

