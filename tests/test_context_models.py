"""Models extend to longer contexts correctly (issue: staged context extension, point 4).

* a causal model whose weights were saved at length L and that is evaluated at 2L gives the same
  outputs on the first L positions (HyenaDNA, Evo 2 with every block kind, the Transformer), in
  float64 so that the only difference allowed is rounding;
* Hyena implicit filters are evaluated at the new length (the filter at 2L extends the one at L,
  it is not zero-padded), modal filters extend naturally, explicit filters keep their weights;
* the RoPE knobs of a stage change exactly what they should: the cos/sin tables equal Hugging
  Face's ``LlamaRotaryEmbedding`` (default and linear scaling) for every (base, factor); through
  the schedule the stage's model differs from the base model only in its attention layers.
"""

from __future__ import annotations

import io

import pytest
import torch

from glmtrain.models import build_model
from glmtrain.models.layers import RotaryEmbedding
from glmtrain.schedule import model_math, resolve
from tests._util import compose_run

L = 48

TINY = {
    "hyena": ["model=hyena", "model.d_model=32", "model.n_layers=2", "model.max_seq_len=128", "model.filter_order=16"],
    "evo2": ["model=evo2", "model.d_model=32", "model.pattern=SDH*", "model.n_heads=2", "model.se_filter_groups=4",
             "model.mr_filter_groups=4", "model.mr_filter_length=16", "model.mlp_dim=64"],
    "transformer": ["model=transformer", "model.d_model=32", "model.n_layers=2", "model.n_heads=2"],
}


def _saved_and_reloaded(model_cfg, vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    a = build_model(model_cfg, vocab).double().eval()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # "saved at length L": weights are all a stage hands on
    buf.seek(0)
    b = build_model(model_cfg, vocab).double().eval()
    b.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    return a, b


@pytest.mark.parametrize("family", sorted(TINY))
def test_causal_model_at_2L_equals_model_at_L_on_first_L_positions(family):
    run = compose_run(TINY[family])
    vocab = 16 if run.model.tokenizer.kind == "char" else 512
    a, b = _saved_and_reloaded(run.model, vocab)
    ids = torch.randint(7, 11, (2, 2 * L))
    with torch.no_grad():
        short = a(ids[:, :L])
        long = b(ids)
    assert long.shape[1] == 2 * L
    torch.testing.assert_close(long[:, :L], short, rtol=0, atol=1e-10)
    # and the extra positions really see the longer context (not a copy of the short model's behaviour)
    with torch.no_grad():
        shifted = b(torch.cat([ids[:, L // 2:], ids[:, : L // 2]], dim=1))
    assert (shifted[:, L:] - long[:, L:]).abs().max() > 1e-6


def test_hyena_implicit_filter_is_evaluated_at_the_new_length():
    run = compose_run(TINY["hyena"])
    torch.manual_seed(1)
    model = build_model(run.model, 16).double()
    with torch.no_grad():
        for f_short, f_long in zip(model.filters(L), model.filters(2 * L)):
            assert f_short.shape[-1] == L and f_long.shape[-1] == 2 * L
            torch.testing.assert_close(f_long[:, :L], f_short, rtol=0, atol=1e-12)
            assert f_long[:, L:].abs().min() > 0  # computed at the new positions, not zero-padded


def test_evo2_modal_filters_extend_and_explicit_filters_keep_their_weights():
    run = compose_run(TINY["evo2"])
    torch.manual_seed(2)
    model = build_model(run.model, 512).double()
    modal = [b.mixer.filter for b in model.blocks if b.kind == "hyena_li"]
    explicit = [b.mixer.filter for b in model.blocks if b.kind in ("hyena_se", "hyena_mr")]
    assert modal and explicit
    with torch.no_grad():
        for f in modal:
            torch.testing.assert_close(f.materialize(2 * L, torch.float64)[:, :L], f.materialize(L, torch.float64),
                                       rtol=0, atol=1e-12)
    # explicit filters (SE 7 taps, MR 16 here) do not depend on the window: the same tensors serve every stage
    lengths = {tuple(f.h.shape) for f in explicit}
    assert lengths == {(4, 7), (4, 16)}


@pytest.mark.parametrize("base,factor", [(10_000.0, 1.0), (1e6, 1.0), (10_000.0, 128.0), (5e5, 4.0)])
def test_rope_tables_match_hugging_face(base, factor):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    kind = {"rope_type": "default"} if factor == 1.0 else {"rope_type": "linear", "factor": factor}
    hf = LlamaRotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=8192,
                                          rope_parameters={**kind, "rope_theta": base}))
    pos = torch.tensor([[0, 1, 7, 100, 1000, 4095]])
    cos_hf, sin_hf = hf(torch.zeros(1, 6, 64), pos)
    ours = RotaryEmbedding(16, base, factor)
    cos, sin = ours.cos_sin(4096, torch.device("cpu"), torch.float32)
    # HF forms the angles in float32 (ours in float64): at position 4095 that rounds by ~4e-5; a wrong
    # base or factor would be off by O(1)
    torch.testing.assert_close(cos[pos[0]], cos_hf[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(sin[pos[0]], sin_hf[0], rtol=0, atol=1e-4)


def test_stage_rope_knobs_change_only_the_attention_layers():
    run = compose_run([*TINY["evo2"], "context=tiny_64_to_1k", "+context.stages.1.rope_base=1e6",
                       "+context.stages.1.rope_interpolation=4"])
    s0, s1 = resolve(run, dp=1).stages[:2]
    assert (s0.rope_base, s0.rope_interpolation) == (10_000.0, 1.0)
    assert (s1.rope_base, s1.rope_interpolation) == (1e6, 4.0)
    assert model_math(s0.run.model) == model_math(s1.run.model)  # everything else is the same model
    a, _ = _saved_and_reloaded(s0.run.model, 512)
    torch.manual_seed(0)
    b = build_model(s1.run.model, 512).double().eval()
    b.load_state_dict(a.state_dict(), strict=True)  # the stage takes the weights unchanged
    ropes = [m for m in b.modules() if isinstance(m, RotaryEmbedding)]
    assert ropes and all((r.base, r.interpolation_factor) == (1e6, 4.0) for r in ropes)
    outs = {}
    for name, model in (("a", a), ("b", b)):
        for i, blk in enumerate(model.blocks):
            blk.register_forward_hook(lambda m, inp, out, i=i, name=name: outs.__setitem__((name, i), out))
    ids = torch.randint(7, 11, (1, 32))
    with torch.no_grad():
        a(ids), b(ids)
    first_attn = next(i for i, blk in enumerate(a.blocks) if blk.kind == "attention")
    for i in range(first_attn):  # Hyena blocks before the first attention layer: untouched
        torch.testing.assert_close(outs[("a", i)], outs[("b", i)], rtol=0, atol=0)
    ya, yb = outs[("a", first_attn)], outs[("b", first_attn)]
    torch.testing.assert_close(ya[:, 0], yb[:, 0], rtol=0, atol=1e-12)  # position 0: RoPE is the identity
    assert (ya[:, 1:] - yb[:, 1:]).abs().max() > 1e-6  # later positions see the new rotation


def test_hyena_stage_longer_than_its_filter_normaliser_is_refused():
    from glmtrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"exceed model.max_seq_len=128"):
        resolve(compose_run([*TINY["hyena"], "context=tiny_64_to_1k"]), dp=1)
