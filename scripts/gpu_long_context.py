#!/usr/bin/env python
"""GPU long-context check: HyenaDNA large-1m at 1,048,576 tokens, batch 1.

One training step = forward + backward + AdamW step under bf16 autocast.  For
each activation-checkpointing mode it reports step time, tokens/s and
``torch.cuda.max_memory_allocated``; an out-of-memory error becomes a table row
instead of a crash.

    python scripts/gpu_long_context.py                       # all modes, 1,048,576 tokens
    python scripts/gpu_long_context.py --modes none,block --steps 3
    python scripts/gpu_long_context.py --device cpu --seq-len 8192 --steps 1   # smoke test

Modes (all share the fused Hyena core and the recomputed MLP GELU):
  none      no activation checkpointing
  mlp       checkpoint the MLP sub-block of every layer (mixer activations kept)
  half      checkpoint whole blocks in the first half of the layers
  block     checkpoint every block (the published large-1m setting)

Runs well inside 4 minutes on an H100 (each mode: model build, 1 warm-up step,
``--steps`` timed steps).  Prints a table and one JSON line per mode.

Measured 2026-11-27 on one H200 (torch 2.11 + CUDA 13, bf16 autocast, fused AdamW,
commit b86ab31), 1,048,576 tokens, batch 1:

    mode   step s   tokens/s   peak alloc GiB   reserved GiB (expandable_segments)
    block   2.149    487,937        23.6            30.1
    half    1.844    568,642        44.7            50.6
    mlp     1.578    664,497        55.2            58.1 (56.2)
    none    1.536    682,667        72.7            78.6 (73.6)

(for reference, RESEARCH.md: the official HyenaDNA code runs out of memory at 1M
without checkpointing and reaches 405k tokens/s at 39 GiB with per-layer
checkpointing on the same card).  Use
``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` to keep reserved close to
allocated on an 80 GB card.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from glmtrain.models.hyena import HyenaConfig, HyenaDNA  # noqa: E402

MODES = {
    "none": dict(activation_checkpointing=False),
    "mlp": dict(activation_checkpointing=True, checkpoint_policy="mlp", checkpoint_layers=0),
    "half": dict(activation_checkpointing=True, checkpoint_policy="block", checkpoint_layers=-1),  # -1: set below
    "block": dict(activation_checkpointing=True, checkpoint_policy="block", checkpoint_layers=0),
}


def load_cfg(path: Path) -> HyenaConfig:
    try:
        from omegaconf import OmegaConf

        raw = OmegaConf.load(path)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(HyenaConfig), raw))
    except ImportError:  # bare GPU image: the large-1m shape by hand
        return HyenaConfig(name="hyena-large-1m", d_model=256, n_layers=8, max_seq_len=1000002)


def run_mode(mode: str, args, device: torch.device) -> dict:
    cfg = load_cfg(Path(args.config))
    for k, v in MODES[mode].items():
        setattr(cfg, k, v)
    if mode == "half":
        cfg.checkpoint_layers = cfg.n_layers // 2
    cfg.embed_dropout = 0.0
    row = {"mode": mode, "model": cfg.name, "seq_len": args.seq_len, "batch": args.batch}
    model = opt = x = loss = None
    try:
        torch.manual_seed(0)
        model = HyenaDNA(cfg, 16).to(device).train()
        row["params"] = model.num_params()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **({"fused": True} if device.type == "cuda" else {}))
        x = torch.randint(7, 11, (args.batch, args.seq_len + 1), device=device)
        amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=not args.fp32)

        def step() -> float:
            with amp:
                logits = model(x[:, :-1])
            loss_ = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            loss_.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss_.item()

        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        row["loss_first"] = round(step(), 4)  # warm-up: cuFFT plans, allocator
        sync()
        row["warmup_s"] = round(time.perf_counter() - t0, 2)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            loss = step()
            sync()
            times.append(time.perf_counter() - t0)
        if args.profile and device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                sync()
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.profile))
        row["step_s"] = round(sum(times) / len(times), 3)
        row["tokens_per_s"] = round(args.batch * args.seq_len / row["step_s"])
        row["loss_last"] = round(loss, 4)
        if device.type == "cuda":
            row["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        row["status"] = "ok"
    except torch.cuda.OutOfMemoryError as e:  # noqa: PERF203
        row["status"] = "OOM"
        row["error"] = str(e).split("\n")[0][:160]
        if device.type == "cuda":
            row["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    except RuntimeError as e:
        if "out of memory" not in str(e).lower():
            raise
        row["status"] = "OOM"
        row["error"] = str(e).split("\n")[0][:160]
    finally:
        del model, opt, x
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def correctness_checks(device: torch.device) -> None:
    """Quick on-device checks: FFT conv == direct conv (fp64), fused Hyena core gradients, autocast path."""
    from glmtrain.models import ops

    torch.manual_seed(0)
    for seq_len in (1000, 4096):
        u = torch.randn(2, 8, seq_len, dtype=torch.float64, device=device)
        k = torch.randn(8, seq_len, dtype=torch.float64, device=device)
        ref = ops.direct_causal_conv(u, k)
        err = float((ops.fft_causal_conv(u, k) - ref).norm() / ref.norm())
        print(f"# check fft_conv fp64 L={seq_len}: rel err {err:.2e}")
        assert err < 1e-8
    z = torch.randn(1, 6, 17, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(6, 1, 3, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    k = torch.randn(2, 17, dtype=torch.float64, device=device, requires_grad=True)
    D = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    ok = torch.autograd.gradcheck(lambda *a: ops.hyena_gated_conv(*a, channel_chunk=1), (z, w, b, k, D), fast_mode=True)
    print(f"# check fused hyena core gradcheck on {device.type}: {ok}")
    cfg = HyenaConfig(d_model=64, n_layers=2, embed_dropout=0.0)
    model = HyenaDNA(cfg, 16).to(device).eval()
    x = torch.randint(7, 11, (2, 3000), device=device)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            out = model(x)
    err = float((out.float() - ref).norm() / ref.norm())
    print(f"# check bf16 autocast vs fp32 logits: rel err {err:.2e}")
    assert err < 5e-2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "conf" / "model" / "hyena_large_1m.yaml"))
    ap.add_argument("--seq-len", type=int, default=1 << 20)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per mode (after one warm-up step)")
    ap.add_argument("--modes", default="block,half,mlp,none")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--fp32", action="store_true", help="disable bf16 autocast")
    ap.add_argument("--check", action="store_true", help="run quick on-device correctness checks first")
    ap.add_argument("--profile", type=int, default=0, help="print the top-N CUDA kernels of one extra step per mode")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: use --device cpu for a smoke test")
        torch.backends.cuda.matmul.allow_tf32 = True
        props = torch.cuda.get_device_properties(device)
        print(f"# {props.name}, {props.total_memory / 2**30:.1f} GiB, torch {torch.__version__}")
    if args.check:
        correctness_checks(device)
    rows = []
    for mode in args.modes.split(","):
        row = run_mode(mode.strip(), args, device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(f"{'mode':<7}{'status':<8}{'step s':>8}{'tokens/s':>11}{'peak alloc GiB':>16}{'reserved GiB':>14}")
    for r in rows:
        print(f"{r['mode']:<7}{r['status']:<8}{r.get('step_s', '-'):>8}{r.get('tokens_per_s', '-'):>11}"
              f"{r.get('peak_alloc_gib', '-'):>16}{r.get('peak_reserved_gib', '-'):>14}")


if __name__ == "__main__":
    main()
