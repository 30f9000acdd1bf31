"""Fine-tuning and variant-scoring throughput of a small model (issue 13, point 6), side by side.

    python scripts/bench_downstream.py                        # HyenaDNA tiny + Transformer encoder, CPU or GPU
    python scripts/bench_downstream.py --model hyena --seq 101 --batch 32 --steps 5

Fine-tuning: forward + backward + AdamW step of the classifier for each method (samples/s and
tokens/s of training, as ``task=finetune`` does it, GUE-like length ``--seq``).  Scoring: variants/s
of ``task=score`` on a synthetic reference (LLR for the causal model at ``--window`` bases: two
windows per variant; masked marginal for the encoder: one masked window).
On GPU: bf16 autocast for fine-tuning, like ``trainer.precision=auto``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from glmtrain.downstream.config import FinetuneTask  # noqa: E402
from glmtrain.downstream.families import inspect_model  # noqa: E402
from glmtrain.downstream.heads import SequenceClassifier  # noqa: E402
from glmtrain.downstream.peft_methods import apply_method  # noqa: E402
from glmtrain.downstream.vcf import score_vcf  # noqa: E402
from glmtrain.models import build_model, config_class  # noqa: E402
from glmtrain.tokenizers import build_tokenizer  # noqa: E402

METHODS = ["full", "probe", "lora", "adalora", "ia3", "prompt", "adapter"]


def build(name: str):
    raw = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(config_class(raw["family"])), raw))
    tok = build_tokenizer(OmegaConf.to_container(OmegaConf.structured(cfg.tokenizer)))
    torch.manual_seed(0)
    return build_model(cfg, tok.vocab_size), tok, cfg


def finetune_rate(name: str, method: str, seq: int, batch: int, steps: int, device: str) -> dict:
    body, tok, cfg = build(name)
    anatomy = inspect_model(body, tok.nucleotide_ids.tolist(), cfg.family)
    clf = SequenceClassifier(body, anatomy.hidden, 2, "mean", 0.1)
    applied = apply_method(clf, FinetuneTask(data_dir="-", method=method), anatomy, cfg.name, 1000)
    net = applied.net.to(device).train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    x = torch.as_tensor(tok.nucleotide_ids)[torch.randint(0, 4, (batch, seq))].to(device)
    y = torch.randint(0, 2, (batch,), device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    for i in range(2 + steps):
        if i == 2:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with amp:
            loss = net(x, labels=y).loss
        loss.backward()
        opt.step()
        if applied.adalora is not None:  # as task=finetune: budget update after the step, before zero_grad
            applied.adalora.update_and_allocate(i)
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    train, total = applied.trainable()
    return {"samples_s": batch / dt, "tok_s": batch * seq / dt, "trainable": train, "total": total}


def scoring_rate(name: str, n: int, window: int, batch: int, device: str) -> dict:
    model, tok, cfg = build(name)
    model.to(device).eval()
    rng = np.random.default_rng(0)
    genome = "".join(rng.choice(list("ACGT"), 200_000))
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "ref.fa").write_text(">chr1\n" + "\n".join(genome[i:i + 80] for i in range(0, len(genome), 80)) + "\n")
        lines = ["##fileformat=VCFv4.2", "#CHROM\tPOS\tID\tREF\tALT"]
        for i, pos in enumerate(rng.integers(window, len(genome) - window, n)):
            ref = genome[pos - 1]
            lines.append(f"chr1\t{pos}\tv{i}\t{ref}\t{'C' if ref != 'C' else 'G'}")
        (d / "v.vcf").write_text("\n".join(lines) + "\n")
        s = score_vcf(model, tok, d / "v.vcf", d / "ref.fa", d / "out.tsv", window=window, batch_size=batch,
                      say=lambda m: None)
    return {"variants_s": s["variants_per_s"], "method": s["method"], "scored": s["scored"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hyena", help="causal model config (conf/model) for fine-tuning and LLR")
    ap.add_argument("--encoder", default="transformer_encoder", help="MLM encoder config for masked-marginal scoring")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--seq", type=int, default=101)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--variants", type=int, default=64)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"fine-tuning {args.model}, length {args.seq}, batch {args.batch}:")
    print(f"  {'method':<9}{'trainable':>11}{'of':>10}{'samples/s':>11}{'tokens/s':>11}")
    for m in args.methods:
        r = finetune_rate(args.model, m, args.seq, args.batch, args.steps, args.device)
        print(f"  {m:<9}{r['trainable']:>11,}{r['total']:>10,}{r['samples_s']:>11.1f}{r['tok_s']:>11.0f}", flush=True)
    print(f"variant scoring, window {args.window}, {args.variants} SNVs:")
    for name in (args.model, args.encoder):
        r = scoring_rate(name, args.variants, args.window, 16, args.device)
        print(f"  {name:<22}{r['method']:<17}{r['variants_s']:>9.1f} variants/s", flush=True)


if __name__ == "__main__":
    main()
