#!/usr/bin/env python
"""Issue-14 GPU targets, measured side by side in ONE process (tokens/s, MFU, peak memory).

    python scripts/bench_scale.py esm            # NT-v2-100M dims, L=1024: HF EsmForMaskedLM vs glmtrain (target >= 2.5x)
    python scripts/bench_scale.py hyena          # HyenaDNA large-1m at 1,048,576 tokens (target >= 2 x 405k = 810k tok/s, < 80 GB)
    python scripts/bench_scale.py evo2           # Evo 2 1B at 8,192 tokens (target >= 30k tok/s per GPU), with MFU
    python scripts/bench_scale.py evo2_7b        # Evo 2 7B under FSDP2 + CPU offload on ONE GPU: builds, steps, peak memory
    python scripts/bench_scale.py all --cpu      # every row at CPU-feasible sizes (what was run without a GPU)

Every row: forward + backward + AdamW step (bf16 autocast on GPU, fp32 on CPU), warm-up steps
excluded, tokens/s = batch x length / step time; MFU = tokens/s x model FLOPs per token
(glmtrain.flops, fwd + bwd) / peak FLOP/s of the device (glmtrain.flops.PEAK_TFLOPS, or --peak-tflops).
glmtrain models are built on the meta device and materialised directly on the device
(glmtrain.models.init).  ``--cpu`` shrinks the shapes (fewer layers, shorter sequences) so that the
ratios between rows can be measured on a laptop; the GPU targets need the full shapes on a GPU.
Prints one JSON line per row and a table.
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

from glmtrain import flops  # noqa: E402
from glmtrain.models import build_model  # noqa: E402
from glmtrain.models.evo2 import Evo2Config  # noqa: E402
from glmtrain.models.hyena import HyenaConfig  # noqa: E402
from glmtrain.models.transformer import TransformerConfig  # noqa: E402

# NT-v2-100M: 22 layers x 512, 16 heads, FFN 2048, 4,107 ids, RoPE, untied embeddings, no biases
NT_V2_100M = dict(d_model=512, n_layers=22, n_heads=16, ffn_dim=2048, vocab=4107)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(model, make_loss, device: torch.device, steps: int, warmup: int, params=None) -> dict:
    opt = torch.optim.AdamW(params if params is not None else model.parameters(), lr=1e-4,
                            **({"fused": True} if device.type == "cuda" and params is None else {}))
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        with amp:
            loss = make_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out = {"step_s": sum(times) / len(times)}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def clm_loss(model, x: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``model`` on ids ``x`` [B, L + 1]."""
    logits = model(x[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def _row(name: str, r: dict, tokens: int, fpt: float | None, peak: float | None, **extra) -> dict:
    row = {"row": name, "tokens_per_step": tokens, "tok_s": tokens / r["step_s"], **{k: v for k, v in r.items()}, **extra}
    if fpt:
        row["flops_per_token"] = fpt
        u = flops.mfu(row["tok_s"], fpt, 1, peak)
        if u is not None:
            row["mfu"] = u
    return row


def _shrink(cfg, pattern: str, d: int, heads: int) -> None:
    """CPU-feasible Evo 2 shape: fewer layers, narrower, filter groups scaled down with the width."""
    cfg.pattern, cfg.d_model, cfg.n_heads, cfg.mlp_dim, cfg.n_layers = pattern, d, heads, 0, 0
    cfg.li_filter_groups, cfg.se_filter_groups, cfg.mr_filter_groups = d, 16, 16


def _free(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- rows
def bench_esm(a, device, peak) -> list[dict]:
    """HF EsmForMaskedLM vs glmtrain's encoder at NT-v2-100M dims, MLM 15 %, same batch."""
    from transformers import EsmConfig, EsmForMaskedLM

    s = dict(NT_V2_100M)
    L, B = (a.seq or 1024), (a.batch or 32)
    if a.cpu:
        s["n_layers"], L, B = 2, a.seq or 256, a.batch or 4
    V = s["vocab"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (B, L), generator=g).to(device)
    mask = (torch.rand(B, L, generator=g) < 0.15).to(device)
    labels = torch.where(mask, ids, torch.full_like(ids, -100))
    inputs = torch.where(mask, torch.full_like(ids, 2), ids)
    rows = []
    hf_cfg = EsmConfig(vocab_size=V, hidden_size=s["d_model"], num_hidden_layers=s["n_layers"],
                       num_attention_heads=s["n_heads"], intermediate_size=s["ffn_dim"], position_embedding_type="rotary",
                       max_position_embeddings=L + 2, pad_token_id=1, mask_token_id=2, token_dropout=False,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf = EsmForMaskedLM(hf_cfg)
    try:
        hf.config._attn_implementation = "sdpa"
    except Exception:  # noqa: BLE001 - older transformers: default attention
        pass
    hf = hf.to(device).train()
    fpt_hf = 6 * sum(p.numel() for n, p in hf.named_parameters() if "embed" not in n and p.ndim == 2) + 12 * s["n_layers"] * s["d_model"] * L
    r = timed(hf, lambda: hf(input_ids=inputs, labels=labels).loss, device, a.steps, a.warmup)
    rows.append(_row("HF EsmForMaskedLM (sdpa)", r, B * L, fpt_hf, peak, params=sum(p.numel() for p in hf.parameters())))
    _free(hf)
    cfg = TransformerConfig(name="nt-v2-100m-dims", d_model=s["d_model"], n_layers=s["n_layers"], n_heads=s["n_heads"],
                            ffn_dim=s["ffn_dim"], causal=False, mlp="swiglu", bias=False, tie_embeddings=False)
    ours = build_model(cfg, V, seed=0, device=device).train()
    fpt = flops.count(ours, L, B).train

    def loss_ours():
        logits = ours(inputs)
        return F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1), ignore_index=-100)

    r = timed(ours, loss_ours, device, a.steps, a.warmup)
    rows.append(_row("glmtrain encoder (SwiGLU, RoPE)", r, B * L, fpt, peak, params=ours.num_params()))
    if a.compile and device.type == "cuda":
        comp = torch.compile(ours)
        r = timed(ours, lambda: F.cross_entropy(comp(inputs).float().reshape(-1, V), labels.reshape(-1), ignore_index=-100),
                  device, a.steps, a.warmup + 2)
        rows.append(_row("glmtrain encoder, torch.compile", r, B * L, fpt, peak))
    _free(ours)
    base = rows[0]["tok_s"]
    for row in rows:
        row["vs_hf"] = row["tok_s"] / base
    return rows


def bench_hyena(a, device, peak) -> list[dict]:
    """HyenaDNA large-1m (8 x 256) at 1,048,576 tokens, batch 1, no activation checkpointing."""
    L = a.seq or (1 << 20)
    cfg = HyenaConfig(name="hyena-large-1m", d_model=256, n_layers=8, max_seq_len=1_000_002, embed_dropout=0.0)
    if a.cpu:
        L = a.seq or 16384
        cfg.n_layers = 2
    model = build_model(cfg, 16, seed=0, device=device).train()
    x = torch.randint(7, 11, (1, L + 1), device=device)
    fpt = flops.count(model, L, 1).train

    r = timed(model, lambda: clm_loss(model, x), device, a.steps, a.warmup)
    row = _row(f"glmtrain HyenaDNA large-1m shape ({cfg.n_layers} layers), L={L}", r, L, fpt, peak,
               official_h200_tok_s=405_000, official_note="RESEARCH.md: official code, per-layer checkpointing, 39 GiB")
    row["vs_official_quoted"] = row["tok_s"] / 405_000
    _free(model)
    return [row]


def bench_evo2(a, device, peak, name="evo2_1b") -> list[dict]:
    """Evo 2 1B (1920 x 25, pattern SDH*...) at 8,192 tokens, micro-batch 1."""
    from omegaconf import OmegaConf

    raw = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Evo2Config), raw))
    L, B = a.seq or 8192, a.batch or 1
    if a.cpu:
        _shrink(cfg, "SDH*", 256, 4)
        L = a.seq or 2048
    model = build_model(cfg, 512, seed=0, device=device).train()
    x = torch.randint(65, 90, (B, L + 1), device=device)
    fpt = flops.count(model, L, B).train

    r = timed(model, lambda: clm_loss(model, x), device, a.steps, a.warmup)
    row = _row(f"glmtrain {cfg.name} ({len(cfg.pattern)} layers x {cfg.d_model}), L={L}", r, B * L, fpt, peak,
               params=model.num_params(), bionemo_h100_tok_s=26_900)
    _free(model)
    return [row]


