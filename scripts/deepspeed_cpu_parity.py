#!/usr/bin/env python
"""DeepSpeed ZeRO on CPU, without Lightning: the configs glmtrain generates, run by DeepSpeed's own engine.

Lightning's DeepSpeedStrategy refuses CPU (it checks for CUDA), and making it run there means
overriding private Lightning methods.  DeepSpeed itself runs on CPU (its CPU accelerator, gloo), so
this script drives ``deepspeed.initialize`` directly with the config from
:func:`glmtrain.parallel.deepspeed_config.deepspeed_config`, a glmtrain model and glmtrain's
objective, for ZeRO stages 1, 2 and 3, and compares the per-step losses (fp32) with plain PyTorch
AdamW + global-norm clipping on the same batches.

    python scripts/deepspeed_cpu_parity.py                         # world 1
    torchrun --nproc_per_node 2 scripts/deepspeed_cpu_parity.py    # ZeRO partitions over 2 ranks

Prints one JSON line ``{"stage": s, "losses": [...], "reference": [...], "max_abs_diff": d}`` per
stage (rank 0).  Each rank feeds its slice of the same global batch; the loss is normalised by the
global weight sum, as GLMModule does under DeepSpeed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS, MICRO, SEQ = 3, 2, 32


def _model_and_data(world: int):
    import torch

    from glmtrain.models import build_model
    from glmtrain.models.transformer import TransformerConfig
    from glmtrain.objectives import build_objective
    from glmtrain.config import ObjectiveConfig
    from glmtrain.tokenizers import TokenizerConfig, build_tokenizer

    tok = build_tokenizer({"kind": "char"})
    cfg = TransformerConfig(d_model=32, n_layers=2, n_heads=4, tokenizer=TokenizerConfig(kind="char"))
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size)
    obj = build_objective(ObjectiveConfig(name="clm"), tok)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(7, 11, (MICRO * world, SEQ), generator=g)  # A C G T
        w = (torch.rand(ids.shape, generator=g) > 0.2).float()  # unequal weight sums per rank
        batches.append((ids, w))
    return model, obj, batches


def _loss_sum(model, obj, ids, w):
    prepared = obj.prepare(ids, w, None)
    loss, stats = obj.loss(model(prepared.inputs), prepared)
    return loss * stats["weight"].clamp_min(1e-8), stats["weight"]


def reference(world: int) -> list[float]:
    import torch

    from glmtrain.module import param_groups

    model, obj, batches = _model_and_data(world)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=2e-3, betas=(0.9, 0.95), eps=1e-8)
    out = []
    for ids, w in batches:
        total, wsum = _loss_sum(model, obj, ids, w)
        loss = total / wsum
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        out.append(float(loss.detach()))
    return out


def zero(stage: int, rank: int, world: int) -> list[float]:
    import deepspeed
    import torch
    import torch.distributed as dist

    from glmtrain.config import StrategyConfig
    from glmtrain.module import param_groups
    from glmtrain.parallel.deepspeed_config import deepspeed_config

    model, obj, batches = _model_and_data(world)
    groups = param_groups(model, 0.1)
    for gr in groups:
        gr["lr"] = 2e-3
    opt = torch.optim.AdamW(groups, lr=2e-3, betas=(0.9, 0.95), eps=1e-8)
    cfg = deepspeed_config(StrategyConfig(name="deepspeed", zero_stage=stage), micro_batch=MICRO, grad_clip=1.0,
                           precision="32-true")
    cfg["gradient_accumulation_steps"] = 1  # Lightning's side of the contract, set here by hand
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
    out = []
    for ids, w in batches:
        ids, w = ids[rank * MICRO:(rank + 1) * MICRO], w[rank * MICRO:(rank + 1) * MICRO]
        total, wsum = _loss_sum(engine, obj, ids, w)
        sums = torch.stack([total.detach(), wsum.detach()]).double()
        dist.all_reduce(sums)
        loss = total * (world / sums[1]).to(total.dtype)  # the engine averages over ranks
        engine.backward(loss)
        engine.step()
        out.append(float(sums[0] / sums[1]))
    engine.destroy() if hasattr(engine, "destroy") else None
    return out


def main() -> int:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29733")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import importlib

    import deepspeed

    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")  # (deepspeed.comm.torch the attribute is torch)

    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce kernel on first use (~2 min on
    # two cores); it is only a speed-up for CPU collectives, so plain gloo is used here instead.
    ds_torch_comm.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ref = reference(world)
    stages = [int(s) for s in (sys.argv[1].split(",") if len(sys.argv) > 1 else ["1", "2", "3"])]
    for stage in stages:
        losses = zero(stage, rank, world)
        if rank == 0:
            d = max(abs(a - b) for a, b in zip(losses, ref))
            print(json.dumps({"stage": stage, "world": world, "losses": losses, "reference": ref, "max_abs_diff": d}),
                  flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
