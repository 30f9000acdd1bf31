"""One training run: validated config in, trained model + held-out report out.

Order of events (all of it after :func:`glmtrain.config.validate` succeeded):
run directory -> resume decision (checkpoint compatibility) -> data -> module ->
Lightning trainer -> fit (resuming if a checkpoint exists) -> final held-out
evaluation beside Markov baselines -> ``final.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from glmtrain.baselines import markov_baselines, unigram_logp
from glmtrain.checkpointing import AtomicCheckpointIO, StepCheckpoint, find_resume_checkpoint
from glmtrain.config import RunConfig, compat_fingerprint, to_yaml
from glmtrain.checkpointing import StepSeed, check_state_shapes, load_weights, step_path
from glmtrain.ckpt_formats import refuse_foreign
from glmtrain.cluster import Preemption, TimeLimit, cluster_environment
from glmtrain.data.genome import GenomeDataModule
from glmtrain.faults import NonFiniteGuard, NumericalFault
from glmtrain.locks import hold_run_dir
from glmtrain.module import GLMModule
from glmtrain.parallel import strategies as parallel
from glmtrain.tokenizers import prepare_vocabulary


def _rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def _say(msg: str) -> None:
    if _rank() == 0:
        print(f"glmtrain: {msg}", flush=True)


def resolve_accelerator(run: RunConfig) -> str:
    acc = run.trainer.accelerator
    if acc == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if acc == "cuda" else acc


def resolve_precision(run: RunConfig, accelerator: str) -> str:
    p = run.trainer.precision
    if p == "auto":
        return "bf16-mixed" if accelerator == "gpu" else "32-true"
    return p


def build_strategy(run: RunConfig, accelerator: str, topo=None):
    """The Lightning strategy for ``run.strategy`` (glmtrain.parallel.strategies)."""
    from glmtrain.parallel.strategies import build_strategy as _build

    return _build(run, accelerator, topo, precision=resolve_precision(run, accelerator))


def build_logger(run: RunConfig, run_dir: Path):
    lg = run.logger
    if lg.kind == "none":
        return False
    if lg.kind == "csv":
        return CSVLogger(save_dir=str(run_dir), name="logs")  # a new logs/version_N per (re)start: nothing overwritten
    # wandb: a stable id kept in the run directory so a resumed run continues the same wandb run
    mode = wandb_mode(lg.mode)
    os.environ["WANDB_MODE"] = mode  # wandb itself reads it (also in DDP children)
    id_file = run_dir / "wandb_id.txt"
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        import uuid

        run_id = uuid.uuid4().hex[:12]
        if _rank() == 0:
            id_file.write_text(run_id)
    return WandbLogger(project=lg.project, entity=lg.entity or None, save_dir=str(run_dir), id=run_id, resume="allow",
                       offline=mode == "offline", tags=list(lg.tags), name=run.name)


def wandb_mode(mode: str) -> str:
    """``logger.mode``: online | offline as given; auto = the environment's WANDB_MODE, else offline."""
    return mode if mode != "auto" else (os.environ.get("WANDB_MODE") or "offline")


def _set_threads(run: RunConfig, accelerator: str) -> None:
    if run.trainer.threads > 0:
        torch.set_num_threads(run.trainer.threads)
    elif accelerator == "cpu" and run.trainer.devices > 1:
        # several CPU ranks on one machine: share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // run.trainer.devices))


