"""Released DNABERT-2 checkpoints (``zhihan1996/DNABERT-2-117M``: MosaicBERT, remote code) -> glmtrain.

The release is a ``BertForMaskedLM`` of MosaicBERT's ``bert_layers.py`` (``config.json`` ``model_type: bert``
with an ``auto_map`` to that file, which glmtrain never executes) and a BPE ``tokenizer.json``.  The network is
glmtrain's ``model=dnabert2*`` Transformer: post-LN encoder, ALiBi (the standard slopes, bias -slope * |i - j|),
a LayerNorm after the embedding, a gated-GELU MLP and the BERT MLM head.

==========================================================  ================================================
released name (``bert.`` / ``cls.predictions.``)            glmtrain
==========================================================  ================================================
``embeddings.word_embeddings``                              ``embed`` (+ the token-type row, see below)
``embeddings.token_type_embeddings`` row 0                  folded into ``embed`` (added to every token)
``embeddings.LayerNorm``                                    ``embed_norm``
``encoder.layer.i.attention.self.Wqkv``                     ``blocks.i.attn.qkv``: rows [(q, k, v), head,
                                                            head_dim] re-ordered to glmtrain's head-major
                                                            [head, (q, k, v), head_dim]
``encoder.layer.i.attention.output.dense`` / ``.LayerNorm``  ``blocks.i.attn.out`` / ``blocks.i.norm1``
``encoder.layer.i.mlp.gated_layers`` (d -> 2 ffn, no bias)   rows ``[:ffn]`` = ``mlp.gate`` (GELU), ``[ffn:]`` =
                                                            ``mlp.up``
``encoder.layer.i.mlp.wo`` / ``.layernorm``                 ``blocks.i.mlp.down`` / ``blocks.i.norm2``
``transform.dense`` / ``transform.LayerNorm``               ``head_dense`` / ``head_norm``
``decoder.weight`` / ``decoder.bias``                       ``lm_head`` (weight tied to the word embedding)
==========================================================  ================================================

MosaicBERT adds ``token_type_embeddings[token_type_ids]`` (always type 0 for DNA) to every token before the
embedding norm.  glmtrain has no token types: row 0 is added to the input embedding -- exactly the same
function.  When that row is not zero, the input embedding then differs from the (tied) decoder matrix, so the
import is untied (``model.tie_embeddings=false``, said on import); row 1 is never used and is dropped.  The
pooler (not used by the masked-LM) is dropped.  ``model.max_seq_len`` is not fixed by the release (ALiBi).
"""

from __future__ import annotations

import torch

from glmtrain.convert import ConvertError, Imported, Layout, Released, Taker, register_layout

SIGNATURE = "bert.encoder.layer.0.attention.self.Wqkv.weight"
GELU = {"gelu": "exact", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def _is_dnabert2(src: Released) -> bool:
    return SIGNATURE in src.tensors and (src.config or {}).get("model_type", "bert") == "bert"


def _rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] > rows:
        raise ConvertError(f"{t.shape[0]} vocabulary rows do not fit the tokenizer's {rows}")
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if t.shape[0] < rows else t


