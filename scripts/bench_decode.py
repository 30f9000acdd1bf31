"""Decoding speed: cached (KV cache, FIR / modal-filter states, Hyena long-convolution history)
versus full recomputation of the prefix for every new token, side by side in one process.

    python scripts/bench_decode.py                                  # tiny shapes, CPU
    python scripts/bench_decode.py --models hyena evo2 --prompt 256 --new 512 --batch 4
    python scripts/bench_decode.py --init-from runs/hyena-clm       # a trained run directory

Prints new tokens/s of both and the speed-up, and checks that both produce the same greedy
sequence (cached decoding is exact). On a GPU it runs there (fp32, no autocast).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from glmtrain.inference import generate  # noqa: E402
from glmtrain.models import build_model, config_class  # noqa: E402
from glmtrain.tokenizers import build_tokenizer  # noqa: E402


def load(name: str, init_from: str):
    if init_from:
        from glmtrain.downstream.pretrained import load_into, load_pretrained

        pre = load_pretrained(init_from, None)
        cfg = pre.model_cfg
    else:
        raw = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(config_class(raw["family"])), raw))
    tok = build_tokenizer(OmegaConf.to_container(OmegaConf.structured(cfg.tokenizer)))
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size)
    if init_from:
        load_into(model, pre.state_dict, "", pre.source)
    return model.eval(), tok, cfg.name


def timed(model, prompt, new: int, cached: bool, device) -> tuple[float, torch.Tensor]:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = generate(model, prompt, new, temperature=0.0, cached=cached)
    if device == "cuda":
        torch.cuda.synchronize()
    return prompt.shape[0] * new / (time.perf_counter() - t0), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["hyena", "evo2", "transformer"])
    ap.add_argument("--init-from", default="", help="a glmtrain run directory (replaces --models)")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'model':<18}{'prompt':>7}{'new':>6}{'batch':>6}{'full tok/s':>12}{'cached tok/s':>14}{'speed-up':>10}  same")
    for name in [args.init_from] if args.init_from else args.models:
        model, tok, label = load(name, args.init_from)
        model.to(args.device)
        g = torch.Generator().manual_seed(0)
        prompt = torch.as_tensor(tok.nucleotide_ids)[torch.randint(0, 4, (args.batch, args.prompt), generator=g)].to(args.device)
        timed(model, prompt[:, :8], 4, True, args.device)  # warm-up
        for new in args.new:
            full, a = timed(model, prompt, new, False, args.device)
            cached, b = timed(model, prompt, new, True, args.device)
            print(f"{label:<18}{args.prompt:>7}{new:>6}{args.batch:>6}{full:>12.1f}{cached:>14.1f}{cached / full:>10.1f}  "
                  f"{bool(torch.equal(a, b))}", flush=True)


if __name__ == "__main__":
    main()
