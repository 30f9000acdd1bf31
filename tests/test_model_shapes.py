"""Parameter counts of the published long-convolution configs (built on the meta device).

HyenaDNA: published counts from the paper / model cards (0.44M tiny, 3.3M small,
6.6M medium and large), within 2 %, plus an exact closed form written from the
released ``config.json`` tensor shapes.

Evo 2: the model cards give only labels (1B, 7B, 40B); ``published_params`` is
the exact tensor inventory of the released checkpoint configs (vortex
``evo2-*.yml``), recomputed here by an independent closed form; the labels are
checked loosely and the deviation is recorded in each yaml.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from glmtrain.models import build_model, config_class
from glmtrain.tokenizers import build_tokenizer

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"

HYENA = {  # file: (d, layers, published)
    "hyena.yaml": (128, 2, 0.44e6),
    "hyena_tiny_1k.yaml": (128, 2, 0.44e6),
    "hyena_small_32k.yaml": (256, 4, 3.3e6),
    "hyena_medium_160k.yaml": (256, 8, 6.6e6),
    "hyena_medium_450k.yaml": (256, 8, 6.6e6),
    "hyena_large_1m.yaml": (256, 8, 6.6e6),
}
EVO2 = {  # file: (d, layers, attention layers, heads, mlp, SE/MR groups, nominal label)
    "evo2_50m.yaml": (640, 11, 2, 10, 1792, 64, 50e6),
    "evo2_100m.yaml": (768, 15, 3, 12, 2048, 64, 100e6),
    "evo2_1b.yaml": (1920, 25, 4, 15, 5120, 128, 1e9),
    "evo2_7b.yaml": (4096, 32, 5, 32, 11264, 256, 7e9),
    "evo2_40b.yaml": (8192, 50, 8, 64, 22528, 512, 40e9),
}


def load(name: str):
    raw = OmegaConf.load(CONF / name)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(config_class(raw.family)), raw))
    tok = build_tokenizer(vars(cfg.tokenizer))
    with torch.device("meta"):
        model = build_model(cfg, tok.vocab_size)
    return cfg, tok, model


def hyenadna_closed_form(d: int, layers: int, vocab: int = 16, order: int = 64, emb: int = 5, inner_mlps: int = 2) -> int:
    mixer = (d * 3 * d + 3 * d) + (3 * d * 3 + 3 * d) + (d * d + d)  # in_proj, short conv, out_proj
    filt = (emb * order + order) + inner_mlps * (order * order + order) + order * d + order + d  # MLP, out, Sin freq, D
    mlp = (d * 4 * d + 4 * d) + (4 * d * d + d)
    return layers * (mixer + filt + mlp + 4 * d) + vocab * d + 2 * d


def evo2_closed_form(d, layers, attn, heads, mlp, groups, vocab=512, state=16) -> int:
    n_hyena = layers - attn
    per = (layers // 1)
    common = per * (2 * d + 3 * d * mlp)  # two RMSNorms + gated MLP in every block
    attn_p = attn * (3 * d * d + d * d + d)
    hyena_p = n_hyena * (3 * d * d + 9 * d + d * d + d)  # projection, featurizer conv, out proj + bias
    # the pattern repeats S, D, H equally often
    se, mr, li = n_hyena // 3, n_hyena // 3, n_hyena // 3
    filters = se * groups * 7 + mr * (groups * 128 + d) + li * (2 * d * state + d)
    return common + attn_p + hyena_p + filters + vocab * d + d


@pytest.mark.parametrize("name", sorted(HYENA))
def test_hyenadna_published_counts(name):
    cfg, tok, model = load(name)
    d, layers, published = HYENA[name]
    n = model.num_params()
    assert tok.vocab_size == 16
    assert (cfg.d_model, cfg.n_layers) == (d, layers)
    assert n == hyenadna_closed_form(d, layers)
    assert abs(n / published - 1) < 0.02
    assert abs(n / cfg.published_params - 1) < 0.02


@pytest.mark.parametrize("name", sorted(EVO2))
def test_evo2_published_counts(name):
    cfg, tok, model = load(name)
    d, layers, attn, heads, mlp, groups, nominal = EVO2[name]
    n = model.num_params()
    assert tok.vocab_size == 512 and cfg.d_model == d and len(cfg.pattern) == layers
    assert cfg.pattern.count("*") == attn and cfg.n_heads == heads and cfg.resolved_mlp_dim() == mlp
    assert n == evo2_closed_form(d, layers, attn, heads, mlp, groups)
    assert abs(n / cfg.published_params - 1) < 0.02
    assert abs(n / nominal - 1) < 0.15  # model-card labels are rounded names (see the yaml comments)


def test_evo2_1b_pattern_matches_release_layout():
    cfg, _, _ = load("evo2_1b.yaml")
    idx = lambda c: [i for i, ch in enumerate(cfg.pattern) if ch == c]  # noqa: E731
    assert idx("S") == [0, 4, 7, 11, 14, 18, 21]
    assert idx("D") == [1, 5, 8, 12, 15, 19, 22]
    assert idx("H") == [2, 6, 9, 13, 16, 20, 23]
    assert idx("*") == [3, 10, 17, 24]


@pytest.mark.parametrize("name", ["hyena.yaml", "evo2.yaml"])
def test_default_shapes_are_cpu_sized(name):
    cfg, tok, model = load(name)
    assert model.num_params() < 3e6
    real = build_model(cfg, tok.vocab_size)  # and it runs on the CPU
    ids = torch.randint(0, tok.vocab_size, (2, 64))
    assert real(ids).shape == (2, 64, tok.vocab_size)
