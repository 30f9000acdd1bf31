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

from glmtrain.memory import PeakLiveBytes, _measure, measure_activations, plan_report
from glmtrain.models import build_model
from glmtrain.schedule import check
from tests._util import compose_run


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: one thread is fastest (and the plan measures with one); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
