"""Released weights in and out of glmtrain.

**Import.**  A released checkpoint -- a weights file, or a directory holding one and the released
config next to it -- is recognised by a registered :class:`Layout` (tensor names, config fields) and
read into an :class:`Imported`: tensors under glmtrain's names and layouts, the glmtrain model-config
values the release implies (checked against the model it is loaded into), and an account of every
released tensor: mapped, or dropped with the reason (duplicates checked equal, positional buffers
checked against glmtrain's recomputed ones, metadata).  A tensor no rule accounts for, or a model
tensor the release does not provide, is refused with one line naming it.  Nothing is unpickled:
safetensors, or ``torch.load(weights_only=True)`` (:mod:`glmtrain.convert.files`).

Two ways in, one code path:

* ``python -m glmtrain.convert import <family> <source> <out>`` writes the imported model as a
  Hugging Face directory (or, for ``out.safetensors``, one file) that glmtrain reads back;
* ``trainer.init_from=<source>`` loads a released checkpoint directly into the configured model
  (:func:`init_from_released`, called by :func:`glmtrain.checkpointing.load_weights`).

**Export.**  ``python -m glmtrain.convert export <run_dir> <out_dir>``: a registered
:class:`Exporter` per family writes ``config.json``, ``model.safetensors``, tokenizer files and, where
no built-in ``transformers`` class fits, a self-contained modeling file (``trust_remote_code``).

**Registry.**  Every module of this package whose name does not start with ``_`` is imported on
first use, so a new family adds a file here with one registration line each, e.g.::

    register_layout(Layout("nt-v2-hf", "nt", match=_is_nt, read=_read_nt))
    register_exporter(Exporter("nt", write=_write_nt))
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import math
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from glmtrain.convert.files import CONFIG_FILES, WEIGHT_FILES, ConvertError, locate, read_config, read_tensors

__all__ = [
    "ConvertError", "Layout", "Exporter", "Released", "Imported", "Taker", "register_layout", "register_exporter",
    "layouts", "exporters", "open_released", "load_released", "fit", "init_from_released", "is_released",
    "build_imported_model", "summary",
]


# ----------------------------------------------------------------------------- data types
@dataclass
class Released:
    """What a source path holds: the weights file, its tensors, the released config next to it."""

    path: Path
    weights: Path
    tensors: dict[str, Any]
    metadata: dict[str, str]
    config_path: Path | None
    config: dict | None
    placeholders: list[str]  # non-tensor globals of a pickled file, replaced by inert placeholders


@dataclass
class Imported:
    layout: str
    family: str
    source: str
    tensors: dict[str, torch.Tensor]  # glmtrain names
    # glmtrain model-config values the release fixes (compared with the model it is loaded into)
    config: dict[str, Any]
    # further config values for building a model from the release alone (dropouts, name, ...)
    settings: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)  # tokenizer options the release was published with
    mapped: list[tuple[str, str]] = field(default_factory=list)  # (released name, glmtrain name)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (released name, why)
    optional: set[str] = field(default_factory=set)  # glmtrain names a model may lack (neutral values)
    # model name -> (imported name, conversion) for a model that parametrises a tensor differently
    alternatives: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = field(default_factory=dict)
    recompute: tuple[str, ...] = ()  # glob patterns of model buffers glmtrain derives itself (not released)
    notes: list[str] = field(default_factory=list)


class Taker:
    """Hands out a release's tensors by name and remembers what is left: nothing is silently ignored."""

    def __init__(self, src: Released, layout: str):
        self.src, self.layout = src, layout
        self.left = set(src.tensors)
        self.out: dict[str, torch.Tensor] = {}
        self.mapped: list[tuple[str, str]] = []
        self.dropped: list[tuple[str, str]] = []

    def has(self, name: str) -> bool:
        return name in self.src.tensors

    def get(self, name: str) -> torch.Tensor:
        """A tensor of the release (not consumed)."""
        if name not in self.src.tensors:
            raise ConvertError(f"{self.src.weights}: tensor {name} is missing (expected in the {self.layout} layout)")
        t = self.src.tensors[name]
        if not isinstance(t, torch.Tensor):
            raise ConvertError(f"{self.src.weights}: entry {name} is a {type(t).__name__}, not a tensor")
        return t

    def take(self, name: str) -> torch.Tensor:
        t = self.get(name)
        self.left.discard(name)
        return t

    def put(self, glm_name: str, tensor: torch.Tensor, *sources: str) -> None:
        self.out[glm_name] = tensor
        for s in sources:
            self.left.discard(s)
            self.mapped.append((s, glm_name))

    def drop(self, name: str, why: str) -> None:
        if name in self.left:
            self.left.discard(name)
            self.dropped.append((name, why))

    def drop_equal(self, name: str, other: torch.Tensor, what: str) -> None:
        """Drop a stored duplicate after checking that it equals the tensor it duplicates."""
        t = self.take(name)
        if t.shape != other.shape or not torch.equal(t.to(other.dtype), other):
            diff = (t.double() - other.double()).abs().max().item() if t.shape == other.shape else "shape"
            raise ConvertError(f"{self.src.weights}: {name} should equal {what} but differs ({diff}); "
                               "glmtrain cannot represent untied copies here")
        self.dropped.append((name, f"duplicate of {what} (checked equal)"))

    def finish(self, **fields) -> Imported:
        if self.left:
            names = sorted(self.left)
            more = f" (+{len(names) - 4} more)" if len(names) > 4 else ""
            raise ConvertError(f"{self.src.weights}: unknown tensors for the {self.layout} layout: "
                               f"{', '.join(names[:4])}{more}; refusing to ignore them")
        return Imported(layout=self.layout, source=str(self.src.path), tensors=self.out, mapped=self.mapped,
                        dropped=self.dropped, **fields)


