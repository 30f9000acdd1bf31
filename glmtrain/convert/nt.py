"""Nucleotide Transformer / ESM weights <-> glmtrain, through ``transformers.EsmForMaskedLM``.

What converts: the NT-v1 / ESM layout of the Transformer family -- pre-LN encoder, learned absolute
(``model.position=learned``) or rotary positions, exact-GELU MLP with biases, ESM MLM head (dense ->
GELU -> LayerNorm -> decoder + bias), optional token dropout -- which is exactly what
``EsmForMaskedLM`` implements.  Key correspondence (layer i):

===========================================================  ==========================================
``esm.embeddings.word_embeddings``                           ``embed`` (first ``n_tokens`` rows)
``esm.embeddings.position_embeddings`` rows ``pad+1+p``      ``pos_embed`` row ``p`` (ESM numbers real
                                                             tokens from ``padding_idx + 1``)
``esm.encoder.layer.i.attention.self.{query,key,value}``     ``blocks.i.attn.qkv`` (head-major: q, k, v of head 0,
                                                             then of head 1, ...)
``esm.encoder.layer.i.attention.output.dense``               ``blocks.i.attn.out``
``esm.encoder.layer.i.attention.LayerNorm``                  ``blocks.i.norm1``
``esm.encoder.layer.i.LayerNorm``                            ``blocks.i.norm2``
``esm.encoder.layer.i.{intermediate,output}.dense``          ``blocks.i.mlp.{fc1,fc2}``
``esm.encoder.emb_layer_norm_after``                         ``norm_f``
``lm_head.{dense,layer_norm}``, ``lm_head.decoder``/``bias``  ``head_dense``, ``head_norm``, ``lm_head``
===========================================================  ==========================================

``esm.contact_head`` (contact prediction from attention maps) has no glmtrain counterpart: zero on
export, ignored on import.

What does not convert: Nucleotide Transformer v2.  Its released checkpoints are ESM-shaped, but their
MLP is a gated unit without biases (``add_bias_fnn: false``, a GLU in ``intermediate.dense``), which
``transformers``' own ``EsmIntermediate`` (Linear + GELU, with bias) cannot express; the NT-v2 repositories
ship their own ``modeling_esm.py`` for it (``trust_remote_code``), and loading never executes code here.
``EsmForMaskedLM`` does support NT-v2's rotary positions, so ``model.position=rope`` with a GELU MLP
converts (and is tested); ``model.mlp=swiglu`` is refused with one line.

The functions take plain state dicts (the ``model.`` prefix of a LightningModule checkpoint stripped)
so that ``python -m glmtrain.convert`` can call them: :func:`esm_to_glmtrain`, :func:`glmtrain_to_esm`,
:func:`esm_config`, :func:`model_config_from_esm`, :func:`export_nt`, :func:`import_nt`.
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


def _check(cfg: TransformerConfig) -> None:
    problems = []
    if cfg.family != "transformer":
        problems.append(f"model.family={cfg.family!r} (needs transformer)")
    if cfg.mlp != "gelu":
        problems.append(f"model.mlp={cfg.mlp!r}: EsmForMaskedLM's MLP is Linear + GELU (NT-v2's gated MLP needs "
                        "NT's own modeling code, which glmtrain does not execute)")
    for key, want in (("causal", False), ("norm", "layernorm"), ("norm_position", "pre"), ("embed_norm", False),
                      ("head", "mlm"), ("gelu", "exact")):
        if getattr(cfg, key) != want:
            problems.append(f"model.{key}={getattr(cfg, key)!r} (ESM: {want!r})")
    if cfg.position not in ("learned", "rope"):
        problems.append(f"model.position={cfg.position!r} (ESM: learned or rope)")
    if cfg.position == "rope" and cfg.rope_interpolation != 1.0:
        problems.append("model.rope_interpolation (ESM has none)")
    if cfg.biases() != (True, True, True):
        problems.append("biases off (ESM has biases everywhere)")
    if problems:
        raise ConversionError("cannot express this model as transformers.EsmForMaskedLM: " + "; ".join(problems))


def esm_config(cfg: TransformerConfig, n_tokens: int, pad_id: int = 1, mask_id: int = 2):
    """The ``transformers.EsmConfig`` of a glmtrain NT-v1/ESM-style config (``n_tokens``: the vocabulary)."""
    from transformers import EsmConfig

    _check(cfg)
    learned = cfg.position == "learned"
    return EsmConfig(
        vocab_size=n_tokens, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.resolved_ffn_dim(), hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout if cfg.attn_dropout is None else cfg.attn_dropout,
        max_position_embeddings=(cfg.max_seq_len + pad_id + 1) if learned else max(cfg.max_seq_len, 1024) + 2,
        position_embedding_type="absolute" if learned else "rotary", rope_theta=cfg.rope_base,
        layer_norm_eps=cfg.norm_eps, pad_token_id=pad_id, mask_token_id=mask_id, token_dropout=cfg.token_dropout,
        emb_layer_norm_before=False, tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
        architectures=["EsmForMaskedLM"],
    )


def model_config_from_esm(hf: Any, name: str = "esm-import", tokenizer: dict | None = None) -> TransformerConfig:
    """A glmtrain config holding an ``EsmForMaskedLM`` (``hf``: its ``EsmConfig`` or config.json dict)."""
    get = (lambda k, d=None: hf.get(k, d)) if isinstance(hf, dict) else (lambda k, d=None: getattr(hf, k, d))
    if get("emb_layer_norm_before"):
        raise ConversionError("emb_layer_norm_before=true (ESM-1b style) is not supported")
    if get("is_decoder"):
        raise ConversionError("is_decoder=true: not an ESM encoder")
    pos = get("position_embedding_type", "absolute")
    if pos not in ("absolute", "rotary"):
        raise ConversionError(f"position_embedding_type={pos!r}: allowed absolute, rotary")
    pad = int(get("pad_token_id", 1))
    from glmtrain.tokenizers import TokenizerConfig

    return TransformerConfig(
        name=name, d_model=get("hidden_size"), n_layers=get("num_hidden_layers"), n_heads=get("num_attention_heads"),
        ffn_dim=get("intermediate_size"), causal=False, norm="layernorm", norm_eps=get("layer_norm_eps", 1e-12),
        norm_position="pre", mlp="gelu", gelu="exact", bias=True, dropout=0.0,
        position="learned" if pos == "absolute" else "rope", rope_base=float(get("rope_theta", 10000.0)),
        max_seq_len=(get("max_position_embeddings") - pad - 1) if pos == "absolute" else 0,
        tie_embeddings=bool(get("tie_word_embeddings", False)), head="mlm", token_dropout=bool(get("token_dropout", False)),
        mask_token_id=int(get("mask_token_id", 2)),
        tokenizer=TokenizerConfig(**(tokenizer or {"kind": "kmer", "k": 6, "add_cls": True})),
    )


def _layer_map(i: int) -> list[tuple[str, str]]:
    e, g = f"esm.encoder.layer.{i}.", f"blocks.{i}."
    pairs = [("attention.output.dense", "attn.out"), ("attention.LayerNorm", "norm1"), ("LayerNorm", "norm2"),
             ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2")]
    return [(e + a + s, g + b + s) for a, b in pairs for s in (".weight", ".bias")]


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
    """glmtrain Transformer state dict -> ``EsmForMaskedLM`` state dict (embedding rows cut to ``n_tokens``)."""
    _check(cfg)
    d = cfg.d_model
    out: dict[str, torch.Tensor] = {"esm.embeddings.word_embeddings.weight": _rows(state["embed.weight"], n_tokens)}
    if cfg.position == "learned":
        pos = state["pos_embed.weight"]
        out["esm.embeddings.position_embeddings.weight"] = torch.cat([pos.new_zeros(pad_id + 1, d), pos])
    h = cfg.n_heads
    for i in range(cfg.n_layers):
        # glmtrain's fused qkv is head-major (rows h * 3 * head_dim + j * head_dim + r); ESM's q, k, v are separate
        qkv_w = state[f"blocks.{i}.attn.qkv.weight"].view(h, 3, d // h, d)
        qkv_b = state[f"blocks.{i}.attn.qkv.bias"].view(h, 3, d // h)
        for j, name in enumerate(("query", "key", "value")):
            out[f"esm.encoder.layer.{i}.attention.self.{name}.weight"] = qkv_w[:, j].reshape(d, d).clone()
            out[f"esm.encoder.layer.{i}.attention.self.{name}.bias"] = qkv_b[:, j].reshape(d).clone()
        for hk, gk in _layer_map(i):
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
    """``EsmForMaskedLM`` state dict -> glmtrain Transformer state dict with ``vocab_rows`` embedding rows
    (the tokenizer's padded row count; the extra rows are zero and never used)."""
    _check(cfg)
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith("inv_freq") and not k.startswith("esm.contact_head")}
    hf_state = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in hf_state.items()}
    # transformers writes LayerNorm parameters under their legacy names (gamma / beta) in some versions
    hf_state = {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)): v for k, v in hf_state.items()}
    try:
        out = {"embed.weight": _rows(hf_state["esm.embeddings.word_embeddings.weight"], vocab_rows)}
        if cfg.position == "learned":
            pos = hf_state["esm.embeddings.position_embeddings.weight"]
            if pos.shape[0] < pad_id + 1 + cfg.max_seq_len:
                raise ConversionError(f"position table has {pos.shape[0]} rows; model.max_seq_len={cfg.max_seq_len} "
                                      f"needs {pad_id + 1 + cfg.max_seq_len}")
            out["pos_embed.weight"] = pos[pad_id + 1: pad_id + 1 + cfg.max_seq_len].clone()
        h, d = cfg.n_heads, cfg.d_model
        for i in range(cfg.n_layers):
            p = f"esm.encoder.layer.{i}.attention.self."
            w = torch.stack([hf_state[p + n + ".weight"].view(h, d // h, d) for n in ("query", "key", "value")], 1)
            b = torch.stack([hf_state[p + n + ".bias"].view(h, d // h) for n in ("query", "key", "value")], 1)
            out[f"blocks.{i}.attn.qkv.weight"] = w.reshape(3 * d, d)  # head-major fused layout
            out[f"blocks.{i}.attn.qkv.bias"] = b.reshape(3 * d)
            for hk, gk in _layer_map(i):
                out[gk] = hf_state[hk].clone()
        for hk, gk in _top_map():
            out[gk] = hf_state[hk].clone()
        dec = hf_state.get("lm_head.decoder.weight", hf_state["esm.embeddings.word_embeddings.weight"])  # tied
        out["lm_head.weight"] = _rows(dec, vocab_rows)
        out["lm_head.bias"] = _rows(hf_state["lm_head.bias"], vocab_rows)
    except KeyError as e:
        raise ConversionError(f"not an EsmForMaskedLM state dict of this shape: missing {e.args[0]}") from None
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out


def export_nt(model_cfg: TransformerConfig, state: dict[str, torch.Tensor], tokenizer, out_dir: str | Path) -> Path:
    """Write a Hugging Face directory (config.json, model.safetensors, vocab.txt and tokenizer config) that
    ``AutoModelForMaskedLM`` / ``AutoTokenizer`` load without remote code.  ``tokenizer``: the run's k-mer
    tokenizer (its ``n_tokens`` ids become vocab.txt; ``add_cls`` decides whether <cls> is prepended)."""
    from transformers import EsmForMaskedLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    conf = esm_config(model_cfg, tokenizer.n_tokens, tokenizer.pad_id, tokenizer.mask_id)
    hf = EsmForMaskedLM(conf)
    missing, unexpected = hf.load_state_dict(glmtrain_to_esm(model_cfg, state, tokenizer.n_tokens, tokenizer.pad_id), strict=False)
    missing = [k for k in missing if not k.endswith(("inv_freq", "position_ids"))]
    if missing or unexpected:
        raise ConversionError(f"export left {missing[:3]} unset and {unexpected[:3]} unused")
    hf.save_pretrained(out, safe_serialization=True)
    (out / "vocab.txt").write_text("\n".join(tokenizer.vocab()) + "\n")
    special = {"unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>", "cls_token": "<cls>"}
    # NT's tokenizer prepends <cls> and appends nothing: no eos_token
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EsmTokenizer", "model_max_length": model_cfg.max_seq_len or 2048, "eos_token": None, **special},
        indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out


def import_nt(hf_dir: str | Path, vocab_rows: int | None = None) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """(glmtrain config, state dict) from a Hugging Face ESM directory (config.json + model.safetensors);
    weights are read with safetensors (no pickle, no code)."""
    from safetensors.torch import load_file

    d = Path(hf_dir)
    conf = json.loads((d / "config.json").read_text())
    if conf.get("model_type") != "esm":
        raise ConversionError(f"{d / 'config.json'}: model_type={conf.get('model_type')!r}, not esm")
    if "add_bias_fnn" in conf or conf.get("auto_map"):
        raise ConversionError(f"{d}: a Nucleotide Transformer v2 checkpoint (gated MLP, remote modeling code); "
                              "only the EsmForMaskedLM layout (NT v1 / ESM) converts")
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{d}: no .safetensors weights (pickled .bin files are not loaded)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    cfg = model_config_from_esm(conf, name=d.name)
    from glmtrain.tokenizers import build_tokenizer

    rows = vocab_rows or build_tokenizer(cfg.tokenizer).vocab_size
    return cfg, esm_to_glmtrain(state, cfg, rows, int(conf.get("pad_token_id", 1)))


__all__ = ["ConversionError", "esm_config", "esm_to_glmtrain", "export_nt", "glmtrain_to_esm", "import_nt",
           "model_config_from_esm"]
