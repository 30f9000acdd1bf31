"""The gradient glmtrain applies vs autograd of the documented loss (tests/test_scale.py; under
torchrun through tests/_dist_checks.py).

For every named strategy the real GLMModule is trained for one optimizer step by a Lightning
Trainer on a fixed global batch (each rank its own micro-batches, unevenly weighted: rank 1 has
many padded / zero-weight / soft-masked positions).  The gradient is read where the optimizer would
use it: right after GLMModule.on_before_optimizer_step normalised it (clipping off; Lightning runs the
last micro-batch's backward and this hook inside ``optimizer.step``, just before the update).  The
reference is ``torch.autograd.grad`` of the documented loss

    sum_i w_i * CE_i / sum_i w_i   over every position of every sample of the global batch

computed here directly (F.cross_entropy, not glmtrain's objective) on an untouched copy of the
initial model.  DeepSpeed keeps its gradients inside the engine, so for it the applied update is
checked instead: the weights after one SGD step (lr 1, no momentum) must equal initial - ref grad.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ACCUMULATE, MICRO, SEQ = 2, 2, 24
MODEL = ["model=transformer", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.dropout=0.0"]
STRATEGY = {
    "single": [],
    "ddp": ["strategy=ddp", "trainer.devices=2"],
    "fsdp": ["strategy=fsdp", "trainer.devices=2"],
    "deepspeed": ["strategy=deepspeed", "trainer.devices=2", "strategy.zero_stage=2"],
}


def global_batch(world: int, tok) -> list[list[dict]]:
    """batches[rank][micro_step] = {"input_ids", "loss_weight"}: fixed by a seed, uneven across ranks."""
    g = torch.Generator().manual_seed(7)
    nuc = torch.as_tensor(tok.nucleotide_ids)
    out = []
    for r in range(world):
        steps = []
        for _ in range(ACCUMULATE):
            ids = nuc[torch.randint(len(nuc), (MICRO, SEQ), generator=g)]
            w = torch.ones(MICRO, SEQ)
            if r % 2 == 1 or world == 1:
                n_pad = int(torch.randint(4, SEQ // 2, (1,), generator=g))
                ids[0, SEQ - n_pad:] = tok.pad_id  # a padded tail: no loss there
                w[0, SEQ - n_pad:] = 0.0
                w[1] = torch.where(torch.rand(SEQ, generator=g) < 0.5, 0.1, 1.0)  # soft-masked bases
                w[1, : SEQ // 3] = 0.0  # N bases
            steps.append({"input_ids": ids, "loss_weight": w})
        out.append(steps)
    return out


def documented_loss(model: torch.nn.Module, batches: list[list[dict]], special: set[int]) -> torch.Tensor:
    """sum(w * CE) / sum(w) over the whole global batch; next-token: logits[t] predicts ids[t+1]."""
    num = den = 0.0
    for steps in batches:
        for b in steps:
            ids, w = b["input_ids"], b["loss_weight"][:, 1:].clone()
            labels = ids[:, 1:]
            for s in special:
                w[labels == s] = 0.0
            logits = model(ids)[:, :-1]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), labels.reshape(-1), reduction="none")
            num = num + (ce.view_as(w) * w.double()).sum()
            den = den + w.double().sum()
    return num / den


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def probe(name: str) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader

    from glmtrain.module import GLMModule
    from glmtrain.parallel.strategies import build_strategy, topology
    from tests._util import compose_run

    extra = ["optim.lr=1.0"] if name == "deepspeed" else []
    run = compose_run([*MODEL, *STRATEGY[name], "trainer.accelerator=cpu", f"trainer.accumulate={ACCUMULATE}",
                       f"trainer.micro_batch_size={MICRO}", f"data.window={SEQ}", "trainer.grad_clip=0",
                       "optim.warmup_steps=0", "optim.weight_decay=0.0", *extra])
    torch.manual_seed(0)
    topo = topology(run)
    rank = int(os.environ.get("RANK", "0"))

    class Probe(GLMModule):
        captured: dict | None = None

        def configure_optimizers(self):
            if name != "deepspeed":
                return super().configure_optimizers()
            # plain SGD, lr 1: the update is minus the gradient the engine applies
            return torch.optim.SGD(self.model.parameters(), lr=1.0)

        def on_before_optimizer_step(self, optimizer):
            super().on_before_optimizer_step(optimizer)
            if self.captured is None and name != "deepspeed":
                self.captured = {n: _full(p.grad).detach().clone() for n, p in self.model.named_parameters()}

    module = Probe(run)
    initial = copy.deepcopy(module.model)
    batches = global_batch(topo.world, module.tokenizer)
    loader = DataLoader(batches[rank], batch_size=None)
    trainer = L.Trainer(accelerator="cpu", devices=topo.devices, strategy=build_strategy(run, "cpu", topo), max_steps=1,
                        accumulate_grad_batches=ACCUMULATE, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=None)
    trainer.fit(module, train_dataloaders=loader)
    ref_model = copy.deepcopy(initial)
    params = dict(ref_model.named_parameters())
    loss = documented_loss(ref_model, batches, set(module.tokenizer.special_ids))
    ref = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    if name == "deepspeed":
        after = _deepspeed_weights(trainer, module)
        got = {n: (initial.get_parameter(n).detach() - after[n]) for n in ref}  # SGD, lr 1: the applied gradient
    else:
        got = module.captured
    errs = {n: float((got[n].double() - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)) for n in ref}
    worst = max(errs, key=errs.get)
    return {"strategy": name, "world": topo.world, "max_rel_err": errs[worst], "worst": worst,
            "loss": float(loss.detach()), "scaled_2x_err": float((2 * got[worst].double() - ref[worst]).norm() / ref[worst].norm())}


def _deepspeed_weights(trainer, module) -> dict[str, torch.Tensor]:
    """Full parameters after the step (ZeRO-3 partitions are gathered)."""
    import deepspeed

    params = dict(module.model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None, enabled=trainer.strategy.zero_stage_3):
        return {n: p.detach().clone().float() for n, p in params.items()}
