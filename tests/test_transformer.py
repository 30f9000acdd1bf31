import math

import pytest
import torch

from glmtrain.models.layers import RotaryEmbedding
from glmtrain.models.transformer import Transformer, TransformerConfig
from glmtrain.module import lr_lambda, param_groups


def _model(causal=True, **kw):
    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=32, n_layers=2, n_heads=4, causal=causal, **kw)
    return Transformer(cfg, 16).double().eval()


@pytest.mark.parametrize("mlp,norm", [("gelu", "layernorm"), ("swiglu", "rmsnorm")])
def test_causal_outputs_never_see_the_future(mlp, norm):
    m = _model(mlp=mlp, norm=norm)
    x = torch.randint(7, 11, (2, 40))
    y = x.clone()
    t = 23
    y[:, t + 1 :] = torch.randint(7, 11, (2, 40 - t - 1))
    with torch.no_grad():
        a, b = m(x), m(y)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_encoder_is_bidirectional():
    m = _model(causal=False)
    x = torch.randint(7, 11, (1, 30))
    y = x.clone()
    y[0, -1] = 7 if x[0, -1] != 7 else 8
    with torch.no_grad():
        assert not torch.allclose(m(x)[:, 0], m(y)[:, 0])


def test_sdpa_matches_explicit_attention():
    m = _model()
    attn = m.blocks[0].attn
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    q, k, v = attn.qkv(x).view(2, 17, 4, 3, 8).permute(3, 0, 2, 1, 4)  # head-major fused layout
    q, k = attn.rope(q, k)
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    s = s.masked_fill(torch.ones(17, 17, dtype=torch.bool).triu(1), float("-inf"))
    ref = attn.out((s.softmax(-1) @ v).transpose(1, 2).reshape(2, 17, 32))
    torch.testing.assert_close(attn(x), ref, rtol=1e-10, atol=1e-12)


def test_rope_base_and_interpolation_are_separate_knobs():
    plain = RotaryEmbedding(8, base=10000.0)
    interp = RotaryEmbedding(8, base=10000.0, interpolation_factor=4.0)
    cos_i, _ = interp.cos_sin(16, "cpu", torch.float64)
    cos_p, _ = plain.cos_sin(16, "cpu", torch.float64)
    # linear interpolation: position 12 under factor 4 is position 3 without it; frequencies unchanged
    torch.testing.assert_close(cos_i[12], cos_p[3])
    torch.testing.assert_close(interp.inv_freq(), plain.inv_freq())
    # the base changes the frequencies, not the positions
    assert not torch.allclose(RotaryEmbedding(8, base=1e6).inv_freq(), plain.inv_freq())


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def score(i, j):
        qi = RotaryEmbedding.rotate(q, *rope.cos_sin(1, "cpu", torch.float64, offset=i))
        kj = RotaryEmbedding.rotate(k, *rope.cos_sin(1, "cpu", torch.float64, offset=j))
        return (qi * kj).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10))


def test_param_groups_no_decay_on_norms_biases_embeddings():
    m = _model()
    groups = {g["name"]: g for g in param_groups(m, 0.1)}
    decay = {id(p) for p in groups["decay"]["params"]}
    names = {id(p): n for n, p in m.named_parameters()}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    for pid in decay:
        n = names[pid]
        assert "norm" not in n and not n.endswith("bias") and "embed" not in n
    assert any("attn.qkv.weight" in names[pid] for pid in decay)
    assert sum(len(g["params"]) for g in groups.values()) == len(list(m.parameters()))  # tied head counted once


def test_warmup_then_cosine():
    f = lambda s: lr_lambda(s, warmup=10, total=110, min_ratio=0.1, schedule="cosine")
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert lr_lambda(50, 10, 110, 0.1, "constant") == 1.0
