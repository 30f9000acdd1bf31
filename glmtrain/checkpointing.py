"""Checkpoints: atomic writes, step-numbered files, retention, and validated resume.

* Every file is written to a temporary name in the same directory, flushed to
  disk and renamed into place, so a crash or a full disk during a save never
  damages an existing checkpoint.
* Files are ``checkpoints/step=NNNNNNNN.ckpt``; the newest readable one is
  resumed from.  Retention keeps the last ``keep_last``.
* Before a run resumes, the checkpoint's config fingerprint (model + objective)
  is compared with the current config; a mismatch is refused with one line that
  names the first differing key.  Nothing in the run directory is modified.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

CKPT_RE = re.compile(r"^step=(\d+)\.ckpt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; one line naming the file and what to do."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to ``<name>.tmp-<pid>``, fsync, then os.replace onto the final name."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        fs = get_filesystem(str(path))
        fs.makedirs(str(path.parent), exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def step_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step={step:08d}.ckpt"


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def read_meta(path: Path) -> dict:
    """Load a checkpoint lazily (mmap) and return its glmtrain metadata; raise CheckpointError if unusable."""
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # truncated, corrupted, not a torch file
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or "glmtrain" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint {path} was not written by glmtrain (no 'glmtrain' metadata)")
    meta = dict(ckpt["glmtrain"])
    meta["global_step"] = ckpt.get("global_step", 0)
    return meta


def first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            d = first_difference(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")
            if d:
                return d
        return None
    if old != new:
        return f"{prefix.rstrip('.')} was {old!r} in the checkpoint, is {new!r} now"
    return None


def find_resume_checkpoint(ckpt_dir: Path, fingerprint: dict) -> Path | None:
    """Newest readable, compatible checkpoint; unreadable newer ones are reported and skipped over (not deleted)."""
    candidates = list_checkpoints(ckpt_dir)
    for step, path in reversed(candidates):
        try:
            meta = read_meta(path)
        except CheckpointError as e:
            print(f"glmtrain: warning: {e}; falling back to an older checkpoint (the file is left in place)", file=sys.stderr)
            continue
        diff = first_difference(meta.get("fingerprint"), fingerprint)
        if diff:
            raise CheckpointError(
                f"run directory {ckpt_dir.parent} holds a checkpoint from an incompatible config ({diff}); "
                "choose a new run_dir=... or restore the original settings"
            )
        return path
    if candidates:
        raise CheckpointError(f"no readable checkpoint in {ckpt_dir}; move the damaged files away to start afresh")
    return None


class StepCheckpoint(L.Callback):
    """Save every ``every`` optimizer steps and at the end of training; keep the last ``keep_last``."""

    def __init__(self, ckpt_dir: Path, every: int, keep_last: int, stop_at_step: int = 0):
        self.dir, self.every, self.keep_last = Path(ckpt_dir), every, keep_last
        self.stop_at_step = stop_at_step
        self._last_saved = -1

    def _save(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        if step == self._last_saved or step == 0:
            return
        trainer.save_checkpoint(step_path(self.dir, step))  # collective: every rank calls it
        self._last_saved = step
        if trainer.is_global_zero and self.keep_last > 0:
            for _, old in list_checkpoints(self.dir)[: -self.keep_last]:
                old.unlink(missing_ok=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: not a step boundary
        if trainer.global_step % self.every == 0:
            self._save(trainer)
        if self.stop_at_step and trainer.global_step >= self.stop_at_step:
            self._save(trainer)
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)
