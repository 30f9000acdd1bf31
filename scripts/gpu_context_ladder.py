#!/usr/bin/env python
"""A context-extension ladder on one GPU: per-stage tokens/s and peak memory, up to the longest length that fits.

Runs ONE glmtrain schedule per model through the real orchestration (``python -m glmtrain`` with a
``context.stages`` list: 8k, 16k, ... doubling to ``--max``, ``--steps`` optimizer steps each, one
sample of the longest window per step -- the same tokens per step in every stage, weights carried
from stage to stage), then prints, per stage, the window, tokens/s and the peak of
``torch.cuda.max_memory_allocated`` that glmtrain records in ``run.json``.  A stage that runs out of
memory ends the schedule; the table then shows the stages that fit and where it stopped.  Before
running, it prints the memory plan (``plan=true``) of the same schedule, so estimate and measurement
can be compared row by row.

    python scripts/gpu_context_ladder.py                                    # HyenaDNA large-1m and Evo 2 100M, 8k .. 1M
    python scripts/gpu_context_ladder.py --models hyena_large_1m --max 1048576 --ckpt-from 262144
    python scripts/gpu_context_ladder.py --device cpu --tiny                # CPU smoke test (tiny shapes, 64 .. 1k)

Data: the bundled human sample (two 2 Mb training records, held-out chr4), stored once at the longest
window.  ``--ckpt-from W`` turns on activation checkpointing for the stages of W bases and more
(default: from 262,144).  Each model's schedule has its own run directory under ``--out``
(removed first); ``--timeout`` bounds each model's run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ladder(lo: int, hi: int) -> list[int]:
    out, w = [], lo
    while w <= hi:
        out.append(w)
        w *= 2
    return out


def overrides(model: str, windows: list[int], steps: int, ckpt_from: int, device: str, tiny: bool, run_dir: Path) -> list[str]:
    stages = ",".join(
        f"{{window:{w},steps:{steps}" + (",activation_checkpointing:true" if w >= ckpt_from else "") + "}"
        for w in windows)
    ov = [f"model={model}", "context=none", "context.name=ladder", f"context.stages=[{stages}]",
          "model.activation_checkpointing=false",  # on per stage from --ckpt-from
          f"data.window={windows[-1]}", "trainer.max_steps=0", f"trainer.global_batch_tokens={windows[-1]}",
          "trainer.micro_batch_size=1", f"trainer.ckpt_every={steps}", "trainer.keep_last=1", "trainer.val_every=0",
          "trainer.max_time_s=0", "trainer.progress=none", "trainer.log_every=1", "data.max_val_windows=1",
          "eval.baselines=[]", "optim.warmup_steps=1", f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}", f"run_dir={run_dir}"]
    if tiny:
        ov += ["model.d_model=32", "model.n_layers=2"] if model.startswith("hyena") else ["model.d_model=64",
                                                                                           "model.n_heads=2"]
        if model.startswith("hyena"):
            ov += ["model.filter_order=16", f"model.max_seq_len={windows[-1] + 2}"]
        else:
            ov += ["model.pattern=SDH*", "model.se_filter_groups=4", "model.mr_filter_groups=4", "model.li_filter_groups=64",
                   "model.mlp_dim=128"]
    elif model.startswith("hyena"):
        ov += [f"model.max_seq_len={max(windows[-1] + 2, 1000002)}"]
    return ov


def run_model(model: str, a, windows: list[int]) -> dict:
    run_dir = Path(a.out) / model
    shutil.rmtree(run_dir, ignore_errors=True)
    ov = overrides(model, windows, a.steps, a.ckpt_from, a.device, a.tiny, run_dir)
    py = [sys.executable, "-m", "glmtrain", *ov]
    plan = subprocess.run([*py, "plan=true", "trainer.accelerator=gpu", "trainer.precision=bf16-mixed"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    print(plan.stdout.strip() or plan.stderr.strip()[-2000:], flush=True)
    t0 = time.time()
    try:
        res = subprocess.run(py, cwd=ROOT, capture_output=True, text=True, timeout=a.timeout)
        rc, tail = res.returncode, (res.stdout + res.stderr)[-1500:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e)[-500:]
    manifest = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {"stages": []}
    rows = []
    for s in manifest["stages"]:
        rows.append({"model": model, "window": s["window"], "status": s.get("status"), "tok_s": s.get("train_tok_s"),
                     "peak_gib": s.get("peak_mem_gib"), "wall_s": s.get("wall_s")})
    stopped = next((r["window"] for r in rows if r["status"] != "complete"), None)
    why = ""
    if rc != 0:
        why = "out of memory" if "out of memory" in str(tail).lower() else f"exit {rc}"
    return {"model": model, "rows": rows, "stopped_at": stopped, "why": why, "wall_s": round(time.time() - t0, 1),
            "tail": tail if rc not in (0,) else ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="hyena_large_1m,evo2_100m")
    ap.add_argument("--min", type=int, default=8192)
    ap.add_argument("--max", type=int, default=1_048_576)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per stage (the first is warm-up)")
    ap.add_argument("--ckpt-from", type=int, default=262_144)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="tiny model shapes (CPU smoke test)")
    ap.add_argument("--out", default="/tmp/glmtrain-ladder")
    ap.add_argument("--timeout", type=float, default=1800)
    a = ap.parse_args()
    if a.tiny and a.max > 4096:
        a.min, a.max = 64, 1024
    windows = ladder(a.min, a.max)
    results = [run_model(m, a, windows) for m in a.models.split(",")]
    print(f"\n{'model':<16} {'window':>10} {'tokens/s':>10} {'peak GiB':>9}  status")
    for r in results:
        for row in r["rows"]:
            tok = f"{row['tok_s']:,.0f}" if row["tok_s"] else "-"
            peak = f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "-"
            print(f"{r['model']:<16} {row['window']:>10,} {tok:>10} {peak:>9}  {row['status']}")
        if r["why"]:
            print(f"{r['model']:<16} stopped at window {r['stopped_at']}: {r['why']}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
