"""Reading released weight files without executing anything, and writing safetensors.

* ``.safetensors`` (one file, or shards listed in ``model.safetensors.index.json``): plain tensors.
* ``.ckpt`` / ``.pt`` / ``.bin`` (torch zip or legacy pickle): ``torch.load(weights_only=True)``.
  Released Lightning ``weights.ckpt`` files and Evo 2 ``.pt`` files may also hold non-tensor
  objects (OmegaConf hyper-parameters, Transformer Engine ``_extra_state`` blobs) that the
  restricted unpickler refuses.  Their globals are listed first (without loading anything) and
  each one is mapped to :class:`Inert`, a placeholder that accepts and discards whatever the file
  passes to it: the load stays ``weights_only=True``, no class or function named by the file is
  ever called, and a placeholder that ends up where a tensor belongs is refused by name later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "weights.ckpt", "pytorch_model.bin")
CONFIG_FILES = ("config.json", "config.yml", "config.yaml")
SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class ConvertError(ValueError):
    """A released checkpoint cannot be used; one line naming the file or tensor and what to do."""


class Inert:
    """Stands in for a non-tensor object of a checkpoint: swallows its arguments and state, runs nothing."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state) -> None:
        pass

    def __repr__(self) -> str:
        return "<non-tensor object, not loaded>"


def locate(path: str | Path) -> tuple[Path, Path | None]:
    """(weights file, released config next to it or None) for a file or a directory."""
    p = Path(path)
    if not p.exists():
        raise ConvertError(f"{p}: no such file or directory")
    folder = p if p.is_dir() else p.parent
    config = next((folder / n for n in CONFIG_FILES if (folder / n).is_file()), None)
    if p.is_file():
        return p, config
    weights = next((p / n for n in WEIGHT_FILES if (p / n).is_file()), None)
    if weights is None:
        found = sorted(q for q in p.iterdir() if q.suffix in SUFFIXES and q.is_file())
        if len(found) != 1:
            what = "none" if not found else ", ".join(q.name for q in found[:4])
            raise ConvertError(f"{p}: expected one weights file ({', '.join(WEIGHT_FILES)} or a single "
                               f"*{'/*'.join(SUFFIXES)}); found {what}")
        weights = found[0]
    return weights, config


def read_config(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        import yaml  # PyYAML comes with hydra/omegaconf; safe_load builds plain types only

        return yaml.safe_load(path.read_text())
    except Exception as e:
        raise ConvertError(f"{path}: unreadable config ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def safe_torch_load(path: Path) -> tuple[Any, list[str]]:
    """``torch.load(weights_only=True)`` (:func:`glmtrain.ckpt_formats.safe_load`); the non-tensor globals a
    released file names become :class:`Inert` (returned by name) instead of refusing the whole file."""
    import zipfile

    from glmtrain.ckpt_formats import UnsafeCheckpointError, safe_load

    mmap = zipfile.is_zipfile(path)  # zip-format files map their storages instead of reading them
    try:
        try:
            return safe_load(str(path), path, mmap=mmap), []
        except UnsafeCheckpointError:
            names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
            return safe_load(str(path), path, mmap=mmap, extra_globals=tuple((Inert, n) for n in names)), names
    except Exception as e:
        raise ConvertError(f"{path}: not readable without executing pickled code or not a torch file "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); save its state_dict as safetensors") from None


def read_tensors(weights: Path) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """(name -> tensor or placeholder, safetensors metadata, non-tensor globals replaced by placeholders)."""
    if weights.name.endswith(".safetensors.index.json"):
        from safetensors.torch import load_file

        index = json.loads(weights.read_text())
        out: dict[str, Any] = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            out.update(load_file(weights.parent / shard))
        return out, dict(index.get("metadata") or {}), []
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        out = {}
        try:
            with safe_open(weights, "pt") as f:
                meta = dict(f.metadata() or {})
                for k in f.keys():
                    out[k] = f.get_tensor(k)
        except Exception as e:
            raise ConvertError(f"{weights}: not a readable safetensors file ({type(e).__name__}: {str(e)[:120]})") from None
        return out, meta, []
    obj, replaced = safe_torch_load(weights)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning checkpoint
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ConvertError(f"{weights}: holds a {type(obj).__name__}, not a state_dict of named tensors")
    return dict(obj), {}, replaced


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Contiguous, unshared copies (safetensors stores no aliases), written atomically."""
    from safetensors.torch import save

    from glmtrain.atomic import atomic_write

    data = save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, metadata=metadata)
    with atomic_write(path) as f:
        f.write(data)