def _read(src: Released) -> Imported:
    c = src.config
    if not c:
        raise ConvertError(f"{src.weights}: a DNABERT-2 checkpoint needs its config.json next to it (the shape comes from it)")
    d, layers, heads, ffn = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["intermediate_size"]
    eps = float(c.get("layer_norm_eps", 1e-12))
    if eps != 1e-12:  # MosaicBERT's head LayerNorm has eps 1e-12 whatever the config says; glmtrain has one eps
        raise ConvertError(f"{src.config_path}: layer_norm_eps={eps}, but the MLM head's LayerNorm uses 1e-12; "
                           "glmtrain's DNABERT-2 has one eps for every norm")
    act = c.get("hidden_act", "gelu")
    if act not in GELU:
        raise ConvertError(f"{src.config_path}: hidden_act={act!r} (allowed: {', '.join(GELU)})")
    tok_cfg = {"kind": "bpe", "vocab_size": int(c["vocab_size"]), "add_cls": True, "add_sep": True}
    vocab = src.weights.parent / "tokenizer.json"
    if vocab.is_file():
        tok_cfg["path"] = str(vocab)
    from glmtrain.tokenizers import build_tokenizer

    rows = build_tokenizer({k: v for k, v in tok_cfg.items() if k != "path"}).vocab_size
    tk = Taker(src, "dnabert2-hf")
    e, h = "bert.embeddings.", "cls.predictions."
    word = tk.take(e + "word_embeddings.weight")
    types = tk.take(e + "token_type_embeddings.weight")
    dec, stored = word, h + "decoder.weight"
    untied_decoder = tk.has(stored) and not torch.equal(tk.get(stored), word)
    if untied_decoder:
        dec = tk.take(stored)
    elif tk.has(stored):
        tk.drop_equal(stored, word, "bert.embeddings.word_embeddings.weight (tied decoder)")
    # a non-zero type-0 row makes the input embedding differ from the head
    tied = not untied_decoder and not bool(types[0].any())
    embed = _rows(word + types[0], rows)
    tk.put("embed.weight", embed, e + "word_embeddings.weight", e + "token_type_embeddings.weight")
    tk.put("lm_head.weight", embed if tied else _rows(dec, rows), *([stored] if untied_decoder else []))
    notes = []
    if not tied:
        notes.append("token-type row 0 folded into the input embedding (exact); the LM head keeps the released "
                     "matrix, so the two are untied from here on (model.tie_embeddings=false)")
    for s in ("weight", "bias"):
        tk.put(f"embed_norm.{s}", tk.take(f"{e}LayerNorm.{s}"), f"{e}LayerNorm.{s}")
        tk.put(f"head_dense.{s}", tk.take(f"{h}transform.dense.{s}"), f"{h}transform.dense.{s}")
        tk.put(f"head_norm.{s}", tk.take(f"{h}transform.LayerNorm.{s}"), f"{h}transform.LayerNorm.{s}")
    tk.put("lm_head.bias", _rows(tk.take(h + "decoder.bias"), rows), h + "decoder.bias")
    for i in range(layers):
        p, g = f"bert.encoder.layer.{i}.", f"blocks.{i}."
        for s in ("weight", "bias"):
            w = tk.take(f"{p}attention.self.Wqkv.{s}")
            # [(q, k, v), head, head_dim] -> glmtrain's head-major [head, (q, k, v), head_dim]
            tk.put(f"{g}attn.qkv.{s}", w.reshape(3, heads, d // heads, *w.shape[1:]).transpose(0, 1).reshape(w.shape),
                   f"{p}attention.self.Wqkv.{s}")
            for a, b in (("attention.output.dense", "attn.out"), ("attention.output.LayerNorm", "norm1"),
                         ("mlp.wo", "mlp.down"), ("mlp.layernorm", "norm2")):
                tk.put(f"{g}{b}.{s}", tk.take(f"{p}{a}.{s}"), f"{p}{a}.{s}")
        glu = tk.take(f"{p}mlp.gated_layers.weight")
        if glu.shape != (2 * ffn, d):
            raise ConvertError(f"{src.weights}: {p}mlp.gated_layers.weight has shape {list(glu.shape)}, "
                               f"the config's gated MLP needs {[2 * ffn, d]}")
        tk.put(f"{g}mlp.gate.weight", glu[:ffn], f"{p}mlp.gated_layers.weight")
        tk.put(f"{g}mlp.up.weight", glu[ffn:])
    tk.dropped.append((e + "token_type_embeddings.weight[1]", "token type 1 (DNA inputs are one segment)"))
    for k in sorted(tk.left):
        if k.startswith("bert.pooler."):
            tk.drop(k, "pooler (not used by the masked-LM)")
        elif k.endswith(("position_ids", "token_type_ids")):
            tk.drop(k, "index buffer (recomputed)")
    config = {"d_model": d, "n_layers": layers, "n_heads": heads, "ffn_dim": ffn, "causal": False, "norm": "layernorm",
              "norm_eps": eps, "norm_position": "post", "embed_norm": True, "mlp": "geglu", "gelu": GELU[act], "bias": True,
              "mlp_bias": False, "mlp_out_bias": True, "position": "alibi", "tie_embeddings": tied, "head": "mlm",
              "token_dropout": False}
    settings = {"name": f"dnabert2-import-{d}x{layers}", "dropout": 0.0, "attn_dropout": 0.0}
    return tk.finish(family="transformer", config=config, settings=settings, tokenizer=tok_cfg, notes=notes)


register_layout(Layout("dnabert2-hf", "transformer", match=_is_dnabert2, read=_read,
                       description="DNABERT-2 (zhihan1996/DNABERT-2-117M: MosaicBERT names, BPE tokenizer.json)"))
