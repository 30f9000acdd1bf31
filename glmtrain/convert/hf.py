"""Export to Hugging Face directories, and reading glmtrain's own exports back.

An export directory holds ``config.json``, ``model.safetensors``, the tokenizer
(``tokenizer.json`` + ``tokenizer_config.json``, loaded by ``AutoTokenizer`` as a
``PreTrainedTokenizerFast``) and, for families without a built-in ``transformers`` class, the
self-contained ``modeling_glmtrain.py`` (a copy of :mod:`glmtrain.convert._hf_modeling`;
``trust_remote_code=True``).  Those "remote-code" exports keep glmtrain's parameter names under
``model.`` and the whole glmtrain model config in ``config.json``, so the layout ``glmtrain-hf``
reads them back bit for bit (``trainer.init_from=<export dir>`` or
``python -m glmtrain.convert import``).  ``<name>.safetensors`` alone (no directory) is the same
tensors with the configs in the file's metadata.

The Transformer baseline exports to the built-in GPT-NeoX classes when its shape fits them
(:mod:`glmtrain.convert.transformer`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from glmtrain.convert import ConvertError, Exporter, Imported, Layout, Released, Taker, exporters, register_exporter, register_layout
from glmtrain.convert.files import write_safetensors

MODELING = Path(__file__).with_name("_hf_modeling.py")
PREFIX = "model."
# model-config fields that do not change the function a set of weights computes, besides each family's speed-only
# knobs (its config's SPEED_ONLY): naming, initialisation, optimiser and dropout settings
NOT_MATH = {
    "name", "published_params", "tokenizer", "embed_dropout", "resid_dropout", "dropout", "initializer_range",
    "filter_lr_scale", "filter_weight_decay", "li_rate_min", "li_rate_max", "filter_w", "train_freq", "mr_decay_preset",
    "mr_decay_fast", "mr_decay_slow", "mr_decay_target", "decay_fast", "decay_slow", "decay_target",
    "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "rescale_prenorm_residual", "n_residuals_per_layer",
}


def not_checked(family: str) -> set[str]:
    """Model-config fields of ``family`` that an export's reader does not hold a model to."""
    from glmtrain.models import config_class

    return NOT_MATH | set(config_class(family).SPEED_ONLY)


def model_config_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


