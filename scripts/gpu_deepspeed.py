#!/usr/bin/env python3
"""GPU check of the sharded strategies on ONE GPU: DeepSpeed ZeRO-2, ZeRO-3, ZeRO-2 + CPU optimizer
offload and FSDP2, each training the same small model through glmtrain (``python -m glmtrain``,
bf16-mixed) beside a single-device baseline; prints loss after N steps and tokens/s per row.

    # on the GPU machine (no package index): wheels from ../shared/tools/gpu-wheels.sh in .whl/
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:$PYTHONPATH
    python3 scripts/gpu_deepspeed.py [--steps 30] [--budget 230] [--json out.json]

Every row is its own subprocess with its own time limit, so a failing row is reported in the table
(status and the last error line) and the script goes on; rows that would not fit the overall
``--budget`` (seconds) are skipped.  The offload row JIT-builds DeepSpeed's CPU Adam on first use
(~45 s).  Same seed, data and global batch in every row: the losses should agree to bf16 noise
(a few 1e-3).  Exit status 0 when every row that ran passed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = ["model=transformer", "model.d_model=256", "model.n_layers=4", "model.n_heads=8"]
# (row name, overrides, time limit in s)
ROWS = [
    ("single GPU (auto)", [], 70),
    ("DeepSpeed ZeRO-2", ["strategy=deepspeed", "strategy.zero_stage=2"], 90),
    ("DeepSpeed ZeRO-3", ["strategy=deepspeed", "strategy.zero_stage=3"], 90),
    ("FSDP2 (1 GPU, bf16 params)", ["strategy=fsdp"], 90),
    ("ZeRO-2 + CPU offload", ["strategy=deepspeed", "strategy.zero_stage=2", "strategy.offload_optimizer=true"], 150),
]


def common(steps: int, run_dir: Path, cache: Path, accelerator: str = "gpu") -> list[str]:
    precision = "bf16-mixed" if accelerator == "gpu" else "32-true"
    return [
        "experiment=smoke", *MODEL, f"trainer.accelerator={accelerator}", "trainer.devices=1", f"trainer.precision={precision}",
        f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.val_every=0", "eval.final=false",
        f"trainer.ckpt_every={10 * steps}", "trainer.progress=none", "trainer.max_time_s=0",
        "trainer.micro_batch_size=16", "data.window=1024", "data.format=memory", f"data.cache_dir={cache}",
        "data.num_workers=2", "logger=csv", "optim.warmup_steps=5", f"run_dir={run_dir}",
    ]


def read_metrics(run_dir: Path) -> tuple[float | None, float | None, int]:
    rows = []
    for f in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        rows += list(csv.DictReader(open(f)))
    loss = [(int(float(r["step"])), float(r["loss"])) for r in rows if r.get("loss")]
    tok = [float(r["tok_s"]) for r in rows if r.get("tok_s")]
    last = max(loss)[1] if loss else None
    tok_s = statistics.median(tok[len(tok) // 2:]) if tok else None  # steady state: second half of the steps
    return last, tok_s, len(loss)


def run_row(name: str, extra: list[str], limit: float, steps: int, base: Path, cache: Path, accelerator: str) -> dict:
    run_dir = base / name.split(" (")[0].replace(" ", "_").replace("+", "plus").lower()
    cmd = [sys.executable, "-m", "glmtrain", *common(steps, run_dir, cache, accelerator), *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1")
    t0 = time.time()
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit, env=env)
        out = res.stdout + res.stderr
        status = "ok" if res.returncode == 0 else f"rc={res.returncode}"
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        out += (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        status = f"timeout {limit:.0f}s"
    wall = time.time() - t0
    (base / f"{run_dir.name}.log").write_text(out)
    loss, tok_s, n = read_metrics(run_dir)
    if status == "ok" and n < steps:
        status = f"only {n}/{steps} steps"
    err = ""
    if status != "ok":
        lines = [ln for ln in out.splitlines() if ("Error" in ln or "error" in ln) and not ln.startswith(" ")]
        err = (lines[-1] if lines else (out.strip().splitlines() or [""])[-1])[:160]
    desc = next((ln.split("glmtrain: ", 1)[1] for ln in out.splitlines() if "glmtrain: strategy" in ln), "")
    return {"row": name, "status": status, "loss": loss, "tok_s": tok_s, "steps": n, "wall_s": round(wall, 1),
            "error": err, "strategy": desc}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--budget", type=float, default=230.0, help="seconds for all rows together")
    ap.add_argument("--out", default="/tmp/glmtrain_gpu_deepspeed")
    ap.add_argument("--json", default="")
    ap.add_argument("--rows", default="", help="comma-separated row numbers (0-based) to run; default all")
    ap.add_argument("--accelerator", default="gpu", help="cpu: dry run of the plumbing (DeepSpeed on its CPU accelerator; the offload row needs a compiler)")
    a = ap.parse_args()
    t_start = time.time()
    base = Path(a.out)
    base.mkdir(parents=True, exist_ok=True)
    cache = base / "cache"
    try:
        import torch

        info = f"torch {torch.__version__}, CUDA {torch.version.cuda}, " + (
            torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU")
    except Exception as e:  # noqa: BLE001
        info = f"torch import failed: {e}"
    try:
        import deepspeed  # noqa: F401

        info += f", deepspeed {deepspeed.__version__}"
    except Exception as e:  # noqa: BLE001
        info += f", deepspeed not importable ({type(e).__name__})"
    print(f"gpu_deepspeed: {info}; {a.steps} steps of {' '.join(MODEL)}, 16 x 1024 tokens/step, bf16-mixed", flush=True)
    chosen = [ROWS[int(i)] for i in a.rows.split(",")] if a.rows else ROWS
    results = []
    for name, extra, limit in chosen:
        left = a.budget - (time.time() - t_start)
        if left < 25:
            results.append({"row": name, "status": "skipped (budget)", "loss": None, "tok_s": None, "steps": 0,
                            "wall_s": 0.0, "error": "", "strategy": ""})
            continue
        r = run_row(name, extra, min(limit, left - 5), a.steps, base, cache, a.accelerator)
        results.append(r)
        print(f"  {name:<28} {r['status']:<14} loss {r['loss'] if r['loss'] is None else round(r['loss'], 4)}"
              f"  {r['wall_s']:.0f} s", flush=True)
    ref = results[0]["loss"] if results and results[0]["status"] == "ok" else None
    print(f"\n{'row':<28} {'status':<16} {'loss@' + str(a.steps):>10} {'vs single':>10} {'tokens/s':>11} {'wall s':>7}")
    for r in results:
        d = f"{r['loss'] - ref:+.4f}" if (ref is not None and r["loss"] is not None) else "-"
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        tok = f"{r['tok_s']:,.0f}" if r["tok_s"] else "-"
        print(f"{r['row']:<28} {r['status']:<16} {loss:>10} {d:>10} {tok:>11} {r['wall_s']:>7.0f}")
        if r["error"]:
            print(f"    {r['error']}")
    print(f"total {time.time() - t_start:.0f} s; logs in {base}/*.log")
    if a.json:
        Path(a.json).write_text(json.dumps({"info": info, "rows": results}, indent=2))
    return 0 if all(r["status"] in ("ok", "skipped (budget)") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
