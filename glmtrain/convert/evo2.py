"""Released Evo 2 checkpoints (vortex / savanna-converted layout) -> glmtrain's Evo 2.

vortex stores (``StripedHyena.state_dict()`` names, ``configs/evo2-*.yml`` next to it):

* Hyena blocks: ``projections.weight`` [3d, d] and ``filter.short_filter_weight`` [3d, 1, 3] are
  channel-interleaved -- rows 3j, 3j+1, 3j+2 feed channel j of x2 (output gate), x1 (pre-gate) and v --
  which is glmtrain's own (tensor-parallel-native) layout of post, pre, v: taken as they are;
* Hyena-SE ``filter.h`` [G, 1, 7] is applied as a cross-correlation (tap 6 multiplies the current
  token), glmtrain's explicit filters as a convolution (tap 0): the taps are reversed;
* Hyena-MR ``filter.h`` [G, 1, 128] already contains its decay window (savanna's converter stores
  ``h * decay``): it is taken as the effective filter and no decay is applied again (the model's
  ``window`` buffer, if it has one, is set to ones);
* Hyena-LI ``filter.log_poles`` [d, 16, 1] stores log p: kept as it is (``li_poles: log_pole``, what a
  model built from the release uses), or mapped to ``log_rate = log(-log p)`` for a model that trains
  with savanna's parametrisation p = exp(-exp(log_rate)) (``li_poles: log_rate``, rounded to the
  parameter dtype: ~1e-7 relative in fp32); every stored pole must lie in (0, 1);
* attention ``Wqkv.weight`` is head-interleaved ([head, (q, k, v), head_dim] rows, ``column_split``),
  glmtrain's head-major fused qkv layout: taken as it is; the stored RoPE frequencies ``rotary_emb.inv_freq`` are kept as
  they are (``rope_freqs: stored``);
* ``unembed.weight`` (a copy of the embedding written by savanna's converter) is ignored, as vortex
  ignores it; Transformer Engine ``*._extra_state`` entries (FP8 metadata) and leftover ``filter.t``
  grids are dropped.

The vortex config fixes the checked glmtrain fields: RMSNorm formula ``vortex``
(y = scale * x / (rms + eps)), the block pattern from the ``hcs/hcm/hcl/attn_layer_idxs`` lists, filter
lengths and groups (LI: one filter per channel, whatever ``hcl_filter_groups`` says), MLP width, the
layer-0-only GELU (``evo2_style_activations``), biases, and RoPE interpolation.
"""

from __future__ import annotations

import math
import re

import torch

from glmtrain.convert import ConvertError, Imported, Layout, Released, Taker, register_layout

KIND_KEYS = {"hcs_layer_idxs": "S", "hcm_layer_idxs": "D", "hcl_layer_idxs": "H", "attn_layer_idxs": "*"}
SUPPORTED_FLAGS = {"interleave": True, "column_split": True, "column_split_hyena": False, "hyena_flip_x1x2": False,
                   "final_norm": True, "proj_groups": 1, "hyena_filter_groups": 1}


def _match(src: Released) -> bool:
    return "embedding_layer.weight" in src.tensors and any(k.startswith("blocks.0.") for k in src.tensors)


def _move(tk: Taker, ours: str, weight: str, bias: str) -> bool:
    """A released weight (and its bias, where stored) -> ``ours.weight`` / ``ours.bias``; True if it has a bias."""
    tk.put(f"{ours}.weight", tk.take(weight), weight)
    if tk.has(bias):
        tk.put(f"{ours}.bias", tk.take(bias), bias)
    return tk.has(bias)


def _pattern(src: Released, n: int) -> str:
    cfg = src.config or {}
    if all(k in cfg for k in KIND_KEYS):
        kinds = ["?"] * n
        for key, c in KIND_KEYS.items():
            for i in cfg[key]:
                if not 0 <= i < n or kinds[i] != "?":
                    raise ConvertError(f"{src.config_path}: {key} lists block {i} twice or out of range 0..{n - 1}")
                kinds[i] = c
        if "?" in kinds:
            raise ConvertError(f"{src.config_path}: block {kinds.index('?')} is in none of {', '.join(KIND_KEYS)}")
        return "".join(kinds)
    out = []  # no config: infer each block's kind from its tensors
    for i in range(n):
        p = f"blocks.{i}."
        if f"{p}inner_mha_cls.Wqkv.weight" in src.tensors:
            out.append("*")
        elif f"{p}filter.log_poles" in src.tensors:
            out.append("H")
        elif f"{p}filter.h" in src.tensors:
            out.append("D" if f"{p}filter.D" in src.tensors else "S")
        else:
            raise ConvertError(f"{src.weights}: block {i} is neither Hyena (filter.*) nor attention (inner_mha_cls.*)")
    return "".join(out)