@hold_run_dir  # one run per run_dir at a time (glmtrain.locks): a second process is refused with one line
def train(run: RunConfig) -> dict:
    t0 = time.perf_counter()
    run_dir = Path(run.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    resume = find_resume_checkpoint(ckpt_dir, compat_fingerprint(run))  # refuses incompatible runs before any write
    run_dir.mkdir(parents=True, exist_ok=True)
    if _rank() == 0:
        (run_dir / "config.yaml").write_text(to_yaml(run))
    L.seed_everything(run.seed, workers=True, verbose=False)
    accelerator = resolve_accelerator(run)
    _set_threads(run, accelerator)

    prepare_vocabulary(run, say=_say)  # bpe: <run_dir>/tokenizer.json (trained on the training split if absent)
    module = GLMModule(run)
    if resume is not None:
        check_state_shapes(resume, module)  # one line naming the first mismatching tensor
        if run.trainer.init_from:  # by design (a requeued chain stage): its own checkpoint wins
            _say(f"trainer.init_from={run.trainer.init_from} is not used: this run resumes from its own checkpoint")
    elif run.trainer.init_from:
        load_weights(run.trainer.init_from, module, say=_say)
    cluster_env = cluster_environment()  # srun/sbatch: SLURMEnvironment(auto_requeue=False); torchrun: TorchElastic
    topo = parallel.topology(run)  # world from torchrun/SLURM when launched by them, else trainer.devices x num_nodes
    if resume is not None:
        refuse_foreign(resume, run.strategy.name)  # DeepSpeed <-> others: one line
    batch = parallel.batch_plan(run, topo.data)  # micro-batch and accumulation derived from the world size
    _say(parallel.describe(run, topo, batch))
    data = GenomeDataModule(run.data, module.tokenizer, batch.micro, run.seed)
    t = run.trainer
    progress = []
    if t.progress == "tqdm":
        progress = [TQDMProgressBar(refresh_rate=max(1, t.log_every // 2))]
    elif t.progress == "rich":
        progress = [RichProgressBar()]
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=topo.devices,
        num_nodes=topo.num_nodes,
        strategy=build_strategy(run, accelerator, topo),
        precision=resolve_precision(run, accelerator),
        max_steps=t.max_steps,
        max_time=None,  # trainer.max_time_s: TimeLimit below (a fresh budget per invocation)
        accumulate_grad_batches=batch.accumulate,
        gradient_clip_val=None,  # GLMModule clips (after its global loss normalisation); DeepSpeed: its config
        log_every_n_steps=t.log_every,
        val_check_interval=(t.val_every * batch.accumulate) if t.val_every else None,
        check_val_every_n_epoch=None,
        limit_val_batches=t.val_batches if t.val_every else 0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        callbacks=[StepCheckpoint(ckpt_dir, t.ckpt_every, t.keep_last, t.stop_at_step), *progress],
        enable_progress_bar=t.progress != "none",
        enable_model_summary=False,
        logger=build_logger(run, run_dir),
        use_distributed_sampler=False,
        deterministic=t.deterministic,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()] + ([cluster_env] if cluster_env is not None else []),
    )
    # preemption and numerical-fault handling, after StepCheckpoint so that they reuse its (deduplicated) save
    ckpt_cb = next(c for c in trainer.callbacks if isinstance(c, StepCheckpoint))
    preempt = Preemption(t.signals, ckpt_cb._save)
    guard = NonFiniteGuard(t.nonfinite, t.nonfinite_max_consecutive, save=ckpt_cb._save,
                           check_grads=trainer.precision not in ("16-mixed", "16"))
    timer = TimeLimit(t.max_time_s) if t.max_time_s > 0 else None
    trainer.callbacks.extend([StepSeed(run.seed), guard, preempt, *([timer] if timer else [])])
    if resume is not None:
        _say(f"resuming from {resume}")
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None, weights_only=True)
    if guard.fault or preempt.triggered:  # interrupted: no final evaluation, no final.json
        requeued = False if guard.fault else preempt.finish(trainer)  # rank 0 under SLURM: `scontrol requeue`
        trainer.strategy.barrier("glmtrain.interrupted")  # no rank exits (srun --kill-on-bad-exit) before that
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if guard.fault:
            raise NumericalFault(f"{guard.fault}; training stopped (trainer.nonfinite={t.nonfinite}); "
                                 f"{step_path(ckpt_dir, trainer.global_step)} holds the weights from before the fault")
        if not requeued:
            _say(f"stopped on {preempt.signal_name} at step {trainer.global_step}; rerun the same command to resume")
        return {"steps": trainer.global_step, "interrupted": preempt.signal_name, "requeued": requeued}
    train_s = time.perf_counter() - t0
    result = {"steps": trainer.global_step, "train_wall_s": round(train_s, 1), "consumed_samples": module.consumed_samples}
    if timer is not None and timer.triggered:  # not finished: said in the report, final.json and the exit status
        result.update(stopped="max_time_s", max_steps=t.max_steps, max_time_s=t.max_time_s)
    if run.eval.final:
        trainer.limit_val_batches = 1.0
        tok = module.tokenizer
        # a token-frequency baseline where it differs from the base composition (MLM, multi-base tokens),
        # scored by the validation pass itself on the positions the model is scored on
        if run.eval.unigram and (run.objective.name == "mlm" or tok.name not in ("char", "byte")):
            module.objective.set_unigram(unigram_logp(data.token_counts(run.eval.unigram_bases), np.asarray(tok.acgt_ids)))
        trainer.validate(module, datamodule=data, verbose=False, weights_only=True)
        module.objective.set_unigram(None)
        result["val_bits_per_base"] = module.last_val["bits_per_base"]
        result["val_bases"] = module.last_val["bases"]
        result["val_tokens"] = module.last_val["tokens"]
        base = {}
        if "unigram_bits_per_base" in module.last_val:
            base["unigram"] = module.last_val["unigram_bits_per_base"]
        if trainer.is_global_zero and run.eval.baselines:
            markov = markov_baselines(data.sequences("train"), data.sequences("valid"), run.eval.baselines)
            base.update({f"order{k}": v for k, v in markov.items()})
        if base:
            result["baselines_bits_per_base"] = base
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    if module.train_tokens_timed:
        result["train_tok_s"] = round(module.train_tokens_timed / module.train_seconds_timed, 1)
        result["flops_per_token"] = module.flops.train  # model FLOPs, fwd + bwd (glmtrain.flops)
        from glmtrain.flops import mfu

        u = mfu(result["train_tok_s"], module.flops.train, trainer.world_size, module._peak_flops)
        if u is not None:
            result["train_mfu"] = round(u, 4)
    if trainer.is_global_zero:
        (run_dir / "final.json").write_text(json.dumps(result, indent=2) + "\n")
        report(run, result)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


def report(run: RunConfig, result: dict) -> None:
    """The held-out figure beside its baselines.

    bits/base = total nats of the scored tokens / bases those tokens cover / ln 2, whatever the tokenizer
    (next-token: every token; MLM: the masked tokens, so "masked bits/base").  The unigram baseline is a
    token-frequency model scored on exactly the same tokens; the Markov baselines score every base of the
    same held-out windows from the preceding bases.
    """
    metric = "held-out bits/base" if run.objective.name == "clm" else "held-out masked bits/base"
    what = "bases" if run.objective.name == "clm" else "masked bases"
    lines = [f"\n{metric} ({run.run_dir}, step {result['steps']}, {result.get('val_bases', 0):.0f} {what} "
             f"in {result.get('val_tokens', 0):.0f} tokens scored):"]
    if result.get("stopped") == "max_time_s":
        lines[0] = lines[0].replace(f"step {result['steps']},", f"step {result['steps']} of {result['max_steps']},")
    if "val_bits_per_base" in result:
        lines.append(f"  {run.model.name:<32} {result['val_bits_per_base']:.4f}")
    for name, v in result.get("baselines_bits_per_base", {}).items():
        label = f"unigram ({run.model.tokenizer.kind}) baseline" if name == "unigram" else f"Markov {name} baseline"
        lines.append(f"  {label:<32} {v:.4f}")
    lines.append(f"  wall time {result['wall_s']:.1f} s" + (f", training {result['train_tok_s']:.0f} tokens/s" if "train_tok_s" in result else "")
                 + (f", MFU {100 * result['train_mfu']:.1f} %" if "train_mfu" in result else ""))
    if result.get("stopped") == "max_time_s":
        lines.append(f"glmtrain: NOT FINISHED: stopped by trainer.max_time_s={result['max_time_s']:g} at step "
                     f"{result['steps']} of {result['max_steps']}; rerun the same command to continue (a fresh time budget)")
    print("\n".join(lines), file=sys.stdout, flush=True)
