"""Calibrate the learning guard (tests/test_learning.py): held-out bits/base of the guard's short CPU
run against the order-0 Markov baseline, for the trained model and for models that did not learn.

    python scripts/calibrate_learning_guard.py [--steps 60 --seeds 1234 7 99]

Rows: ``trained`` (the guard's config), ``untrained`` (the initial model: one step at lr 1e-12), ``lr tiny``
(the guard's steps at lr 1e-6: learning silently broken).  The guard's margin must sit between the trained
rows and the best broken row with room for noise (seeds).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_learning import GUARD, guard_overrides  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 7, 99])
    ap.add_argument("--rows", nargs="+", default=["trained", "untrained", "lr tiny (1e-6)"])
    args = ap.parse_args()
    from glmtrain.train import train
    from tests._util import compose_run

    rows = [("trained", []), ("untrained", ["optim.lr=1e-12", "trainer.max_steps=1", "optim.warmup_steps=1"]),
            ("lr tiny (1e-6)", ["optim.lr=1e-6"])]
    print(f"guard config: {' '.join(GUARD)}")
    print(f"{'case':<20} {'seed':>6} {'model':>8} {'order0':>8} {'order0 - model':>15} {'s':>6}")
    for name, extra in [r for r in rows if r[0] in args.rows]:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                r = train(compose_run([*guard_overrides(d), f"seed={seed}", *extra]))
                dt = time.perf_counter() - t0
            m, b = r["val_bits_per_base"], r["baselines_bits_per_base"]["order0"]
            print(f"{name:<20} {seed:>6} {m:8.4f} {b:8.4f} {b - m:15.4f} {dt:6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