def _read(src: Released) -> Imported:
    tk = Taker(src, "evo2-vortex")
    cfg = src.config or {}
    notes = [] if src.config else [f"no vortex config next to {src.weights.name} (give --config): shapes and block kinds "
                                   "read from the tensors; eps, activations and RoPE interpolation taken from the model config"]
    for key, want in SUPPORTED_FLAGS.items():
        if key in cfg and cfg[key] != want:
            raise ConvertError(f"{src.config_path}: {key}={cfg[key]!r}; glmtrain imports the released layout ({key}={want!r})")
    for k in list(tk.left):
        if k.endswith("._extra_state"):
            tk.drop(k, "Transformer Engine FP8 metadata (_extra_state)")
        elif re.match(r"^blocks\.\d+\..*filter\.t$", k):
            tk.drop(k, "leftover filter time grid (unused by vortex)")
    emb = tk.take("embedding_layer.weight")
    vocab, d = emb.shape
    n = 1 + max(int(m.group(1)) for k in src.tensors if (m := re.match(r"blocks\.(\d+)\.", k)))
    pattern = _pattern(src, n)
    tie = bool(cfg.get("tie_embeddings", True))
    tk.put("embed.weight", emb, "embedding_layer.weight")
    if tie:
        tk.put("lm_head.weight", emb)
        if tk.has("unembed.weight"):
            u = tk.take("unembed.weight")
            same = u.shape == emb.shape and torch.equal(u, emb)
            tk.dropped.append(("unembed.weight", "copy of the embedding written by savanna's converter, ignored as vortex "
                               + ("does (checked equal)" if same else "does (it differs from the embedding)")))
    else:
        tk.put("lm_head.weight", tk.take("unembed.weight"), "unembed.weight")
    tk.put("norm_f.weight", tk.take("norm.scale"), "norm.scale")
    heads = int(cfg.get("num_attention_heads", 0))
    mlp_dim = tk.get("blocks.0.mlp.l1.weight").shape[0]
    config = {"d_model": d, "pattern": pattern, "mlp_dim": mlp_dim, "rmsnorm": "vortex", "tie_embeddings": tie}
    # values only the config states: checked when it is there, left to the model config otherwise
    for key, ours, conv in (("eps", "norm_eps", float), ("evo2_style_activations", "mlp_act_first_layer_only", bool),
                            ("mlp_activation", "mlp_activation", str)):
        if key in cfg:
            config[ours] = conv(cfg[key])
    if "inner_mlp_size" in cfg and int(cfg["inner_mlp_size"]) != mlp_dim:
        raise ConvertError(f"{src.weights}: mlp.l1 has {mlp_dim} rows but the config says inner_mlp_size {cfg['inner_mlp_size']}")
    optional: set[str] = set()
    alternatives: dict = {}
    stored_freqs = None
    for i, kind in enumerate(pattern):
        s, g = f"blocks.{i}.", f"blocks.{i}."
        tk.put(f"{g}norm1.weight", tk.take(f"{s}pre_norm.scale"), f"{s}pre_norm.scale")
        tk.put(f"{g}norm2.weight", tk.take(f"{s}post_norm.scale"), f"{s}post_norm.scale")
        for a, b in (("l1", "gate"), ("l2", "up"), ("l3", "down")):
            tk.put(f"{g}mlp.{b}.weight", tk.take(f"{s}mlp.{a}.weight"), f"{s}mlp.{a}.weight")
        if kind == "*":
            a = f"{s}inner_mha_cls."
            freqs = tk.take(f"{a}rotary_emb.inv_freq")
            hd = 2 * freqs.numel()
            heads = heads or d // hd
            if heads * hd != d:
                raise ConvertError(f"{src.weights}: {a}rotary_emb.inv_freq implies head_dim {hd}, which with "
                                   f"{heads} heads does not give d_model {d}")
            config["qkv_bias"] = _move(tk, f"{g}mixer.qkv", f"{a}Wqkv.weight", f"{a}Wqkv.bias")
            config["attn_out_bias"] = _move(tk, f"{g}mixer.out", f"{a}out_proj.weight", f"{a}out_proj.bias")
            tk.put(f"{g}mixer.rope.freqs", freqs, f"{a}rotary_emb.inv_freq")
            stored_freqs = freqs
            continue
        tk.put(f"{g}mixer.proj.weight", tk.take(f"{s}projections.weight"), f"{s}projections.weight")
        config["short_filter_length"] = tk.get(f"{s}filter.short_filter_weight").shape[-1]
        config["short_filter_bias"] = _move(tk, f"{g}mixer.short_conv", f"{s}filter.short_filter_weight",
                                            f"{s}filter.short_filter_bias")
        config["hyena_out_bias"] = _move(tk, f"{g}mixer.out", f"{s}out_filter_dense.weight", f"{s}out_filter_dense.bias")
        f, gf = f"{s}filter.", f"{g}mixer.filter."
        if kind in "SD":
            h = tk.take(f"{f}h")
            taps = h.reshape(h.shape[0], -1)
            prefix = "se" if kind == "S" else "mr"
            config[f"{prefix}_filter_groups"], config[f"{prefix}_filter_length"] = taps.shape
            # SE is stored for a cross-correlation (last tap = current token), MR for a convolution (first tap)
            tk.put(f"{gf}h", taps.flip(-1) if kind == "S" else taps, f"{f}h")
        if kind == "D":
            optional.add(f"{gf}window")
            tk.out[f"{gf}window"] = torch.ones(taps.shape, dtype=torch.float32)  # decay already in h
        if kind == "H":
            log_poles = tk.take(f"{f}log_poles")
            lp = log_poles.reshape(log_poles.shape[0], -1).double()
            if not bool((lp < 0).all()):
                raise ConvertError(f"{src.weights}: {f}log_poles has poles outside (0, 1) (max log p {lp.max().item():.3g}); "
                                   "glmtrain's Hyena-LI keeps every mode decaying")
            tk.put(f"{gf}log_poles", log_poles.reshape(lp.shape), f"{f}log_poles")
            alternatives[f"{gf}log_rate"] = (f"{gf}log_poles", lambda t: torch.log(-t.double()).to(t.dtype))
            res = tk.take(f"{f}residues")
            tk.put(f"{gf}residues", res, f"{f}residues")
            config["li_filter_groups"], config["state_size"] = lp.shape
        if kind in "DH":
            tk.put(f"{gf}D", tk.take(f"{f}D"), f"{f}D")
    if "*" in pattern:
        config["n_heads"] = heads
        if cfg:
            factor = float(cfg.get("rotary_emb_scaling_factor", 1.0)) if cfg.get("use_interpolated_rotary_pos_emb") else 1.0
            config["rope_interpolation"] = factor
        config["rope_freqs"] = "stored"
        base = float(cfg.get("rotary_emb_base", 10000.0))
        implied = float(stored_freqs.double()[1] ** (-stored_freqs.numel())) if stored_freqs.numel() > 1 else base
        if not math.isclose(implied, base, rel_tol=1e-3):
            notes.append(f"the stored RoPE frequencies correspond to base {implied:.4g}, the config says {base:g}: "
                         "the stored ones are used")
    if "hcl_filter_groups" in cfg and int(cfg["hcl_filter_groups"]) != config.get("li_filter_groups", d):
        notes.append(f"hcl_filter_groups={cfg['hcl_filter_groups']} ignored: vortex builds one LI filter per channel")
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in src.tensors.values() if isinstance(t, torch.Tensor)})
    if dtypes != ["float32"]:
        notes.append(f"stored as {'/'.join(dtypes)}; loaded into the model's dtype")
    if "D" in pattern:
        notes.append("MR filters include their decay: taken as they are (window off / ones), no decay applied again")
    settings = {"name": f"evo2-import-{d}x{n}", "rope_base": float(cfg.get("rotary_emb_base", 10000.0)),
                "mr_decay": False, "n_layers": n, "li_poles": "log_pole"}
    return tk.finish(family="evo2", config=config, settings=settings, tokenizer={"kind": "byte", "lowercase": "keep"},
                     optional=optional, alternatives=alternatives, notes=notes)


register_layout(Layout("evo2-vortex", "evo2", match=_match, read=_read,
                       description="Evo 2 vortex/savanna state_dict (embedding_layer, blocks.*.filter/inner_mha_cls)"))