@dataclass(frozen=True)
class Layout:
    """A released checkpoint layout: how to recognise it and read it into glmtrain's names."""

    name: str
    family: str  # the glmtrain family it imports into ("" = stated by the files: glmtrain's own export)
    match: Callable[[Released], bool]
    read: Callable[[Released], Imported]
    description: str = ""


@dataclass(frozen=True)
class Exporter:
    """Writes a built glmtrain model of ``family`` as a Hugging Face directory."""

    family: str
    write: Callable[..., dict]  # (model, out_dir, tokenizer_cfg) -> files written {name: what}


_LAYOUTS: dict[str, Layout] = {}
_EXPORTERS: dict[str, Exporter] = {}
_DISCOVERED = False


def register_layout(layout: Layout) -> Layout:
    _LAYOUTS[layout.name] = layout
    return layout


def register_exporter(exporter: Exporter) -> Exporter:
    _EXPORTERS[exporter.family] = exporter
    return exporter


def _discover() -> None:
    global _DISCOVERED
    if not _DISCOVERED:
        _DISCOVERED = True
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_") and info.name not in ("files",):
                importlib.import_module(f"{__name__}.{info.name}")


def layouts() -> dict[str, Layout]:
    _discover()
    return dict(_LAYOUTS)


def exporters() -> dict[str, Exporter]:
    _discover()
    return dict(_EXPORTERS)


# ----------------------------------------------------------------------------- import
def open_released(path: str | Path, config_path: str | Path | None = None) -> Released:
    weights, found = locate(path)
    config_path = Path(config_path) if config_path else found
    tensors, metadata, placeholders = read_tensors(weights)
    return Released(Path(path), weights, tensors, metadata, config_path, read_config(config_path), placeholders)


