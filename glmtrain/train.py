"""A run: a schedule of stages (glmtrain.schedule), trained one after the other, resumable anywhere.

Order of events (all of it after the config and the schedule were validated):
run directory -> where the run stands (newest readable, compatible checkpoint: its stage and step)
-> for every stage not yet complete: data (re-windowed to the stage), module (weights from the
previous stage's final checkpoint, or resumed), Lightning trainer, fit, held-out evaluation at the
stage's window -> Markov baselines -> ``final.json``.

A plain run (``context=none``) is the one-stage schedule: the same path.  The run directory holds

* ``checkpoints/step-N.ckpt`` -- N is the *global* optimizer step; every checkpoint records its stage,
  the stage's step offset and the compatibility record; each stage's final checkpoint has a ``.keep``
  marker (retention never deletes it) and is what the next stage starts from;
* ``run.json`` -- the manifest: the resolved schedule (window, steps, tokens per step, lr, carry,
  RoPE per stage), the status of every stage, the checksums of the weights each stage ended with
  and started from, and each stage's held-out bits/base;
* ``logs/version_N/metrics.csv`` (one version per stage and restart, steps global), ``config.yaml``,
  ``final.json``.

Re-running the command resumes from the newest checkpoint: inside a stage at its step and data
position, or -- when that checkpoint is a stage's last -- with the next stage; a complete stage is
never trained again.  One invocation holds the run directory's lock (glmtrain.locks) across all of
its stages, and ``trainer.max_time_s`` is that invocation's budget across its stages.
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

from glmtrain.atomic import atomic_write
from glmtrain.baselines import markov_baselines, unigram_logp
from glmtrain.checkpointing import (AtomicCheckpointIO, CheckpointError, StepCheckpoint, StepSeed, check_state_shapes,
                                    checkpoint_at, checkpoint_step, find_resume_checkpoint, load_optimizer_state,
                                    load_weights, step_path, weights_sha256)
from glmtrain.ckpt_formats import refuse_foreign
from glmtrain.cluster import Preemption, TimeLimit, cluster_environment
from glmtrain.config import RunConfig, to_yaml
from glmtrain.data.genome import GenomeDataModule
from glmtrain.data.stream import StreamCursor
from glmtrain.faults import NonFiniteGuard, NumericalFault
from glmtrain.locks import hold_run_dir
from glmtrain.module import GLMModule
from glmtrain.parallel import strategies as parallel
from glmtrain.schedule import Schedule, Stage, check, compat, compat_problem
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


def _with_step_offset(logger, offset: int):
    """Log at global steps (the stage's offset + its own step): one x-axis across all stages."""
    if not offset:
        return logger
    inner = logger.log_metrics

    def log_metrics(metrics, step=None):
        return inner(metrics, None if step is None else step + offset)

    logger.log_metrics = log_metrics
    return logger


def build_logger(run: RunConfig, run_dir: Path, step_offset: int = 0):
    lg = run.logger
    if lg.kind == "none":
        return False
    if lg.kind == "csv":  # a new logs/version_N per stage and (re)start: nothing overwritten
        return _with_step_offset(CSVLogger(save_dir=str(run_dir), name="logs"), step_offset)
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
    return _with_step_offset(
        WandbLogger(project=lg.project, entity=lg.entity or None, save_dir=str(run_dir), id=run_id, resume="allow",
                    offline=mode == "offline", tags=list(lg.tags), name=run.name), step_offset)


def wandb_mode(mode: str) -> str:
    """``logger.mode``: online | offline as given; auto = the environment's WANDB_MODE, else offline."""
    return mode if mode != "auto" else (os.environ.get("WANDB_MODE") or "offline")


def _set_threads(run: RunConfig, accelerator: str) -> None:
    if run.trainer.threads > 0:
        torch.set_num_threads(run.trainer.threads)
    elif accelerator == "cpu" and run.trainer.devices > 1:
        # several CPU ranks on one machine: share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // run.trainer.devices))


def stage_seed(seed: int, stage: Stage) -> int:
    """The data order and dropout seed of a stage (stage 0: the run's seed, so a plain run is unchanged)."""
    return seed if stage.index == 0 else (seed * 1_000_003 + 7919 * stage.index) % (2**31 - 1)


# ----------------------------------------------------------------------------- the run directory
class Manifest:
    """``run.json``: the schedule and the progress of every stage (rank 0 writes it, atomically)."""

    def __init__(self, run_dir: Path, schedule: Schedule):
        self.path = run_dir / "run.json"
        old = {}
        if self.path.exists():
            try:
                old = json.loads(self.path.read_text())
            except ValueError:
                old = {}
        prev = {s.get("name"): s for s in old.get("stages", []) if isinstance(s, dict)}
        self.data = {"schedule": schedule.name, "total_steps": schedule.total_steps, "stages": []}
        for row in schedule.table():
            p = prev.get(row["name"], {})
            keep = {k: p[k] for k in ("status", "init_from", "init_sha256", "final_checkpoint", "final_sha256",
                                      "val_bits_per_base", "val_bases", "val_tokens", "unigram_bits_per_base", "train_tok_s", "flops_per_token", "train_mfu",
                                      "peak_mem_gib", "wall_s") if k in p}
            self.data["stages"].append({**row, "status": "pending", **keep})

    def stage(self, stage: Stage) -> dict:
        return self.data["stages"][stage.index]

    def update(self, stage: Stage, **kw) -> None:
        self.stage(stage).update(kw)
        self.write()

    def write(self) -> None:
        if _rank() == 0:
            with atomic_write(self.path) as f:
                f.write((json.dumps(self.data, indent=2) + "\n").encode())


def where_we_are(run: RunConfig, schedule: Schedule, ckpt_dir: Path) -> tuple[Path | None, Stage, bool]:
    """(checkpoint to resume from or None, the stage to train next, whether that checkpoint is inside it).

    Refuses (CheckpointError, one line) a checkpoint of an incompatible config before anything is written.
    """
    found = find_resume_checkpoint(ckpt_dir, lambda meta: compat_problem(meta.get("compat"), run, schedule))
    if found is None:
        return None, schedule.stages[0], False
    path, meta = found
    stage = schedule.stages[meta["stage"]]
    if meta["offset"] != stage.offset:
        raise CheckpointError(f"checkpoint {path} starts its stage at step {meta['offset']}, the schedule at "
                              f"{stage.offset}; choose a new run_dir=... or restore the original schedule")
    step = checkpoint_step(meta)
    if step > stage.end:
        raise CheckpointError(f"checkpoint {path} is at step {step}, past the end of {stage.label} (step {stage.end}); "
                              "lengthen the stage again or choose a new run_dir=...")
    if step == stage.end:  # that stage is complete: the next one starts from its final weights
        if stage.index + 1 < len(schedule.stages):
            return path, schedule.stages[stage.index + 1], False
        return path, stage, True  # the whole schedule is complete (fit returns at once)
    return path, stage, True


# ----------------------------------------------------------------------------- train
def train(run: RunConfig) -> dict:
    t0 = time.perf_counter()
    schedule = check(run)
    if run.plan:  # the memory plan of every stage; nothing is trained or written
        from glmtrain.memory import plan_report

        text = plan_report(run, schedule)
        print(text, flush=True)
        return {"plan": text}
    return _run_schedule(run, schedule, t0)


@hold_run_dir  # one run per run_dir at a time, across all its stages (glmtrain.locks): a second process is refused
def _run_schedule(run: RunConfig, schedule: Schedule, t0: float) -> dict:
    run_dir = Path(run.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    resume, first, inside = where_we_are(run, schedule, ckpt_dir)  # refuses incompatible runs before any write
    run_dir.mkdir(parents=True, exist_ok=True)
    if _rank() == 0:
        (run_dir / "config.yaml").write_text(to_yaml(run))
    manifest = Manifest(run_dir, schedule)
    for s in schedule.stages:  # the checkpoints decide (a run.json row may be stale: checkpoints deleted by hand)
        if s.index < first.index:
            manifest.stage(s)["status"] = "complete"
        elif manifest.stage(s)["status"] == "complete" and not (inside and s is first):
            manifest.stage(s)["status"] = "pending"
    manifest.write()
    if len(schedule.stages) > 1:
        _say(f"schedule {schedule.name}: {len(schedule.stages)} stages, {schedule.total_steps} steps; "
             + ", ".join(f"{s.name} x{s.steps}" for s in schedule.stages)
             + (f"; resuming in {first.label}" if resume is not None else ""))
    if resume is not None and run.trainer.init_from:  # by design (a requeued chain stage): its own checkpoint wins
        _say(f"trainer.init_from={run.trainer.init_from} is not used: this run resumes from its own checkpoint")
    accelerator = resolve_accelerator(run)
    _set_threads(run, accelerator)
    prepare_vocabulary(run, say=_say)  # bpe: <run_dir>/tokenizer.json (trained on the training split if absent)
    # trainer.max_time_s: one budget for this invocation, across its stages (fresh on every rerun)
    timer = TimeLimit(run.trainer.max_time_s) if run.trainer.max_time_s > 0 else None
    result: dict = {}
    for stage in schedule.stages[first.index:]:
        if run.trainer.stop_at_step and run.trainer.stop_at_step <= stage.offset:
            _say(f"stopped before {stage.label} (trainer.stop_at_step={run.trainer.stop_at_step}); rerun to continue")
            result = {"steps": stage.offset, "stopped_at_step": stage.offset}
            break
        if timer is not None and timer.spent:  # spent at the previous stage's last step: that stage completed
            result = {"steps": stage.offset, "stopped": "max_time_s", "consumed_samples": 0}
            break
        result = _train_stage(run, schedule, stage, manifest, ckpt_dir,
                              resume=resume if (inside and stage is first) else None,
                              carry_from=resume if (not inside and stage is first) else None,
                              timer=timer, accelerator=accelerator)
        if result.get("interrupted") or result.get("stopped") or result.get("steps", 0) < stage.end:
            break  # stopped by a signal, a fault policy, stop_at_step or the time limit: rerun to continue
        resume = None
    if result.get("stopped") == "max_time_s":  # not finished: said in the report, final.json and the exit status
        result.update(max_steps=schedule.total_steps, max_time_s=run.trainer.max_time_s)
        result = _finish(run, schedule, manifest, result, t0)
    elif bool(result) and not result.get("interrupted") and result.get("steps") == schedule.total_steps:
        result = _finish(run, schedule, manifest, result, t0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


def _train_stage(run: RunConfig, schedule: Schedule, stage: Stage, manifest: Manifest, ckpt_dir: Path, *,
                 resume: Path | None, carry_from: Path | None, timer: TimeLimit | None, accelerator: str) -> dict:
    """Fit one stage: from its own checkpoint (``resume``), from the previous stage's final checkpoint
    (``carry_from``; for stage 1: ``trainer.init_from``), or from scratch."""
    t0 = time.perf_counter()
    sr, t = stage.run, stage.run.trainer
    run_dir = Path(run.run_dir)
    seed = stage_seed(run.seed, stage)
    L.seed_everything(run.seed, workers=True, verbose=False)
    cursor = StreamCursor()
    meta = {"stage": stage.index, "stage_name": stage.name, "offset": stage.offset, "schedule": schedule.name,
            "compat": compat(run, schedule, stage)}
    module = GLMModule(sr, meta=meta, cursor=cursor)
    multi = len(schedule.stages) > 1
    if resume is not None:
        check_state_shapes(resume, module)  # one line naming the first mismatching tensor
    else:
        source = carry_from
        if source is None and stage.index > 0:
            source = checkpoint_at(ckpt_dir, stage.offset)
            if source is None:
                raise CheckpointError(f"{stage.label} starts from the final checkpoint of the stage before it, "
                                      f"{step_path(ckpt_dir, stage.offset)}, which is missing; restore it or choose "
                                      "a new run_dir=...")
        if source is None and run.trainer.init_from:
            source = run.trainer.init_from
        if source is not None:
            source = load_weights(source, module, say=_say)  # the checkpoint file a run directory resolves to
            if stage.index > 0 and stage.carry == "weights+optimizer":
                module.carried_optimizer_state = load_optimizer_state(Path(source))
            manifest.update(stage, init_from=str(source), init_sha256=weights_sha256(module.state_dict()))
        if multi:
            _say(f"{stage.label}: window {stage.window}, steps {stage.offset + 1}-{stage.end}, "
                 f"{stage.global_batch_tokens} tokens/step, lr {stage.lr:g} -> {stage.final_lr:g}"
                 + (f", carrying {stage.carry} from {source}" if source is not None and stage.index else ""))
    manifest.update(stage, status="running")
    cluster_env = cluster_environment()  # srun/sbatch: SLURMEnvironment(auto_requeue=False); torchrun: TorchElastic
    topo = parallel.topology(sr)  # world from torchrun/SLURM when launched by them, else trainer.devices x num_nodes
    if resume is not None:
        refuse_foreign(resume, sr.strategy.name)  # DeepSpeed <-> others: one line
    batch = parallel.batch_plan(sr, topo.data)  # micro-batch and accumulation derived from the world size
    _say(parallel.describe(sr, topo, batch))
    data = GenomeDataModule(sr.data, module.tokenizer, batch.micro, seed, cursor)
    progress = []
    if t.progress == "tqdm":
        progress = [TQDMProgressBar(refresh_rate=max(1, t.log_every // 2))]
    elif t.progress == "rich":
        progress = [RichProgressBar()]
    ckpt_cb = StepCheckpoint(ckpt_dir, t.ckpt_every, t.keep_last, t.stop_at_step, offset=stage.offset)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=topo.devices,
        num_nodes=topo.num_nodes,
        strategy=build_strategy(sr, accelerator, topo),
        precision=resolve_precision(sr, accelerator),
        max_steps=stage.steps,
        max_time=None,  # trainer.max_time_s: the TimeLimit callback (a fresh budget per invocation, across stages)
        accumulate_grad_batches=batch.accumulate,
        gradient_clip_val=None,  # GLMModule clips (after its global loss normalisation); DeepSpeed: its config
        log_every_n_steps=t.log_every,
        val_check_interval=(t.val_every * batch.accumulate) if t.val_every else None,
        check_val_every_n_epoch=None,
        limit_val_batches=t.val_batches if t.val_every else 0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        callbacks=[ckpt_cb, *progress],
        enable_progress_bar=t.progress != "none",
        enable_model_summary=False,
        logger=build_logger(sr, run_dir, stage.offset),
        use_distributed_sampler=False,
        deterministic=t.deterministic,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()] + ([cluster_env] if cluster_env is not None else []),
    )
    # preemption and numerical-fault handling, after StepCheckpoint so that they reuse its (deduplicated) save
    preempt = Preemption(t.signals, ckpt_cb._save, step_offset=stage.offset)
    guard = NonFiniteGuard(t.nonfinite, t.nonfinite_max_consecutive, save=ckpt_cb._save,
                           check_grads=trainer.precision not in ("16-mixed", "16"), step_offset=stage.offset)
    trainer.callbacks.extend([StepSeed(seed), guard, preempt, *([timer] if timer is not None else [])])
    if resume is not None:
        _say(f"resuming from {resume}")
    if accelerator == "gpu":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None, weights_only=True)
    peak_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2) if accelerator == "gpu" else None
    step = stage.offset + trainer.global_step
    if guard.fault or preempt.triggered:  # interrupted: no evaluation, the stage stays "running"
        requeued = False if guard.fault else preempt.finish(trainer)  # rank 0 under SLURM: `scontrol requeue`
        trainer.strategy.barrier("glmtrain.interrupted")  # no rank exits (srun --kill-on-bad-exit) before that
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if guard.fault:
            raise NumericalFault(f"{guard.fault}; training stopped (trainer.nonfinite={t.nonfinite}); "
                                 f"{step_path(ckpt_dir, step)} holds the weights from before the fault")
        if not requeued:
            _say(f"stopped on {preempt.signal_name} at step {step}; rerun the same command to resume")
        return {"steps": step, "interrupted": preempt.signal_name, "requeued": requeued}
    out = {"steps": step, "consumed_samples": module.consumed_samples}
    if module.train_tokens_timed:
        out["train_tok_s"] = round(module.train_tokens_timed / module.train_seconds_timed, 1)
        out["flops_per_token"] = module.flops.train  # model FLOPs, fwd + bwd (glmtrain.flops)
        from glmtrain.flops import mfu

        u = mfu(out["train_tok_s"], module.flops.train, trainer.world_size, module._peak_flops)
        if u is not None:
            out["train_mfu"] = round(u, 4)
    if timer is not None and timer.triggered:  # the time cap, inside the stage: a checkpoint was written
        out["stopped"] = "max_time_s"
        if run.eval.final:  # the report of a stopped run still gives the held-out number of its model
            out.update(_validate(run, trainer, module, data))
        out["_data"] = data
        return out
    if step < stage.end:  # stop_at_step: a checkpoint was written, rerun to continue
        _say(f"stopped at step {step} of {stage.label} (trainer.stop_at_step); rerun the same command to continue")
        return out
    final = step_path(ckpt_dir, stage.end)
    row = {"status": "complete", "final_checkpoint": str(final), "final_sha256": weights_sha256(module.state_dict())}
    if run.eval.final:
        out.update(_validate(run, trainer, module, data))
        row.update({k: out[k] for k in VAL_KEYS if k in out})
    for k in ("train_tok_s", "flops_per_token", "train_mfu"):
        if k in out:
            row[k] = out[k]
    if peak_gib is not None:  # torch.cuda.max_memory_allocated of this stage's training
        row["peak_mem_gib"] = peak_gib
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    manifest.update(stage, **row)
    if multi:
        _say(f"{stage.label} complete at step {step}: {final}"
             + (f", held-out {out['val_bits_per_base']:.4f} bits/base at window {stage.window}" if "val_bits_per_base" in out else ""))
    out["_data"] = data
    return out


#: the held-out numbers of a stage (run.json row, final.json)
VAL_KEYS = ("val_bits_per_base", "val_bases", "val_tokens", "unigram_bits_per_base")


def _validate(run: RunConfig, trainer: L.Trainer, module: GLMModule, data: GenomeDataModule) -> dict:
    """Held-out bits/base of the module now, over the whole validation split at the stage's window, and
    -- where it differs from the base composition (MLM, multi-base tokens) -- a token-frequency baseline
    that the same validation pass scores on exactly the positions the model is scored on."""
    trainer.limit_val_batches = 1.0
    tok = module.tokenizer
    if _unigram_wanted(run, tok.name):
        module.objective.set_unigram(unigram_logp(data.token_counts(run.eval.unigram_bases), np.asarray(tok.acgt_ids)))
    try:
        trainer.validate(module, datamodule=data, verbose=False, weights_only=True)
    finally:
        module.objective.set_unigram(None)
    v = module.last_val
    out = {"val_bits_per_base": v["bits_per_base"], "val_bases": v["bases"], "val_tokens": v["tokens"]}
    if "unigram_bits_per_base" in v:
        out["unigram_bits_per_base"] = v["unigram_bits_per_base"]
    return out


def _unigram_wanted(run: RunConfig, kind: str) -> bool:
    """The token-frequency baseline where it is not one of the Markov baselines already reported: multi-base
    tokens, or MLM on single bases -- unless order 0 is asked for, which for a masked single base is the
    same model (the base composition): the report then gives it once, as Markov order 0."""
    if not run.eval.unigram:
        return False
    if kind not in ("char", "byte"):
        return True
    return run.objective.name == "mlm" and 0 not in run.eval.baselines


def _markov_orders(run: RunConfig) -> list[int]:
    """MLM: only order 0 (the composition a masked base is drawn from); higher orders predict from the left
    context alone, which an MLM's figure is not comparable with."""
    return [k for k in run.eval.baselines if run.objective.name == "clm" or k == 0]


def _finish(run: RunConfig, schedule: Schedule, manifest: Manifest, last: dict, t0: float) -> dict:
    """The report of a complete schedule -- or of one the time cap stopped (``last["stopped"]``: NOT FINISHED,
    at the step it reached): final.json (every stage's numbers and the Markov baselines)."""
    data = last.pop("_data", None)
    stages = manifest.data["stages"]
    stopped = last.get("stopped")
    result = {"steps": last["steps"] if stopped else schedule.total_steps,
              "train_wall_s": round(time.perf_counter() - t0, 1), "consumed_samples": last.get("consumed_samples")}
    if stopped:
        result.update({k: last[k] for k in ("stopped", "max_steps", "max_time_s")})
    now = last if stopped else stages[-1]  # the numbers of the model the run ends with
    for k in (*VAL_KEYS, "train_tok_s", "flops_per_token", "train_mfu"):
        if k in now:
            result[k] = now[k]
    base = {"unigram": result.pop("unigram_bits_per_base")} if "unigram_bits_per_base" in result else {}
    if len(stages) > 1:
        result["stages"] = [{k: s.get(k) for k in ("name", "window", "steps", "tokens_per_step", "val_bits_per_base",
                                                   "train_tok_s", "train_mfu", "peak_mem_gib", "final_sha256",
                                                   "init_sha256")} for s in stages]
    orders = _markov_orders(run)
    if run.eval.final and orders and _rank() == 0:
        if data is None:  # no stage trained in this invocation: open the last stage's data for the baselines
            from glmtrain.tokenizers import build_tokenizer

            sr = schedule.stages[-1].run
            tok = build_tokenizer(sr.model.tokenizer, run_dir=sr.run_dir)
            data = GenomeDataModule(sr.data, tok, 1, run.seed)
        markov = markov_baselines(data.sequences("train"), data.sequences("valid"), orders)
        base.update({f"order{k}": v for k, v in markov.items()})
    if base:
        result["baselines_bits_per_base"] = base
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    if _rank() == 0:
        (Path(run.run_dir) / "final.json").write_text(json.dumps(result, indent=2) + "\n")
        report(run, result)
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
    of = f" of {result['max_steps']}" if result.get("stopped") == "max_time_s" else ""
    lines = [f"\n{metric} ({run.run_dir}, step {result['steps']}{of}, {result.get('val_bases', 0):.0f} {what} "
             f"in {result.get('val_tokens', 0):.0f} tokens scored):"]
    for s in result.get("stages", []):
        if s.get("val_bits_per_base") is not None:
            lines.append(f"  {run.model.name + ' stage ' + s['name'] + ' (window ' + str(s['window']) + ')':<40} "
                         f"{s['val_bits_per_base']:.4f}")
    if "val_bits_per_base" in result and (of or not result.get("stages")):
        lines.append(f"  {run.model.name:<32} {result['val_bits_per_base']:.4f}")
    for name, v in result.get("baselines_bits_per_base", {}).items():
        label = f"unigram ({run.model.tokenizer.kind}) baseline" if name == "unigram" else f"Markov {name} baseline"
        lines.append(f"  {label:<32} {v:.4f}")
    lines.append(f"  wall time {result['wall_s']:.1f} s" + (f", training {result['train_tok_s']:.0f} tokens/s" if "train_tok_s" in result else "")
                 + (f", MFU {100 * result['train_mfu']:.1f} %" if "train_mfu" in result else ""))
    if of:
        lines.append(f"glmtrain: NOT FINISHED: stopped by trainer.max_time_s={result['max_time_s']:g} at step "
                     f"{result['steps']}{of}; rerun the same command to continue (a fresh time budget)")
    print("\n".join(lines), file=sys.stdout, flush=True)
