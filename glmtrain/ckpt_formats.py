"""Checkpoint formats: the one module that knows how checkpoints are laid out on disk and reads them.

Three formats, told apart by what is on disk:

* **file** -- ``torch.save`` of Lightning's checkpoint dict (single device, DDP, ``fsdp``/``tp`` with
  ``strategy.checkpoint=full``), written atomically (:class:`AtomicCheckpointIO`);
* **sharded** -- a ``torch.distributed.checkpoint`` (DCP) directory: ``.metadata`` and every rank's
  ``__R_0.distcp`` hold the model and optimizer tensors, ``meta.pt`` everything else (step, loops,
  schedulers, glmtrain's metadata); written to ``.<name>.partial`` and renamed into place;
* **deepspeed** -- a DeepSpeed directory (``*/..._model_states.pt``, ``*/..._optim_states.pt``),
  written and read by DeepSpeed itself.

**Loading never executes code.**  A checkpoint is a pickle, and unpickling an arbitrary file can run
anything it names.  Every read here admits only tensors and plain values:

* files and ``meta.pt``: ``torch.load(weights_only=True)``;
* DCP's ``.metadata`` (a plain pickle): an unpickler that admits only DCP's own metadata classes,
  torch sizes/dtypes/layouts and paths; DCP's non-tensor entries: ``weights_only=True`` as well
  (torch's own DCP reader uses ``weights_only=False`` for those);
* DeepSpeed directories, which DeepSpeed reads with ``weights_only=False``: every ``.pt`` file is
  opened with ``weights_only=True`` first (admitting DeepSpeed's plain-data classes: the ZeRO stage
  enum, its loss scalers and fragment addresses) before DeepSpeed may touch the directory.

A file that needs anything else is refused with one line naming it (:class:`UnsafeCheckpointError`);
resume and ``trainer.init_from`` do not fall back to an older checkpoint past it.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from glmtrain.atomic import atomic_write

META = "meta.pt"  # sharded checkpoints: everything that is not a model/optimizer tensor
DCP_METADATA = ".metadata"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; one line naming the file and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose loading would construct objects other than tensors and plain values."""


# ----------------------------------------------------------------------------- which format
def is_sharded(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / DCP_METADATA).is_file()


def is_deepspeed(path: Path) -> bool:
    p = Path(path)
    return p.is_dir() and not (p / DCP_METADATA).is_file() and any(p.glob("*/*model_states.pt"))


def kind(path: Path) -> str:
    """file | sharded | deepspeed | unknown"""
    p = Path(path)
    if p.is_file():
        return "file"
    if is_sharded(p):
        return "sharded"
    if is_deepspeed(p):
        return "deepspeed"
    return "unknown"


# ----------------------------------------------------------------------------- safe reading
_GLOBAL_RE = re.compile(r"(?:GLOBAL|global|class)\s+([\w.]+)")


def _unsafe(path: Any, err: BaseException) -> UnsafeCheckpointError:
    m = _GLOBAL_RE.search(str(err))
    what = f"it references {m.group(1)}" if m else "it holds more than tensors and plain values"
    return UnsafeCheckpointError(
        f"checkpoint {path} is refused: loading it would execute code or build arbitrary objects ({what}); "
        "glmtrain loads only tensors and plain values - delete or move the file if you did not write it with glmtrain")


def _is_unsafe_global(err: BaseException) -> bool:
    s = str(err)
    return "Unsupported global" in s or "Unsupported class" in s or "not an allowed global" in s


