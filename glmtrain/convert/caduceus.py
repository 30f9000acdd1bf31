"""Released Caduceus checkpoints (``kuleshov-group/caduceus-{ps,ph}_*``, Hugging Face layout) -> glmtrain.

The reference ``CaduceusForMaskedLM`` state dict, read from safetensors (nothing unpickled):

====================================================================  =================================
reference name (``caduceus.backbone.`` prefix, or ``backbone.``)       glmtrain name
====================================================================  =================================
``embeddings.word_embeddings.embedding.weight`` (PS) / ``.weight``    ``embed.weight``
``layers.i.mixer[.submodule].mamba_{fwd,rev}.<p>``                    ``blocks.i.mixer.mamba_{fwd,rev}.<p>``
``layers.i.norm[.submodule].weight`` (``.bias`` for LayerNorm)        ``blocks.i.norm.weight``
``norm_f[.submodule].weight``                                         ``norm_f.weight``
``lm_head[.lm_head].weight``                                          ``lm_head.weight`` (tied: checked)
``*.complement_map`` (PS buffers)                                     checked against the tokenizer's
====================================================================  =================================

``.submodule`` appears in PS checkpoints saved with ``fused_add_norm: false`` (RCPS wrappers around
the norms); the released ones (``fused_add_norm: true``) store the plain names.  Tied tensors
(``mamba_rev.in_proj`` / ``out_proj`` = ``mamba_fwd``'s; LM head = embedding) may be stored under
every name (checked equal) or once (Hugging Face drops the duplicates).  The layouts of every
tensor are glmtrain's own (Mamba's parameter names and shapes are kept as published), so the
mapping is a renaming; what must also match is the maths the config selects, in particular the
PS ``fused_add_norm`` half order (see :mod:`glmtrain.models.caduceus`).

API: :func:`read_reference` (names + config), :func:`load_reference` (build the glmtrain model from a
release directory).  When the importer registry of :mod:`glmtrain.convert` is present, the layout
``caduceus-hf`` is registered with it (``python -m glmtrain.convert import caduceus ...`` and
``trainer.init_from``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

PREFIXES = ("caduceus.backbone.", "backbone.")
_LAYER = re.compile(r"layers\.(\d+)\.(mixer|norm)\.(?:submodule\.)?(.+)$")


class CaduceusImportError(ValueError):
    """A Caduceus checkpoint cannot be used; one line naming the file or tensor and what to do."""


def _prefix(tensors: dict[str, Any]) -> str | None:
    for p in PREFIXES:
        if any(k.startswith(f"{p}embeddings.word_embeddings.") for k in tensors):
            return p
    return None


def is_caduceus(tensors: dict[str, Any]) -> bool:
    return _prefix(tensors) is not None and any(".mamba_fwd." in k for k in tensors)


def glm_name(name: str, prefix: str) -> str | None:
    """glmtrain's name for a reference tensor; None for the complement-map buffers; raises for unknown names."""
    if name.endswith("complement_map"):
        return None
    if name in ("lm_head.weight", "lm_head.lm_head.weight"):
        return "lm_head.weight"
    if not name.startswith(prefix):
        raise CaduceusImportError(f"unknown tensor {name} for the Caduceus layout; refusing to ignore it")
    rest = name[len(prefix):]
    if rest in ("embeddings.word_embeddings.weight", "embeddings.word_embeddings.embedding.weight"):
        return "embed.weight"
    m = re.match(r"norm_f\.(?:submodule\.)?(weight|bias)$", rest)
    if m:
        return f"norm_f.{m.group(1)}"
    m = _LAYER.match(rest)
    if m and (m.group(2) == "mixer" and m.group(3).startswith(("mamba_fwd.", "mamba_rev."))
              or m.group(2) == "norm" and m.group(3) in ("weight", "bias")):
        return f"blocks.{m.group(1)}.{m.group(2)}.{m.group(3)}"
    raise CaduceusImportError(f"unknown tensor {name} for the Caduceus layout; refusing to ignore it")


