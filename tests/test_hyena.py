"""HyenaDNA and the shared long-convolution ops: exactness, causality, filters, groups."""

from __future__ import annotations

import pytest
import torch

from glmtrain.models import ops
from glmtrain.models.hyena import HyenaConfig, HyenaDNA
from glmtrain.tokenizers import TokenizerConfig


def tiny_cfg(**kw) -> HyenaConfig:
    base = dict(d_model=16, n_layers=2, filter_order=16, max_seq_len=64, embed_dropout=0.0, tokenizer=TokenizerConfig(kind="char"))
    base.update(kw)
    return HyenaConfig(**base)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# ----------------------------------------------------------------------------- FFT convolution


@pytest.mark.parametrize("seq_len", [1, 2, 64, 100, 127, 256, 1000])
@pytest.mark.parametrize("filter_len", [None, 3, 17])
def test_fft_conv_equals_direct_conv_fp64(seq_len, filter_len):
    torch.manual_seed(seq_len)
    b, c = 2, 5
    klen = seq_len if filter_len is None else filter_len
    u = torch.randn(b, c, seq_len, dtype=torch.float64)
    k = torch.randn(c, klen, dtype=torch.float64)
    D = torch.randn(c, dtype=torch.float64)
    ref = ops.direct_causal_conv(u, k, D)
    for chunk in (0, 2):
        out = ops.fft_causal_conv(u, k, D, channel_chunk=chunk)
        assert out.dtype == torch.float64
        assert rel_err(out, ref) < 1e-8


def test_fft_conv_matches_naive_sum():
    torch.manual_seed(0)
    u = torch.randn(1, 1, 9, dtype=torch.float64)
    k = torch.randn(1, 9, dtype=torch.float64)
    naive = torch.stack([sum(k[0, s] * u[0, 0, t - s] for s in range(t + 1)) for t in range(9)])
    assert rel_err(ops.fft_causal_conv(u, k)[0, 0], naive) < 1e-12


def test_fft_conv_backward_gradcheck():
    torch.manual_seed(1)
    u = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    D = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, k, D: ops.fft_causal_conv(u, k, D, channel_chunk=2), (u, k, D), fast_mode=True)


def test_fused_hyena_core_matches_composition_and_gradcheck():
    torch.manual_seed(2)
    b, c, seq_len = 1, 2, 9
    z = torch.randn(b, 3 * c, seq_len, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3 * c, 1, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3 * c, dtype=torch.float64, requires_grad=True)
    k = torch.randn(c, seq_len, dtype=torch.float64, requires_grad=True)
    D = torch.randn(c, dtype=torch.float64, requires_grad=True)
    fused = ops.hyena_gated_conv(z, w, bias, k, D, channel_chunk=1)
    plain = ops.hyena_gated_conv(z, w, bias, k, D, fused=False)
    assert rel_err(fused, plain) < 1e-12
    assert torch.autograd.gradcheck(lambda *a: ops.hyena_gated_conv(*a, channel_chunk=1), (z, w, bias, k, D), fast_mode=True)


