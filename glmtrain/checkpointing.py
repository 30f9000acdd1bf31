"""Checkpoints: atomic writes, step-numbered files, retention, and validated resume.

* Every file is written to a temporary name in the same directory, flushed to
  disk and renamed into place, so a crash or a full disk during a save never
  damages an existing checkpoint.
* Files are ``checkpoints/step-NNNNNNNN.ckpt`` numbered by the *global* optimizer
  step (across the stages of a schedule; glmtrain.schedule), a name Hydra's override
  parser takes unquoted (``trainer.init_from=runs/x/checkpoints/step-00000500.ckpt``);
  the newest readable one is resumed from.  Run directories of older versions named
  them ``step=NNNNNNNN.ckpt``: those are still found, resumed from, pruned and kept by
  markers.  Retention keeps the last ``keep_last`` plus every checkpoint with a
  ``<name>.keep`` marker: each stage's final checkpoint gets one (it is what the next
  stage starts from), and users may add their own.
* A checkpoint is validated when it is considered for a resume (metadata:
  step, stage, data position, compatibility record, non-empty tensors) and
  against the built model (every tensor's name and shape) before any state is
  loaded.
* Before a run resumes, the checkpoint's compatibility record (model maths,
  objective, the definition of every stage up to its own) is compared with the
  current config (:func:`glmtrain.schedule.compat_problem`); a mismatch is
  refused with one line that names the first differing key.  Nothing in the
  run directory is modified.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

from glmtrain import ckpt_formats
from glmtrain.ckpt_formats import AtomicCheckpointIO, CheckpointError, UnsafeCheckpointError  # noqa: F401 (re-exported)
from glmtrain.config import first_difference

CKPT_RE = re.compile(r"^step([-=])(\d+)\.ckpt$")  # '=': the name in run directories of earlier versions


def step_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step-{step:08d}.ckpt"


def _all_checkpoints(ckpt_dir: Path) -> list[tuple[int, str, Path]]:
    if not ckpt_dir.is_dir():
        return []
    return sorted((int(m.group(2)), m.group(1), p) for p in ckpt_dir.iterdir() if (m := CKPT_RE.match(p.name)))


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) in step order; where both names exist for one step, the current one."""
    found: dict[int, Path] = {}
    for step, sep, p in _all_checkpoints(ckpt_dir):
        if step not in found or sep == "-":
            found[step] = p
    return sorted(found.items())


def checkpoint_at(ckpt_dir: Path, step: int) -> Path | None:
    """The checkpoint of global step ``step`` under either name (current or earlier versions'), or None."""
    return dict(list_checkpoints(ckpt_dir)).get(step)


def read_meta(path: Path) -> dict:
    """Load a checkpoint lazily (mmap; directories: metadata only) and return its glmtrain metadata; raise
    CheckpointError if unusable (UnsafeCheckpointError if loading it would need more than tensors and plain values)."""
    try:
        ckpt = ckpt_formats.summary(Path(path))
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated, corrupted, not a torch file
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or "glmtrain" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint {path} was not written by glmtrain (no 'glmtrain' metadata)")
    meta = dict(ckpt["glmtrain"])
    meta["global_step"] = ckpt.get("global_step", 0)  # within the checkpoint's stage
    problem = _metadata_problem(ckpt, meta)
    if problem:
        raise CheckpointError(f"checkpoint {path} has invalid metadata ({problem})")
    meta["shapes"] = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    return meta


def _metadata_problem(ckpt: dict, meta: dict) -> str | None:
    """What makes a loaded checkpoint unusable for a resume, or None."""
    if "fingerprint" in meta and "compat" not in meta:
        # written before staged runs; its fused projections (qkv, Hyena in_proj) also have the older row order,
        # so its tensors would load into today's modules with the right shapes and the wrong meaning
        return ("written by an earlier glmtrain (before staged runs and tensor-parallel-native layouts): its weights "
                "are laid out differently and cannot be loaded; retrain, or export it with that version")
    for key in ("consumed_samples", "global_step"):
        v = meta.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            return f"{key}={v!r}, expected an integer >= 0"
    for key in ("stage", "offset"):
        v = meta.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            return f"{key}={v!r}, expected an integer >= 0"
    if not isinstance(meta.get("compat"), dict):
        return "no compatibility record"
    sd = ckpt["state_dict"]
    if not isinstance(sd, dict) or not sd:
        return "empty state_dict"
    bad = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        return f"state_dict[{bad!r}] is not a tensor"
    for key in ("optimizer_states", "loops"):
        if key not in ckpt:
            return f"no {key!r} (not a full training checkpoint)"
    return None


