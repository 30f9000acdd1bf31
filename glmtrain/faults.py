"""Numerical faults: a NaN/inf loss or gradient never reaches the weights unnoticed.

Policy ``trainer.nonfinite``:

* ``skip`` -- the optimizer step is not applied (every gradient is dropped, so
  AdamW changes neither weights nor moments; the step still counts for the lr
  schedule and the data position moves on), a warning names the step, and the
  count is logged (``train/nonfinite_skipped``) and kept in checkpoints.  After
  ``trainer.nonfinite_max_consecutive`` skipped steps in a row the run stops as
  under ``stop``: a model that produces nothing but NaN is not training.
* ``stop`` -- the faulty update is not applied either; a checkpoint of that step
  is written (weights and optimizer state are those from before the fault, the
  data position is after the faulty batch), training stops and
  :class:`NumericalFault` is raised with one line naming step, what was
  non-finite and the checkpoint.

Detection: every micro-batch's loss (``on_before_backward``) and, once per
optimizer step, the gradient norms (``on_before_optimizer_step``, after AMP
unscaling, before clipping).  Under ``16-mixed`` the grad scaler owns inf/NaN
gradients (overflow is how it finds its scale), so only the loss is checked.
Under several ranks the decision is agreed (MAX over ranks) so that all ranks
skip or stop together.  Under DeepSpeed the engine owns the optimizer step and
the (partitioned) gradients, so a fault always stops the run, by raising
:class:`NumericalFault` before the engine applies the update (the newest
periodic checkpoint is from before the fault).
"""

from __future__ import annotations

import sys

import lightning as L
import torch

from glmtrain.cluster import agree_max

POLICIES = ("skip", "stop")


class NumericalFault(RuntimeError):
    """Training stopped on a non-finite loss or gradient (policy ``stop``)."""


def _grads_finite(module: torch.nn.Module) -> torch.Tensor:
    """All local gradient values finite (DTensor shards: the local shard; ranks agree afterwards)."""
    grads = [getattr(p.grad, "_local_tensor", p.grad) for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool)
    by_device: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        if hasattr(g, "to_local"):  # DTensor (fsdp/tp): this rank's shard; the ranks agree afterwards
            g = g.to_local()
        by_device.setdefault((g.device, g.dtype), []).append(g.detach())
    ok = None
    for gs in by_device.values():
        norms = torch._foreach_norm(gs, 2.0) if hasattr(torch, "_foreach_norm") else [g.norm() for g in gs]
        f = torch.isfinite(torch.stack([n.float() for n in norms])).all()
        ok = f if ok is None else (ok & f.to(ok.device))
    return ok


class NonFiniteGuard(L.Callback):
    def __init__(self, policy: str = "skip", max_consecutive: int = 10, check_grads: bool = True, save=None,
                 step_offset: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"trainer.nonfinite={policy!r}: allowed values are {', '.join(POLICIES)}")
        self.policy, self.max_consecutive, self.check_grads, self.save = policy, max_consecutive, check_grads, save
        self.step_offset = step_offset  # steps of earlier stages: messages name global steps
        self.skipped = 0  # total skipped optimizer steps (kept in checkpoints)
        self.consecutive = 0
        self.fault: str | None = None  # set when the run was stopped: the one-line reason
        self._loss_bad: torch.Tensor | None = None
        self._stop_now = False

    # ------------------------------------------------------------- detection
    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else (self._loss_bad | bad)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        loss_bad = bool(self._loss_bad.item()) if self._loss_bad is not None else False
        self._loss_bad = None
        grad_bad = self.check_grads and not bool(_grads_finite(pl_module).item())
        code = agree_max(trainer, (1 if loss_bad else 0) | (2 if grad_bad else 0))
        if code == 0:
            self.consecutive = 0
            return
        step = self.step_offset + trainer.global_step + 1  # the step being attempted (1-based, as in checkpoint names)
        what = " and ".join(w for w, bit in (("loss", 1), ("gradient", 2)) if code & bit)
        if "DeepSpeed" in type(trainer.strategy).__name__:
            # the engine owns the step (and partitions the gradients): nothing can be dropped here, so stop before
            # it is applied; the newest periodic checkpoint is from before the fault
            self.fault = f"non-finite {what} at optimizer step {step} (under DeepSpeed the update cannot be skipped)"
            raise NumericalFault(f"{self.fault}; training stopped before applying it; resume from the newest checkpoint")
        # drop every gradient: torch optimizers skip parameters whose .grad is None (no update, no moment change)
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped += 1
        self.consecutive += 1
        if self.policy == "stop" or self.consecutive >= self.max_consecutive > 0:
            why = f"non-finite {what} at optimizer step {step}"
            if self.policy == "skip":
                why += f" ({self.consecutive} consecutive steps skipped, trainer.nonfinite_max_consecutive={self.max_consecutive})"
            self.fault = why
            self._stop_now = True
        elif trainer.is_global_zero:
            print(f"glmtrain: warning: non-finite {what} at optimizer step {step}: update skipped "
                  f"({self.skipped} skipped so far; trainer.nonfinite=skip)", file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, batch_size=1)
        if self._stop_now:
            self._stop_now = False
            if self.save is not None:
                self.save(trainer)  # collective: the weights are those from before the fault
            trainer.should_stop = True

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
