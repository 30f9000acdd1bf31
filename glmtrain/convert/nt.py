"""Nucleotide Transformer (v1 and v2) / ESM weights <-> glmtrain.

Two layouts of the Transformer family convert, both the Hugging Face ``esm`` layout:

* **NT-v1 / ESM** (``model=nt_v1``): pre-LN encoder, learned absolute (``model.position=learned``) or rotary
  positions, exact-GELU MLP with biases, ESM MLM head (dense -> GELU -> LayerNorm -> decoder + bias),
  optional token dropout -- exactly what ``transformers.EsmForMaskedLM`` implements.
* **NT-v2** (``model=nt_v2*``): the same, with rotary positions and a gated MLP without biases
  (``model.mlp=swiglu``, ``mlp_bias=false``).  The released NT-v2 repositories (InstaDeepAI
  ``nucleotide-transformer-v2-*``) store it with ESM's names, config ``add_bias_fnn: false``, and a GLU
  in ``intermediate.dense``: one Linear ``d -> 2 * ffn`` whose output is split in halves,
  ``silu(first) * second``.  ``transformers``' own ``EsmIntermediate`` (Linear + GELU, with bias) cannot
  run it (the repositories ship their own ``modeling_esm.py``; glmtrain never executes downloaded code),
  so for NT-v2 these functions map state dicts and write / read the directory layout, and
  :func:`esm_config` (an ``EsmForMaskedLM`` config) refuses it.

Key correspondence (layer i):

===========================================================  ==========================================
``esm.embeddings.word_embeddings``                           ``embed`` (first ``n_tokens`` rows)
``esm.embeddings.position_embeddings`` rows ``pad+1+p``      ``pos_embed`` row ``p`` (learned positions;
                                                             ESM numbers real tokens from ``pad + 1``)
``esm.encoder.layer.i.attention.self.{query,key,value}``     ``blocks.i.attn.qkv`` (head-major: q, k, v of head 0,
                                                             then of head 1, ...)
``esm.encoder.layer.i.attention.output.dense``               ``blocks.i.attn.out``
``esm.encoder.layer.i.attention.LayerNorm``                  ``blocks.i.norm1``
``esm.encoder.layer.i.LayerNorm``                            ``blocks.i.norm2``
``esm.encoder.layer.i.{intermediate,output}.dense``          GELU MLP: ``blocks.i.mlp.{fc1,fc2}``;
                                                             NT-v2: ``intermediate.dense`` rows
                                                             ``[:ffn]`` = ``mlp.gate``, ``[ffn:]`` =
                                                             ``mlp.up``; ``output.dense`` = ``mlp.down``
``esm.encoder.emb_layer_norm_after``                         ``norm_f``
``lm_head.{dense,layer_norm}``, ``lm_head.decoder``/``bias``  ``head_dense``, ``head_norm``, ``lm_head``
===========================================================  ==========================================

Tensors with no glmtrain counterpart, dropped on import (:data:`DROPPED`) and written as zeros on
export: ``esm.contact_head.*`` (contact prediction from attention maps) and, for rotary models, the
absolute position table ``esm.embeddings.position_embeddings`` that older ``transformers`` versions
created unconditionally (NT-v2's checkpoints hold 2,050 unused rows); rotary ``inv_freq`` and
``position_ids`` buffers are recomputed.  Any other tensor is refused with one line naming it, and so is
a missing one.

The functions take plain state dicts (the ``model.`` prefix of a LightningModule checkpoint stripped):
:func:`esm_to_glmtrain`, :func:`glmtrain_to_esm`, :func:`esm_config`, :func:`model_config_from_esm`,
:func:`export_nt`, :func:`import_nt`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from glmtrain.models.transformer import TransformerConfig


class ConversionError(ValueError):
    """A model that the ESM layout cannot hold, or a checkpoint that is not one (one line)."""


#: tensors of an ESM / NT checkpoint with no glmtrain counterpart (dropped on import, see the module doc)
DROPPED = ("esm.contact_head.", "inv_freq", "position_ids")


def is_nt_v2(cfg: TransformerConfig) -> bool:
    """Whether ``cfg`` is the NT-v2 layout (gated MLP without biases) rather than NT-v1 / EsmForMaskedLM."""
    return cfg.mlp == "swiglu"


def _check(cfg: TransformerConfig, hf_class: bool = False) -> None:
    """One line listing everything of ``cfg`` that the ESM layout cannot hold (``hf_class``: must also be
    runnable by ``transformers.EsmForMaskedLM`` itself, which NT-v2's gated MLP is not)."""
    problems = []
    if cfg.family != "transformer":
        problems.append(f"model.family={cfg.family!r} (needs transformer)")
    if cfg.mlp not in ("gelu", "swiglu") or (hf_class and cfg.mlp != "gelu"):
        problems.append(f"model.mlp={cfg.mlp!r}: EsmForMaskedLM's MLP is Linear + GELU (NT-v2's gated MLP needs "
                        "NT's own modeling code, which glmtrain does not execute)" if hf_class else
                        f"model.mlp={cfg.mlp!r} (ESM: gelu; NT-v2: swiglu)")
    for key, want in (("causal", False), ("norm", "layernorm"), ("norm_position", "pre"), ("embed_norm", False),
                      ("head", "mlm"), ("gelu", "exact")):
        if getattr(cfg, key) != want:
            problems.append(f"model.{key}={getattr(cfg, key)!r} (ESM: {want!r})")
    if cfg.position not in ("learned", "rope"):
        problems.append(f"model.position={cfg.position!r} (ESM: learned or rope)")
    if cfg.position == "rope" and cfg.rope_interpolation != 1.0:
        problems.append("model.rope_interpolation (ESM has none)")
    attn, mlp, out = cfg.biases()
    if not attn or (mlp, out) != ((False, False) if cfg.mlp == "swiglu" else (True, True)):
        problems.append("biases: ESM has them everywhere, NT-v2 everywhere but in its gated MLP (mlp_bias=false)")
    if problems:
        raise ConversionError("cannot express this model in the ESM / Nucleotide Transformer layout: " + "; ".join(problems))


def esm_config(cfg: TransformerConfig, n_tokens: int, pad_id: int = 1, mask_id: int = 2, hf_class: bool = True):
    """The ``transformers.EsmConfig`` of a glmtrain NT / ESM config (``n_tokens``: the vocabulary).  With
    ``hf_class=False`` an NT-v2 config is allowed too; it then carries NT's ``add_bias_fnn: false``, which
    only NT's own modeling code reads (``EsmForMaskedLM`` would build a GELU MLP from it)."""
    from transformers import EsmConfig

    _check(cfg, hf_class)
    learned = cfg.position == "learned"
    extra = {"add_bias_fnn": False} if is_nt_v2(cfg) else {}
    return EsmConfig(
        vocab_size=n_tokens, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.resolved_ffn_dim(), hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout if cfg.attn_dropout is None else cfg.attn_dropout,
        max_position_embeddings=(cfg.max_seq_len + pad_id + 1) if learned else max(cfg.max_seq_len, 1024) + 2,
        position_embedding_type="absolute" if learned else "rotary", rope_theta=cfg.rope_base,
        layer_norm_eps=cfg.norm_eps, pad_token_id=pad_id, mask_token_id=mask_id, token_dropout=cfg.token_dropout,
        emb_layer_norm_before=False, tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
        architectures=["EsmForMaskedLM"], **extra,
    )


def model_config_from_esm(hf: Any, name: str = "esm-import", tokenizer: dict | None = None) -> TransformerConfig:
    """A glmtrain config holding an ESM / NT checkpoint (``hf``: its ``EsmConfig`` or config.json dict).  A
    config with ``add_bias_fnn`` (NT-v2's key) is the NT-v2 layout: gated MLP, its biases per that key."""
    get = (lambda k, d=None: hf.get(k, d)) if isinstance(hf, dict) else (lambda k, d=None: getattr(hf, k, d))
    if get("emb_layer_norm_before"):
        raise ConversionError("emb_layer_norm_before=true (ESM-1b style) is not supported")
    if get("is_decoder"):
        raise ConversionError("is_decoder=true: not an ESM encoder")
    pos = get("position_embedding_type", "absolute")
    if pos not in ("absolute", "rotary"):
        raise ConversionError(f"position_embedding_type={pos!r}: allowed absolute, rotary")
    nt_v2 = get("add_bias_fnn") is not None
    if nt_v2 and get("add_bias_fnn"):
        raise ConversionError("add_bias_fnn=true: a gated MLP with biases is no released NT-v2 layout")
    pad = int(get("pad_token_id", 1))
    from glmtrain.tokenizers import TokenizerConfig

    return TransformerConfig(
        name=name, d_model=get("hidden_size"), n_layers=get("num_hidden_layers"), n_heads=get("num_attention_heads"),
        ffn_dim=get("intermediate_size"), causal=False, norm="layernorm", norm_eps=get("layer_norm_eps", 1e-12),
        norm_position="pre", mlp="swiglu" if nt_v2 else "gelu", gelu="exact", bias=True,
        mlp_bias=False if nt_v2 else None, dropout=0.0,
        position="learned" if pos == "absolute" else "rope", rope_base=float(get("rope_theta", 10000.0)),
        max_seq_len=(get("max_position_embeddings") - pad - 1) if pos == "absolute" else 0,
        tie_embeddings=bool(get("tie_word_embeddings", False)), head="mlm", token_dropout=bool(get("token_dropout", False)),
        mask_token_id=int(get("mask_token_id", 2)),
        tokenizer=TokenizerConfig(**(tokenizer or {"kind": "kmer", "k": 6, "add_cls": True})),
    )


def _layer_map(i: int, nt_v2: bool) -> list[tuple[str, str]]:
    """(ESM name, glmtrain name) of layer ``i``'s tensors that map one to one."""
    e, g = f"esm.encoder.layer.{i}.", f"blocks.{i}."
    pairs = [("attention.output.dense", "attn.out"), ("attention.LayerNorm", "norm1"), ("LayerNorm", "norm2")]
    out = [(e + a + s, g + b + s) for a, b in pairs for s in (".weight", ".bias")]
    if nt_v2:
        return out + [(e + "output.dense.weight", g + "mlp.down.weight")]
    return out + [(e + a + s, g + b + s) for a, b in (("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"))
                  for s in (".weight", ".bias")]


def _top_map() -> list[tuple[str, str]]:
    return [("esm.encoder.emb_layer_norm_after.weight", "norm_f.weight"), ("esm.encoder.emb_layer_norm_after.bias", "norm_f.bias"),
            ("lm_head.dense.weight", "head_dense.weight"), ("lm_head.dense.bias", "head_dense.bias"),
            ("lm_head.layer_norm.weight", "head_norm.weight"), ("lm_head.layer_norm.bias", "head_norm.bias")]


def _rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """First ``rows`` rows of ``t``, zero rows appended where ``t`` is shorter (padded embedding rows)."""
    if t.shape[0] >= rows:
        return t[:rows].clone()
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def glmtrain_to_esm(cfg: TransformerConfig, state: dict[str, torch.Tensor], n_tokens: int, pad_id: int = 1) -> dict[str, torch.Tensor]:
    """glmtrain Transformer state dict -> ESM / NT state dict (embedding rows cut to ``n_tokens``)."""
    _check(cfg)
    d, h, nt_v2 = cfg.d_model, cfg.n_heads, is_nt_v2(cfg)
    out: dict[str, torch.Tensor] = {"esm.embeddings.word_embeddings.weight": _rows(state["embed.weight"], n_tokens)}
    if cfg.position == "learned":
        pos = state["pos_embed.weight"]
        out["esm.embeddings.position_embeddings.weight"] = torch.cat([pos.new_zeros(pad_id + 1, d), pos])
    for i in range(cfg.n_layers):
        # glmtrain's fused qkv is head-major (rows h * 3 * head_dim + j * head_dim + r); ESM's q, k, v are separate
        qkv_w = state[f"blocks.{i}.attn.qkv.weight"].view(h, 3, d // h, d)
        qkv_b = state[f"blocks.{i}.attn.qkv.bias"].view(h, 3, d // h)
        for j, name in enumerate(("query", "key", "value")):
            out[f"esm.encoder.layer.{i}.attention.self.{name}.weight"] = qkv_w[:, j].reshape(d, d).clone()
            out[f"esm.encoder.layer.{i}.attention.self.{name}.bias"] = qkv_b[:, j].reshape(d).clone()
        if nt_v2:  # NT's GLU: silu of the first half times the second half
            out[f"esm.encoder.layer.{i}.intermediate.dense.weight"] = torch.cat(
                [state[f"blocks.{i}.mlp.gate.weight"], state[f"blocks.{i}.mlp.up.weight"]])
        for hk, gk in _layer_map(i, nt_v2):
            out[hk] = state[gk].clone()
    for hk, gk in _top_map():
        out[hk] = state[gk].clone()
    out["lm_head.decoder.weight"] = _rows(state["lm_head.weight"], n_tokens)
    out["lm_head.bias"] = _rows(state["lm_head.bias"], n_tokens)
    heads = cfg.n_layers * cfg.n_heads
    out["esm.contact_head.regression.weight"] = torch.zeros(1, heads, dtype=out["lm_head.bias"].dtype)
    out["esm.contact_head.regression.bias"] = torch.zeros(1, dtype=out["lm_head.bias"].dtype)
    return out


def esm_to_glmtrain(hf_state: dict[str, torch.Tensor], cfg: TransformerConfig, vocab_rows: int, pad_id: int = 1) -> dict[str, torch.Tensor]:
    """ESM / NT state dict -> glmtrain Transformer state dict with ``vocab_rows`` embedding rows (the
    tokenizer's padded row count; the extra rows are zero and never used).  A tensor missing, of the
    wrong shape, or with no counterpart (other than :data:`DROPPED`) is refused with one line."""
    _check(cfg)
    nt_v2, ffn = is_nt_v2(cfg), cfg.resolved_ffn_dim()
    hf_state = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in hf_state.items()}
    # transformers writes LayerNorm parameters under their legacy names (gamma / beta) in some versions
    hf_state = {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)): v for k, v in hf_state.items()}
    unused = {k for k in hf_state if not any(k.startswith(p) or k.endswith(p) for p in DROPPED)}
    if cfg.position != "learned":
        unused.discard("esm.embeddings.position_embeddings.weight")  # rotary models never read it

    def take(key: str) -> torch.Tensor:
        unused.discard(key)
        return hf_state[key]

    try:
        out = {"embed.weight": _rows(take("esm.embeddings.word_embeddings.weight"), vocab_rows)}
        if cfg.position == "learned":
            pos = take("esm.embeddings.position_embeddings.weight")
            if pos.shape[0] < pad_id + 1 + cfg.max_seq_len:
                raise ConversionError(f"position table has {pos.shape[0]} rows; model.max_seq_len={cfg.max_seq_len} "
                                      f"needs {pad_id + 1 + cfg.max_seq_len}")
            out["pos_embed.weight"] = pos[pad_id + 1: pad_id + 1 + cfg.max_seq_len].clone()
        h, d = cfg.n_heads, cfg.d_model
        for i in range(cfg.n_layers):
            p = f"esm.encoder.layer.{i}.attention.self."
            w = torch.stack([take(p + n + ".weight").view(h, d // h, d) for n in ("query", "key", "value")], 1)
            b = torch.stack([take(p + n + ".bias").view(h, d // h) for n in ("query", "key", "value")], 1)
            out[f"blocks.{i}.attn.qkv.weight"] = w.reshape(3 * d, d)  # head-major fused layout
            out[f"blocks.{i}.attn.qkv.bias"] = b.reshape(3 * d)
            if nt_v2:
                glu = take(f"esm.encoder.layer.{i}.intermediate.dense.weight")
                if glu.shape != (2 * ffn, d):
                    raise ConversionError(f"esm.encoder.layer.{i}.intermediate.dense.weight has shape {tuple(glu.shape)}; "
                                          f"NT-v2's gated MLP needs {(2 * ffn, d)}")
                out[f"blocks.{i}.mlp.gate.weight"], out[f"blocks.{i}.mlp.up.weight"] = glu[:ffn].clone(), glu[ffn:].clone()
            for hk, gk in _layer_map(i, nt_v2):
                out[gk] = take(hk).clone()
        for hk, gk in _top_map():
            out[gk] = take(hk).clone()
        tied = "lm_head.decoder.weight" not in hf_state
        dec = take("esm.embeddings.word_embeddings.weight" if tied else "lm_head.decoder.weight")
        out["lm_head.weight"] = _rows(dec, vocab_rows)
        out["lm_head.bias"] = _rows(take("lm_head.bias"), vocab_rows)
    except KeyError as e:
        raise ConversionError(f"not an ESM / NT state dict of this shape: missing {e.args[0]}") from None
    if unused:
        raise ConversionError(f"{len(unused)} tensor(s) with no glmtrain counterpart, e.g. {sorted(unused)[:3]} "
                              "(another layer count or layout?)")
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out


def _write_tokenizer(model_cfg: TransformerConfig, tokenizer, out: Path) -> None:
    (out / "vocab.txt").write_text("\n".join(tokenizer.vocab()) + "\n")
    special = {"unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>", "cls_token": "<cls>"}
    # NT's tokenizer prepends <cls> and appends nothing: no eos_token
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EsmTokenizer", "model_max_length": model_cfg.max_seq_len or 2048, "eos_token": None, **special},
        indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def export_nt(model_cfg: TransformerConfig, state: dict[str, torch.Tensor], tokenizer, out_dir: str | Path,
              rows: int | None = None, extra_config: dict | None = None) -> Path:
    """Write a Hugging Face directory: config.json, model.safetensors, vocab.txt and tokenizer config.
    ``tokenizer``: the run's k-mer tokenizer (its ``n_tokens`` ids become vocab.txt; ``add_cls`` decides
    whether <cls> is prepended).  NT-v1 / ESM: ``AutoModelForMaskedLM`` / ``AutoTokenizer`` load it without
    remote code.  NT-v2: the released repositories' layout (``add_bias_fnn: false``, GLU in
    ``intermediate.dense``) plus ``modeling_glmtrain.py`` (``NtEsmForMaskedLM``: transformers' ESM with NT's
    gated MLP), loaded with ``trust_remote_code=True``.  ``rows``: embedding / decoder rows written (default
    the tokenizer's ``n_tokens``, as NT releases; a run's padded row count keeps the export bit-exact);
    ``extra_config``: further config.json entries."""
    from safetensors.torch import save_file
    from transformers import EsmForMaskedLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nt_v2 = is_nt_v2(model_cfg)
    rows = rows or tokenizer.n_tokens
    conf = esm_config(model_cfg, rows, tokenizer.pad_id, tokenizer.mask_id, hf_class=not nt_v2)
    esm_state = glmtrain_to_esm(model_cfg, state, rows, tokenizer.pad_id)
    for k, v in (extra_config or {}).items():
        setattr(conf, k, v)  # saved with the config (to_dict holds every attribute)
    if nt_v2:
        if model_cfg.tie_embeddings:
            del esm_state["lm_head.decoder.weight"]  # tied: one tensor on disk, as transformers writes it
        conf.auto_map = {"AutoModelForMaskedLM": "modeling_glmtrain.NtEsmForMaskedLM"}
        conf.save_pretrained(out)
        save_file({k: v.contiguous() for k, v in esm_state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
        import shutil

        shutil.copyfile(Path(__file__).with_name("_hf_modeling.py"), out / "modeling_glmtrain.py")
    else:
        hf = EsmForMaskedLM(conf)
        missing, unexpected = hf.load_state_dict(esm_state, strict=False)
        missing = [k for k in missing if not k.endswith(("inv_freq", "position_ids"))]
        if missing or unexpected:
            raise ConversionError(f"export left {missing[:3]} unset and {unexpected[:3]} unused")
        hf.save_pretrained(out, safe_serialization=True)
    _write_tokenizer(model_cfg, tokenizer, out)
    return out


def import_nt(hf_dir: str | Path) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """(glmtrain config, state dict) from a Hugging Face ESM / NT directory: NT-v1 / ESM, or NT-v2 as released
    (config with ``add_bias_fnn``) -- the ``esm-hf`` layout's reader (safetensors, or ``weights_only`` torch
    files: nothing unpickled, no code run)."""
    from glmtrain.convert import build_imported_model, load_released

    model, cfg, _, _ = build_imported_model(load_released(hf_dir, family="transformer"))
    return cfg, model.state_dict()


# ----------------------------------------------------------------------------- registry (python -m glmtrain.convert)
#: model-config fields an ESM / NT checkpoint fixes (compared with the model it is loaded into)
MATHS = ("d_model", "n_layers", "n_heads", "ffn_dim", "causal", "norm", "norm_eps", "norm_position", "embed_norm", "mlp",
         "gelu", "bias", "position", "tie_embeddings", "head", "token_dropout")
NT_TOKENIZER = {"kind": "kmer", "k": 6, "add_cls": True}  # NT's 6-mers, <cls> first, nothing appended


def esm_names(cfg: TransformerConfig) -> dict[str, str]:
    """ESM / NT tensor name -> the glmtrain tensor(s) it becomes (for the import account)."""
    nt_v2 = is_nt_v2(cfg)
    out = {"esm.embeddings.word_embeddings.weight": "embed.weight", "lm_head.decoder.weight": "lm_head.weight",
           "lm_head.bias": "lm_head.bias", **dict(_top_map())}
    if cfg.position == "learned":
        out["esm.embeddings.position_embeddings.weight"] = "pos_embed.weight (rows pad+1 ..)"
    for i in range(cfg.n_layers):
        for n in ("query", "key", "value"):
            for s in ("weight", "bias"):
                out[f"esm.encoder.layer.{i}.attention.self.{n}.{s}"] = f"blocks.{i}.attn.qkv.{s} ({n} rows, head-major)"
        if nt_v2:
            out[f"esm.encoder.layer.{i}.intermediate.dense.weight"] = f"blocks.{i}.mlp.gate.weight + blocks.{i}.mlp.up.weight"
        out.update(dict(_layer_map(i, nt_v2)))
    return out


def _is_esm(src) -> bool:
    return (src.config or {}).get("model_type") == "esm"


def _read_esm(src):
    """The ``esm-hf`` layout: NT-v2 as released (InstaDeepAI ``nucleotide-transformer-v2-*``), NT-v1 / ESM, and
    glmtrain's own NT exports."""
    from glmtrain.convert import ConvertError, Taker
    from glmtrain.tokenizers import build_tokenizer

    conf = src.config
    tok_cfg = dict(NT_TOKENIZER)
    tc = src.weights.parent / "tokenizer_config.json"
    own = conf.get("glmtrain_model") or {}  # set by glmtrain's own export
    if tc.is_file():
        tok_cfg = json.loads(tc.read_text()).get("glmtrain_tokenizer") or tok_cfg
    try:
        cfg = model_config_from_esm(conf, name=own.get("name", f"{src.path.name or 'esm'}-import"), tokenizer=tok_cfg)
        tok = build_tokenizer(tok_cfg)
        vocab = src.weights.parent / "vocab.txt"
        if vocab.is_file() and tok_cfg.get("kind") in ("kmer", "kmer_overlap"):
            theirs, ours = vocab.read_text().split(), tok.vocab()
            if theirs != ours:
                at = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
                raise ConvertError(f"{vocab}: token {at} is {theirs[at] if at < len(theirs) else '(none)'!r}, glmtrain's "
                                   f"{tok_cfg['kind']} tokenizer has {ours[at] if at < len(ours) else '(none)'!r}; "
                                   "ids would not mean the same tokens")
        tensors = esm_to_glmtrain(dict(src.tensors), cfg, tok.vocab_size, int(conf.get("pad_token_id", 1)))
    except ConversionError as e:
        raise ConvertError(f"{src.weights}: {e}") from None
    tk = Taker(src, "esm-hf")
    names = esm_names(cfg)
    for k in sorted(src.tensors):
        if k in names:
            tk.mapped.append((k, names[k]))
        elif k.endswith(("inv_freq", "position_ids")):
            tk.dropped.append((k, "rotary frequencies / position ids (recomputed)"))
        elif k.startswith("esm.contact_head."):
            tk.dropped.append((k, "contact-prediction head (no glmtrain counterpart)"))
        elif k == "esm.embeddings.position_embeddings.weight":
            tk.dropped.append((k, "absolute position table a rotary model never reads"))
        else:  # legacy names (gamma/beta) that esm_to_glmtrain accepted
            tk.mapped.append((k, "(legacy LayerNorm name)"))
    tk.left.clear()  # esm_to_glmtrain accounted for every tensor or refused
    tk.out = tensors
    config = {k: getattr(cfg, k) for k in MATHS}
    if cfg.position == "learned":
        config["max_seq_len"] = cfg.max_seq_len
    if cfg.position == "rope":
        config["rope_base"] = cfg.rope_base
    if is_nt_v2(cfg):
        config["mlp_bias"] = False
    if cfg.token_dropout:
        config["mask_token_id"] = cfg.mask_token_id
    settings = {"name": cfg.name, "dropout": float(own.get("dropout", 0.0))}
    if not is_nt_v2(cfg):
        settings["mlp_bias"] = cfg.mlp_bias
    return tk.finish(family="transformer", config=config, settings=settings, tokenizer=dict(tok_cfg),
                     notes=[] if own else ["NT-v2 layout (gated MLP, add_bias_fnn=false)" if is_nt_v2(cfg)
                                           else "ESM / NT-v1 layout"])


def fits_esm(cfg: TransformerConfig) -> bool:
    """Whether a glmtrain Transformer can be written in the ESM / NT layout (NT-v1: the built-in class)."""
    try:
        _check(cfg)
    except ConversionError:
        return False
    return True


def write_esm(model, out: Path, tok_cfg) -> dict:
    """Exporter for NT-v1 / NT-v2 shaped encoders: the ESM / NT layout with every embedding row of the run."""
    from glmtrain.tokenizers import build_tokenizer

    tok = build_tokenizer(tok_cfg)
    export_nt(model.cfg, model.state_dict(), tok, out, rows=model.vocab_size,
              extra_config={"glmtrain_model": {"name": model.cfg.name, "dropout": model.cfg.dropout}})
    if is_nt_v2(model.cfg):
        return {"config.json": "NT-v2 layout (esm, add_bias_fnn=false) via modeling_glmtrain.NtEsmForMaskedLM "
                               "(trust_remote_code=True)", "model.safetensors": "ESM / NT tensor names",
                "modeling_glmtrain.py": "torch + transformers only"}
    return {"config.json": "EsmForMaskedLM (built into transformers)", "model.safetensors": "ESM tensor names"}


def _register() -> None:
    from glmtrain.convert import Layout, register_layout

    register_layout(Layout("esm-hf", "transformer", match=_is_esm, read=_read_esm,
                           description="NT-v2 (InstaDeepAI nucleotide-transformer-v2-*), NT-v1 / ESM (config.json model_type esm)"))


_register()

__all__ = ["DROPPED", "ConversionError", "esm_config", "fits_esm", "write_esm", "esm_names", "esm_to_glmtrain", "export_nt", "glmtrain_to_esm", "import_nt",
           "is_nt_v2", "model_config_from_esm"]