def safe_load(src: Any, path: Any = None, *, mmap: bool = False, extra_globals: tuple = ()) -> Any:
    """``torch.load(weights_only=True)``; an unpickling request for any other global raises
    :class:`UnsafeCheckpointError` naming ``path``; other failures (truncated, not a torch file) propagate."""
    path = path if path is not None else src
    try:
        if extra_globals:
            with torch.serialization.safe_globals(list(extra_globals)):
                return torch.load(src, map_location="cpu", mmap=mmap, weights_only=True)
        return torch.load(src, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        if _is_unsafe_global(e):
            raise _unsafe(path, e) from None
        raise


def load_file(path: Path, mmap: bool = True) -> dict:
    """A checkpoint file -> Lightning's checkpoint dict (tensors memory-mapped)."""
    try:
        return safe_load(str(path), path, mmap=mmap)
    except RuntimeError as e:
        if mmap and "mmap" in str(e):  # not a zip-format torch file: read it whole (still weights_only)
            return safe_load(str(path), path, mmap=False)
        raise


def load_meta(path: Path) -> dict:
    """``meta.pt`` of a sharded checkpoint directory."""
    return safe_load(str(Path(path) / META), Path(path) / META)


def save_file(checkpoint: dict, path: Path) -> None:
    """torch.save through :func:`glmtrain.atomic.atomic_write` (temporary name, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, sync_dir=True) as f:
        torch.save(checkpoint, f)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO: atomic saves, and loads that never unpickle code (``weights_only`` is always on)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        save_file(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return load_file(Path(path))


# ----------------------------------------------------------------------------- DCP (sharded) directories
def _dcp_allowed(module: str, name: str) -> Any:
    """The globals a DCP ``.metadata`` pickle may name: DCP's metadata dataclasses/enums, torch sizes,
    dtypes, layouts and memory formats, paths.  None for anything else."""
    if module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"):
        obj = getattr(importlib.import_module(module), name, None)
        import dataclasses
        import enum

        if isinstance(obj, type) and obj.__module__ == module and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
            return obj
        return None
    if module == "torch":
        obj = getattr(torch, name, None)
        return obj if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)) else None
    if (module, name) == ("torch.serialization", "_get_layout"):
        return torch.serialization._get_layout
    if module == "pathlib" and name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
        import pathlib

        return getattr(pathlib, name)
    if (module, name) == ("collections", "OrderedDict"):
        import collections

        return collections.OrderedDict
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        obj = _dcp_allowed(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
        return obj


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's file reader with a ``.metadata`` unpickler restricted to DCP's own data classes."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            rank = kwargs.get("rank")
            p = Path(self.path) / (DCP_METADATA if rank is None else f"__{rank}{DCP_METADATA}")
            with open(p, "rb") as f:
                try:
                    md = _MetadataUnpickler(f).load()
                except pickle.UnpicklingError as e:
                    if _is_unsafe_global(e):
                        raise _unsafe(p, e) from None
                    raise
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(str(path))


def _safe_planner(base: type, path: Path, **kw):
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(base):
        """Non-tensor entries (optimizer hyper-parameters, steps) are read with weights_only=True."""

        unsafe: UnsafeCheckpointError | None = None

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = safe_load(value, path)
            except UnsafeCheckpointError as e:
                self.unsafe = e  # DCP wraps exceptions into its own multi-rank report: keep ours
                raise
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner(**kw)


def _dcp_read(load, path: Path, planner) -> None:
    dcp_metadata(path)  # refused here, on every rank, before DCP wraps the error into its own report
    try:
        load(planner)
    except BaseException:  # DCP's CheckpointException is a BaseException
        if planner.unsafe is not None:
            raise planner.unsafe from None
        raise


def read_sharded_into(state: dict, path: Path) -> None:
    """``dcp.load`` into ``state`` (live, possibly sharded tensors), with the safe reader and planner (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    _dcp_read(lambda planner: dcp.load(state, storage_reader=_reader(path), planner=planner), path,
              _safe_planner(DefaultLoadPlanner, path))


def dcp_metadata(path: Path):
    """The DCP directory's ``.metadata`` (tensor names, global shapes, dtypes), read safely."""
    return _reader(path).read_metadata()


def load_sharded_as_full(path: Path) -> dict:
    """A sharded (DCP) checkpoint directory -> Lightning's checkpoint dict with full tensors (one process)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    tensors: dict[str, Any] = {}
    _dcp_read(lambda planner: _load_state_dict(tensors, storage_reader=_reader(path), planner=planner, no_dist=True),
              path, _safe_planner(_EmptyStateDictLoadPlanner, path))
    ckpt = load_meta(path)
    ckpt["state_dict"] = tensors.pop("state_dict")
    keys = sorted((k for k in tensors if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    ckpt["optimizer_states"] = [tensors[k] for k in keys]
    return ckpt


def sharded_partial(path: Path) -> Path:
    """Where a sharded save is written before it is renamed into place."""
    return Path(path).with_name(f".{Path(path).name}.partial")


def sharded_old(path: Path) -> Path:
    return Path(path).with_name(f".{Path(path).name}.old")


def publish_sharded(tmp: Path, path: Path, checkpoint: dict) -> None:
    """Global rank 0, after every rank's ``dcp.save`` into ``tmp``: write ``meta.pt`` and swap ``tmp`` into ``path``."""
    with open(tmp / META, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    old = sharded_old(path)
    if path.exists():
        if path.is_dir():
            os.replace(path, old)
        else:
            path.unlink()
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- DeepSpeed directories
# Plain-data classes DeepSpeed pickles into its checkpoints (ZeRO optimizer state): admitted by name when
# DeepSpeed is installed.  Nothing else in those files may need more than weights_only=True.
DEEPSPEED_DATA_CLASSES = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _deepspeed_globals() -> tuple:
    out = []
    for dotted in DEEPSPEED_DATA_CLASSES:
        mod, _, name = dotted.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            continue
    return tuple(out)


def check_deepspeed(path: Path) -> None:
    """Open every ``.pt`` of a DeepSpeed directory with weights_only=True (DeepSpeed itself then loads them
    with weights_only off); raise :class:`UnsafeCheckpointError` / :class:`CheckpointError` naming the file."""
    extra = _deepspeed_globals()
    for f in sorted(Path(path).rglob("*.pt")):
        try:
            safe_load(str(f), f, extra_globals=extra)
        except UnsafeCheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"checkpoint {f} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


# ----------------------------------------------------------------------------- summaries and whole loads
def summary(path: Path) -> dict:
    """A checkpoint of any format as a Lightning-like dict for resume checks, without reading big tensor
    data of directories: the metadata, ``state_dict`` (directories: meta-device tensors of the stored global
    shapes), and ``optimizer_states`` (directories: placeholders)."""
    path = Path(path)
    k = kind(path)
    if k == "file":
        return load_file(path)
    if k == "sharded":
        ckpt = load_meta(path)
        sd, optims = {}, set()
        for key, m in dcp_metadata(path).state_dict_metadata.items():
            if key.startswith("state_dict.") and hasattr(m, "size"):
                sd[key[len("state_dict."):]] = torch.empty(tuple(m.size), dtype=m.properties.dtype, device="meta")
            elif key.startswith("optimizer_"):
                optims.add(key.split(".")[0])
        ckpt["state_dict"] = sd
        ckpt["optimizer_states"] = [{} for _ in sorted(optims)]
        return ckpt
    if k == "deepspeed":
        f = sorted(path.glob("*/*model_states.pt"))[0]
        ckpt = safe_load(str(f), f, extra_globals=_deepspeed_globals())
        shapes: dict[str, Any] = {}
        for group in ckpt.get("param_shapes") or []:
            shapes.update(group)
        sd = {k: torch.empty(tuple(v), device="meta") for k, v in shapes.items()}
        for k, v in (ckpt.get("module") or {}).items():
            if isinstance(v, torch.Tensor) and (k not in sd or v.numel()):
                sd[k] = v
        ckpt["state_dict"] = sd
        ckpt.setdefault("optimizer_states", [{}])
        return ckpt
    raise FileNotFoundError(f"{path} is neither a checkpoint file, a sharded (.metadata + {META}) nor a DeepSpeed directory")


def load_full(path: Path) -> dict:
    """A checkpoint file or sharded directory -> Lightning's checkpoint dict with full tensors (one process)."""
    path = Path(path)
    k = kind(path)
    if k == "sharded":
        return load_sharded_as_full(path)
    if k == "deepspeed":
        raise CheckpointError(f"checkpoint {path} is a DeepSpeed directory: only strategy=deepspeed reads it "
                              "(or convert it with DeepSpeed's zero_to_fp32.py)")
    return load_file(path)


def refuse_foreign(path: Path, strategy_name: str) -> None:
    """DeepSpeed directories resume only under DeepSpeed, and DeepSpeed resumes only its own (one line)."""
    ds = is_deepspeed(path)
    if ds and strategy_name != "deepspeed":
        raise CheckpointError(f"checkpoint {path} was written by DeepSpeed; resume it with strategy=deepspeed "
                              "(or convert it with DeepSpeed's zero_to_fp32.py into a new run)")
    if not ds and strategy_name == "deepspeed" and Path(path).exists():
        raise CheckpointError(f"checkpoint {path} was written under strategy=fsdp/tp/ddp; DeepSpeed resumes only its own "
                              "checkpoints: resume with the strategy that wrote it, or start a new run_dir")
