"""Structured config schema and validation.

Hydra composes YAML from ``conf/``; :func:`validate` then checks the result
against these dataclasses *before* any trainer, process group or subprocess is
created.  Every problem is reported as one line naming the key and what is
allowed (:class:`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from glmtrain.downstream import config as _task_config  # noqa: F401  (registers the ${basename:} resolver)
from glmtrain.models import config_class, family_names


class ConfigError(ValueError):
    """A configuration problem, phrased as one line for the user."""


# ----------------------------------------------------------------------------- data
@dataclass
class SourceConfig:
    path: str = "???"  # FASTA: plain, gzip or bgzip; "pkg://" points into the installed package
    species: str = ""  # "" = source<i>
    weight: float = 1.0  # relative sampling weight of this source in the training mix (0 = held-out use only)
    # Only these records (empty = all). Names as in the FASTA header's first word.
    records: list[str] = field(default_factory=list)


@dataclass
class SplitConfig:
    kind: str = "records"  # records | fraction | bed
    # records: records (per species: "species:record" or bare record names) held out
    valid_records: list[str] = field(default_factory=list)
    test_records: list[str] = field(default_factory=list)
    # fraction: the last valid_fraction (and test_fraction) of every record
    valid_fraction: float = 0.1
    test_fraction: float = 0.0
    # bed: "chrom start end split" intervals (Basenji/Enformer, HyenaDNA); bases outside them are unused
    bed: str = ""
    bed_species: str = ""  # the species whose records the bed names ("" = every source)


@dataclass
class DataConfig:
    name: str = "sample"
    sources: list[SourceConfig] = field(default_factory=list)
    split: SplitConfig = field(default_factory=SplitConfig)
    window: int = 1024  # bases per training window
    # tokens per sample for multi-base tokenizers (k-mers, BPE), class/separator tokens included: longer
    # encodings are cut, shorter ones padded (attention_mask 0, no loss). 0 = what a clean window of
    # `window` bases becomes (BPE: each batch is padded to its longest sample, rounded up to 8).
    window_tokens: int = 0
    # bases per stored window (shards / memory windows); 0 = window.  Training windows are consecutive
    # pieces of stored windows, so one set of shards serves every window that divides it (context stages).
    store_window: int = 0
    stride: int = 0  # 0 = window (no overlap); held-out windows never overlap
    min_length: int = 0  # 0 = window; shorter tails are padded (and excluded from the loss)
    max_n_fraction: float = 0.1  # drop windows with more N (non-ACGT) than this
    softmask: str = "upper"  # upper | keep | weight
    softmask_weight: float = 0.1  # loss weight of lowercase bases when softmask=weight
    rc_prob: float = 0.0  # reverse-complement augmentation probability at stream time
    rc_offline: bool = False  # also store the reverse complement of every training window at build time
    max_val_windows: int = 256  # held-out windows evaluated (evenly spaced); 0 = all
    num_workers: int = 1  # DataLoader worker processes per rank
    cache_dir: str = ""  # decompressed FASTA, indexes, auto-built shards ("" = $GLMTRAIN_CACHE or ~/.cache/glmtrain)
    format: str = "shards"  # shards (webdataset tar shards, built once) | memory (windows cut in RAM each run)
    shards: str = ""  # directory built by `python -m glmtrain.data build`; "" = build into cache_dir on first use
    shard_mb: float = 64.0  # target shard size (MB)
    build_workers: int = 0  # shard-build processes (0: CLI build min(cpus, shards, 8); auto-build in a run 1)
    shuffle_shards: int = 8  # shuffle block: samples of this many consecutive shards are permuted together; 0 = whole epoch
    resample: bool = False  # endless resampled mode: every pass draws shards with replacement (weighted by size)
    mix_block: int = 4096  # multispecies mix: exact weight quotas within every block of this many samples
    on_corrupt: str = "error"  # error | skip (count, log and leave out corrupt shards/samples)
    verify: str = "size"  # shard check when a run opens them: size | sha256


# ------------------------------------------------------------------------ objective
@dataclass
class ObjectiveConfig:
    name: str = "clm"  # clm (next token) | mlm
    mask_prob: float = 0.15
    mask_token_prob: float = 0.8  # of selected positions -> [MASK]
    random_token_prob: float = 0.1  # of selected positions -> random nucleotide; rest unchanged


# ------------------------------------------------------------------------- strategy
@dataclass
class StrategyConfig:
    """How training is distributed (glmtrain.parallel; conf/strategy/*.yaml)."""

    name: str = "auto"  # auto (single device) | ddp | ddp_spawn | fsdp | tp | deepspeed
    backend: str = "auto"  # auto: nccl on GPU, gloo on CPU
    find_unused_parameters: bool = False  # ddp
    # --- fsdp / tp (Lightning ModelParallelStrategy: FSDP2 fully_shard per block + DTensor tensor parallel)
    tp_size: int = 1  # tensor-parallel degree; fsdp with tp_size>1 = 2-D; strategy=tp: 0 = all devices of a node
    # context-parallel degree (strategy=fsdp, tp_size=1): each sequence split over this many ranks
    # (ring attention; Hyena mixers gather the sequence) -- glmtrain.parallel.context
    cp_size: int = 1
    sequence_parallel: bool = True  # tp: norms and residual stream split along the sequence
    vocab_parallel: bool = False  # tp: embedding and LM head split along the vocabulary
    reshard_after_forward: bool = True  # fsdp: free gathered parameters after each block's forward (ZeRO-3)
    param_dtype: str = "auto"  # fsdp: auto = bf16 parameters on GPU under bf16 precision | fp32 | bf16 | fp16
    reduce_dtype: str = "fp32"  # fsdp: gradient reduction dtype when parameters are low precision
    checkpoint: str = "sharded"  # fsdp/tp: sharded (torch.distributed.checkpoint directory) | full (one file)
    # --- deepspeed (ZeRO; config generated by glmtrain.parallel.deepspeed_config)
    zero_stage: int = 2  # 1 | 2 | 3
    offload_optimizer: bool = False  # optimizer states + step on the CPU (DeepSpeed CPU Adam)
    offload_params: bool = False  # parameters on the CPU (zero_stage=3 only)
    overlap_comm: bool = True
    reduce_bucket_size: int = 200_000_000
    allgather_bucket_size: int = 200_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    stage3_max_live_parameters: int = 1_000_000_000


# -------------------------------------------------------------------------- trainer
@dataclass
class OptimConfig:
    lr: float = 2e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    schedule: str = "cosine"  # cosine | constant


@dataclass
class TrainerConfig:
    max_steps: int = 400
    # Wall-clock cap on training per invocation (0 = none): the run stops at a step boundary with a
    # checkpoint, reports itself as not finished (final.json "stopped": "max_time_s", exit status 75);
    # a rerun continues with a fresh budget.
    max_time_s: float = 0.0
    # Stop (with a checkpoint) after this optimizer step without changing the schedule, which
    # stays defined by max_steps: train a long run in chunks; rerun the command to continue (0 = off).
    stop_at_step: int = 0
    micro_batch_size: int = 16  # per device; with global_batch_tokens: the largest allowed
    accumulate: int = 1
    global_batch_tokens: int = 0  # >0: the global batch; micro-batch and accumulation derived from the world size
    grad_clip: float = 1.0
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU | 32-true | bf16-mixed | 16-mixed
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: int = 1
    num_nodes: int = 1
    log_every: int = 10
    val_every: int = 200  # steps between validations (0 = only at the end)
    val_batches: int = 4  # batches per periodic validation (the final one uses all)
    ckpt_every: int = 100
    keep_last: int = 2
    deterministic: bool = False
    progress: str = "tqdm"  # tqdm | rich | none
    threads: int = 0  # torch intra-op threads per process (0 = torch default)
    # peak TFLOP/s of one device for MFU (0 = from glmtrain.flops.PEAK_TFLOPS by GPU name; unknown on CPU)
    peak_tflops: float = 0.0
    # Signal -> action (glmtrain.cluster). The handler only sets a flag; at the next optimizer-step
    # boundary all ranks agree, save a checkpoint and stop. requeue: then `scontrol requeue` the SLURM
    # job (which resumes from that checkpoint) | stop: no requeue | ignore.
    signals: dict[str, str] = field(default_factory=lambda: {"USR1": "requeue", "TERM": "stop"})
    # NaN/inf loss or gradient (glmtrain.faults): skip = drop that update and count it |
    # stop = checkpoint (weights from before the fault) and exit with an error
    nonfinite: str = "skip"
    nonfinite_max_consecutive: int = 10  # skip: stop after this many skipped steps in a row (0 = never)
    # Weights-only start (a later stage of a chain): a checkpoint file or a run directory (its newest
    # checkpoint), or a released checkpoint that glmtrain.convert imports (HyenaDNA, Evo 2, HF exports).
    # Optimizer, schedule and data position start fresh. Ignored when the run resumes.
    init_from: str = ""


# -------------------------------------------------------------------------- context
@dataclass
class StageConfig:
    """One stage of a context-extension schedule (``conf/context/*.yaml``).

    ``None`` (YAML ``null``) means "as in the rest of the config": the peak learning rate is
    ``optim.lr``, the global batch ``trainer.global_batch_tokens``, the RoPE knobs the model's.
    """

    window: int = 0  # bases per training window of this stage; must divide the stored window (data.store_window or data.window)
    steps: int = 0  # stage length in optimizer steps ...
    tokens: int = 0  # ... or in tokens (a multiple of the stage's tokens per step); give exactly one
    global_batch_tokens: Optional[int] = None  # tokens per optimizer step (default: trainer.global_batch_tokens)
    micro_batch_size: Optional[int] = None  # largest per-device micro-batch (speed only; default trainer.micro_batch_size)
    # learning-rate schedule of this stage: warmup to lr, then schedule down to final_lr at its last step
    lr: Optional[float] = None  # peak (default optim.lr)
    final_lr: Optional[float] = None  # default lr * optim.min_lr_ratio
    warmup_steps: Optional[int] = None  # default optim.warmup_steps (or warmup_fraction)
    warmup_fraction: Optional[float] = None  # warmup as a fraction of the stage's steps (Evo 2: 0.05)
    schedule: Optional[str] = None  # cosine | linear | constant (default optim.schedule)
    # what the stage takes from the previous stage's final checkpoint (the first stage: trainer.init_from)
    carry: str = "weights"  # weights | weights+optimizer
    rope_base: Optional[float] = None  # attention layers' RoPE base (default: the model's)
    rope_interpolation: Optional[float] = None  # RoPE linear position interpolation factor (default: the model's)
    # memory / speed knobs of this stage (they may change between restarts)
    activation_checkpointing: Optional[bool] = None  # default: the model's
    checkpoint_layers: Optional[int] = None  # default: the model's (0 = every layer)
    context_parallel: Optional[int] = None  # GPUs sharing one sequence (strategy.cp_size of this stage; fsdp)
    name: str = ""  # "" = "<k>-<window>"


@dataclass
class ContextConfig:
    """A context-extension schedule: a list of stages.  No stages = a plain run, i.e. one stage made
    of ``data.window``, ``trainer.max_steps`` and ``optim.*``."""

    name: str = "none"
    stages: list[StageConfig] = field(default_factory=list)


@dataclass
class LoggerConfig:
    kind: str = "csv"  # csv | wandb | none
    project: str = "glmtrain"
    entity: str = ""
    mode: str = "auto"  # wandb: auto ($WANDB_MODE if set, else offline) | offline | online
    tags: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    baselines: list[int] = field(default_factory=lambda: [0, 2])  # Markov orders fit on the training windows
    unigram: bool = True  # token-frequency baseline scored on the same held-out tokens as the model
    unigram_bases: int = 1_000_000  # bases of evenly spaced training windows the unigram counts come from
    final: bool = True


@dataclass
class RunConfig:
    model: Any = None  # validated against the family's own dataclass
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    plan: bool = False  # print the per-stage memory plan and exit (nothing is trained or written)
    plan_card_gib: float = 80.0  # memory per GPU the plan checks against (GiB)
    seed: int = 1234
    name: str = "default"
    run_dir: str = "runs/default"
    task: Any = None  # validated against the task's own dataclass (glmtrain/downstream/config.py)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.split.kind": ("records", "fraction", "bed"),
    "data.softmask": ("upper", "keep", "weight"),
    "data.format": ("shards", "memory"),
    "data.on_corrupt": ("error", "skip"),
    "data.verify": ("size", "sha256"),
    "objective.name": ("clm", "mlm"),
    "strategy.name": ("auto", "ddp", "ddp_spawn", "fsdp", "tp", "deepspeed"),
    "strategy.backend": ("auto", "gloo", "nccl"),
    "strategy.param_dtype": ("auto", "fp32", "bf16", "fp16"),
    "strategy.reduce_dtype": ("fp32", "bf16"),
    "strategy.checkpoint": ("sharded", "full"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "trainer.precision": ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true"),
    "trainer.accelerator": ("auto", "cpu", "gpu", "cuda"),
    "trainer.progress": ("tqdm", "rich", "none"),
    "trainer.nonfinite": ("skip", "stop"),
    "logger.kind": ("csv", "wandb", "none"),
    "logger.mode": ("auto", "offline", "online"),
    "model.tokenizer.kind": ("char", "kmer", "kmer_overlap", "bpe", "byte"),
    "model.tokenizer.lowercase": ("upper", "keep", "error", "unk"),
    "model.tokenizer.iupac": ("N", "keep", "error", "unk"),
    "model.tokenizer.unknown": ("error", "unk"),
}


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _check_keys(node: Any, cls: type, prefix: str) -> None:
    """Reject unknown keys with the list of allowed ones (OmegaConf's own message is multi-line)."""
    if not isinstance(node, (dict, DictConfig)):
        return
    fields = _fields(cls)
    hints = typing.get_type_hints(cls)
    for key in node.keys():
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"{prefix}{key}: unknown key; allowed keys here are: {allowed}")
        sub = hints[key]
        if dataclasses.is_dataclass(sub):
            _check_keys(node[key], sub, f"{prefix}{key}.")
        elif typing.get_origin(sub) is list:
            (item,) = typing.get_args(sub)
            if dataclasses.is_dataclass(item) and isinstance(node[key], (list, ListConfig)):
                for i, v in enumerate(node[key]):
                    _check_keys(v, item, f"{prefix}{key}[{i}].")


def _merge(schema_cls: type, node: Any, prefix: str) -> Any:
    _check_keys(node, schema_cls, prefix)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema_cls), node if node is not None else {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{prefix}{key}: {msg}") from None


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: DictConfig | dict, given: set[str] | None = None) -> RunConfig:
    """Resolve and validate a composed config; raise :class:`ConfigError` with one line.

    ``given``: the keys the user set on the command line (the CLI passes them): those are also checked
    for having any effect together with the rest (:data:`_INERT`).  A preset (data, experiment) may set
    keys for several cases; only what the user typed is held against the combination."""
    if isinstance(cfg, DictConfig):
        try:
            raw = OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{getattr(e, 'full_key', '?')}: {str(e).splitlines()[0]}") from None
    else:
        raw = dict(cfg)
    raw = dict(raw)
    model_raw = raw.pop("model", None)
    task_raw = raw.pop("task", None) or {"name": "pretrain"}
    raw.pop("hydra", None)
    if not isinstance(model_raw, dict) or "family" not in model_raw:
        raise ConfigError(f"model: choose a model (model=<name>); families: {', '.join(family_names())}")
    family = model_raw["family"]
    try:
        cls = config_class(family)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    run: RunConfig = _merge(RunConfig, raw, "")
    run.model = _merge(cls, model_raw, "model.")
    for key, allowed in CHOICES.items():
        value = _get(run, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: allowed values are {', '.join(allowed)}")
    run.task = _validate_task(task_raw)
    if run.task.name == "pretrain":
        _check_combinations(run)
    else:  # the objective does not apply; the model may come from the checkpoint (glmtrain.downstream)
        from glmtrain.downstream.run import check_run

        check_run(run, given or set())
    if given:
        _check_inert(run, given)
    return run


def _validate_task(task_raw: Any) -> Any:
    from glmtrain.downstream.config import TASKS, check_task

    name = task_raw.get("name") if isinstance(task_raw, dict) else None
    if name not in TASKS:
        raise ConfigError(f"task.name={name!r}: allowed values are {', '.join(TASKS)} (choose with task=<name>)")
    task = _merge(TASKS[name], task_raw, "task.")
    check_task(task)
    return task


def _check_combinations(run: RunConfig) -> None:
    from glmtrain.models import model_class

    causal = getattr(run.model, "causal", model_class(run.model.family).causal)
    obj = run.objective
    if obj.name == "clm" and not causal:
        # only families with a causal switch can offer one; for the others name a causal family
        switch = "model.causal=true" if hasattr(run.model, "causal") else "a causal family, e.g. model=hyena"
        raise ConfigError(
            f"objective=clm needs a causal model, but model {run.model.name!r} is a bidirectional encoder; "
            f"use objective=mlm or a causal model ({switch})"
        )
    # a family's own cross-field checks: they return the problem (one line) or None, or raise ValueError
    check = getattr(run.model, "check", None)
    if callable(check):
        try:
            problem = check()
        except ValueError as e:
            problem = str(e)
        if problem:
            raise ConfigError(problem)
    if obj.name == "mlm" and causal:
        raise ConfigError(
            f"objective=mlm needs a bidirectional encoder, but model {run.model.name!r} is causal; "
            "use objective=clm or set model.causal=false where the family allows it"
        )
    if obj.name == "mlm" and run.model.tokenizer.kind == "byte":
        raise ConfigError("objective=mlm needs a [MASK] token; model.tokenizer.kind=byte has none (allowed: char, kmer, kmer_overlap, bpe)")
    try:
        from glmtrain.tokenizers import build_tokenizer

        tok = build_tokenizer(run.model.tokenizer)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    from glmtrain.tokenizers import sample_tokens

    n_tok = sample_tokens(tok, run.data.window, run.data.window_tokens)
    # a hard limit only for the Transformer family (its position table; HyenaDNA's max_seq_len normalises
    # filter positions and extends past it)
    max_len = getattr(run.model, "max_seq_len", 0) if run.model.family == "transformer" else 0
    if max_len and n_tok > max_len and not (tok.variable_length and run.data.window_tokens == 0):
        raise ConfigError(f"a sample is {n_tok} tokens (data.window={run.data.window}, data.window_tokens={run.data.window_tokens}) "
                          f"but model.max_seq_len={max_len}; lower data.window or set data.window_tokens <= {max_len}")
    if tok.variable_length and run.data.window_tokens == 0 and max_len:
        raise ConfigError(f"model.max_seq_len={max_len} with a {tok.name} tokenizer: set data.window_tokens (<= {max_len}) "
                          "so that every sample fits")
    if tok.variable_length and run.data.window_tokens == 0 and run.strategy.tp_size > 1 and run.strategy.sequence_parallel:
        raise ConfigError("strategy.sequence_parallel with a bpe tokenizer needs fixed-length samples: set data.window_tokens")
    for key in ("mask_prob", "mask_token_prob", "random_token_prob"):
        v = getattr(obj, key)
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"objective.{key}={v}: must lie in [0, 1]")
    if obj.mask_token_prob + obj.random_token_prob > 1.0 + 1e-9:
        raise ConfigError("objective.mask_token_prob + objective.random_token_prob must not exceed 1")
    t = run.trainer
    _check_ranges(run)
    if t.max_steps < (0 if run.context.stages else 1):  # a schedule's stages define its length (glmtrain.schedule)
        raise ConfigError(f"trainer.max_steps={t.max_steps}: must be >= 1")
    _check_signals(t.signals)
    _check_data(run.data)
    if t.stop_at_step and not run.context.stages and t.stop_at_step >= t.max_steps:
        raise ConfigError(f"trainer.stop_at_step={t.stop_at_step} never takes effect: the run ends at trainer.max_steps="
                          f"{t.max_steps}; use a smaller stop_at_step or 0")
    if run.plan_card_gib <= 0:
        raise ConfigError(f"plan_card_gib={run.plan_card_gib}: must be > 0")
    _check_model_builds(run)
    # The schedule (stages against data, model and strategy, and stop_at_step against its length) is checked
    # by glmtrain.schedule.resolve, which needs the world size: see glmtrain.schedule.check.


# Ranges.  Every int and float anywhere in the config must be >= 0 (none of them means anything when
# negative); these must be > 0 (a zero would divide by zero, build an empty model or never run).
POSITIVE = {
    "trainer": ("micro_batch_size", "accumulate", "devices", "num_nodes", "log_every", "ckpt_every",
                "val_batches"),
    "optim": ("lr", "eps"),
    "strategy": ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size", "stage3_max_live_parameters"),
    "model": ("d_model", "n_heads", "filter_order", "short_filter_order", "short_filter_length", "se_filter_length",
              "mr_filter_length", "se_filter_groups", "mr_filter_groups", "state_size", "mlp_multiple_of", "filter_chunk",
              "norm_eps", "initializer_range", "rope_base", "rope_interpolation", "filter_w", "decay_fast", "decay_slow",
              "decay_target", "mr_decay_fast", "mr_decay_slow", "mr_decay_target", "li_rate_min", "li_rate_max"),
    "model.tokenizer": ("k", "pad_to_multiple"),
}
MAY_BE_NEGATIVE = {"model.modulation_shift"}


def _numbers(obj: Any, prefix: str) -> list[tuple[str, Any]]:
    out = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out += _numbers(v, f"{prefix}{f.name}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append((f"{prefix}{f.name}", v))
        elif isinstance(v, list):
            for i, x in enumerate(v):
                if dataclasses.is_dataclass(x):
                    out += _numbers(x, f"{prefix}{f.name}[{i}].")
                elif isinstance(x, (int, float)) and not isinstance(x, bool):
                    out.append((f"{prefix}{f.name}[{i}]", x))
    return out


def _check_ranges(run: RunConfig) -> None:
    import math

    for key, v in _numbers(run, ""):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}={v}: must be a finite number")
        if v < 0 and key not in MAY_BE_NEGATIVE:
            raise ConfigError(f"{key}={v}: must be >= 0")
    for group, keys in POSITIVE.items():
        node = _get(run, group)
        for k in keys:
            if hasattr(node, k) and getattr(node, k) <= 0:
                raise ConfigError(f"{group}.{k}={getattr(node, k)}: must be > 0")
    if getattr(run.model, "n_layers", 1) == 0 and dataclasses.fields(type(run.model)) and \
            next(f for f in dataclasses.fields(type(run.model)) if f.name == "n_layers").default > 0:
        raise ConfigError("model.n_layers=0: must be >= 1")
    for f in dataclasses.fields(type(run.model)):
        v = getattr(run.model, f.name)
        # rates only: model.attn_dropout may be None (= dropout), model.token_dropout is ESM's on/off switch
        if "dropout" in f.name and isinstance(v, float) and not 0.0 <= v < 1.0:
            raise ConfigError(f"model.{f.name}={getattr(run.model, f.name)}: must lie in [0, 1)")
    o = run.optim
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas={list(o.betas)}: two values in [0, 1), e.g. [0.9, 0.95]")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio}: must lie in [0, 1]")
    if not 0 <= run.seed < 2**32:
        raise ConfigError(f"seed={run.seed}: must lie in [0, 2**32)")
    bad = [k for k in run.eval.baselines if k > 12]
    if bad:
        raise ConfigError(f"eval.baselines={list(run.eval.baselines)}: Markov orders above 12 ({bad[0]}) are not supported")


# Settings that take effect only together with others: giving one on the command line (a value other
# than its default) where it cannot act is refused rather than ignored.  (key, applies(run), "where")
_INERT: list[tuple[str, Any, str]] = [
    ("strategy.find_unused_parameters", lambda r: r.strategy.name in ("auto", "ddp", "ddp_spawn"), "strategy=ddp"),
    ("strategy.sequence_parallel", lambda r: r.strategy.name in ("fsdp", "tp"), "strategy=tp|fsdp_tp"),
    ("strategy.vocab_parallel", lambda r: r.strategy.name in ("fsdp", "tp"), "strategy=tp|fsdp_tp"),
    ("strategy.reshard_after_forward", lambda r: r.strategy.name in ("fsdp", "tp"), "strategy=fsdp|tp"),
    ("strategy.param_dtype", lambda r: r.strategy.name in ("fsdp", "tp"), "strategy=fsdp|tp"),
    ("strategy.reduce_dtype", lambda r: r.strategy.name in ("fsdp", "tp"), "strategy=fsdp|tp"),
    ("strategy.checkpoint", lambda r: r.strategy.name in ("fsdp", "tp"), "strategy=fsdp|tp"),
    *[(f"strategy.{k}", lambda r: r.strategy.name == "deepspeed", "strategy=deepspeed")
      for k in ("zero_stage", "offload_optimizer", "offload_params", "overlap_comm", "reduce_bucket_size",
                "allgather_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                "stage3_max_live_parameters")],
    *[(f"objective.{k}", lambda r: r.objective.name == "mlm", "objective=mlm")
      for k in ("mask_prob", "mask_token_prob", "random_token_prob")],
    ("optim.min_lr_ratio", lambda r: r.optim.schedule == "cosine", "optim.schedule=cosine"),
    ("data.softmask_weight", lambda r: r.data.softmask == "weight", "data.softmask=weight"),
    ("data.split.valid_fraction", lambda r: r.data.split.kind == "fraction", "data.split.kind=fraction"),
    ("data.split.test_fraction", lambda r: r.data.split.kind == "fraction", "data.split.kind=fraction"),
    ("data.split.valid_records", lambda r: r.data.split.kind == "records", "data.split.kind=records"),
    ("data.split.test_records", lambda r: r.data.split.kind == "records", "data.split.kind=records"),
    ("data.split.bed", lambda r: r.data.split.kind == "bed", "data.split.kind=bed"),
    ("data.split.bed_species", lambda r: r.data.split.kind == "bed", "data.split.kind=bed"),
    ("data.shards", lambda r: r.data.format == "shards", "data.format=shards"),
    *[(f"logger.{k}", lambda r: r.logger.kind == "wandb", "logger=wandb") for k in ("project", "entity", "mode", "tags")],
    ("trainer.nonfinite_max_consecutive", lambda r: r.trainer.nonfinite == "skip", "trainer.nonfinite=skip"),
]
_DEFAULTS: dict[str, Any] = {}


def _default(key: str) -> Any:
    if not _DEFAULTS:
        def walk(obj, prefix):
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                if dataclasses.is_dataclass(v):
                    walk(v, f"{prefix}{f.name}.")
                else:
                    _DEFAULTS[f"{prefix}{f.name}"] = v
        walk(RunConfig(), "")
    return _DEFAULTS[key]


def _check_inert(run: RunConfig, given: set[str]) -> None:
    for key, applies, where in _INERT:
        if key not in given:
            continue
        value = _get(run, key)
        if value != _default(key) and not applies(run):
            raise ConfigError(f"{key}={value!r} has no effect here: it applies only with {where}; "
                              "remove it or change that setting")


def _check_model_builds(run: RunConfig) -> None:
    """Build the model on the meta device (no memory, no compute): shape rules such as heads dividing the
    width are the model's own, and a violation becomes one line here instead of a traceback later."""
    import torch

    from glmtrain.models import build_model
    from glmtrain.tokenizers import build_tokenizer

    try:
        tok = build_tokenizer(OmegaConf.to_container(OmegaConf.structured(run.model.tokenizer)))
        with torch.device("meta"):
            build_model(run.model, tok.vocab_size)
    except (ValueError, TypeError, ZeroDivisionError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(msg if msg.startswith("model.") else f"model: {msg}") from None


def check_machine(run: RunConfig) -> None:
    """What this machine cannot do (run by the CLI after :func:`validate`; a config read back from a
    checkpoint elsewhere is not checked against this machine): GPUs that are not there, NCCL without
    a GPU, several nodes without a launcher that provides them."""
    import os

    import torch

    t, env = run.trainer, os.environ
    gpu = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and torch.cuda.is_available())
    launched = any(k in env for k in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "WORLD_SIZE"))
    if t.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        vis = env.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(f"trainer.accelerator={t.accelerator}: this machine has no usable CUDA GPU "
                          f"(torch.cuda.is_available() is False{'; CUDA_VISIBLE_DEVICES=' + repr(vis) if vis is not None else ''}"
                          f"; torch {torch.__version__}); use trainer.accelerator=cpu (or auto)")
    if gpu and not launched and t.devices > torch.cuda.device_count():
        raise ConfigError(f"trainer.devices={t.devices}: this machine has {torch.cuda.device_count()} visible GPU(s)")
    if run.strategy.backend == "nccl" and not gpu:
        raise ConfigError("strategy.backend=nccl needs GPUs; this run uses the CPU (use strategy.backend=gloo or auto)")
    if t.precision == "16-mixed" and not gpu:
        raise ConfigError("trainer.precision=16-mixed needs a GPU (fp16 autocast with a grad scaler); on CPU use "
                          "32-true or bf16-mixed")
    if t.num_nodes > 1 and not launched and not ("MASTER_ADDR" in env and "NODE_RANK" in env):
        raise ConfigError(f"trainer.num_nodes={t.num_nodes}: started as one local process, nothing would start the other "
                          "nodes (it would wait for them forever); launch with srun / torchrun, or set MASTER_ADDR and "
                          "NODE_RANK on every node")


def _check_data(d: DataConfig) -> None:
    if d.window < 2:
        raise ConfigError(f"data.window={d.window}: must be >= 2")
    if d.window_tokens < 0 or d.window_tokens == 1:
        raise ConfigError(f"data.window_tokens={d.window_tokens}: must be 0 (derived from data.window) or >= 2")
    if d.stride < 0 or d.min_length < 0:
        raise ConfigError("data.stride and data.min_length must be >= 0")
    stored = d.store_window or d.window
    if d.store_window < 0 or stored % d.window:
        raise ConfigError(f"data.store_window={d.store_window}: must be 0 (= data.window) or a multiple of "
                          f"data.window={d.window}")
    if d.min_length > stored:
        raise ConfigError(f"data.min_length={d.min_length}: must not exceed the stored window ({stored})")
    if not 0.0 <= d.max_n_fraction <= 1.0:
        raise ConfigError(f"data.max_n_fraction={d.max_n_fraction}: must lie in [0, 1]")
    if not 0.0 <= d.rc_prob <= 1.0:
        raise ConfigError(f"data.rc_prob={d.rc_prob}: must lie in [0, 1]")
    if not 0.0 <= d.softmask_weight <= 1.0:
        raise ConfigError(f"data.softmask_weight={d.softmask_weight}: must lie in [0, 1]")
    if not d.sources:
        raise ConfigError("data.sources: empty; list at least one FASTA source (see conf/data/sample.yaml)")
    for i, src in enumerate(d.sources):
        if src.weight < 0:
            raise ConfigError(f"data.sources[{i}].weight={src.weight}: must be >= 0")
    if not any(src.weight > 0 for src in d.sources):
        raise ConfigError("data.sources: every weight is 0; give at least one source a positive weight")
    if d.split.kind == "fraction" and not 0.0 < d.split.valid_fraction + d.split.test_fraction < 1.0:
        raise ConfigError("data.split.valid_fraction + data.split.test_fraction must lie in (0, 1)")
    if d.split.kind == "bed" and not d.split.bed:
        raise ConfigError("data.split.kind=bed needs data.split.bed=<path of a 'chrom start end split' file>")
    if d.shard_mb <= 0:
        raise ConfigError(f"data.shard_mb={d.shard_mb}: must be > 0")
    for key in ("shuffle_shards", "build_workers", "num_workers", "max_val_windows"):
        if getattr(d, key) < 0:
            raise ConfigError(f"data.{key}={getattr(d, key)}: must be >= 0")
    if d.mix_block < 16:
        raise ConfigError(f"data.mix_block={d.mix_block}: must be >= 16")


def validate_data(node: Any) -> DataConfig:
    """Validate only the ``data`` group (used by ``python -m glmtrain.data``)."""
    if isinstance(node, DictConfig):
        try:
            node = OmegaConf.to_container(node, resolve=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"data.{getattr(e, 'full_key', '?')}: {str(e).splitlines()[0]}") from None
    d: DataConfig = _merge(DataConfig, node, "data.")
    for key, allowed in CHOICES.items():
        if key.startswith("data."):
            value = _get(d, key[len("data."):])
            if value not in allowed:
                raise ConfigError(f"{key}={value!r}: allowed values are {', '.join(allowed)}")
    _check_data(d)
    return d


def _check_signals(signals: dict[str, str]) -> None:
    import signal

    for name, action in signals.items():
        s = str(name).upper()
        s = s if s.startswith("SIG") else "SIG" + s
        if s not in signal.Signals.__members__ or s in ("SIGKILL", "SIGSTOP"):
            raise ConfigError(f"trainer.signals.{name}: not a signal that can be handled (e.g. USR1, USR2, TERM, INT)")
        if action not in ("requeue", "stop", "ignore"):
            raise ConfigError(f"trainer.signals.{name}={action!r}: allowed values are requeue, stop, ignore")


def first_difference(old: Any, new: Any, prefix: str = "", where: str = "") -> str | None:
    """The first key whose value differs between two nested dict/list records, as one phrase
    (``data.window was 1024<where>, is 2048 now``), or None; keys in ``new``'s order, then ``old``'s extras."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(new) + [k for k in old if k not in new]:
            d = first_difference(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.", where)
            if d:
                return d
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            d = first_difference(a, b, f"{prefix.rstrip('.')}[{i}].", where)
            if d:
                return d
        return None
    if old != new:
        return f"{prefix.rstrip('.')} was {old!r}{where}, is {new!r} now"
    return None


def compose(overrides: list[str]) -> DictConfig:
    """The Hydra config of ``conf/`` with ``overrides``, as ``python -m glmtrain`` composes it (not validated;
    ``${hydra:...}`` interpolations such as the default run name resolve)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from glmtrain import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])


def to_yaml(run: RunConfig) -> str:
    node = OmegaConf.structured(run)
    return OmegaConf.to_yaml(node)
