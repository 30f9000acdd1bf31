"""Schema of the ``task`` group (``conf/task/*.yaml``): what a run does with the composed model.

``task=pretrain`` (the default) is glmtrain's pretraining run.  The downstream tasks reuse the
same groups -- ``model`` (the architecture; replaced by the checkpoint's own when one is given),
``trainer`` (steps, batch, precision, devices, validation interval), ``optim``, ``logger``,
``data`` (generation statistics) -- and add their own keys under ``task``.  Like the rest of the
config they are validated before anything runs; every problem is one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

# ``run_dir: runs/finetune/${basename:${task.data_dir}}-...`` in conf/task/*.yaml
if not OmegaConf.has_resolver("basename"):
    OmegaConf.register_new_resolver("basename", lambda p: os.path.basename(os.path.normpath(str(p))) or "data")

METHODS = ("full", "probe", "lora", "adalora", "ia3", "prompt", "adapter")


@dataclass
class PretrainTask:
    name: str = "pretrain"


@dataclass
class LoraOptions:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0


@dataclass
class AdaLoraOptions:
    init_r: int = 12  # rank every target starts with
    target_r: int = 4  # average rank kept after the budget schedule
    tinit: int = 0  # steps before pruning starts (0 = 10 % of trainer.max_steps)
    tfinal: int = 0  # steps of final fine-tuning at the target budget (0 = 20 % of trainer.max_steps)
    delta_t: int = 10  # steps between budget reallocations
    orth_reg_weight: float = 0.5


@dataclass
class FinetuneTask:
    name: str = "finetune"
    # GUE layout: a folder with train.csv, dev.csv, test.csv (optionally .gz), columns sequence,label
    data_dir: str = "???"
    # pretrained body: a glmtrain run directory or checkpoint; "" = random initialisation (a baseline)
    init_from: str = ""
    method: str = "lora"  # full | probe | lora | adalora | ia3 | prompt | adapter
    pooling: str = "auto"  # auto (last if causal, else mean; overrides: downstream/families.py POOLING) | mean | last | cls
    # adapter targets (lora/adalora/ia3): suffixes of module names; [] = every linear layer acting on the tokens
    target_modules: list[str] = field(default_factory=list)
    lora: LoraOptions = field(default_factory=LoraOptions)
    adalora: AdaLoraOptions = field(default_factory=AdaLoraOptions)
    ia3_feedforward: list[str] = field(default_factory=list)  # [] = the contracting projections (MLP down)
    prompt_tokens: int = 16  # prompt: learned soft tokens prepended to the embeddings
    adapter_dim: int = 32  # adapter: bottleneck width of the adapter after every block
    head_dropout: float = 0.1
    train_body_norms: bool = False  # lora/adalora/ia3/prompt/adapter: also train the norms (LayerNorm/RMSNorm)
    rc_average: bool = False  # test-time: average class probabilities of each sequence and its reverse complement
    select_metric: str = "mcc"  # dev metric that selects the checkpoint evaluated on test: mcc | accuracy | f1 | auroc
    patience: int = 0  # stop after this many dev evaluations without improvement (0 = never)
    eval_batch_size: int = 128
    max_train_samples: int = 0  # 0 = all (a quick look: the first n rows)
    max_eval_samples: int = 0  # 0 = all dev and test rows


@dataclass
class ScoreTask:
    name: str = "score"
    init_from: str = "???"  # glmtrain run directory or checkpoint
    vcf: str = "???"  # VCF (plain or gzip): CHROM POS ID REF ALT ...
    fasta: str = "???"  # reference genome (plain, gzip or bgzip), read with pyfaidx
    out: str = ""  # scored TSV ("" = <run_dir>/scores.tsv); rejected lines go to <out>.rejected.tsv
    method: str = "auto"  # auto (llr for causal, masked_marginal for MLM) | llr | masked_marginal
    window: int = 512  # bases of reference context around the variant (centred)
    batch_size: int = 16
    strict: bool = False  # stop at the first bad VCF line (exit 2) instead of reporting and counting it


@dataclass
class GenerateTask:
    name: str = "generate"
    init_from: str = "???"  # glmtrain run directory or checkpoint (a causal model)
    prompt: str = "ACGT"  # DNA the samples continue
    num_samples: int = 8
    length: int = 1000  # new bases per sample
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    batch_size: int = 8
    cached: bool = True  # KV cache / recurrent filter states; false = recompute the prefix for every token
    out: str = ""  # FASTA ("" = <run_dir>/samples.fa); statistics beside it (<out>.stats.json)
    stats_k: int = 6  # k-mer spectrum for the distance to the training data (the data group's train split)
    stats_max_bases: int = 2_000_000  # training bases sampled for the reference spectrum


TASKS: dict[str, type] = {"pretrain": PretrainTask, "finetune": FinetuneTask, "score": ScoreTask,
                          "generate": GenerateTask}

CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "finetune": {"method": METHODS, "pooling": ("auto", "mean", "last", "cls"),
                 "select_metric": ("mcc", "accuracy", "f1", "auroc")},
    "score": {"method": ("auto", "llr", "masked_marginal")},
}


def check_task(task: Any) -> None:
    """Values and ranges (types and keys are checked by the schema merge); raise ConfigError."""
    from glmtrain.config import ConfigError

    for key, allowed in CHOICES.get(task.name, {}).items():
        value = getattr(task, key)
        if value not in allowed:
            raise ConfigError(f"task.{key}={value!r}: allowed values are {', '.join(allowed)}")
    positive = {
        "finetune": ("prompt_tokens", "adapter_dim", "eval_batch_size", "lora.r", "adalora.init_r", "adalora.target_r",
                     "adalora.delta_t"),
        "score": ("window", "batch_size"),
        "generate": ("num_samples", "length", "batch_size", "stats_k", "stats_max_bases"),
    }.get(task.name, ())
    for key in positive:
        obj = task
        for part in key.split("."):
            obj = getattr(obj, part)
        if obj < 1:
            raise ConfigError(f"task.{key}={obj}: must be >= 1")
    if task.name == "finetune":
        if not 0.0 <= task.head_dropout < 1.0:
            raise ConfigError(f"task.head_dropout={task.head_dropout}: must lie in [0, 1)")
        if task.adalora.target_r > task.adalora.init_r:
            raise ConfigError(f"task.adalora.target_r={task.adalora.target_r} must not exceed task.adalora.init_r={task.adalora.init_r}")
    if task.name == "generate":
        if not 0.0 < task.top_p <= 1.0:
            raise ConfigError(f"task.top_p={task.top_p}: must lie in (0, 1]")
        if task.top_k < 0:
            raise ConfigError(f"task.top_k={task.top_k}: must be >= 0 (0 = off)")
        if not task.prompt:
            raise ConfigError("task.prompt: empty; give at least one base for the samples to continue")
