#!/usr/bin/env python
"""Caduceus speed: selective scan and full-model training tokens/s, fast path vs sequential reference.

    python scripts/bench_caduceus.py                       # CPU: 4,096 and 131,072 tokens
    python scripts/bench_caduceus.py --device cuda         # GPU; adds mamba_ssm's kernel when installed
    python scripts/bench_caduceus.py --lengths 4096 --threads 1

Rows (all fp32, batch 1, forward + backward; the model rows add the AdamW step).  Each row gives
tokens/s from wall time and from this process's CPU time (on CPU the script runs one thread by
default, so the CPU-time figure is what an idle core would do even on a shared machine):

* ``scan``: one selective scan of the released 131k shape's mixer (d_inner 512, d_state 16) --
  ``chunked`` (glmtrain's default off CUDA), ``sequential`` (the reference loop), ``mamba_ssm``
  (the CUDA kernel, GPU only, when importable);
* ``model``: Caduceus-PS at the released 131k shape (d_model 256 x 16 layers, 7.7M parameters),
  ``model.scan_impl`` = each of the above.

What is extrapolated (and marked ``~`` in the table): the sequential reference costs the same per
position at any length (one step per position), so above ``--seq-max`` positions it is timed on
``--seq-max`` positions and scaled linearly; a model at more than ``--model-max`` tokens is timed
with ``--long-layers`` of its 16 layers (the layers are identical, embedding and head are a
negligible share) and scaled to 16 -- a 16-layer 131k-token training step does not fit in a
shared CPU box's memory.  Ratios are measured side by side in one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glmtrain.models.caduceus import Caduceus, CaduceusConfig  # noqa: E402
from glmtrain.models.scan import mamba_ssm_scan, selective_scan  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int, warmup: bool = True) -> tuple[float, float]:
    """(wall, CPU) seconds of the fastest of ``reps`` runs (after an optional warm-up).  The CPU time
    (this process, all threads) is the stable number on a shared machine: with --threads 1 it is
    what one idle core would take."""
    if warmup:
        fn()
        sync(device)
    best = (float("inf"), float("inf"))
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        best = min(best, (time.perf_counter() - t, time.process_time() - c))
    return best


def scan_step(L: int, impl: str, device: str, d_inner: int = 512, n: int = 16):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s, scale=1.0, shift=0.0: (torch.randn(*s, generator=g) * scale + shift).to(device).requires_grad_()  # noqa: E731
    u, z = mk(1, d_inner, L), mk(1, d_inner, L)
    delta = mk(1, d_inner, L, scale=0.5, shift=-4.0)
    A = (-torch.exp(torch.randn(d_inner, n, generator=g))).to(device).requires_grad_()
    B, C = mk(1, n, L), mk(1, n, L)
    D, bias = mk(d_inner), mk(d_inner)

    def step():
        y = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, impl=impl)
        y.sum().backward()
    return step


def model_step(L: int, impl: str, device: str, layers: int, rcps: bool = True):
    cfg = CaduceusConfig(name="caduceus-131k", d_model=256, n_layers=layers, rcps=rcps, scan_impl=impl)
    torch.manual_seed(0)
    model = Caduceus(cfg, 16).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(7, 11, (1, L), device=device)

    def step():
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits.view(-1, 16).float(), ids.view(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 131072])
    ap.add_argument("--seq-max", type=int, default=1024, help="longest sequence the sequential reference is timed on")
    ap.add_argument("--model-max", type=int, default=8192, help="longest model step timed with all 16 layers")
    ap.add_argument("--long-layers", type=int, default=1, help="layers timed above --model-max (scaled to 16)")
    ap.add_argument("--variant", choices=("ps", "ph"), default="ps", help="model rows: Caduceus-PS (2x the work) or -Ph")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=-1, help="torch intra-op threads (default: 1 on CPU, torch's on GPU)")
    ap.add_argument("--skip-model", action="store_true")
    args = ap.parse_args(argv)
    threads = args.threads if args.threads >= 0 else (1 if args.device == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    dev = args.device
    impls = ["chunked", "sequential"]
    if dev.startswith("cuda") and mamba_ssm_scan() is not None:
        impls.insert(0, "mamba_ssm")
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.startswith('cuda') else f'{torch.get_num_threads()} threads'}), "
          f"torch {torch.__version__}, mamba_ssm {'yes' if mamba_ssm_scan() is not None else 'not installed'}", flush=True)
    rows = []
    for what in ("scan", "model"):
        if what == "model" and args.skip_model:
            continue
        for L in args.lengths:
            for impl in impls:
                run_L, layers, scale = L, 16, 1.0
                if impl == "sequential" and L > args.seq_max:
                    run_L, scale = args.seq_max, L / args.seq_max
                if what == "model" and run_L > args.model_max:
                    layers = args.long_layers
                    scale *= 16 / layers
                fn = scan_step(run_L, impl, dev) if what == "scan" else model_step(run_L, impl, dev, layers, args.variant == "ps")
                slow = impl == "sequential"
                wall, cpu = timed(fn, dev, 1 if slow else args.reps, warmup=not slow)
                wall, cpu = wall * scale, cpu * scale
                del fn
                gc.collect()
                approx = "~" if scale != 1.0 else ""
                note = []
                if run_L != L:
                    note.append(f"timed at {run_L}")
                if what == "model" and layers != 16:
                    note.append(f"{layers} of 16 layers timed")
                rows.append((what, L, impl, wall, cpu, approx, ", ".join(note)))
                print(f"{what:<6} L={L:<7} {impl:<11} wall {approx}{L / wall:>10,.0f} tok/s  CPU {approx}{L / cpu:>10,.0f} tok/s  "
                      f"{approx}{cpu:9.3f} CPU s/step  {'; '.join(note)}", flush=True)
    name = f"Caduceus-{args.variant.upper()} 256 x 16"
    print(f"\nscan = one selective scan, d_inner 512, d_state 16; model = {name} (fwd + bwd + AdamW), batch 1, fp32")
    print("| what | tokens | scan | tokens/s (wall) | tokens/s (CPU time) | CPU s/step | vs sequential (CPU) | note |")
    print("|---|---|---|---|---|---|---|---|")
    for what, L, impl, wall, cpu, approx, note in rows:
        ref = next((r[4] for r in rows if r[:2] == (what, L) and r[2] == "sequential"), None)
        ratio = f"{ref / cpu:.1f}x" if ref else ""
        print(f"| {what} | {L:,} | {impl} | {approx}{L / wall:,.0f} | {approx}{L / cpu:,.0f} | {approx}{cpu:.3f} | {ratio} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
