"""The Transformer family -> Hugging Face: the built-in class where one fits, remote code otherwise.

* a causal Transformer of GPT-NeoX's shape -> ``GPTNeoXForCausalLM`` (below);
* NT-v1 / ESM-shaped encoders -> ``EsmForMaskedLM``; NT-v2 -> its released ESM layout with NT's gated MLP
  (``modeling_glmtrain.NtEsmForMaskedLM``, remote code) -- :mod:`glmtrain.convert.nt`;
* everything else (DNABERT-1/2: post-LN, ALiBi, gated GELU; GENERator: RMSNorm, SwiGLU, no biases; the
  encoder baseline) -> glmtrain's own modeling file (``trust_remote_code``, glmtrain's parameter names).

GPT-NeoX:

glmtrain's causal Transformer with LayerNorm, a GELU(tanh) MLP with biases and full-width RoPE
(rotate-half) is GPT-NeoX with ``use_parallel_residual=false``, ``partial_rotary_factor=1``,
``hidden_act=gelu_pytorch_tanh`` and ``attention_bias=true``.  The fused qkv projection has the same
row order in both ([head, (q, k, v), head_dim], glmtrain's tensor-parallel-native layout), so every
tensor is only renamed.  Other Transformer configurations (RMSNorm, SwiGLU, no biases, position
interpolation, bidirectional encoders) export with glmtrain's own modeling file.

The ``gpt-neox`` layout reads such a directory back (and any GPT-NeoX checkpoint of that form).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from glmtrain.convert import ConvertError, Exporter, Imported, Layout, Released, Taker, register_exporter, register_layout
from glmtrain.convert.files import write_safetensors
from glmtrain.convert.hf import hf_config_common, write_remote_code

ACT = "gelu_pytorch_tanh"


def fits_gpt_neox(cfg) -> bool:
    return (cfg.causal and cfg.norm == "layernorm" and cfg.mlp == "gelu" and cfg.bias and cfg.rope_interpolation == 1.0
            and not cfg.max_seq_len)


NAMES = [  # (glmtrain block name, GPT-NeoX layer name)
    ("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"), ("attn.out", "attention.dense"),
    ("mlp.fc1", "mlp.dense_h_to_4h"), ("mlp.fc2", "mlp.dense_4h_to_h"),
]


def write_transformer(model, out: Path, tok_cfg) -> dict:
    from glmtrain.convert.nt import fits_esm, write_esm

    if fits_gpt_neox(model.cfg):
        return write_gpt_neox(model, out, tok_cfg)
    if fits_esm(model.cfg):
        return write_esm(model, out, tok_cfg)
    return write_remote_code(model, out, tok_cfg)


def write_gpt_neox(model, out: Path, tok_cfg) -> dict:
    cfg = model.cfg
    sd = model.state_dict()
    t = {"gpt_neox.embed_in.weight": sd["embed.weight"], "gpt_neox.final_layer_norm.weight": sd["norm_f.weight"],
         "gpt_neox.final_layer_norm.bias": sd["norm_f.bias"]}
    for i in range(cfg.n_layers):
        g, n = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        for a, b in NAMES:
            for p in ("weight", "bias"):
                t[f"{n}{b}.{p}"] = sd[f"{g}{a}.{p}"]
        for p in ("weight", "bias"):
            t[f"{n}attention.query_key_value.{p}"] = sd[f"{g}attn.qkv.{p}"]
    tied = model.lm_head.weight is model.embed.weight
    if not tied:
        t["embed_out.weight"] = sd["lm_head.weight"]
    config = {
        "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.resolved_ffn_dim(),
        "hidden_act": ACT, "layer_norm_eps": cfg.norm_eps, "use_parallel_residual": False, "attention_bias": True,
        "rotary_pct": 1.0, "rotary_emb_base": cfg.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base, "partial_rotary_factor": 1.0},
        "max_position_embeddings": 1 << 20, "attention_dropout": 0.0, "hidden_dropout": 0.0,
        "tie_word_embeddings": tied, "use_cache": False, "glmtrain_model": {"name": cfg.name, "dropout": cfg.dropout},
        **hf_config_common(model, tok_cfg),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(t, out / "model.safetensors", {"format": "pt"})
    return {"config.json": "GPTNeoXForCausalLM (built into transformers)", "model.safetensors": "GPT-NeoX names"}


register_exporter(Exporter("transformer", write=write_transformer))


def _is_neox(src: Released) -> bool:
    return (src.config or {}).get("model_type") == "gpt_neox"


def _read_neox(src: Released) -> Imported:
    c = src.config
    rope = c.get("rope_parameters") or {}
    partial = rope.get("partial_rotary_factor", c.get("rotary_pct", 0.25))
    problems = [f"{k}={v!r}" for k, v, ok in (
        ("use_parallel_residual", c.get("use_parallel_residual", True), False),
        ("partial_rotary_factor", partial, 1.0), ("hidden_act", c.get("hidden_act"), ACT),
        ("attention_bias", c.get("attention_bias", True), True)) if v != ok]
    if problems:
        raise ConvertError(f"{src.config_path}: GPT-NeoX with {', '.join(problems)} is not glmtrain's Transformer "
                           f"(needs use_parallel_residual=false, partial_rotary_factor=1, hidden_act={ACT}, biases)")
    tk = Taker(src, "gpt-neox")
    heads, layers = c["num_attention_heads"], c["num_hidden_layers"]
    emb = tk.take("gpt_neox.embed_in.weight")
    tk.put("embed.weight", emb, "gpt_neox.embed_in.weight")
    tied = bool(c.get("tie_word_embeddings", False))
    head = next((k for k in ("embed_out.weight", "lm_head.weight") if tk.has(k)), None)
    if tied:
        tk.put("lm_head.weight", emb)
        if head:
            tk.drop_equal(head, emb, "the input embedding (tied)")
    elif head is None:
        raise ConvertError(f"{src.weights}: untied GPT-NeoX without embed_out.weight / lm_head.weight")
    else:
        tk.put("lm_head.weight", tk.take(head), head)
    for p in ("weight", "bias"):
        tk.put(f"norm_f.{p}", tk.take(f"gpt_neox.final_layer_norm.{p}"), f"gpt_neox.final_layer_norm.{p}")
    for i in range(layers):
        g, n = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        for a, b in NAMES:
            for p in ("weight", "bias"):
                tk.put(f"{g}{a}.{p}", tk.take(f"{n}{b}.{p}"), f"{n}{b}.{p}")
        for p in ("weight", "bias"):
            tk.put(f"{g}attn.qkv.{p}", tk.take(f"{n}attention.query_key_value.{p}"),
                   f"{n}attention.query_key_value.{p}")
        for k in (f"{n}attention.rotary_emb.inv_freq", f"{n}attention.bias", f"{n}attention.masked_bias"):
            if tk.has(k):
                tk.drop(k, "buffer GPT-NeoX recomputes (rotary frequencies, causal mask)")
    config = {"d_model": c["hidden_size"], "n_layers": layers, "n_heads": heads, "ffn_dim": c["intermediate_size"],
              "causal": True, "norm": "layernorm", "norm_eps": float(c.get("layer_norm_eps", 1e-5)), "mlp": "gelu",
              "bias": True, "rope_base": float(rope.get("rope_theta", c.get("rotary_emb_base", 10000.0))),
              "rope_interpolation": 1.0, "tie_embeddings": tied}
    own = c.get("glmtrain_model") or {}
    settings = {"name": own.get("name", "gpt-neox-import"), "dropout": float(own.get("dropout", 0.0))}
    tok = {}
    tc = src.weights.parent / "tokenizer_config.json"
    if tc.is_file():
        tok = json.loads(tc.read_text()).get("glmtrain_tokenizer") or {}
    return tk.finish(family="transformer", config=config, settings=settings, tokenizer=tok)


register_layout(Layout("gpt-neox", "transformer", match=_is_neox, read=_read_neox,
                       description="transformers GPT-NeoX (what glmtrain exports its Transformer baseline as)"))
