"""Released HyenaDNA checkpoints (``LongSafari/hyenadna-*``) -> glmtrain's HyenaDNA.

Two layouts of the same standalone model (``standalone_hyenadna.py``):

* ``hyenadna``: the Lightning ``weights.ckpt`` of the ``*-seqlen`` repositories, ``state_dict`` names
  ``model.backbone.*`` (+ ``model.lm_head.weight``); checkpoints trained with checkpoint_mixer spell
  ``.mixer.layer.`` / ``.mlp.layer.``; the bare standalone model has ``backbone.*``.  Config: the
  original ``config.json`` (``layer: {l_max, emb_dim, filter_order, local_order, ...}``).
* ``hyenadna-hf``: the ``*-seqlen-hf`` repositories (``model.safetensors`` or ``pytorch_model.bin``,
  ``hyena.backbone.*`` + ``lm_head.weight``; the three copies of the shared Sin frequency may be
  stored once).  Config: the ``hyenadna`` ``config.json`` (``max_seq_len``, ``emb_dim``, ...).

What the importer does beyond renaming:

* ``in_proj`` [3d, d] and ``short_filter`` [3d, 1, 3] are stored chunked -- rows [x0; x1; v], each
  [d] (post-gate, pre-gate, value); glmtrain's layout is channel-interleaved (row 3c + j = component j
  of channel c, ``layers.split_interleaved``): the rows are interleaved;
* the implicit filter's ``Sequential`` (Linear, Sin, Linear, Sin, ..., Linear) becomes ``mlp.*`` +
  ``out``; the Sin frequency is one shared parameter (stored copies checked equal);
* the per-layer positional buffers ``pos_emb.z`` / ``pos_emb.t`` are dropped after checking them
  against glmtrain's own features (computed for the released ``l_max``): glmtrain recomputes them;
* the modulation shift: the released configs carry none, so the standalone/HF code's default 0.05
  applies -- recorded in the imported config (``modulation_shift``) and checked on ``init_from``;
* the tied LM head (stored separately) is checked equal to the embedding;
* the official tokenizer's conventions are recorded: ``[CLS]`` first, ``[SEP]`` last, anything but
  ``A C G T N`` (lowercase included) -> ``[UNK]``.
"""

from __future__ import annotations

import re

import torch

from glmtrain.convert import ConvertError, Imported, Layout, Released, Taker, register_layout

STANDALONE_SHIFT = 0.05  # ExponentialModulation's default in standalone_hyenadna.py and the HF port
FEATURE_TOL = 1e-5  # |stored - recomputed| positional features (fp32 rounding of the same formula: ~1e-7)
OFFICIAL_TOKENIZER = {"kind": "char", "add_cls": True, "add_sep": True, "lowercase": "unk", "iupac": "unk", "unknown": "unk"}
PREFIXES = {"hyenadna": ("model.backbone.", "backbone."), "hyenadna-hf": ("hyena.backbone.",)}


