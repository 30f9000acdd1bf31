"""k-mer logistic-regression baseline on GUE-format tasks (the floor a fine-tuned model must beat).

    python scripts/kmer_baseline.py ../shared/data/benchmarks/gue/prom/prom_core_all ../shared/data/benchmarks/gue/tf/0
    python scripts/kmer_baseline.py <task dir> --k 5 --l2 1e-4 1e-3 1e-2 --json out.json

Features: overlapping k-mer frequencies of each sequence (both strands counted when --both-strands),
standardised on train.  Model: multinomial logistic regression with an L2 penalty, fit full-batch
by L-BFGS in torch (float64).  The penalty is chosen on dev by MCC; test metrics (MCC, accuracy,
F1, AUROC: glmtrain.downstream.metrics) of that choice are printed -- the same splits and metrics
as ``python -m glmtrain task=finetune``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glmtrain.downstream.data import read_split  # noqa: E402
from glmtrain.downstream.generate import kmer_spectrum  # noqa: E402
from glmtrain.downstream.metrics import classification_metrics  # noqa: E402
from glmtrain.tokenizers import reverse_complement  # noqa: E402


def features(seqs: list[str], k: int, both_strands: bool) -> np.ndarray:
    x = np.stack([kmer_spectrum([s] + ([reverse_complement(s)] if both_strands else []), k) for s in seqs]).astype(np.float64)
    return x / np.maximum(x.sum(1, keepdims=True), 1)


def fit(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, iters: int = 200) -> torch.nn.Linear:
    lin = torch.nn.Linear(x.shape[1], n_classes).double()
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x), y) + 0.5 * l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def run_task(task_dir: Path, k: int, l2s: list[float], both_strands: bool) -> dict:
    t0 = time.perf_counter()
    data = {s: read_split(task_dir, s) for s in ("train", "dev", "test")}
    feats = {s: features(seqs, k, both_strands) for s, (seqs, _) in data.items()}
    mu, sd = feats["train"].mean(0), feats["train"].std(0) + 1e-8
    x = {s: torch.from_numpy((f - mu) / sd) for s, f in feats.items()}
    y = {s: torch.from_numpy(labels) for s, (_, labels) in data.items()}
    n_classes = int(max(int(v.max()) for v in y.values()) + 1)
    best = None
    for l2 in l2s:
        lin = fit(x["train"], y["train"], n_classes, l2)
        with torch.no_grad():
            dev = classification_metrics(y["dev"].numpy(), torch.softmax(lin(x["dev"]), -1).numpy())
        if best is None or dev["mcc"] > best[1]["mcc"]:
            best = (l2, dev, lin)
    l2, dev, lin = best
    with torch.no_grad():
        test = classification_metrics(y["test"].numpy(), torch.softmax(lin(x["test"]), -1).numpy())
    return {"task": str(task_dir), "k": k, "both_strands": both_strands, "l2": l2, "dev": dev, "test": test,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tasks", nargs="+", type=Path, help="GUE task folders (train/dev/test.csv[.gz])")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--l2", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1])
    ap.add_argument("--both-strands", action="store_true", help="count k-mers of the reverse complement too")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = []
    print(f"{'task':<40}{'k':>3}{'l2':>9}{'dev MCC':>9}{'test MCC':>10}{'acc':>8}{'F1':>8}{'AUROC':>8}{'s':>7}")
    for t in args.tasks:
        r = run_task(t, args.k, args.l2, args.both_strands)
        results.append(r)
        m = r["test"]
        print(f"{str(t)[-40:]:<40}{r['k']:>3}{r['l2']:>9.0e}{r['dev']['mcc']:>9.4f}{m['mcc']:>10.4f}{m['accuracy']:>8.4f}"
              f"{m['f1']:>8.4f}{m['auroc']:>8.4f}{r['seconds']:>7.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
