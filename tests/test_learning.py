"""The learning guard: a short CPU run must beat the order-0 Markov baseline on held-out DNA.

HyenaDNA tiny, next-token, on the bundled human sample (chr3 + chr5 train, chr4 held out), then
held-out bits/base on chr4 windows beside the base composition of the training windows (order-0
Markov, fit by :mod:`glmtrain.baselines`, code independent of the model).  An untrained model scores
far above order-0 (about 3.5 bits/base), a model that learned only the composition scores order-0
itself, so beating order-0 by MARGIN needs context learned by training.  Calibration
(``scripts/calibrate_learning_guard.py``, 3 seeds; numbers in its README section): see MARGIN.
"""

from __future__ import annotations

from tests._util import compose_run

GUARD = [
    "model=hyena", "objective=clm", "data=sample", "data.window=256", "data.max_val_windows=48",
    "trainer.max_steps=60", "trainer.micro_batch_size=16", "trainer.val_every=0", "trainer.ckpt_every=1000",
    "trainer.progress=none", "trainer.threads=2", "optim.warmup_steps=5", "logger=none", "eval.baselines=[0]",
]
# bits/base below the order-0 baseline the trained guard run must reach (see the module doc)
MARGIN = 0.02


def guard_overrides(run_dir) -> list[str]:
    return [*GUARD, f"run_dir={run_dir}"]


def test_short_run_beats_the_order0_markov_baseline_on_held_out_dna(tmp_path):
    from glmtrain.train import train

    result = train(compose_run(guard_overrides(tmp_path)))
    model, order0 = result["val_bits_per_base"], result["baselines_bits_per_base"]["order0"]
    assert result["val_bases"] >= 48 * 255
    assert 1.8 < order0 < 2.0, order0  # the composition of human DNA: the baseline itself is sane
    assert model < order0 - MARGIN, (f"held-out {model:.4f} bits/base does not beat order-0 {order0:.4f} by {MARGIN}: "
                                     "learning is broken (an untrained model scores ~3.5, composition only ~order-0)")
