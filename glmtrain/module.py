"""The one LightningModule: any model family x any objective.

It owns what is the same for every model: the objective's masking/shifting, the
weighted loss, AdamW groups (no decay on norms, biases, embeddings; family
overrides such as Hyena filter groups), warmup + cosine schedule, throughput and
bits/base logging, and the resume state that Lightning does not keep (consumed
samples, RNG states).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from glmtrain import __version__
from glmtrain.config import RunConfig
from glmtrain.data.stream import StreamCursor
from glmtrain.models import build_model
from glmtrain.objectives import bits_per_base, build_objective
from glmtrain.tokenizers import build_tokenizer


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1 - min_ratio) * progress
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


def _deferred(run: RunConfig) -> bool:
    """Build on the meta device (materialised in configure_model) for sharded strategies and on GPUs."""
    import torch

    if run.strategy.name in ("fsdp", "tp"):
        return True
    gpu = run.trainer.accelerator in ("gpu", "cuda") or (run.trainer.accelerator == "auto" and torch.cuda.is_available())
    return gpu and run.strategy.name in ("auto", "ddp", "ddp_spawn")


class GLMModule(L.LightningModule):
    """``run`` is the config of one stage (glmtrain.schedule.Stage.run); ``meta`` is what the run's
    checkpoints record about that stage (index, global step offset, compatibility record)."""

    def __init__(self, run: RunConfig | dict, meta: dict | None = None, cursor: StreamCursor | None = None,
                 carried_optimizer_state: dict | None = None):
        super().__init__()
        if isinstance(run, dict):  # from a checkpoint's hyper_parameters
            from glmtrain.config import validate

            run = validate(run)
        self.run = run
        self.meta = dict(meta or {})
        self.save_hyperparameters({"config": OmegaConf.to_container(OmegaConf.structured(run))})
        # vocabulary (tokenizer.n_tokens) and embedding rows (tokenizer.vocab_size, padded) are distinct numbers
        self.tokenizer = build_tokenizer(run.model.tokenizer, run_dir=run.run_dir)
        self.objective = build_objective(run.objective, self.tokenizer)
        # name-seeded initialisation (glmtrain.models.init): identical for a plain build and for a meta-device
        # build materialised shard by shard.  Sharded strategies and GPUs build on the meta device and
        # materialise in configure_model (block by block while sharding, or directly on the device).
        self.model = build_model(run.model, self.tokenizer.vocab_size, seed=run.seed, meta=_deferred(run))
        from glmtrain.flops import count
        from glmtrain.parallel.strategies import seq_tokens

        # model FLOPs per training token (fwd + bwd) from the unsharded shapes, for MFU (glmtrain.flops)
        self.flops = count(self.model, seq_tokens(run), run.trainer.micro_batch_size)
        self._peak_flops: float | None = None
        self._loss_scale: float | None = None
        self.cursor = cursor if cursor is not None else StreamCursor()  # the data stream's resume position
        # carry=weights+optimizer: the previous stage's optimizer state, loaded into this stage's optimizer
        self.carried_optimizer_state = carried_optimizer_state
        self._t_last: float | None = None
        self._tokens_since = 0
        # run-average throughput (all ranks' tokens; first step excluded as warm-up)
        self.train_tokens_timed = 0
        self.train_seconds_timed = 0.0
        self._val: dict[str, torch.Tensor] = {}

    @property
    def consumed_samples(self) -> int:
        """Global training samples consumed in this stage (all data-parallel ranks)."""
        return self.cursor.consumed

    @consumed_samples.setter
    def consumed_samples(self, value: int) -> None:
        self.cursor.consumed = int(value)

    @property
    def step_offset(self) -> int:
        """Optimizer steps of the schedule's earlier stages: global step = offset + this stage's step."""
        return int(self.meta.get("offset", 0))

    # ------------------------------------------------------------------ helpers
    def _generator(self, salt: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        # per data rank: the ranks of one context-parallel group draw the same MLM masks for their shared samples
        g.manual_seed((self.run.seed * 1_000_003 + salt * 7919 + self._dp()[0] // self._cp()[1]) % (2**63 - 1))
        return g

    def _dp(self) -> tuple[int, int, Any]:
        """(rank, size, group) of this process among the data-parallel ranks (tensor-parallel ranks share data)."""
        from glmtrain.parallel.strategies import data_parallel

        return data_parallel(self._trainer)

    def _cp(self) -> tuple[int, int, Any]:
        """(rank, size, group) of this process in its context-parallel group (strategy.cp_size)."""
        from glmtrain.parallel.strategies import context_parallel

        return context_parallel(self)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        _, dp, group = self._dp()
        if dp > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t, group=group)
        return t

    def materialize(self, device: Any = "cpu", prefix: str = "") -> int:
        """Allocate and initialise the meta-device parameters of ``model.<prefix>`` (all: "") on ``device``."""
        from glmtrain.models.init import materialize

        return materialize(self.model, device, self.run.seed, prefix)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As torch's; a meta-device model is materialised (on the CPU) first, so that loading fills it."""
        from glmtrain.models.init import has_meta

        if has_meta(self.model):
            self.materialize("cpu")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def configure_model(self) -> None:
        """Materialise a meta-built model on the device; FSDP2 / tensor / context parallelism
        (strategy=fsdp|tp): materialise and shard ``self.model`` block by block by its family's plan."""
        from glmtrain.parallel.strategies import apply_parallelism, is_deepspeed

        if is_deepspeed(self._trainer):
            # Lightning leaves the module on the CPU under ZeRO-3 (it expects layers created inside
            # zero.Init); ours exist already, so put them, buffers included, on the device first.
            self.model.to(self._trainer.strategy.root_device)
        apply_parallelism(self)
        # the data module's loaders read these: data ranks (the ranks of a context-parallel group share samples)
        (dp_rank, dp, _), cp = self._dp(), self._cp()[1]
        self.cursor.rank, self.cursor.world = dp_rank // cp, dp // cp

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, **self._mask_kw(attention_mask))

    def _mask_kw(self, attention_mask: torch.Tensor | None) -> dict:
        # padding masks reach the families that take them (the Transformer encoders and decoders); for the
        # others padding sits after the real tokens of a causal model, where it cannot change them
        if attention_mask is None or not getattr(self.model, "accepts_attention_mask", False):
            return {}
        return {"attention_mask": attention_mask}

    def _prepare(self, batch: dict, generator: torch.Generator | None, salt: int):
        ids, w, index = batch["input_ids"], batch.get("loss_weight"), batch.get("index")
        if self.objective.name != "mlm" or index is None:
            return self.objective.prepare(ids, w, generator)
        # MLM masks drawn per sample from its index in the stream: the same masks whatever the world size,
        # micro-batch and accumulation (strategy parity, resharded resume)
        parts = []
        for i, g in enumerate(torch.as_tensor(index).tolist()):
            gen = torch.Generator(device=self.device)
            gen.manual_seed((self.run.seed * 1_000_003 + (salt + int(g)) * 7919) % (2**63 - 1))
            parts.append(self.objective.prepare(ids[i:i + 1], None if w is None else w[i:i + 1], gen))
        return dataclasses.replace(parts[0], **{k: torch.cat([getattr(p, k) for p in parts]) for k in ("inputs", "labels", "weights")})

    def _step(self, batch: dict, generator: torch.Generator | None, salt: int = 0):
        prepared = self._prepare(batch, generator, salt)
        cp_rank, cp, _ = self._cp()
        if cp > 1:  # context parallel: this rank's chunk of every sequence, labels aligned globally
            from glmtrain.parallel.context import chunk_prepared

            prepared = chunk_prepared(prepared, cp_rank, cp)
            # ring attention has no padding masks: configs that pad (multi-base tokenizers, ALiBi,
            # learned positions) are refused with context parallelism before anything starts
            logits = self.model(prepared.inputs)
        else:
            logits = self.model(prepared.inputs, **self._mask_kw(batch.get("attention_mask")))
        return self.objective.loss(logits, prepared)

    # ----------------------------------------------------------------- training
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # debugging / tests: GLMTRAIN_DATA_TRACE=<dir> records the keys of every batch a rank trains on
        trace = os.environ.get("GLMTRAIN_DATA_TRACE")
        if trace and isinstance(batch, dict) and "key" in batch:
            with open(Path(trace) / f"train.rank{self.global_rank}.tsv", "a") as f:
                f.writelines(f"{int(i)}\t{k}\n" for i, k in zip(batch["index"], batch["key"]))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Loss normalised over the *global* batch: sum(w * CE) / sum(w) over every sample of every
        data-parallel rank and every accumulated micro-batch of the optimizer step, so that any split of
        one global batch (world size, micro-batch, accumulation) gives the same gradient.

        Each micro-step returns its unnormalised sum(w * CE) times a fixed constant; the exact factor
        (the global weight sum is only known after the last micro-batch) is applied to the gradients in
        :meth:`on_before_optimizer_step` -- under DeepSpeed, whose partitioned gradients live inside the
        engine, as the ZeRO optimizer's external loss scale, which it divides out before clipping and the
        update.  (DeepSpeed under fp16 keeps its dynamic loss scaler: there each micro-batch is normalised
        by its own weight sum over the ranks instead, exact without accumulation.)
        """
        _, dp, _ = self._dp()
        data = dp // self._cp()[1]  # ranks reading different samples
        micro, seq = batch["input_ids"].shape[0], batch["input_ids"].shape[1]
        salt = self.consumed_samples  # masking depends on the stream position: identical after resume
        self.consumed_samples += micro * data
        loss, stats = self._step(batch, self._generator(salt) if self.objective.name == "mlm" else None)
        wsum = stats["weight"]
        total = loss * wsum.clamp_min(1e-8)  # sum(w * CE) of this micro-batch
        sums = torch.stack([total.detach(), wsum.detach(), stats["nats"].detach(), stats["bases"].detach()]).double()
        self._loss_sums = sums if getattr(self, "_loss_sums", None) is None else self._loss_sums + sums
        self._tokens_since += batch["input_ids"].numel() * data
        ds = self._deepspeed_optimizer()
        if ds is False:  # DeepSpeed with its own (fp16) loss scaler: per-micro-batch normalisation
            accumulate = self.trainer.accumulate_grad_batches
            w = self._all_reduce(wsum.detach().double().clone())
            # DeepSpeed averages over ranks and divides by its accumulation steps, and Lightning divides once more
            return total * (dp * accumulate / w.clamp_min(1e-8)).to(total.dtype)
        if ds is not None:
            ds.override_loss_scale(1.0)  # backward of this micro-batch unscaled; the step's divisor comes later
        if self._loss_scale is None:  # one constant for the whole run: on_before_optimizer_step divides it out
            self._loss_scale = 1.0 / (micro * seq)  # keeps the returned value O(1) (fp16 loss scaling, logs)
        return total * self._loss_scale

    def _deepspeed_optimizer(self):
        """None (not DeepSpeed), the ZeRO optimizer when it takes an external loss scale, or False (fp16)."""
        from glmtrain.parallel.strategies import is_deepspeed

        if not is_deepspeed(self._trainer):
            return None
        opt = self.trainer.strategy.deepspeed_engine.optimizer
        fp16 = self.trainer.strategy.config.get("fp16", {}).get("enabled", False)
        return opt if hasattr(opt, "override_loss_scale") and not fp16 else False

    def on_before_optimizer_step(self, optimizer) -> None:
        """Exact global normalisation of the accumulated gradients, clipping, and the global loss for the logs."""
        from glmtrain.parallel.strategies import clip_grad_norm

        sums = getattr(self, "_loss_sums", None)
        ds = self._deepspeed_optimizer()
        if sums is None or (ds is not None and not self.trainer.strategy.deepspeed_engine.is_gradient_accumulation_boundary()):
            return  # (DeepSpeed accumulates inside the engine: Lightning calls this hook after every micro-batch)
        self._loss_sums = None
        _, dp, _ = self._dp()
        total, wsum, nats, bases = self._all_reduce(sums.clone()).tolist()
        accumulate = self.trainer.accumulate_grad_batches
        if ds is None:
            # gradients now hold mean over dp ranks of (1/accumulate) sum_a scale * d sum(w*CE)
            factor = accumulate * dp / (self._loss_scale * max(wsum, 1e-8))
            params = [p for p in self.parameters() if p.grad is not None]
            for p in params:
                p.grad.mul_(factor)
            if self.run.trainer.grad_clip:
                clip_grad_norm(params, self.run.trainer.grad_clip)
        elif ds is not False:
            # the engine holds mean over dp of (1/accumulate^2) sum_a scale * d sum(w*CE) (Lightning and DeepSpeed
            # each divide by the accumulation steps); the ZeRO optimizer divides its gradients by this external
            # loss scale before clipping (on the unscaled norm) and the update
            ds.override_loss_scale(self._loss_scale * max(wsum, 1e-8) / (dp * accumulate * accumulate))
        self.log("loss", total / max(wsum, 1e-8), prog_bar=True, on_step=True, batch_size=1)
        self.log("train/bits_per_base", bits_per_base(nats, bases), on_step=True, batch_size=1)

    def on_fit_start(self) -> None:
        from glmtrain.flops import peak_flops

        self._peak_flops = peak_flops(self.device, self.run.trainer.peak_tflops)
        if self.trainer.is_global_zero:
            peak = f"{self._peak_flops / 1e12:.0f} TFLOP/s per device" if self._peak_flops else "unknown peak: set trainer.peak_tflops for MFU"
            print(f"glmtrain: model FLOPs {self.flops.describe()}; {peak}", flush=True)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches:
            return
        now = time.perf_counter()
        if self._t_last is not None and now > self._t_last:
            from glmtrain.flops import mfu

            tok_s = self._tokens_since / (now - self._t_last)  # all data-parallel ranks' tokens
            self.log("tok_s", tok_s, prog_bar=True, on_step=True, batch_size=1, reduce_fx="max")
            devices = self.trainer.world_size if self._trainer is not None else 1
            self.log("tflops", tok_s * self.flops.train / devices / 1e12, on_step=True, batch_size=1, reduce_fx="max")
            u = mfu(tok_s, self.flops.train, devices, self._peak_flops)
            if u is not None:
                self.log("mfu", u, prog_bar=True, on_step=True, batch_size=1, reduce_fx="max")
            self.train_tokens_timed += self._tokens_since
            self.train_seconds_timed += now - self._t_last
        self._t_last, self._tokens_since = now, 0
        sched = self.lr_schedulers()
        if sched is not None:
            self.log("lr", sched.get_last_lr()[0], on_step=True, batch_size=1)
        self.log("global_step", float(self.step_offset + self.global_step), on_step=True, batch_size=1)

    # --------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val = {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in ("nats", "bases", "tokens", "unigram_nats")}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        gen = self._generator(10**9 + batch_idx) if self.objective.name == "mlm" else None
        _, stats = self._step(batch, gen, salt=10**9)  # held-out windows: their own mask stream
        for k in self._val:
            if k in stats:
                self._val[k] += stats[k].double()

    def on_validation_epoch_end(self) -> None:
        totals = torch.stack([self._val["nats"], self._val["bases"], self._val["tokens"], self._val["unigram_nats"]])
        totals = self._all_reduce(totals)  # over data-parallel ranks (tensor-parallel ranks saw the same windows)
        nats, bases, tokens, uni = totals.tolist()
        bpb = bits_per_base(nats, bases)
        self.last_val = {"bits_per_base": bpb, "nats": nats, "bases": bases, "tokens": tokens}
        if self.objective.unigram_logp is not None:
            self.last_val["unigram_bits_per_base"] = bits_per_base(uni, bases)
        self.log("val/bits_per_base", bpb, prog_bar=True, sync_dist=False, batch_size=1, rank_zero_only=True)
        self.log("val/loss", nats / max(tokens, 1e-9), sync_dist=False, batch_size=1, rank_zero_only=True)

    # ---------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        o, t = self.run.optim, self.run.trainer
        groups = param_groups(self.model, o.weight_decay)
        for g in groups:
            g["lr"] = o.lr * g["lr_scale"]
        s = self.run.strategy
        if s.name == "deepspeed" and s.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # DeepSpeed requires its CPU Adam for offload

            opt = DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, adamw_mode=True)
        else:
            from torch.distributed.tensor import DTensor

            sharded = any(isinstance(p, DTensor) for g in groups for p in g["params"])
            # fused kernels for plain CUDA tensors; per-tensor loop for DTensors (parameters may live on
            # different meshes under 2-D parallelism)
            kw = {"foreach": False} if sharded else {"fused": (self.device.type == "cuda") or None}
            opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **kw)
        carried = self.carried_optimizer_state
        if carried is not None:  # carry=weights+optimizer: the previous stage's moments, this stage's hyper-parameters
            from glmtrain.parallel.strategies import optim_state_by_index

            self._load_carried_state(opt, optim_state_by_index(carried, opt, self))
            self.carried_optimizer_state = None
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, o.warmup_steps, t.max_steps, o.min_lr_ratio, o.schedule)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @staticmethod
    def _load_carried_state(opt: torch.optim.Optimizer, saved: dict) -> None:
        """Adam moments and step counts of the previous stage; lr, betas, decay and the schedule stay this stage's."""
        groups = saved.get("param_groups", [])
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in opt.param_groups]:
            raise RuntimeError("carry=weights+optimizer: the previous stage's optimizer has other parameter groups")
        current = opt.state_dict()["param_groups"]
        opt.load_state_dict({"state": saved.get("state", {}),
                             "param_groups": [{**cur, "params": g["params"]} for cur, g in zip(current, groups)]})

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["glmtrain"] = {
            "version": __version__,
            "consumed_samples": self.consumed_samples,
            **self.meta,  # stage index and name, global step offset, compatibility record
            "world_size": self._dp()[1] // self._cp()[1],  # data ranks (the data stream's divisor)
            "world_size_total": self.trainer.world_size if self._trainer is not None else 1,
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