def config_values(ref: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """(values fixing the maths, other settings) of a glmtrain CaduceusConfig from a reference config.json."""
    ssm = dict(ref.get("ssm_cfg") or {})
    d = int(ref["d_model"])
    dt_rank = ssm.get("dt_rank", "auto")
    rcps = bool(ref.get("rcps", False))
    strategy = ref.get("bidirectional_strategy") or "add"
    maths = {
        "d_model": d,
        "n_layers": int(ref["n_layer"]),
        "rcps": rcps,
        "d_state": int(ssm.get("d_state", 16)),
        "d_conv": int(ssm.get("d_conv", 4)),
        "expand": int(ssm.get("expand", 2)),
        "dt_rank": -(-d // 16) if dt_rank == "auto" else int(dt_rank),
        "conv_bias": bool(ssm.get("conv_bias", True)),
        "bias": bool(ssm.get("bias", False)),
        "bidirectional": bool(ref.get("bidirectional", True)),
        "bidirectional_strategy": strategy,
        "bidirectional_weight_tie": bool(ref.get("bidirectional_weight_tie", True)),
        "norm": "rmsnorm" if ref.get("rms_norm", True) else "layernorm",
        "norm_eps": float(ref.get("norm_epsilon", 1e-5)),
        "residual_in_fp32": bool(ref.get("residual_in_fp32", False)),
    }
    if rcps:  # the half order of the fused branch; for Caduceus-Ph both branches compute the same
        maths["fused_add_norm"] = bool(ref.get("fused_add_norm", False))
    init = dict(ref.get("initializer_cfg") or {})
    settings = {
        "name": f"caduceus-{'ps' if rcps else 'ph'}-import-{d}x{maths['n_layers']}",
        "dt_min": float(ssm.get("dt_min", 0.001)), "dt_max": float(ssm.get("dt_max", 0.1)),
        "dt_init": ssm.get("dt_init", "random"), "dt_scale": float(ssm.get("dt_scale", 1.0)),
        "dt_init_floor": float(ssm.get("dt_init_floor", 1e-4)),
        "initializer_range": float(init.get("initializer_range", 0.02)),
        "rescale_prenorm_residual": bool(init.get("rescale_prenorm_residual", True)),
        "n_residuals_per_layer": int(init.get("n_residuals_per_layer", 1)),
    }
    if not rcps:
        settings["fused_add_norm"] = bool(ref.get("fused_add_norm", False))
    return maths, settings


def _check_vocab(ref: dict, comp: torch.Tensor, where: str) -> None:
    """The release's (padded) vocabulary and complement map must be the char tokenizer's."""
    vocab, mult = int(ref.get("vocab_size", len(comp))), int(ref.get("pad_vocab_size_multiple", 1) or 1)
    vocab += (-vocab) % mult
    if vocab != len(comp):
        raise CaduceusImportError(f"{where}: vocabulary of {vocab} ids, but glmtrain's char tokenizer has {len(comp)}")
    cm = ref.get("complement_map")
    if cm is not None:
        theirs = torch.arange(len(comp))
        for k, v in cm.items():
            if int(k) < len(comp):
                theirs[int(k)] = int(v)
        if not torch.equal(theirs, comp):
            raise CaduceusImportError(f"{where}: complement_map {cm} differs from the char tokenizer's "
                                      f"{dict(enumerate(comp.tolist()))}")


def _char_complement() -> torch.Tensor:
    from glmtrain.tokenizers import CharTokenizer, complement_map

    return torch.as_tensor(complement_map(CharTokenizer()))


def read_reference(tensors: dict[str, torch.Tensor], ref_config: dict | None, where: str = "checkpoint"):
    """Rename a reference state dict.  Returns (tensors under glmtrain names, [(reference, glmtrain)]
    mapped, [(reference, why)] dropped, maths config values, settings).  Duplicates of tied tensors
    and the complement-map buffers are checked and dropped; an unknown tensor is refused."""
    prefix = _prefix(tensors)
    if prefix is None:
        raise CaduceusImportError(f"{where}: no Caduceus embedding (caduceus.backbone.embeddings.word_embeddings.*)")
    comp = _char_complement()
    maths, settings = config_values(ref_config) if ref_config else ({}, {})
    if ref_config:
        _check_vocab(ref_config, comp, where)
    out: dict[str, torch.Tensor] = {}
    mapped: list[tuple[str, str]] = []
    dropped: list[tuple[str, str]] = []
    for name, t in tensors.items():
        glm = glm_name(name, prefix)
        if glm is None:
            if not torch.equal(t.long().cpu(), comp):
                raise CaduceusImportError(f"{where}: {name} {t.tolist()} differs from the char tokenizer's complement map")
            dropped.append((name, "complement map, equal to the tokenizer's"))
            continue
        out[glm] = t
        mapped.append((name, glm))
    # tied tensors: one value, duplicates checked equal and dropped
    for dup, canon, what in _tied_names(out):
        if dup in out and canon in out:
            a, b = out[dup], out[canon]
            if a.shape != b.shape or not torch.equal(a, b):
                raise CaduceusImportError(f"{where}: {dup} should equal {canon} ({what}) but differs; "
                                          "glmtrain cannot represent untied copies")
            del out[dup]
            src = next(r for r, g in mapped if g == dup)
            mapped = [(r, g) for r, g in mapped if g != dup]
            dropped.append((src, f"duplicate of {canon} ({what}, checked equal)"))
        elif dup in out:  # only the duplicate stored: it is the value
            out[canon] = out.pop(dup)
            mapped = [(r, canon if g == dup else g) for r, g in mapped]
    if ref_config:
        n_layers = maths["n_layers"]
        found = sorted({int(m.group(1)) for k in out if (m := re.match(r"blocks\.(\d+)\.", k))})
        if found != list(range(n_layers)):
            raise CaduceusImportError(f"{where}: layers {found[:6]} stored, the config says n_layer={n_layers}")
    return out, mapped, dropped, maths, settings


def _tied_names(names) -> list[tuple[str, str, str]]:
    """(duplicate, canonical, what) for every tied pair a Caduceus state dict may hold."""
    out = [("lm_head.weight", "embed.weight", "tied LM head")]
    layers = sorted({int(m.group(1)) for k in names if (m := re.match(r"blocks\.(\d+)\.", k))})
    for i in layers:
        for p in ("in_proj.weight", "in_proj.bias", "out_proj.weight", "out_proj.bias"):
            out.append((f"blocks.{i}.mixer.mamba_rev.{p}", f"blocks.{i}.mixer.mamba_fwd.{p}", "shared in/out projection"))
    return out


def _fill_tied(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state dict for ``model``: tied entries take their canonical tensor's value."""
    full = dict(state)
    own = model.state_dict()
    for dup, canon, _ in _tied_names(own):
        if dup in own and canon in full:
            full[dup] = full[canon]
    return full


def read_files(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None, Path]:
    """(tensors, config.json or None, weights file) of a release directory or a .safetensors file."""
    from safetensors.torch import load_file

    p = Path(path)
    weights = p / "model.safetensors" if p.is_dir() else p
    if not weights.is_file():
        raise CaduceusImportError(f"{p}: no model.safetensors (the Caduceus release format)")
    cfg_path = weights.parent / "config.json"
    ref = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
    return load_file(str(weights)), ref, weights


def load_reference(path: str | Path, dtype: torch.dtype = torch.float32, **overrides):
    """Build glmtrain's Caduceus from a release directory (config.json + model.safetensors).

    ``overrides`` replace config fields (e.g. ``fused_add_norm=True``, ``scan_impl="sequential"``).
    Returns (model in eval mode, {"mapped": [...], "dropped": [...]})."""
    from glmtrain.models import build_model
    from glmtrain.models.caduceus import CaduceusConfig

    tensors, ref, weights = read_files(path)
    if ref is None:
        raise CaduceusImportError(f"{weights.parent}: no config.json next to {weights.name}; the shape comes from it")
    state, mapped, dropped, maths, settings = read_reference(tensors, ref, str(weights))
    cfg = CaduceusConfig(**{**settings, **maths, **overrides})
    model = build_model(cfg, len(_char_complement()))
    own = model.state_dict()
    full = _fill_tied(model, state)
    missing = sorted(set(own) - set(full))
    if missing:
        raise CaduceusImportError(f"{weights}: the model needs {missing[0]}"
                                  f"{f' (+{len(missing) - 1} more)' if len(missing) > 1 else ''}, which the checkpoint lacks")
    for k, v in full.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CaduceusImportError(f"{weights}: {k} has shape {list(v.shape)}, the model {list(own[k].shape)}")
    model.load_state_dict(full, strict=True)
    return model.to(dtype).eval(), {"mapped": mapped, "dropped": dropped, "config": dataclasses.asdict(cfg)}


# ----------------------------------------------------------------------------- importer registry (issue 12)
def _register() -> None:
    try:
        from glmtrain.convert import Exporter, Layout, Taker, register_exporter, register_layout  # type: ignore[attr-defined]
    except ImportError:  # the registry is not part of this checkout
        return

    def read(src):
        state, mapped, dropped, maths, settings = read_reference(dict(src.tensors), src.config, str(src.weights))
        tk = Taker(src, "caduceus-hf")
        tk.left.clear()  # read_reference accounted for every tensor (or refused)
        for name, glm in mapped:
            tk.put(glm, state[glm], name)
        tk.dropped.extend(dropped)
        for dup, canon, _ in _tied_names(state):
            if canon in state:
                tk.out[dup] = state[canon]  # the model's tied entries (one parameter)
        return tk.finish(family="caduceus", config=maths, settings=settings, tokenizer={"kind": "char"})

    register_layout(Layout("caduceus-hf", "caduceus", match=lambda src: is_caduceus(src.tensors), read=read,
                           description="Caduceus-PS/Ph Hugging Face repositories (caduceus.backbone.*)"))
    register_exporter(Exporter("caduceus", write=write_export))


def write_export(model, out: Path, tok_cfg) -> dict:
    """glmtrain's remote-code export (``AutoModelForMaskedLM``: Caduceus is bidirectional), plus the tokenizer's
    complement map in config.json (``complement_map``; glmtrain derives it, so no tensor holds it)."""
    from glmtrain.convert.hf import write_remote_code

    return write_remote_code(model, out, tok_cfg, extra_config={"complement_map": model.complement.tolist()})


_register()

__all__ = ["CaduceusImportError", "config_values", "glm_name", "is_caduceus", "load_reference", "read_files",
           "read_reference"]
