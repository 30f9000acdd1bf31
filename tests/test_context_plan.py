"""The memory plan (``plan=true``): its activation measurement and its estimate against measured peaks.

* the plan measures a reduced-width proxy and extrapolates in width: the extrapolated bytes per token
  equal a direct measurement of the full-width model (Evo 2, every block kind);
* the estimated peak of a training step is checked against the peak of live tensor bytes measured
  while the real full-size step runs (CPU, fp32) -- a measurement the estimate does not use;
* the report has one row per stage with a verdict and a suggestion where it does not fit.
"""

from __future__ import annotations

import copy

import pytest
import torch

from glmtrain.config import ConfigError
from glmtrain.memory import PeakLiveBytes, _measure, measure_activations, plan_report
from glmtrain.models import build_model
from glmtrain.schedule import check
from tests._util import compose_run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_width_extrapolation_equals_a_direct_measurement():
    run = compose_run(["model=evo2", "model.d_model=256", "model.n_heads=4"])  # proxies at d 64 and 128
    got = measure_activations(run.model, 512, 256, None)
    a, b = _measure(run.model, 512, 128, None), _measure(run.model, 512, 256, None)
    direct = [(y - x) / 128 for x, y in zip(a, b)]
    n = len(run.model.pattern)
    assert len(got.layers) == n == len(got.recompute)
    for est, ref in zip([got.head, *got.layers], direct[: n + 1]):
        assert abs(est - ref) <= 0.02 * ref + 8, (est, ref)


def test_estimated_step_peak_against_measured_live_bytes():
    run = compose_run(["model=hyena", "model.d_model=128", "model.max_seq_len=8192"])
    cfg, L = copy.deepcopy(run.model), 1024
    cfg.embed_dropout = 0.0
    torch.manual_seed(0)
    model = build_model(cfg, 16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    ids = torch.randint(7, 11, (1, L))

    def step():
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 16), ids[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # optimizer states exist before the measured step
    with PeakLiveBytes() as peak:
        step()
    est = measure_activations(cfg, 16, L, None).peak(L) + 4 * sum(p.numel() for p in model.parameters())
    assert 0.8 < est / peak.peak < 1.2, (est, peak.peak)


def test_plan_report_per_stage_with_verdicts():
    for card, verdict in ((80, "fits"), (1, "over by")):  # 1 GiB: nothing left after the CUDA context
        run = compose_run(["context=tiny_64_to_1k", "model.d_model=32", "model.filter_order=16", "plan=true",
                           f"plan_card_gib={card}"])
        text = plan_report(run, check(run))
        rows = [ln for ln in text.splitlines() if ln.split() and ln.split()[0][:2] in ("1-", "2-", "3-", "4-", "5-")]
        assert len(rows) == 5 and f"card {card} GiB" in text
        assert all(verdict in r for r in rows), text
    assert "activation_checkpointing=true" in rows[-1] and "memory plan: model hyena-tiny-1k" in text


def test_shipped_schedules_resolve_with_their_published_numbers():
    evo = check(compose_run(["model=evo2_7b", "context=evo2_8k_to_1m", "strategy=fsdp", "trainer.devices=8",
                             "plan=true"])).stages
    assert [s.window for s in evo] == [8192, 32768, 65536, 131072, 262144, 524288, 1_048_576]
    for s in evo[1:]:  # the extension stages: 12,500 iterations at 3e-5 -> 3e-6, 5 % warmup, weights only
        assert (s.steps, s.lr, s.final_lr, s.warmup_steps, s.carry) == (12_500, 3e-5, 3e-5 * 0.1, 625, "weights")
        assert (s.rope_base, s.rope_interpolation) == (10_000.0, s.window / 8192)
        assert s.global_batch_tokens == 4_194_304 and s.run.trainer.micro_batch_size == 1
    assert evo[-1].context_parallel == 2  # 4 samples of 1M per step on 8 GPUs: the plan needs 2 GPUs per sample
    hy = check(compose_run(["model=hyena_small_32k", "context=hyena_1k_to_32k"])).stages
    assert [s.window for s in hy] == [1024 * 2**i for i in range(6)]
    assert {s.global_batch_tokens for s in hy} == {262_144} and [s.global_batch_tokens // s.window for s in hy][::5] == [256, 8]
    assert all(s.carry == "weights+optimizer" for s in hy[1:])


@pytest.mark.parametrize("overrides, says", [
    (["trainer.max_steps=10"], "trainer.max_steps=10 conflicts with context=tiny_64_to_1k (its stages total 24 steps)"),
    (["trainer.stop_at_step=24"], "trainer.stop_at_step=24 never takes effect: the schedule ends at step 24"),
    (["context.stages.2.window=384"], "context.stages[2].window=384 does not divide the stored window (1024 bases"),
    (["context.stages.2.steps=0"], "context.stages[2]: give its length as steps or as tokens (exactly one, > 0)"),
    (["context.stages.2.steps=0", "+context.stages.2.tokens=1500"], "context.stages[2].tokens=1500 is not a whole number of steps"),
    (["+context.stages.1.carry=optimizer"], "context.stages[1].carry='optimizer': allowed values are"),
    (["+context.stages.1.rope_base=500000"], "context.stages[1].rope_base: model family 'hyena' has no attention layers"),
    (["+context.stages.1.warmup_steps=9"], "context.stages[1]: warmup (9 steps) is longer than the stage (4 steps)"),
])
def test_a_schedule_that_cannot_run_is_refused_with_one_line(overrides, says):
    with pytest.raises(ConfigError) as e:
        check(compose_run(["context=tiny_64_to_1k", "model=hyena", *overrides]))
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)
