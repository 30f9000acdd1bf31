#!/usr/bin/env python
"""Check the memory plan (glmtrain.memory, ``plan=true``) against measured peaks.

1. CPU, measured here: for small shapes, the peak of live tensor bytes allocated during one training
   step (forward, backward, AdamW step; parameters and optimizer states that exist before the step
   are not counted) -- tracked with a TorchDispatchMode that adds every new tensor storage and
   subtracts it when it is freed -- beside the plan's estimate of the same quantity (activation peak
   + gradients).  The plan measures a *reduced-width* proxy and extrapolates, so this checks the
   extrapolation in width and length as well as the backward model.
2. GPU, recorded: the plan's estimate for HyenaDNA large-1m at 1,048,576 tokens (bf16-mixed, batch 1)
   in the four checkpointing modes of scripts/gpu_long_context.py, beside the peaks measured there on
   one H200 (torch.cuda.max_memory_allocated: 72.7 / 55.2 / 44.7 / 23.6 GiB).

    python scripts/memory_plan_check.py            # both (about a minute on 2 idle cores)
    python scripts/memory_plan_check.py --cpu-only
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from glmtrain.config import compose, validate  # noqa: E402
from glmtrain.memory import GiB, PeakLiveBytes, measure_activations  # noqa: E402
from glmtrain.models import build_model  # noqa: E402

GPU_H200 = {"none": 72.7, "mlp": 55.2, "half": 44.7, "block": 23.6}  # scripts/gpu_long_context.py, 2026-11-27
MODES = {"none": dict(activation_checkpointing=False),
         "mlp": dict(activation_checkpointing=True, checkpoint_policy="mlp"),
         "half": dict(activation_checkpointing=True, checkpoint_layers=4),
         "block": dict(activation_checkpointing=True)}


def measured_step_peak(cfg, vocab: int, tokens: int, dtype) -> float:
    torch.manual_seed(0)
    model = build_model(cfg, vocab).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    ids = torch.randint(0, min(vocab, 8), (1, tokens))
    ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)

    def step():
        with ctx:
            logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # optimizer states exist from here on (they are not part of the step's peak)
    with PeakLiveBytes() as p:
        step()
    return p.peak


def cpu_rows(tokens: int) -> list[dict]:
    cases = [
        ("hyena d256x2", ["model=hyena", "model.d_model=256", "model.max_seq_len=65536"], 16),
        ("evo2 d256 SDH*", ["model=evo2", "model.d_model=256", "model.n_heads=4"], 512),
        ("transformer d256x2", ["model=transformer", "model.d_model=256", "model.n_layers=2", "model.n_heads=4"], 16),
    ]
    rows = []
    for name, ov, vocab in cases:
        run = validate(compose(["name=x", *ov]))
        cfg = copy.deepcopy(run.model)
        for label, dtype, size in (("fp32", None, 4), ("bf16-autocast", torch.bfloat16, 4)):
            t0 = time.perf_counter()
            act = measure_activations(cfg, vocab, tokens, dtype)
            n = sum(p.numel() for p in build_model(cfg, vocab).parameters())
            est = act.peak(tokens) + n * size  # activations + the gradients the step creates
            got = measured_step_peak(cfg, vocab, tokens, dtype)
            rows.append({"model": name, "precision": label, "tokens": tokens, "estimate_mib": est / 2**20,
                         "measured_mib": got / 2**20, "ratio": est / got, "s": round(time.perf_counter() - t0, 1)})
            print(f"  {name:<20} {label:<14} {tokens:>6} tokens: estimate {est / 2**20:8.1f} MiB, measured "
                  f"{got / 2**20:8.1f} MiB ({est / got - 1:+.1%})", flush=True)
    return rows


def gpu_rows() -> list[dict]:
    run = validate(compose(["name=x", "model=hyena_large_1m"]))
    L = 1_048_576
    n = sum(p.numel() for p in build_model(run.model, 16).parameters())
    rows = []
    for mode, kw in MODES.items():
        cfg = copy.deepcopy(run.model)
        for k, v in kw.items():
            setattr(cfg, k, v)
        act = measure_activations(cfg, 16, L, torch.bfloat16)
        est = (act.peak(L) + n * 16) / GiB  # + fp32 parameters, gradients and AdamW moments (16 bytes each)
        rows.append({"mode": mode, "estimate_gib": est, "h200_peak_gib": GPU_H200[mode], "ratio": est / GPU_H200[mode]})
        print(f"  hyena-large-1m {mode:<6} 1,048,576 tokens: estimate {est:6.1f} GiB, H200 measured "
              f"{GPU_H200[mode]:5.1f} GiB ({est / GPU_H200[mode] - 1:+.1%})", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print("CPU: estimated vs measured peak bytes of one training step (activations + gradients + transients):")
    out = {"cpu": cpu_rows(a.tokens)}
    if not a.cpu_only:
        print("GPU: estimated vs recorded H200 peak (torch.cuda.max_memory_allocated), HyenaDNA large-1m, bf16-mixed:")
        out["gpu"] = gpu_rows()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