# ----------------------------------------------------------------------------- tokenizer files
def write_tokenizer(tok_cfg: Any, out: Path) -> list[str]:
    """``tokenizer.json`` (a tokenizers WordLevel pipeline reproducing glmtrain's ids) + ``tokenizer_config.json``.

    Returns notes on behaviour a fast tokenizer cannot copy (glmtrain refusing a character)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    from glmtrain.tokenizers import build_tokenizer

    cfg = dataclasses.asdict(tok_cfg) if dataclasses.is_dataclass(tok_cfg) else dict(tok_cfg)
    tok = build_tokenizer(cfg)
    notes: list[str] = []
    special: dict[str, str] = {}
    split = Regex(".")
    replace: dict[str, str] = {}
    if tok.name == "char":
        vocab = {t: i for i, t in enumerate(tok.tokens)}
        unk = "[UNK]"
        for b in range(256):
            i = int(tok._lut[b])
            if i >= 0 and len(tok.tokens[i]) == 1 and tok.tokens[i] != chr(b):
                replace[chr(b)] = tok.tokens[i]
        if (tok._lut < 0).any():
            notes.append("characters glmtrain's char tokenizer refuses (lowercase/iupac/unknown=error) become [UNK]")
        special = {"cls_token": "[CLS]", "sep_token": "[SEP]", "bos_token": "[BOS]", "mask_token": "[MASK]",
                   "pad_token": "[PAD]", "unk_token": "[UNK]", "eos_token": "[SEP]"}
    elif tok.name == "byte":
        vocab = {"<eod>": 0, "<pad>": 1, **{chr(i): i for i in range(2, 256)}}
        unk = "?"  # glmtrain encodes text as latin-1 with errors="replace"
        if tok.lowercase == "upper":
            replace = {chr(c): chr(c).upper() for c in range(ord("a"), ord("z") + 1)}
        special = {"pad_token": "<pad>", "eos_token": "<eod>"}
    elif tok.name == "kmer":
        vocab = {t: i for i, t in enumerate(tok._vocab)}
        unk = "<unk>"
        for b in range(256):
            c = int(tok._code[b])
            if 0 <= c <= 4 and "ATCGN"[c] != chr(b):
                replace[chr(b)] = "ATCGN"[c]
        split = Regex(f"[ACGT]{{{tok.k}}}|.")  # runs of unambiguous bases in k-mers, everything else single
        special = {"unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>", "cls_token": "<cls>",
                   "eos_token": "<eos>", "bos_token": "<bos>"}
    elif tok.name == "kmer_overlap":
        # DNABERT's convention: the caller passes the overlapping k-mers separated by spaces
        # ("ACGTAC CGTACG ..."); a k-mer with anything but A/C/G/T is [UNK], as in glmtrain
        vocab = {t: i for i, t in enumerate(tok.vocab())}
        unk = "[UNK]"
        for b in range(256):
            c = int(tok._code[b])
            if 0 <= c <= 4 and "ACGTN"[c] != chr(b) and chr(b) != " ":
                replace[chr(b)] = "ACGTN"[c]  # lowercase folded, ambiguity codes -> N (a k-mer with N is [UNK])
        notes.append("input: overlapping k-mers separated by spaces (DNABERT's convention), e.g. "
                     "' '.join(seq[i:i + k] for i in range(len(seq) - k + 1))")
        special = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                   "mask_token": "[MASK]"}
    elif tok.name == "bpe":
        vocab = None
        special = {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                   "mask_token": "[MASK]"}
    else:
        raise ConvertError(f"model.tokenizer.kind={tok.name}: no Hugging Face tokenizer export for it yet")
    if tok.name == "bpe":  # the run's own vocabulary file, with glmtrain's character policy in front of it
        if not tok.path or not Path(tok.path).is_file():
            raise ConvertError(f"model.tokenizer.path={tok.path or '(unset)'}: the bpe vocabulary to export is missing "
                               "(a run keeps it as <run_dir>/tokenizer.json)")
        ht = Tokenizer.from_file(str(tok.path))
        cfg = {**cfg, "path": ""}  # the export's own tokenizer.json is the vocabulary (set again on reading it back)
        tok._load()
        replace = {chr(b): chr(int(tok._code[b])) for b in range(256)
                   if int(tok._code[b]) and chr(int(tok._code[b])) != chr(b)}
        if (tok._code == 0).any():
            notes.append("characters glmtrain's bpe tokenizer refuses (lowercase/iupac/unknown=error) are kept as they are")
        vocab = ht.get_vocab()
    else:
        ht = Tokenizer(WordLevel(vocab=vocab, unk_token=unk))
    if replace:
        ht.normalizer = normalizers.Sequence([normalizers.Replace(a, b) for a, b in sorted(replace.items())])
    if tok.name == "kmer_overlap":
        ht.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    elif tok.name != "bpe":  # bpe: the vocabulary file's own (none: a whole sequence is one word)
        ht.pre_tokenizer = pre_tokenizers.Split(split, behavior="isolated")
    if tok.add_cls or tok.add_sep:  # the run's class/separator tokens around every sequence (released HyenaDNA: both)
        name = {i: t for t, i in vocab.items()}
        head = [name[tok.cls_id]] if tok.add_cls else []
        tail = [name[tok.sep_id]] if tok.add_sep else []
        single = " ".join([*head, "$A", *tail])
        ht.post_processor = processors.TemplateProcessing(
            single=single, pair=" ".join([single, "$B", *tail]),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(head + tail)])
    ht.add_special_tokens([t for t in dict.fromkeys(special.values()) if t in vocab and len(t) > 1])
    ht.save(str(out / "tokenizer.json"))
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False,
          "padding_side": "right", **special, "glmtrain_tokenizer": cfg}
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return notes


# ----------------------------------------------------------------------------- remote-code export
def hf_config_common(model, tok_cfg) -> dict:
    from glmtrain.tokenizers import build_tokenizer

    tok = build_tokenizer(dataclasses.asdict(tok_cfg) if dataclasses.is_dataclass(tok_cfg) else dict(tok_cfg))
    return {"vocab_size": model.vocab_size, "pad_token_id": tok.pad_id, "eos_token_id": tok.eos_id,
            "bos_token_id": tok.bos_id, "torch_dtype": "float32"}


def glmtrain_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state under ``model.``; a tied LM head is left out (safetensors stores no aliases)."""
    sd = model.state_dict()
    tied = getattr(model, "lm_head", None) is not None and getattr(model, "embed", None) is not None \
        and model.lm_head.weight is model.embed.weight
    return {PREFIX + k: v for k, v in sd.items() if not (tied and k == "lm_head.weight")}