def check_state_shapes(path: Path, module: torch.nn.Module) -> None:
    """Refuse (one line) a checkpoint whose tensors do not match the built model's names and shapes."""
    if ckpt_formats.is_deepspeed(Path(path)):
        return  # DeepSpeed directory: parameter names are the engine's (checked by DeepSpeed when it loads)
    problem = shape_mismatch(read_meta(Path(path))["shapes"], module)
    if problem:
        raise CheckpointError(f"checkpoint {path} does not fit the model ({problem}); "
                              "choose a new run_dir=... or restore the original model settings")


def shape_mismatch(shapes: dict[str, tuple], module: torch.nn.Module) -> str | None:
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for k in own:
        if k not in shapes:
            return f"tensor {k} is missing from the checkpoint"
        if shapes[k] != own[k]:
            return f"tensor {k} has shape {list(shapes[k])} in the checkpoint, {list(own[k])} in the model"
    extra = next((k for k in shapes if k not in own), None)
    if extra is not None:
        return f"the checkpoint has tensor {extra}, which the model does not"
    return None


def resolve_checkpoint(spec: str | Path) -> Path:
    """A checkpoint file, or a run directory / checkpoints directory -> its newest readable checkpoint."""
    p = Path(spec)
    if ckpt_formats.kind(p) != "unknown":  # a file, or a sharded / DeepSpeed checkpoint directory
        return p
    for d in (p / "checkpoints", p):
        for _, c in reversed(list_checkpoints(d)):
            try:
                read_meta(c)
                return c
            except UnsafeCheckpointError:
                raise  # never fall back past a planted file
            except CheckpointError as e:
                print(f"glmtrain: warning: {e}; trying an older checkpoint", file=sys.stderr)
    raise CheckpointError(f"trainer.init_from={spec}: no readable checkpoint there (a .ckpt file or a run directory)")


def load_weights(spec: str | Path, module: torch.nn.Module, say=print) -> Path:
    """Weights-only initialisation (``trainer.init_from``): strict names and shapes, same tokenizer.

    A released checkpoint (HyenaDNA, Evo 2, a Hugging Face export, ...) is handed to :mod:`glmtrain.convert`."""
    from glmtrain import convert

    if convert.is_released(spec):
        try:
            return convert.init_from_released(spec, module, say)
        except convert.ConvertError as e:
            raise CheckpointError(f"trainer.init_from={spec}: {e}") from None
    path = resolve_checkpoint(spec)
    meta = read_meta(path)
    own_tok = getattr(getattr(getattr(module, "run", None), "model", None), "tokenizer", None)
    ck_tok = (meta.get("compat") or {}).get("model", {}).get("tokenizer")
    if own_tok is not None and ck_tok is not None:
        import dataclasses

        diff = first_difference(ck_tok, dataclasses.asdict(own_tok) if dataclasses.is_dataclass(own_tok) else dict(own_tok),
                                "model.tokenizer.", " in the checkpoint")
        if diff:
            raise CheckpointError(f"trainer.init_from={spec}: tokenizer differs ({diff})")
    problem = shape_mismatch(meta["shapes"], module)
    if problem:
        raise CheckpointError(f"trainer.init_from={path}: does not fit the model ({problem})")
    try:
        sd = ckpt_formats.load_full(Path(path))["state_dict"]
    except CheckpointError as e:
        raise CheckpointError(f"trainer.init_from={spec}: {e}") from None
    module.load_state_dict(sd, strict=True)
    say(f"initialised weights from {path} (step {checkpoint_step(meta)}); optimizer, schedule and data start fresh")
    return path


def checkpoint_step(meta: dict) -> int:
    """The global optimizer step of a checkpoint (its stage's offset + the step within the stage)."""
    return int(meta.get("offset", 0)) + int(meta["global_step"])


def load_optimizer_state(path: Path) -> dict:
    """The (single) optimizer's full state in a checkpoint, for ``carry=weights+optimizer``."""
    ckpt = ckpt_formats.load_full(Path(path))
    states = ckpt.get("optimizer_states") or []
    if len(states) != 1:
        raise CheckpointError(f"checkpoint {path} holds {len(states)} optimizer states, expected 1")
    return states[0]


