"""Evo 2-style StripedHyena 2: operators, modal filter, causality, RoPE knobs, quirks."""

from __future__ import annotations

import math

import pytest
import torch

from glmtrain.models import ops
from glmtrain.models.evo2 import Evo2, Evo2Config, ExplicitFilter, ModalFilter
from glmtrain.models.layers import RotaryEmbedding
from glmtrain.tokenizers import TokenizerConfig


def tiny_cfg(**kw) -> Evo2Config:
    base = dict(
        d_model=32, pattern="SDH*", n_heads=4, mlp_dim=64, se_filter_groups=4, mr_filter_groups=8,
        mr_filter_length=16, tokenizer=TokenizerConfig(kind="byte"),
    )
    base.update(kw)
    return Evo2Config(**base)


def rel_err(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_pattern_builds_blocks_in_order():
    model = Evo2(tiny_cfg(pattern="SDH*HS"), 512)
    assert [b.kind for b in model.blocks] == ["hyena_se", "hyena_mr", "hyena_li", "attention", "hyena_li", "hyena_se"]
    with pytest.raises(ValueError, match="pattern"):
        Evo2(tiny_cfg(pattern="SDX"), 512)
    with pytest.raises(ValueError, match="n_layers"):
        Evo2(tiny_cfg(pattern="SDH*", n_layers=5), 512)


def test_causality_all_block_kinds():
    torch.manual_seed(0)
    model = Evo2(tiny_cfg(pattern="SDH*SDH*"), 512).double().eval()
    x = torch.randint(2, 256, (2, 45))
    y = model(x)
    for t in (0, 20, 43):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randint(2, 256, x2[:, t + 1 :].shape)
        y2 = model(x2)
        assert torch.allclose(y[:, : t + 1], y2[:, : t + 1], atol=1e-10, rtol=0)
        assert not torch.allclose(y[:, t + 1 :], y2[:, t + 1 :])


@pytest.mark.parametrize("groups", [32, 8, 1])
def test_modal_filter_fft_equals_recurrence_and_explicit_sum(groups):
    torch.manual_seed(0)
    d, n, seq_len = 32, 16, 77
    f = ModalFilter(d, groups, n, 1e-3, 1.0).double()
    with torch.no_grad():
        f.D.normal_()
    x = torch.randn(2, d, seq_len, dtype=torch.float64)
    h = f.materialize(seq_len, torch.float64)  # [G, L]
    # explicit materialisation: sum_n R_n p_n^t, term by term
    p, r = f.poles().detach(), f.residues.detach()
    naive = torch.stack([sum(r[:, j] * p[:, j] ** t for j in range(n)) for t in range(seq_len)], dim=-1)
    assert rel_err(h.detach(), naive) < 1e-10
    fft = ops.fft_causal_conv(x, ops.grouped_filter(h, d), f.D)
    rec = f.forward_recurrent(x)
    assert rel_err(fft.detach(), rec.detach()) < 1e-8
    # initial decay rates -log(p): spread log-uniformly over [rate_min, rate_max] = [1e-3, 1] (jitter below half
    # a bin), increasing along the modes of every group
    rate = -torch.log(p)
    half_bin = math.log(1.0 / 1e-3) / (2 * n)
    assert rate.min() >= 1e-3 * math.exp(-half_bin) and rate.max() <= math.exp(half_bin)
    assert torch.all(rate[:, 1:] > rate[:, :-1])


def test_modal_materialize_gradients_checkpointed():
    torch.manual_seed(0)
    f = ModalFilter(8, 8, 4, 1e-2, 1.0).double()
    assert torch.autograd.gradcheck(lambda lr, r: f._materialize(lr, r, 12), (f.log_rate.detach().clone().requires_grad_(), f.residues.detach().clone().requires_grad_()))
    f.materialize(12, torch.float64).sum().backward()
    assert f.log_rate.grad is not None and f.residues.grad is not None


def test_grouped_explicit_filter_matches_per_channel_conv():
    torch.manual_seed(0)
    d, g, klen = 12, 3, 7
    f = ExplicitFilter(d, klen, g, None, skip=False).double()
    x = torch.randn(2, d, 30, dtype=torch.float64)
    y = f(x)
    h = f.h.detach()
    for c in range(d):
        ref = ops.direct_causal_conv(x[:, c : c + 1], h[c // (d // g)][None])
        assert torch.allclose(y[:, c : c + 1], ref, atol=1e-12)


def test_mr_filter_decay_window_and_skip():
    f = ExplicitFilter(16, 128, 4, (0.3, 1.5, 1e-2), skip=True)
    w = f.window
    assert w.shape == (4, 128)
    assert torch.all(w[:, 1:] <= w[:, :-1]) and torch.allclose(w[:, 0], torch.ones(4))
    assert float(w[-1, int(0.3 * 128)]) == pytest.approx(1e-2, rel=0.05)  # fastest group reaches the target at 30 %
    assert torch.allclose(f.materialize(), f.h * w)
    assert f.D is not None and ExplicitFilter(16, 7, 4, None, skip=False).D is None


def test_evo2_quirks():
    model = Evo2(tiny_cfg(pattern="SDH*"), 512)
    acts = [b.mlp.act for b in model.blocks]
    x = torch.randn(5)
    assert torch.allclose(acts[0](x), torch.nn.functional.gelu(x))
    assert all(torch.equal(a(x), x) for a in acts[1:])
    attn = model.blocks[3].mixer
    assert attn.qkv.bias is None and attn.out.bias is not None
    hy = model.blocks[0].mixer
    assert hy.proj.bias is None and hy.short_conv.bias is None and hy.out.bias is not None
    everywhere = Evo2(tiny_cfg(mlp_act_first_layer_only=False), 512)
    assert all(torch.allclose(b.mlp.act(x), torch.nn.functional.gelu(x)) for b in everywhere.blocks)
    assert model.lm_head.weight is model.embed.weight


def test_rope_base_and_interpolation_are_separate_knobs():
    model = Evo2(tiny_cfg(rope_base=1e6, rope_interpolation=8.0), 512)
    rope = model.blocks[3].mixer.rope
    hd = rope.head_dim
    # the model's rotary table is base 1e6 (theta_i = 1e6^(-2i/hd)) at positions divided by 8
    want = 1e6 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    torch.testing.assert_close(rope.inv_freq().double(), want, rtol=1e-6, atol=0)
    cos_m, _ = rope.cos_sin(17, "cpu", torch.float64)
    torch.testing.assert_close(cos_m[16].reshape(-1)[: hd // 2], torch.cos(2.0 * want), rtol=1e-6, atol=1e-7)
    # interpolation divides positions: position 8p with factor 8 == position p with factor 1 (same base)
    r8 = RotaryEmbedding(hd, 1e6, 8.0)
    r1 = RotaryEmbedding(hd, 1e6, 1.0)
    cos8, sin8 = r8.cos_sin(33, "cpu", torch.float64)
    cos1, sin1 = r1.cos_sin(5, "cpu", torch.float64)
    assert torch.allclose(cos8[::8], cos1) and torch.allclose(sin8[::8], sin1)
    # the base changes the frequencies, not the positions
    rb = RotaryEmbedding(hd, 1e4, 8.0)
    assert not torch.allclose(rb.inv_freq(), r8.inv_freq())
    assert torch.allclose(rb.inv_freq()[0], r8.inv_freq()[0])  # first frequency is 1 for any base
    # and the model's attention actually depends on both
    torch.manual_seed(0)
    x = torch.randint(2, 256, (1, 20))
    outs = []
    for base, interp in ((1e4, 1.0), (1e6, 1.0), (1e4, 8.0)):
        torch.manual_seed(0)
        m = Evo2(tiny_cfg(rope_base=base, rope_interpolation=interp), 512).eval()
        outs.append(m(x))
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])


def test_filter_param_group():
    model = Evo2(tiny_cfg(filter_lr_scale=0.1), 512)
    ov = model.param_groups_overrides()
    assert ov == {"mixer.filter.": {"weight_decay": 0.0, "lr_scale": 0.1}}
    grouped = {n for n, _ in model.named_parameters() if "mixer.filter." in n}
    assert grouped == {
        "blocks.0.mixer.filter.h", "blocks.1.mixer.filter.h", "blocks.1.mixer.filter.D",
        "blocks.2.mixer.filter.log_rate", "blocks.2.mixer.filter.residues", "blocks.2.mixer.filter.D",
    }
    assert "blocks.1.mixer.filter.window" in dict(model.named_buffers())


def test_activation_checkpointing_same_gradients():
    x = torch.randint(2, 256, (2, 24))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = Evo2(tiny_cfg(activation_checkpointing=ckpt), 512).double().train()
        model(x).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-10), n


def test_bf16_autocast_runs():
    torch.manual_seed(0)
    model = Evo2(tiny_cfg(), 512).eval()
    x = torch.randint(2, 256, (2, 40))
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert rel_err(out.float(), ref) < 5e-2


def test_default_mlp_dim_rounding():
    assert Evo2Config(d_model=1920).resolved_mlp_dim() == 5120
    assert Evo2Config(d_model=128).resolved_mlp_dim() == 384
    assert math.isclose(Evo2Config(d_model=4096, mlp_dim=11264).resolved_mlp_dim(), 11264)
