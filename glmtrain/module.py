"""The one LightningModule: any model family x any objective.

It owns what is the same for every model: the objective's masking/shifting, the
weighted loss, AdamW groups (no decay on norms, biases, embeddings; family
overrides such as Hyena filter groups), warmup + cosine schedule, throughput and
bits/base logging, and the resume state that Lightning does not keep (consumed
samples, RNG states).
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from glmtrain import __version__
from glmtrain.config import RunConfig, compat_fingerprint
from glmtrain.models import build_model
from glmtrain.objectives import bits_per_base, build_objective
from glmtrain.tokenizers import build_tokenizer

LN2 = math.log(2)


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices only; norms, biases, embeddings and family-flagged params get none."""
    overrides = model.param_groups_overrides() if hasattr(model, "param_groups_overrides") else {}
    extra_no_decay = model.no_decay_param_names() if hasattr(model, "no_decay_param_names") else set()
    groups: dict[tuple, dict[str, Any]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        wd, lr_scale, tag = weight_decay, 1.0, "decay"
        if p.ndim < 2 or name.endswith("bias") or "norm" in name or "embed" in name or name in extra_no_decay:
            wd, tag = 0.0, "no_decay"
        for sub, ov in overrides.items():
            if sub in name:
                wd = ov.get("weight_decay", wd)
                lr_scale = ov.get("lr_scale", lr_scale)
                tag = f"override:{sub}"
                break
        key = (tag, wd, lr_scale)
        groups.setdefault(key, {"params": [], "weight_decay": wd, "lr_scale": lr_scale, "name": tag})["params"].append(p)
    return list(groups.values())


class GLMModule(L.LightningModule):
    def __init__(self, run: RunConfig | dict):
        super().__init__()
        if isinstance(run, dict):  # from a checkpoint's hyper_parameters
            from glmtrain.config import validate

            run = validate(run)
        self.run = run
        self.save_hyperparameters({"config": OmegaConf.to_container(OmegaConf.structured(run))})
        self.tokenizer = build_tokenizer(OmegaConf.to_container(OmegaConf.structured(run.model.tokenizer)))
        self.objective = build_objective(run.objective, self.tokenizer)
        self.model = build_model(run.model, self.tokenizer.vocab_size)
        self.consumed_samples = 0  # global samples consumed; the data stream's resume position
        self._t_last: float | None = None
        self._tokens_since = 0
        # run-average throughput (all ranks' tokens; first step excluded as warm-up)
        self.train_tokens_timed = 0
        self.train_seconds_timed = 0.0
        self._val: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ helpers
    def _generator(self, salt: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed((self.run.seed * 1_000_003 + salt * 7919 + self.global_rank) % (2**63 - 1))
        return g

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def _step(self, batch: dict, generator: torch.Generator | None):
        prepared = self.objective.prepare(batch["input_ids"], batch.get("loss_weight"), generator)
        logits = self.model(prepared.inputs)
        return self.objective.loss(logits, prepared)

    # ----------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        world = self.trainer.world_size if self._trainer is not None else 1
        micro = batch["input_ids"].shape[0]
        salt = self.consumed_samples  # masking depends on the stream position: identical after resume
        self.consumed_samples += micro * world
        loss, stats = self._step(batch, self._generator(salt) if self.objective.name == "mlm" else None)
        self._tokens_since += batch["input_ids"].numel() * world
        self.log("loss", loss, prog_bar=True, on_step=True, batch_size=micro)
        self.log("train/bits_per_base", bits_per_base(stats["nats"], stats["bases"]), on_step=True, batch_size=micro)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches:
            return
        now = time.perf_counter()
        if self._t_last is not None and now > self._t_last:
            tok_s = self._tokens_since / (now - self._t_last)
            self.log("tok_s", tok_s, prog_bar=True, on_step=True, batch_size=1, reduce_fx="max")
            self.train_tokens_timed += self._tokens_since
            self.train_seconds_timed += now - self._t_last
        self._t_last, self._tokens_since = now, 0
        sched = self.lr_schedulers()
        if sched is not None:
            self.log("lr", sched.get_last_lr()[0], on_step=True, batch_size=1)
        self.log("global_step", float(self.global_step), on_step=True, batch_size=1)

    # --------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val = {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in ("nats", "bases", "tokens")}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        gen = self._generator(10**9 + batch_idx) if self.objective.name == "mlm" else None
        _, stats = self._step(batch, gen)
        for k in self._val:
            self._val[k] += stats[k].double()

    def on_validation_epoch_end(self) -> None:
        totals = torch.stack([self._val["nats"], self._val["bases"], self._val["tokens"]])
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        nats, bases, tokens = totals.tolist()
        bpb = nats / LN2 / max(bases, 1e-9)
        self.last_val = {"bits_per_base": bpb, "nats": nats, "bases": bases, "tokens": tokens}
        self.log("val/bits_per_base", bpb, prog_bar=True, sync_dist=False, batch_size=1, rank_zero_only=True)
        self.log("val/loss", nats / max(tokens, 1e-9), sync_dist=False, batch_size=1, rank_zero_only=True)

    # ---------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        o, t = self.run.optim, self.run.trainer
        groups = param_groups(self.model, o.weight_decay)
        for g in groups:
            g["lr"] = o.lr * g["lr_scale"]
        fused = self.device.type == "cuda"
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused or None)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, o.warmup_steps, t.max_steps, o.min_lr_ratio, o.schedule)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["glmtrain"] = {
            "version": __version__,
            "consumed_samples": self.consumed_samples,
            "fingerprint": compat_fingerprint(self.run),
            "world_size": self.trainer.world_size if self._trainer is not None else 1,
            "micro_batch_size": self.run.trainer.micro_batch_size,
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("glmtrain", {})
        self.consumed_samples = int(meta.get("consumed_samples", 0))
        rng = meta.get("rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