def weights_sha256(state_dict: dict) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order: a checksum of weights.

    Sharded tensors (DTensor: FSDP2, tensor parallel) are gathered one at a time -- a collective, so
    every rank calls this at the same point -- and give the checksum of the whole weights."""
    import hashlib

    from torch.distributed.tensor import DTensor

    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach()
        t = (t.full_tensor() if isinstance(t, DTensor) else t).to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class StepSeed(L.Callback):
    """Exactly resumable randomness (dropout): torch's global RNG is re-seeded before every micro-batch
    from (seed, data-stream position, data-parallel rank).  Incidental draws -- a DataLoader iterator
    drawing its base seed when a resumed run creates it, a validation pass -- can then not shift the
    random stream of a resumed run, and tensor-parallel ranks that share a batch draw the same masks."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pos = int(getattr(pl_module, "consumed_samples", 0))
        # data rank: context-parallel ranks of one sequence draw the same numbers (dropout of shared tokens)
        dp_rank = pl_module._dp()[0] // pl_module._cp()[1] if hasattr(pl_module, "_dp") else trainer.global_rank
        torch.manual_seed((self.seed * 1_000_003 + pos * 7919 + dp_rank * 104_729 + 17) % (2**63 - 1))


def keep_marker(path: Path) -> Path:
    return path.with_name(path.name + ".keep")


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Retention: delete all but the newest ``keep_last`` checkpoints, except those with a ``.keep`` marker."""
    if keep_last <= 0:
        return
    doomed = {step for step, _ in list_checkpoints(ckpt_dir)[:-keep_last]}
    for step, _, old in _all_checkpoints(ckpt_dir):
        if step in doomed and not keep_marker(old).exists():
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def remove_stale_temporaries(ckpt_dir: Path) -> list[Path]:
    """Partial files of saves that never finished (crash, SIGKILL, full disk); never read by a resume."""
    gone = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.glob(".*.tmp-*"):
            p.unlink(missing_ok=True)
            gone.append(p)
        for p in [*ckpt_dir.glob(".*.partial"), *ckpt_dir.glob(".*.old")]:  # sharded saves (directories)
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def find_resume_checkpoint(ckpt_dir: Path, problem) -> tuple[Path, dict] | None:
    """Newest readable, compatible checkpoint and its metadata; unreadable newer ones are reported and skipped
    over (not deleted).  ``problem(meta)`` says why a readable checkpoint does not fit this config (or None)."""
    candidates = list_checkpoints(ckpt_dir)
    for step, path in reversed(candidates):
        try:
            meta = read_meta(path)
        except UnsafeCheckpointError:
            raise  # never fall back past a planted file
        except CheckpointError as e:
            print(f"glmtrain: warning: {e}; falling back to an older checkpoint (the file is left in place)", file=sys.stderr)
            continue
        diff = problem(meta)
        if diff:
            raise CheckpointError(
                f"run directory {ckpt_dir.parent} holds a checkpoint from an incompatible config ({diff}); "
                "choose a new run_dir=... or restore the original settings"
            )
        return path, meta
    if candidates:
        raise CheckpointError(f"no readable checkpoint in {ckpt_dir}; move the damaged files away to start afresh")
    return None


class StepCheckpoint(L.Callback):
    """Save every ``every`` optimizer steps and at the end of training; keep the last ``keep_last``.

    Steps are global: ``offset`` (the optimizer steps of earlier stages) plus the trainer's step
    within the stage; ``stop_at_step`` is global too."""

    def __init__(self, ckpt_dir: Path, every: int, keep_last: int, stop_at_step: int = 0, offset: int = 0):
        self.dir, self.every, self.keep_last = Path(ckpt_dir), every, keep_last
        self.stop_at_step, self.offset = stop_at_step, offset
        self._last_saved = -1
        self.last_path: Path | None = None

    def step(self, trainer: L.Trainer) -> int:
        return self.offset + trainer.global_step

    def _save(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        if step == self._last_saved or step == 0:
            return
        self.last_path = step_path(self.dir, self.offset + step)
        trainer.save_checkpoint(self.last_path)  # collective: every rank calls it
        self._last_saved = step
        if trainer.is_global_zero and self.keep_last > 0:
            prune(self.dir, self.keep_last)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.is_global_zero:  # no save of this run is in flight yet
            for p in remove_stale_temporaries(self.dir):
                print(f"glmtrain: removed {p.name}, a partial checkpoint of an interrupted save", file=sys.stderr)

    def mark_stage_final(self, trainer: L.Trainer) -> None:
        """Protect the checkpoint of the current step from retention (a stage's final checkpoint)."""
        self._save(trainer)
        path = step_path(self.dir, self.step(trainer))
        if trainer.is_global_zero and path.exists():
            keep_marker(path).touch()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: not a step boundary
        if self.step(trainer) % self.every == 0:
            self._save(trainer)
        if self.stop_at_step and self.step(trainer) >= self.stop_at_step:
            self._save(trainer)
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            self.mark_stage_final(trainer)  # the stage is complete: retention keeps this one for good