def test_fft_conv_runs_in_fp32_under_bf16_autocast():
    u = torch.randn(1, 4, 50, dtype=torch.bfloat16)
    k = torch.randn(4, 50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.fft_causal_conv(u, k)
    assert y.dtype == torch.float32


def test_next_fast_len():
    for n in [1, 2, 7, 11, 97, 1000, 2049, 65537]:
        m = ops.next_fast_len(n)
        assert m >= n
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        assert r == 1
        assert all(not _smooth(j) for j in range(n, m))


def _smooth(n: int) -> bool:
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    return n == 1


# ----------------------------------------------------------------------------- model


def test_causality_hyena():
    torch.manual_seed(0)
    model = HyenaDNA(tiny_cfg(), 16).double().eval()
    x = torch.randint(7, 12, (2, 40))
    y = model(x)
    for t in (0, 17, 38):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randint(7, 12, x2[:, t + 1 :].shape)
        y2 = model(x2)
        assert torch.allclose(y[:, : t + 1], y2[:, : t + 1], atol=1e-10, rtol=0)
        assert not torch.allclose(y[:, t + 1 :], y2[:, t + 1 :])


def test_prefix_logits_do_not_depend_on_input_length():
    """The filter is defined per position, so a prefix scores the same alone or inside a longer input."""
    torch.manual_seed(0)
    model = HyenaDNA(tiny_cfg(), 16).double().eval()
    x = torch.randint(7, 12, (1, 50))
    assert torch.allclose(model(x)[:, :13], model(x[:, :13]), atol=1e-10, rtol=0)


def test_implicit_filter_chunked_equals_unchunked_and_has_decay():
    torch.manual_seed(0)
    cfg = tiny_cfg(filter_chunk=7)
    model = HyenaDNA(cfg, 16)
    f = model.blocks[0].mixer.filter
    k_chunked = f(50)
    f.cfg.filter_chunk = 0
    k_full = f(50)
    assert k_full.shape == (cfg.d_model, 50)
    assert torch.allclose(k_chunked, k_full, atol=1e-6)
    # checkpointed chunks give the same gradients
    f.cfg.filter_chunk = 7
    f(50).square().sum().backward()
    g_chunk = f.out.weight.grad.clone()
    f.zero_grad()
    f.cfg.filter_chunk = 0
    f(50).square().sum().backward()
    assert torch.allclose(g_chunk, f.out.weight.grad, atol=1e-5)
    # prefix property and features
    assert torch.allclose(f(20), k_full[:, :20], atol=1e-6)
    z, t = f.features(0, 4, "cpu")
    assert z.shape == (4, cfg.emb_dim) and torch.allclose(t[:, 0], torch.arange(4) / (cfg.max_seq_len - 1))


def test_filter_params_group_and_buffers():
    model = HyenaDNA(tiny_cfg(filter_lr_scale=0.5), 16)
    overrides = model.param_groups_overrides()
    assert overrides == {"mixer.filter.": {"weight_decay": 0.0, "lr_scale": 0.5}}
    names = [n for n, _ in model.named_parameters()]
    in_group = [n for n in names if any(s in n for s in overrides)]
    # the implicit-filter MLP, its shared Sin frequency and the D skip, in every layer
    for i in range(2):
        for suffix in ("bias", "act.freq", "mlp.0.weight", "mlp.2.bias", "out.weight"):
            assert f"blocks.{i}.mixer.filter.{suffix}" in in_group
    assert not any("short_conv" in n or "in_proj" in n or "out_proj" in n for n in in_group)
    buffers = dict(model.named_buffers())
    assert "blocks.0.mixer.filter.band_freqs" in buffers and "blocks.0.mixer.filter.deltas" in buffers
    assert not any("band_freqs" in n or "deltas" in n for n in names)


def test_tied_lm_head():
    model = HyenaDNA(tiny_cfg(), 16)
    assert model.lm_head.weight is model.embed.weight


@pytest.mark.parametrize("policy,layers", [("block", 0), ("mlp", 0), ("block", 1)])
def test_activation_checkpointing_same_gradients(policy, layers):
    torch.manual_seed(0)
    x = torch.randint(7, 12, (2, 30))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = HyenaDNA(tiny_cfg(activation_checkpointing=ckpt, checkpoint_policy=policy, checkpoint_layers=layers), 16).double()
        model.train()
        loss = model(x).logsumexp(-1).mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-10), n


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = HyenaDNA(tiny_cfg(), 16).eval()
    x = torch.randint(7, 12, (2, 64))
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == ref.shape
    assert rel_err(out.float(), ref) < 5e-2


def test_learns_a_repeat():
    """A few AdamW steps on a periodic sequence drive next-token loss down."""
    torch.manual_seed(0)
    model = HyenaDNA(tiny_cfg(), 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.tensor([[7, 8, 9, 10, 10, 9, 8] * 9])
    losses = []
    for _ in range(40):
        logits = model(x)[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_config_validation():
    with pytest.raises(ValueError, match="checkpoint_policy"):
        HyenaDNA(tiny_cfg(checkpoint_policy="everything"), 16)
    with pytest.raises(ValueError, match="emb_dim"):
        HyenaDNA(tiny_cfg(emb_dim=4), 16)


def test_gelu_linear_recompute_matches_plain_mlp():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, w, b: ops.gelu_linear(h, w, b), (h, w, b), fast_mode=True)
    plain = torch.nn.functional.linear(torch.nn.functional.gelu(h, approximate="tanh"), w, b)
    assert torch.allclose(ops.gelu_linear(h, w, b), plain)
    # whole model: same gradients with and without recomputation, also under bf16 autocast
    x = torch.randint(7, 12, (2, 20))
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = HyenaDNA(tiny_cfg(mlp_recompute_gelu=recompute), 16).double()
        model(x).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(*grads))
    model = HyenaDNA(tiny_cfg(), 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