def write_remote_code(model, out: Path, tok_cfg, extra_config: dict | None = None) -> dict:
    """config.json (+ ``extra_config``: values the modeling code reads besides the model config) +
    model.safetensors + modeling_glmtrain.py for ``trust_remote_code``."""
    cfg = model.cfg
    causal = bool(getattr(model, "causal", True))
    auto = "AutoModelForCausalLM" if causal else "AutoModelForMaskedLM"
    arch = "GlmtrainForCausalLM" if causal else "GlmtrainForMaskedLM"
    mc = model_config_dict(cfg)
    tied = model.lm_head.weight is model.embed.weight
    config = {
        "model_type": "glmtrain", "architectures": [arch], "family": cfg.family, "glmtrain": mc,
        "auto_map": {"AutoConfig": "modeling_glmtrain.GlmtrainConfig", auto: f"modeling_glmtrain.{arch}"},
        "tie_word_embeddings": tied, **hf_config_common(model, tok_cfg), **(extra_config or {}),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(glmtrain_tensors(model), out / "model.safetensors",
                      {"format": "pt", "glmtrain_family": cfg.family})
    shutil.copyfile(MODELING, out / "modeling_glmtrain.py")
    return {"config.json": f"{auto} via modeling_glmtrain.{arch} (trust_remote_code=True)",
            "model.safetensors": "glmtrain parameter names under 'model.'", "modeling_glmtrain.py": "torch + transformers only"}


for _family in ("hyena", "evo2"):
    register_exporter(Exporter(_family, write=write_remote_code))


def export_model(model, out: str | Path, tok_cfg, extra: dict | None = None) -> dict:
    """Write ``model`` (a built glmtrain model, weights loaded) as a Hugging Face directory, or as one
    ``.safetensors`` file when ``out`` ends in ``.safetensors``."""
    out = Path(out)
    cfg = model.cfg
    if out.suffix == ".safetensors":
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": "pt", "glmtrain_family": cfg.family, "glmtrain_model": json.dumps(model_config_dict(cfg)),
                "glmtrain_tokenizer": json.dumps(dataclasses.asdict(tok_cfg) if dataclasses.is_dataclass(tok_cfg) else dict(tok_cfg))}
        write_safetensors(glmtrain_tensors(model), out, meta)
        return {out.name: "glmtrain tensors, configs in the metadata"}
    ex = exporters().get(cfg.family)
    if ex is None:
        raise ConvertError(f"no Hugging Face exporter for model.family={cfg.family} (have: {', '.join(sorted(exporters()))})")
    out.mkdir(parents=True, exist_ok=True)
    files = ex.write(model, out, tok_cfg)
    notes = write_tokenizer(tok_cfg, out)
    files["tokenizer.json"] = "AutoTokenizer (PreTrainedTokenizerFast)" + (f"; {'; '.join(notes)}" if notes else "")
    if extra:
        (out / "import.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")
        files["import.json"] = "what was mapped, dropped and recomputed"
    return files


# ----------------------------------------------------------------------------- reading exports back
def _own_export(src: Released) -> tuple[str, dict, dict] | None:
    """(family, model config, tokenizer config) of a glmtrain remote-code export or single-file export."""
    c = src.config or {}
    if c.get("model_type") == "glmtrain" and isinstance(c.get("glmtrain"), dict):
        tok = {}
        tc = src.weights.parent / "tokenizer_config.json"
        if tc.is_file():
            tok = json.loads(tc.read_text()).get("glmtrain_tokenizer") or {}
        return c["family"], c["glmtrain"], tok
    m = src.metadata
    if "glmtrain_model" in m and "glmtrain_family" in m:
        return m["glmtrain_family"], json.loads(m["glmtrain_model"]), json.loads(m.get("glmtrain_tokenizer", "{}"))
    return None


def _read_own(src: Released) -> Imported:
    family, mc, tok = _own_export(src)
    tk = Taker(src, "glmtrain-hf")
    for k in list(tk.left):
        if not k.startswith(PREFIX):
            raise ConvertError(f"{src.weights}: tensor {k} lacks the '{PREFIX}' prefix of a glmtrain export")
        tk.put(k[len(PREFIX):], tk.take(k), k)
    if mc.get("tie_embeddings", True) and "embed.weight" in tk.out and "lm_head.weight" not in tk.out:
        tk.out["lm_head.weight"] = tk.out["embed.weight"]
    from glmtrain.models import config_class

    built = config_class(family)(**{k: v for k, v in mc.items() if k != "tokenizer"})
    free = not_checked(family)
    config = {}  # resolved values (mlp_dim 0 -> the width it stands for), so that equivalent configs compare equal
    for k, v in mc.items():
        if k not in free and k != "family":
            resolve = getattr(built, f"resolved_{k}", None)
            config[k] = resolve() if callable(resolve) else v
    settings = {k: v for k, v in mc.items() if k in free and k != "tokenizer"}
    tok = dict(tok or mc.get("tokenizer") or {})
    if tok.get("kind") == "bpe":  # the vocabulary travels with the export
        vocab = src.weights.parent / "tokenizer.json"
        if not vocab.is_file():
            raise ConvertError(f"{src.weights}: a bpe model needs its vocabulary, {vocab} is missing")
        tok["path"] = str(vocab)
    return tk.finish(family=family, config=config, settings=settings, tokenizer=tok)


register_layout(Layout("glmtrain-hf", "", match=lambda src: _own_export(src) is not None, read=_read_own,
                       description="a directory or .safetensors file written by python -m glmtrain.convert"))

__all__ = ["export_model", "write_tokenizer", "write_remote_code", "glmtrain_tensors", "model_config_dict", "NOT_MATH", "not_checked"]