def load_released(path: str | Path, family: str | None = None, config_path: str | Path | None = None) -> Imported:
    """Read a released checkpoint into glmtrain's names (any registered layout, or those of ``family``)."""
    src = open_released(path, config_path)
    known = layouts()
    candidates = [lay for lay in known.values() if family is None or lay.family in (family, "")]
    lay = next((lay for lay in candidates if lay.match(src)), None)
    if lay is None:
        names = [lay.name for lay in candidates] or ["none registered"]
        sample = ", ".join(list(src.tensors)[:3])
        raise ConvertError(f"{path}: not a checkpoint layout glmtrain can import{f' as {family}' if family else ''} "
                           f"(known: {', '.join(names)}; its first tensors: {sample})")
    imp = lay.read(src)
    if family is not None and imp.family != family:
        raise ConvertError(f"{path} holds a {imp.family} checkpoint ({lay.name}), but the model is {family}")
    if src.placeholders:
        imp.notes.append(f"{len(src.placeholders)} kinds of non-tensor objects in {src.weights.name} were not loaded "
                         f"(inert placeholders, nothing executed): {', '.join(src.placeholders[:3])}"
                         + (" ..." if len(src.placeholders) > 3 else ""))
    return imp


def _config_values(cfg: Any, key: str) -> list[Any]:
    """The config's value for ``key``, as written and as resolved (``mlp_dim: 0`` -> the derived width)."""
    resolve = getattr(cfg, f"resolved_{key}", None)
    return [getattr(cfg, key)] + ([resolve()] if callable(resolve) else [])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return a == b


def check_config(imp: Imported, cfg: Any) -> None:
    """The model config must agree with every value the release fixes; one line names the first that does not."""
    for key, want in imp.config.items():
        values = _config_values(cfg, key)
        if not any(_same(have, want) for have in values):
            raise ConvertError(f"model.{key}={values[-1]!r}, but {imp.source} ({imp.layout}) was published with {want!r}; "
                               f"set model.{key}={want} (or choose the matching model=...)")


