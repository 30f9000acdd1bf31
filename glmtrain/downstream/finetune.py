"""``python -m glmtrain task=finetune``: sequence classification on a GUE-format task.

Order of events: the body (architecture + weights from ``task.init_from``, or the composed model
at random) -> a new head -> the method's adapters and frozen parameters (trainable / total
printed; an adapter that targets nothing is refused) -> Lightning fits on train with AdamW
(``optim``) for ``trainer.max_steps`` steps -> every ``trainer.val_every`` steps the dev split is
scored and the best trainable weights (``task.select_metric``) are kept -> those weights are
evaluated on test (optionally averaging both strands) -> ``metrics.json``, ``best.safetensors``
(trainable tensors only) and ``load_report.json`` in the run directory.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from glmtrain.downstream.run import claim_run_dir, releases_run_dir
from glmtrain.atomic import atomic_write
from glmtrain.config import ConfigError, RunConfig, to_yaml
from glmtrain.downstream.data import Encoded, collate, encode, length_buckets, read_split, train_loader
from glmtrain.downstream.families import Anatomy, inspect_model
from glmtrain.downstream.heads import SequenceClassifier
from glmtrain.downstream.metrics import classification_metrics
from glmtrain.downstream.peft_methods import Applied, apply_method
from glmtrain.downstream.pretrained import build_from, describe_load, load_into
from glmtrain.module import lr_lambda, param_groups


def resolve_pooling(task: Any, anatomy: Anatomy, tokenizer) -> str:
    pooling = task.pooling
    if pooling == "auto":
        pooling = anatomy.default_pooling()
    if pooling == "cls":
        if anatomy.causal:
            raise ConfigError("task.pooling=cls: a causal model's first position sees nothing of the sequence; use last or mean")
        if tokenizer.cls_id is None:
            raise ConfigError(f"task.pooling=cls: the {tokenizer.name} tokenizer has no CLS token; use mean")
    return pooling


@torch.no_grad()
def predict(net: torch.nn.Module, data: Encoded, batch_size: int, rc_average: bool, device) -> np.ndarray:
    """Class probabilities [N, C] (in data order); with ``rc_average`` the mean over both strands."""
    was = net.training
    net.eval()
    probs: np.ndarray | None = None
    try:
        for idx in length_buckets(data, batch_size, None):
            b = collate(data, idx.tolist())
            p = torch.softmax(net(b["input_ids"].to(device)).logits.float(), -1)
            if rc_average:
                p = 0.5 * (p + torch.softmax(net(collate(data, idx.tolist(), rc=True)["input_ids"].to(device)).logits.float(), -1))
            if probs is None:
                probs = np.zeros((len(data), p.shape[1]), dtype=np.float64)
            probs[idx] = p.double().cpu().numpy()
    finally:
        net.train(was)
    return probs


class FinetuneModule(L.LightningModule):
    def __init__(self, applied: Applied, run: RunConfig, dev: Encoded):
        super().__init__()
        self.applied, self.net, self.run, self.dev = applied, applied.net, run, dev
        self.best: dict[str, Any] = {"score": -math.inf, "step": 0, "dev": None, "state": None}
        self.history: list[dict] = []
        self.evals_without_gain = 0
        self.samples = self.tokens = 0
        self.train_seconds = 0.0
        self._t: float | None = None

    def forward(self, input_ids):
        return self.net(input_ids)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.net(batch["input_ids"], labels=batch["labels"])
        self.samples += batch["input_ids"].shape[0]
        self.tokens += batch["input_ids"].numel()
        self.log("loss", out.loss.detach(), prog_bar=True, on_step=True, batch_size=batch["input_ids"].shape[0])
        return out.loss

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self._t is None:
            self._t = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches:
            return  # mid-accumulation: no optimizer step yet
        if self.applied.adalora is not None:  # after the optimizer step, before the next zero_grad
            self.applied.adalora.update_and_allocate(self.global_step)
        every = self.run.trainer.val_every
        if every and self.global_step % every == 0:
            self.evaluate_dev()

    def evaluate_dev(self) -> None:
        t0 = time.perf_counter()
        task = self.run.task
        m = classification_metrics(self.dev.labels, predict(self.net, self.dev, task.eval_batch_size, task.rc_average, self.device))
        m["step"] = self.global_step
        self.history.append(m)
        self.log_dict({f"dev/{k}": float(v) for k, v in m.items() if k != "n"}, on_step=True, batch_size=1)
        score = m[task.select_metric]
        if score > self.best["score"] or self.best["state"] is None:
            self.best = {"score": score, "step": self.global_step, "dev": m,
                         "state": {k: v.detach().cpu().clone() for k, v in self.trainable_state().items()}}
            self.evals_without_gain = 0
        else:
            self.evals_without_gain += 1
            if task.patience and self.evals_without_gain >= task.patience:
                self.trainer.should_stop = True
        if self._t is not None:
            self._t += time.perf_counter() - t0  # dev scoring is not training time

    def trainable_state(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.net.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.net.state_dict(keep_vars=True).items() if k in names}

    def restore_best(self) -> None:
        if self.best["state"] is not None:
            self.net.load_state_dict(self.best["state"], strict=False)

    def configure_optimizers(self):
        o, t = self.run.optim, self.run.trainer
        groups = param_groups(self.net, o.weight_decay)
        for g in groups:
            g["lr"] = o.lr * g["lr_scale"]
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, o.warmup_steps, t.max_steps, o.min_lr_ratio, o.schedule))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _say(msg: str) -> None:
    print(f"glmtrain: {msg}", flush=True)


@releases_run_dir
def run_finetune(run: RunConfig) -> dict:
    t0 = time.perf_counter()
    task, t = run.task, run.trainer
    run_dir = Path(run.run_dir)
    if (run_dir / "metrics.json").exists():
        raise ConfigError(f"run_dir={run_dir} already holds a finished fine-tuning (metrics.json); choose another run_dir")
    if (run_dir / "checkpoints").is_dir():
        raise ConfigError(f"run_dir={run_dir} is a pretraining run directory; fine-tuning writes elsewhere (run_dir=...)")
    L.seed_everything(run.seed, workers=True, verbose=False)
    body, tok, pre = build_from(run)
    report = {"loaded": [], "not_loaded": [], "unused": []}
    if pre.state_dict is not None:  # the weights first: the inspection below reads real hidden states
        report = {k: ["body." + n for n in v] for k, v in load_into(body, pre.state_dict, "", pre.source).items()}
    anatomy = inspect_model(body, tok.nucleotide_ids.tolist(), pre.model_cfg.family, seed=run.seed)
    pooling = resolve_pooling(task, anatomy, tok)
    prefix = [tok.cls_id] if pooling == "cls" else []
    splits = {}
    for split in ("train", "dev", "test"):
        seqs, labels = read_split(task.data_dir, split, task.max_train_samples if split == "train" else task.max_eval_samples)
        splits[split] = encode(seqs, labels, tok, prefix, with_rc=task.rc_average and split != "train",
                               where=f"task.data_dir {split}")
    n_classes = int(max(int(s.labels.max()) for s in splits.values()) + 1)
    classifier = SequenceClassifier(body, anatomy.hidden, n_classes, pooling, task.head_dropout)
    if pre.state_dict is not None:
        report["not_loaded"] = sorted(report["not_loaded"] + [n for n in classifier.state_dict() if not n.startswith("body.")])
        _say(describe_load(report, pre.source, pre.step))
    else:
        _say(f"body: {pre.model_cfg.name} from {pre.source}")
    applied = apply_method(classifier, task, anatomy, pre.model_cfg.name, t.max_steps, seed=run.seed)
    n_train, n_total = applied.trainable()
    _say(f"task.method={task.method}: trainable parameters {n_train:,} of {n_total:,} ({100 * n_train / n_total:.2f} %)"
         + (f"; adapters on {len(applied.targets)} modules" if applied.targets else "")
         + f"; pooling={pooling}, {n_classes} classes, train/dev/test {len(splits['train'])}/{len(splits['dev'])}/{len(splits['test'])}")

    from glmtrain.train import build_logger, resolve_accelerator, resolve_precision

    claim_run_dir(run_dir)
    if (run_dir / "metrics.json").exists():  # again, under the lock: another run may have finished meanwhile
        raise ConfigError(f"run_dir={run_dir} already holds a finished fine-tuning (metrics.json); choose another run_dir")
    (run_dir / "config.yaml").write_text(to_yaml(run))
    (run_dir / "load_report.json").write_text(json.dumps({"source": pre.source, "step": pre.step, **report}, indent=1) + "\n")
    accelerator = resolve_accelerator(run)
    module = FinetuneModule(applied, run, splits["dev"])
    progress = []
    if t.progress == "rich":
        from lightning.pytorch.callbacks import RichProgressBar

        progress = [RichProgressBar()]
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, precision=resolve_precision(run, accelerator),
        max_steps=t.max_steps, max_epochs=-1,
        max_time={"seconds": t.max_time_s} if t.max_time_s > 0 else None,
        accumulate_grad_batches=t.accumulate, gradient_clip_val=t.grad_clip or None,
        log_every_n_steps=t.log_every, limit_val_batches=0, num_sanity_val_steps=0,
        enable_checkpointing=False, enable_progress_bar=t.progress != "none", enable_model_summary=False,
        logger=build_logger(run, run_dir), callbacks=progress, deterministic=t.deterministic,
        default_root_dir=str(run_dir),
    )
    trainer.fit(module, train_dataloaders=train_loader(splits["train"], t.micro_batch_size, run.seed))
    train_s = time.perf_counter() - (module._t or time.perf_counter())
    if not module.history or module.history[-1]["step"] != module.global_step:
        module.evaluate_dev()  # the final weights are a candidate too
    module.restore_best()
    device = module.device
    probs = predict(applied.net, splits["test"], task.eval_batch_size, task.rc_average, device)
    test = classification_metrics(splits["test"].labels, probs)
    result = {
        "task": str(task.data_dir), "method": task.method, "init_from": pre.source, "model": pre.model_cfg.name,
        "pooling": pooling, "rc_average": task.rc_average, "select_metric": task.select_metric,
        "best_step": module.best["step"], "steps": module.global_step, "dev": module.best["dev"], "test": test,
        "trainable_params": n_train, "total_params": n_total,
        "train_samples_per_s": round(module.samples / max(train_s, 1e-9), 1),
        "train_tokens_per_s": round(module.tokens / max(train_s, 1e-9), 1),
        "dev_history": module.history, "wall_s": round(time.perf_counter() - t0, 1),
    }
    from safetensors.torch import save

    with atomic_write(run_dir / "best.safetensors") as f:
        f.write(save({k: v.contiguous() for k, v in (module.best["state"] or {}).items()}))
    with atomic_write(run_dir / "metrics.json") as f:
        f.write((json.dumps(result, indent=1) + "\n").encode())
    d = module.best["dev"]
    _say(f"dev {task.select_metric} {d[task.select_metric]:.4f} at step {module.best['step']}; "
         f"test MCC {test['mcc']:.4f}  accuracy {test['accuracy']:.4f}  F1 {test['f1']:.4f}  AUROC {test['auroc']:.4f}"
         f"  ({run_dir / 'metrics.json'})")
    return result
