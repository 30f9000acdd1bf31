#!/usr/bin/env python
"""Data pipeline throughput: shard build vs plain decompress+read, and stream tokens/s per worker.

    python scripts/bench_data.py [--fasta ../shared/data/genomes/human_grch37_chrX_first70mb.fa.gz]
                                 [--window 1024] [--batches 300] [--workers 1 2]

1. baseline: gzip-decompress the FASTA and read it line by line (what any reader must do);
2. build: plan (decompress once into a fresh cache, .fai, sha256) + shard build with P processes,
   reported as Mbases/s per process and as a ratio to the baseline (goal: within 3x);
3. stream: one DataLoader worker producing fixed-shape micro-batches (random access into the
   shards, crc32 check, tokenize, loss weights, collate) for the char and the 6-mer tokenizer,
   in tokens/s (goal: >= 2M tokens/s per worker for characters).
Prints one JSON object.  Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def baseline(path: Path) -> tuple[float, int]:
    t = time.perf_counter()
    bases = 0
    with gzip.open(path, "rb") as f:
        for line in f:
            if not line.startswith(b">"):
                bases += len(line.rstrip(b"\r\n"))
    return time.perf_counter() - t, bases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fasta", default=str(REPO.parent / "shared/data/genomes/human_grch37_chrX_first70mb.fa.gz"))
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="build process counts to time")
    ap.add_argument("--keep", default="", help="keep the built shards here (default: a temporary directory)")
    args = ap.parse_args()

    from torch.utils.data import DataLoader

    from glmtrain.config import validate_data
    from glmtrain.data.plan import make_plan
    from glmtrain.data.shards import ShardStore, build_shards
    from glmtrain.data.stream import ResumableBatchSampler, TrainOrder, TrainSamples, WindowEncoder
    from glmtrain.tokenizers import build_tokenizer

    fasta = Path(args.fasta)
    if not fasta.is_file():
        sys.exit(f"bench_data: {fasta} not found (pass --fasta)")
    report: dict = {"fasta": str(fasta), "window": args.window, "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    t_base, bases = baseline(fasta)
    report["baseline"] = {"seconds": round(t_base, 3), "mbases": round(bases / 1e6, 2),
                          "mbases_per_s": round(bases / 1e6 / t_base, 1)}

    tmp = Path(tempfile.mkdtemp(prefix="glmtrain-bench-"))
    try:
        node = {"name": "bench", "sources": [{"path": str(fasta), "species": "human"}], "window": args.window,
                "split": {"kind": "fraction", "valid_fraction": 0.01}, "shard_mb": 64, "max_val_windows": 64,
                "num_workers": 1}
        builds = []
        out_dir = None
        for p in args.workers:
            cache = tmp / f"cache{p}"
            cfg = validate_data({**node, "cache_dir": str(cache)})
            t0 = time.perf_counter()
            plan = make_plan(cfg)  # decompress once into the cache, .fai, sha256 of the source
            t_plan = time.perf_counter() - t0
            out_dir = tmp / f"shards{p}"
            m = build_shards(plan, out_dir, workers=p, verbose=False)
            wall = time.perf_counter() - t0
            written = sum(v["bases"] for v in m["totals"].values())
            per_proc = written / 1e6 / (t_plan + (wall - t_plan) * p)  # plan is one process, shards are p
            builds.append({"processes": p, "plan_s": round(t_plan, 3), "wall_s": round(wall, 3),
                           "shard_cpu_s": m["build"]["cpu_seconds"], "shards": sum(len(v) for v in m["shards"].values()),
                           "mbases_written": round(written / 1e6, 2), "mbases_per_s_per_process": round(per_proc, 1),
                           "ratio_to_baseline": round(report["baseline"]["mbases_per_s"] / per_proc, 2),
                           "shard_gb": round(sum(v["bytes"] for v in m["totals"].values()) / 1e9, 3)})
        report["build"] = builds

        store = ShardStore(out_dir)
        stream = {}
        for name, tok_cfg in (("char", {"kind": "char"}), ("kmer6", {"kind": "kmer", "k": 6})):
            tok = build_tokenizer(tok_cfg)
            cfg = validate_data({**node, "cache_dir": str(tmp / "cache1"), "rc_prob": 0.5})
            ds = TrainSamples(store, TrainOrder(store, cfg, 0), WindowEncoder(cfg, tok), 0, cfg.rc_prob)
            res = {}
            for workers in (0, 1):
                dl = DataLoader(ds, batch_sampler=ResumableBatchSampler(args.micro, 0, 1, 0), num_workers=workers,
                                prefetch_factor=4 if workers else None)
                it = iter(dl)
                next(it)  # worker start-up and first group permutation are not throughput
                t = time.perf_counter()
                tokens = 0
                for _ in range(args.batches):
                    b = next(it)
                    tokens += b["input_ids"].numel()
                dt = time.perf_counter() - t
                res["in_process" if workers == 0 else "one_worker"] = {
                    "tokens_per_s": round(tokens / dt), "samples_per_s": round(args.batches * args.micro / dt),
                    "tokens_per_sample": int(b["input_ids"].shape[1])}
                del it
            stream[name] = res
        report["stream"] = stream
        if args.keep:
            shutil.copytree(out_dir, args.keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