def _interleave(w: torch.Tensor) -> torch.Tensor:
    """[3d, ...] rows chunked [x0; x1; v] -> channel-interleaved (row 3c + j = chunk j, row c)."""
    return w.reshape(3, w.shape[0] // 3, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


FUSED = ("mixer.in_proj", "mixer.short_filter")  # the fused d -> 3d tensors, re-ordered


def _prefix(src: Released, layout: str) -> str | None:
    for p in PREFIXES[layout]:
        if f"{p}embeddings.word_embeddings.weight" in src.tensors:
            return p
    return None


def _normalise_names(src: Released) -> None:
    """Checkpoints trained with checkpoint_mixer insert ``.layer`` after ``.mixer`` / ``.mlp``."""
    renamed = {re.sub(r"\.(mixer|mlp)\.layer\.", r".\1.", k): v for k, v in src.tensors.items()}
    if len(renamed) == len(src.tensors):
        src.tensors = renamed


def _layer_cfg(config: dict | None) -> tuple[dict, dict]:
    """(top-level, filter-level) settings of either config flavour."""
    if not config:
        return {}, {}
    if isinstance(config.get("layer"), dict):  # original config.json
        return config, config["layer"]
    return config, config  # hyenadna (HF) config.json: flat


def _read(src: Released, layout: str) -> Imported:
    _normalise_names(src)
    pre = _prefix(src, layout)
    tk = Taker(src, layout)
    top, layer = _layer_cfg(src.config)
    order = top.get("hyena_order", layer.get("order", 2))
    if order != 2:
        raise ConvertError(f"{src.weights}: Hyena order {order}; glmtrain's HyenaDNA implements order 2 (the released models)")
    emb = tk.take(f"{pre}embeddings.word_embeddings.weight")
    tk.put("embed.weight", emb)
    tk.put("lm_head.weight", emb)
    layers = sorted({int(m.group(1)) for k in src.tensors if (m := re.match(re.escape(pre) + r"layers\.(\d+)\.", k))})
    if layers != list(range(len(layers))) or not layers:
        raise ConvertError(f"{src.weights}: layer indices {layers[:5]} are not 0..n-1")
    first = f"{pre}layers.0.mixer.filter_fn."
    lin = sorted({int(m.group(1)) for k in src.tensors
                  if (m := re.match(re.escape(first) + r"implicit_filter\.(\d+)\.weight$", k))})
    if len(lin) < 2 or lin != list(range(0, 2 * len(lin), 2)):
        raise ConvertError(f"{src.weights}: implicit filter layers {lin} are not Linear/Sin pairs ending in a Linear")
    w0 = tk.get(f"{first}implicit_filter.0.weight")
    l_max = int(layer.get("l_max", top.get("max_seq_len", 0)) or 0)
    z_key = f"{first}pos_emb.z"
    if tk.has(z_key):
        stored_len = tk.get(z_key).shape[1]
        if l_max and l_max != stored_len:
            raise ConvertError(f"{src.weights}: pos_emb.z covers {stored_len} positions but the config says l_max {l_max}")
        l_max = stored_len
    if not l_max:
        raise ConvertError(f"{src.weights}: no l_max in {src.config_path or 'a config next to it'} and no pos_emb.z to read it from")
    d = emb.shape[1]
    config = {
        "d_model": d,
        "n_layers": len(layers),
        "d_inner": tk.get(f"{pre}layers.0.mlp.fc1.weight").shape[0],
        "short_filter_order": tk.get(f"{pre}layers.0.mixer.short_filter.weight").shape[-1],
        "filter_order": w0.shape[0],
        "emb_dim": w0.shape[1],
        "num_inner_mlps": len(lin) - 2,
        "max_seq_len": l_max,
        "modulate": bool(layer.get("modulate", True)),
        "modulation_shift": float(layer.get("shift", STANDALONE_SHIFT)),
        "norm_eps": float(top.get("layer_norm_epsilon", 1e-5)),
    }
    if config["modulate"]:
        config.update(decay_fast=float(layer.get("fast_decay_pct", 0.3)), decay_slow=float(layer.get("slow_decay_pct", 1.5)),
                      decay_target=float(layer.get("target", 1e-2)))
    settings = {
        "name": f"hyenadna-import-{d}x{len(layers)}",
        "filter_w": float(layer.get("w", top.get("activation_freq", 10.0))),
        "train_freq": bool(top.get("train_freq", layer.get("train_freq", True))),
        "embed_dropout": float(top.get("embed_dropout", 0.1)),
        "resid_dropout": float(top.get("resid_dropout", 0.0)),
    }
    from glmtrain.models.hyena import band_frequencies, positional_features

    z_ref, t_ref = positional_features(0, l_max, l_max, band_frequencies(config["emb_dim"]))
    worst = 0.0
    for i in layers:
        s, g = f"{pre}layers.{i}.", f"blocks.{i}."
        for a, b in (("norm1", "norm1"), ("norm2", "norm2"), ("mixer.in_proj", "mixer.in_proj"),
                     ("mixer.out_proj", "mixer.out_proj"), ("mixer.short_filter", "mixer.short_conv"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for p in ("weight", "bias"):
                t = tk.take(f"{s}{a}.{p}")
                tk.put(f"{g}{b}.{p}", _interleave(t) if a in FUSED else t, f"{s}{a}.{p}")
        f, gf = f"{s}mixer.filter_fn.", f"{g}mixer.filter."
        tk.put(f"{gf}bias", tk.take(f"{f}bias"), f"{f}bias")
        for j, idx in enumerate(lin[:-1]):
            for p in ("weight", "bias"):
                tk.put(f"{gf}mlp.{j}.{p}", tk.take(f"{f}implicit_filter.{idx}.{p}"), f"{f}implicit_filter.{idx}.{p}")
        tk.put(f"{gf}out.weight", tk.take(f"{f}implicit_filter.{lin[-1]}.weight"), f"{f}implicit_filter.{lin[-1]}.weight")
        freqs = [f"{f}implicit_filter.{idx + 1}.freq" for idx in lin[:-1] if tk.has(f"{f}implicit_filter.{idx + 1}.freq")]
        if not freqs:
            raise ConvertError(f"{src.weights}: no Sin frequency stored for layer {i} (implicit_filter.1.freq)")
        freq = tk.take(freqs[0])
        tk.put(f"{gf}act.freq", freq, freqs[0])
        for other in freqs[1:]:
            tk.drop_equal(other, freq, "the Sin frequency the filter MLP shares")
        if config["modulate"]:
            tk.put(f"{gf}deltas", tk.take(f"{f}modulation.deltas").reshape(-1), f"{f}modulation.deltas")
        for name, ref in ((f"{f}pos_emb.z", z_ref), (f"{f}pos_emb.t", t_ref)):
            if not tk.has(name):
                continue
            stored = tk.take(name).reshape(ref.shape).float()
            diff = (stored - ref).abs().max().item()
            if diff > FEATURE_TOL:
                raise ConvertError(f"{src.weights}: {name} differs from the positional features glmtrain computes for "
                                   f"l_max {l_max} by {diff:.2e} (trained positional features are not supported)")
            worst = max(worst, diff)
            tk.dropped.append((name, f"positional features, equal to glmtrain's recomputed ones within {FEATURE_TOL:g}"))
    for a, b in (("ln_f.weight", "norm_f.weight"), ("ln_f.bias", "norm_f.bias")):
        tk.put(b, tk.take(f"{pre}{a}"), f"{pre}{a}")
    head = "lm_head.weight" if layout == "hyenadna-hf" else pre.replace("backbone.", "lm_head.weight")
    if tk.has(head):
        tk.drop_equal(head, emb, "the word embedding (tied LM head)")
    notes = [f"modulation shift {config['modulation_shift']:g}"
             + (" (the released config has no shift: the standalone/HF code's default)" if "shift" not in layer else ""),
             "scores sequences as published with model.tokenizer.add_cls=true add_sep=true lowercase=unk iupac=unk unknown=unk"]
    if worst:
        notes.append(f"positional features: max |stored - recomputed| = {worst:.1e}")
    if top.get("residual_in_fp32") is False:
        notes.append("residual_in_fp32=false in the release; glmtrain keeps the residual stream in (at least) fp32")
    return tk.finish(family="hyena", config=config, settings=settings, tokenizer=dict(OFFICIAL_TOKENIZER),
                     recompute=("blocks.*.mixer.filter.band_freqs",), notes=notes)


def _layout(name: str, description: str) -> Layout:
    return Layout(name, "hyena", match=lambda src: _prefix(src, name) is not None,
                  read=lambda src: _read(src, name), description=description)


register_layout(_layout("hyenadna", "HyenaDNA Lightning weights.ckpt / standalone state_dict (model.backbone.*)"))
register_layout(_layout("hyenadna-hf", "HyenaDNA -hf repositories (hyena.backbone.*)"))

__all__ = ["OFFICIAL_TOKENIZER", "STANDALONE_SHIFT"]
