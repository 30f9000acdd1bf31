#!/usr/bin/env python
"""CPU long-context check: forward + backward of a HyenaDNA shape at 65,536 tokens.

    python scripts/bench_long_context.py                      # tiny-1k shape, 65,536 tokens, batch 1
    python scripts/bench_long_context.py --seq-len 131072 --checkpointing
    python scripts/bench_long_context.py --config conf/model/hyena_small_32k.yaml

Prints one table row per run (time of forward, backward, total; peak RSS of the
process) and a JSON line for scripts.  Peak RSS is the process high-water mark
(``ru_maxrss``), so it includes the interpreter and torch (~0.3 GB); the
baseline before the step is printed too.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from glmtrain.models.hyena import HyenaConfig, HyenaDNA  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "conf" / "model" / "hyena.yaml"))
    ap.add_argument("--seq-len", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    raw = OmegaConf.load(args.config)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(HyenaConfig), raw))
    cfg.activation_checkpointing = args.checkpointing
    torch.manual_seed(args.seed)
    model = HyenaDNA(cfg, 16).train()
    x = torch.randint(7, 11, (args.batch, args.seq_len))
    base = peak_rss_mb()

    t0 = time.perf_counter()
    logits = model(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    peak = peak_rss_mb()
    grad_ok = all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    row = {
        "model": cfg.name, "params": model.num_params(), "tokens": args.batch * args.seq_len,
        "checkpointing": args.checkpointing, "threads": torch.get_num_threads(),
        "fwd_s": round(t1 - t0, 3), "bwd_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3),
        "tokens_per_s": round(args.batch * args.seq_len / (t2 - t0)), "rss_before_mb": round(base),
        "peak_rss_mb": round(peak), "loss": round(loss.item(), 4), "finite_grads": grad_ok,
    }
    print(f"{'model':<16}{'tokens':>9}{'ckpt':>6}{'fwd s':>8}{'bwd s':>8}{'total s':>9}{'tok/s':>9}{'peak RSS MB':>13}")
    print(f"{row['model']:<16}{row['tokens']:>9}{str(args.checkpointing):>6}{row['fwd_s']:>8}{row['bwd_s']:>8}"
          f"{row['total_s']:>9}{row['tokens_per_s']:>9}{row['peak_rss_mb']:>13}")
    print(json.dumps(row))
    if not grad_ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