def bench_evo2_7b_offload(a, device, peak) -> list[dict]:
    """Evo 2 7B on one GPU: meta build, FSDP2 (world 1) with CPU offload of parameters, gradients and
    optimizer states, materialised block by block; a few steps at 8,192 tokens; peak GPU memory."""
    import os

    import torch.distributed as dist
    from omegaconf import OmegaConf
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from glmtrain.models.init import materialize
    from glmtrain.parallel.plans import plan_for, shard_model

    raw = OmegaConf.load(ROOT / "conf" / "model" / "evo2_7b.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Evo2Config), raw))
    L = a.seq or 8192
    if a.cpu:
        _shrink(cfg, "SDH*SDH*", 512, 8)
        L = a.seq or 1024
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29591")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (1,))
    t0 = time.perf_counter()
    model = build_model(cfg, 512, seed=0, meta=True)
    n_params = model.num_params()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else None
    # materialised block by block on the CPU, where FSDP2's offload keeps it; the GPU sees one block at a time
    shard_model(model, plan_for("evo2"), dp_mesh=mesh, fsdp=True, mp_policy=mp, offload=True,
                materialize=lambda prefix: materialize(model, "cpu", 0, prefix))
    build_s = time.perf_counter() - t0
    model.train()
    x = torch.randint(65, 90, (1, L + 1), device=device)
    fpt = flops.count(model, L, 1).train

    r = timed(model, lambda: clm_loss(model, x), device, a.steps, a.warmup)
    row = _row(f"glmtrain {cfg.name} FSDP2 + CPU offload, 1 device, L={L}", r, L, fpt, peak, params=n_params,
               build_s=build_s)
    dist.destroy_process_group()
    return [row]


ROWS = {"esm": bench_esm, "hyena": bench_hyena, "evo2": bench_evo2, "evo2_7b": bench_evo2_7b_offload}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=[*ROWS, "all"])
    ap.add_argument("--cpu", action="store_true", help="CPU-feasible shapes (and device cpu)")
    ap.add_argument("--device", default="")
    ap.add_argument("--seq", type=int, default=0)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="esm: also a torch.compile row (GPU)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="MFU denominator (default: table by GPU name)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    device = torch.device(a.device or ("cpu" if a.cpu or not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = flops.peak_flops(device, a.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# {name}, torch {torch.__version__}, peak {peak / 1e12 if peak else 'unknown'} TFLOP/s", flush=True)
    rows = []
    for w in (ROWS if a.which == "all" else [a.which]):
        try:
            got = ROWS[w](a, device, peak)
        except torch.cuda.OutOfMemoryError as e:
            got = [{"row": w, "status": "OOM", "error": str(e).splitlines()[0][:160]}]
        for r in got:
            print(json.dumps(r), flush=True)
        rows += got
    print(f"\n{'row':<62}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'ratio':>8}")
    for r in rows:
        ratio = r.get("vs_hf", r.get("vs_official_quoted"))
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        mem = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        rat = f"{ratio:.2f}x" if ratio is not None else ""
        print(f"{r['row']:<62}{r.get('tok_s', 0):>12,.0f}{mfu:>8}{mem:>10}{rat:>8}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