def fit(imp: Imported, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A full state_dict for ``model`` from an import: (state, names of buffers glmtrain recomputed)."""
    check_config(imp, model.cfg)
    own = model.state_dict()
    buffers = {n for n, _ in model.named_buffers()}
    state: dict[str, torch.Tensor] = {}
    recomputed, missing, converted = [], [], set()
    for k, v in own.items():
        if k in imp.tensors or (k in imp.alternatives and imp.alternatives[k][0] in imp.tensors):
            if k in imp.tensors:
                t = imp.tensors[k]
            else:
                name, convert = imp.alternatives[k]
                t = convert(imp.tensors[name])
                converted.add(name)
            if tuple(t.shape) != tuple(v.shape):
                raise ConvertError(f"{imp.source}: tensor {k} has shape {list(t.shape)} in the release, "
                                   f"{list(v.shape)} in the model; the model config does not fit the release")
            state[k] = t.detach().to(v.dtype)
        elif k in buffers and any(fnmatch.fnmatchcase(k, p) for p in imp.recompute):
            state[k] = v
            recomputed.append(k)
        else:
            missing.append(k)
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConvertError(f"{imp.source}: the model needs tensor {missing[0]}{more}, which the {imp.layout} checkpoint "
                           "does not provide")
    extra = [k for k in imp.tensors if k not in own and k not in imp.optional and k not in converted]
    if extra:
        raise ConvertError(f"{imp.source}: the {imp.layout} checkpoint has {extra[0]}"
                           f"{f' (+{len(extra) - 1} more)' if len(extra) > 1 else ''}, which the model does not")
    return state, recomputed


def summary(imp: Imported, recomputed: list[str]) -> list[str]:
    lines = [f"imported {imp.source} ({imp.layout}): {len(imp.mapped)} tensors mapped, {len(imp.dropped)} dropped, "
             f"{len(recomputed)} recomputed by glmtrain, none missing"]
    reasons: dict[str, int] = {}
    for _, why in imp.dropped:
        reasons[why] = reasons.get(why, 0) + 1
    lines += [f"  dropped {n}: {why}" for why, n in reasons.items()]
    if recomputed:
        lines.append(f"  recomputed: {', '.join(sorted({r.split('.')[-1] for r in recomputed}))} "
                     f"({len(recomputed)} buffers glmtrain derives from the config)")
    lines += [f"  note: {n}" for n in imp.notes]
    return lines


def init_from_released(spec: str | Path, module: torch.nn.Module, say=print) -> Path:
    """``trainer.init_from=<released checkpoint>``: check the configured model against the release and load it."""
    model = getattr(module, "model", module)
    imp = load_released(spec, family=model.cfg.family)
    state, recomputed = fit(imp, model)
    _check_vocabulary(imp, getattr(module, "tokenizer", None))
    model.load_state_dict(state, strict=True)
    for line in summary(imp, recomputed):
        say(line)
    # compared config to config (the run's model.tokenizer): a tokenizer object's attributes are not its options
    tok = getattr(getattr(getattr(module, "run", None), "model", None), "tokenizer", None)
    have = dataclasses.asdict(tok) if dataclasses.is_dataclass(tok) else dict(tok or {})
    differs = {k: v for k, v in imp.tokenizer.items() if k in have and have[k] != v}
    if differs:
        say("  note: the release scores sequences with tokenizer options "
            + " ".join(f"model.tokenizer.{k}={v}" for k, v in differs.items()) + " (this run differs)")
    say("optimizer, schedule and data start fresh")
    return Path(spec)


def _check_vocabulary(imp: Imported, tok: Any) -> None:
    """A release with its own vocabulary file (DNABERT-2's BPE) only fits a run that tokenizes with that file:
    otherwise the ids index other embedding rows and the weights are silently meaningless."""
    path = imp.tokenizer.get("path")
    if imp.tokenizer.get("kind") != "bpe" or not path or getattr(tok, "name", None) != "bpe":
        return
    from tokenizers import Tokenizer as HFTokenizer

    theirs = HFTokenizer.from_file(str(path)).get_vocab()
    ours = {t: i for i, t in enumerate(tok.vocab())}
    if ours != theirs:
        raise ConvertError(f"the run's BPE vocabulary ({tok.path}) is not the release's ({path}): the ids would index "
                           f"other embedding rows; set model.tokenizer.path={path}")


def is_released(spec: str | Path) -> bool:
    """True when ``spec`` is not a glmtrain checkpoint or run directory but something an importer may read."""
    p = Path(spec)
    if p.is_dir():
        if (p / "checkpoints").is_dir() or (p / "meta.pt").is_file() or (p / ".metadata").is_file():
            return False
        from glmtrain.checkpointing import CKPT_RE

        if any(CKPT_RE.match(q.name) for q in p.iterdir()):  # a checkpoints directory (step-N.ckpt, step=N.ckpt)
            return False
        return any((p / n).exists() for n in (*WEIGHT_FILES, *CONFIG_FILES)) or any(p.glob("*.safetensors"))
    if not p.is_file():
        return False
    if p.suffix == ".safetensors":
        return True
    if p.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        from glmtrain.checkpointing import CKPT_RE
        from glmtrain.convert.files import safe_torch_load

        if CKPT_RE.match(p.name):
            return False  # glmtrain's own step-N.ckpt
        try:
            obj, _ = safe_torch_load(p)
        except ConvertError:
            return False  # glmtrain's own loader reports the problem
        return not (isinstance(obj, dict) and "glmtrain" in obj)
    return False



# ----------------------------------------------------------------------------- building from a release
def build_imported_model(imp: Imported, dtype: torch.dtype = torch.float32):
    """A glmtrain model built from the release alone (config from its files), weights loaded.

    Returns (model, model config, tokenizer config dict, recomputed buffer names)."""
    from glmtrain.models import build_model, config_class
    from glmtrain.tokenizers import TokenizerConfig, build_tokenizer

    cls = config_class(imp.family)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {**imp.settings, **imp.config}
    tok_cfg = TokenizerConfig(**{**dataclasses.asdict(cls().tokenizer), **values.pop("tokenizer", {}), **imp.tokenizer})
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConvertError(f"{imp.layout}: config keys {unknown} are not fields of the {imp.family} config")
    cfg = cls(**values, tokenizer=tok_cfg)
    tok = build_tokenizer(dataclasses.asdict(tok_cfg))
    model = build_model(cfg, tok.vocab_size)
    state, recomputed = fit(imp, model)
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval(), cfg, tok_cfg, recomputed
