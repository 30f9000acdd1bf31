"""Distributed training: sharding plans, strategies, DeepSpeed configs, pre-spawn checks.

* :mod:`glmtrain.parallel.plans` -- per-family tensor-parallel / FSDP2 plans (the only
  place that knows about device meshes; models stay plain ``nn.Module``);
* :mod:`glmtrain.parallel.strategies` -- topology (torchrun / SLURM / local), batch
  arithmetic, Lightning strategy objects, portable checkpoint formats;
* :mod:`glmtrain.parallel.deepspeed_config` -- the ZeRO config from the Hydra config.

:func:`check_strategy` is called by :func:`glmtrain.config.validate`: every
refusal is one line, before any process group or subprocess exists.
"""

from __future__ import annotations

import importlib.util
from typing import Any

STRATEGIES = ("auto", "ddp", "ddp_spawn", "fsdp", "tp", "deepspeed")


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def strategy_problem(run: Any) -> str | None:
    """The first reason ``run.strategy`` cannot run (one line), or None."""
    from glmtrain.parallel.plans import plan_for, sequence_parallel_problem, tp_problems
    from glmtrain.parallel.strategies import batch_plan, seq_tokens, topology

    s, t = run.strategy, run.trainer
    family = run.model.family
    if s.tp_size < 0:
        return f"strategy.tp_size={s.tp_size}: must be >= 0 (0 = all devices of a node for strategy=tp)"
    topo = topology(run)
    if s.cp_size < 1:
        return f"strategy.cp_size={s.cp_size}: must be >= 1"
    if s.cp_size > 1:
        if s.name != "fsdp" or topo.tp > 1:
            return (f"strategy.cp_size={s.cp_size}: context parallelism runs under strategy=fsdp with tp_size=1 "
                    f"(is strategy={s.name}, tp_size={topo.tp})")
        if topo.dp % s.cp_size:
            return f"strategy.cp_size={s.cp_size} does not divide the data-parallel size {topo.dp} ({topo.describe().split(';')[0]})"
        if seq_tokens(run) % s.cp_size:
            return f"strategy.cp_size={s.cp_size} does not divide the sequence length ({seq_tokens(run)} tokens per window)"
        plan = plan_for(family)
        if plan is not None and plan.cp_refusal:
            return f"strategy.cp_size={s.cp_size}: model family {family!r} has no context parallelism ({plan.cp_refusal}); use cp_size=1"
        pos, kind = getattr(run.model, "position", "rope"), run.model.tokenizer.kind
        encoder_padding = not getattr(run.model, "causal", True) and kind in ("kmer", "kmer_overlap", "bpe")
        if pos in ("alibi", "learned") or encoder_padding:
            return (f"strategy.cp_size={s.cp_size}: ring attention supports neither the padding masks of an encoder on "
                    f"model.tokenizer.kind={kind} nor ALiBi / learned positions (model.position={pos}); use cp_size=1")
    if s.name in ("fsdp", "tp"):
        plan = plan_for(family)
        if plan is None:
            return (f"strategy={s.name}: model family {family!r} declares no sharding plan (glmtrain/parallel/plans.py); "
                    "use strategy=ddp or strategy=deepspeed")
        if topo.tp > 1 and not plan.tensor_parallel:
            why = f" ({plan.tp_refusal})" if plan.tp_refusal else ""
            return f"strategy.tp_size={topo.tp}: model family {family!r} has no tensor-parallel plan{why}; use strategy=fsdp with tp_size=1"
        if topo.world % topo.tp:
            return f"strategy.tp_size={topo.tp} does not divide the world size {topo.world} ({topo.describe().split(';')[0]})"
        if topo.tp > 1 and s.sequence_parallel and sequence_parallel_problem(run.model):
            return sequence_parallel_problem(run.model)
        if topo.tp > 1:
            L = seq_tokens(run)
            vocab = _vocab(run)
            bad = tp_problems(run.model, vocab, topo.tp, L, s.sequence_parallel, s.vocab_parallel)
            if bad:
                return f"strategy.tp_size={topo.tp} does not divide {', '.join(bad)}"
        if s.name == "fsdp" and s.param_dtype not in ("auto", "fp32", "bf16", "fp16"):
            return f"strategy.param_dtype={s.param_dtype!r}: allowed values are auto, fp32, bf16, fp16"
    elif s.tp_size > 1:
        return f"strategy.tp_size={s.tp_size} needs strategy=tp or strategy=fsdp (is {s.name})"
    if s.name == "deepspeed":
        if not deepspeed_available():
            return "strategy=deepspeed needs the deepspeed package: pip install -e '.[deepspeed]'"
        if s.zero_stage not in (1, 2, 3):
            return f"strategy.zero_stage={s.zero_stage}: allowed values are 1, 2, 3"
        if s.offload_params and s.zero_stage != 3:
            return f"strategy.offload_params=true needs strategy.zero_stage=3 (is {s.zero_stage})"
    if s.name == "ddp_spawn" and s.checkpoint == "sharded":
        pass  # ddp_spawn writes single files; the option only concerns fsdp/tp
    try:
        batch_plan(run, topo.data if topo.dp else 1)
    except ValueError as e:
        return str(e)
    return None


def _vocab(run: Any) -> int:
    from omegaconf import OmegaConf

    from glmtrain.tokenizers import build_tokenizer

    return build_tokenizer(OmegaConf.to_container(OmegaConf.structured(run.model.tokenizer))).vocab_size


def check_strategy(run: Any) -> None:
    """Raise :class:`glmtrain.config.ConfigError` (one line) if the strategy cannot run."""
    from glmtrain.config import ConfigError

    problem = strategy_problem(run)
    if problem:
        raise ConfigError(problem)


__all__ = ["STRATEGIES", "check_strategy", "deepspeed_available", "strategy_problem"]
