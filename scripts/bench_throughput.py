"""Training throughput of model configs: forward + backward + AdamW step, tokens/s and peak memory.

    python scripts/bench_throughput.py                       # default set, CPU or GPU
    python scripts/bench_throughput.py --models transformer hyena --seq 1024 --batch 8 --steps 10
    python scripts/bench_throughput.py --models hyena evo2 --against main --repeat 3   # this tree vs a git revision

On GPU it uses bf16 autocast (as the trainer's `precision=auto` does); on CPU fp32. Rows are
measured side by side in one process so that ratios between them are meaningful. ``--against REV``
imports the model code of a git revision as a second package (``git archive``) and alternates the
two versions ``--repeat`` times per model (median tokens/s and the ratio), for before/after numbers.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import glmtrain.models as this_models  # noqa: E402
import glmtrain.tokenizers as this_tokenizers  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402


def import_revision(rev: str):
    """The ``glmtrain.models`` package of git revision ``rev``, importable beside this tree's (renamed)."""
    pkg = "glmtrain_" + re.sub(r"\W", "_", rev)
    dest = Path(tempfile.mkdtemp(prefix="bench-rev-"))
    tar = subprocess.run(["git", "archive", rev, "glmtrain"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    (dest / "glmtrain").rename(dest / pkg)
    for f in (dest / pkg).rglob("*.py"):
        f.write_text(re.sub(r"\bglmtrain\.", pkg + ".", f.read_text()))
    sys.path.insert(0, str(dest))
    import importlib

    return importlib.import_module(pkg + ".models"), importlib.import_module(pkg + ".tokenizers")


def bench(name: str, seq: int, batch: int, steps: int, device: str, overrides: dict, impl=None) -> dict:
    models_pkg, tok_pkg = impl or (this_models, this_tokenizers)
    raw = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
    raw.update(overrides)
    cls = models_pkg.config_class(raw["family"])
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), raw))
    tok = tok_pkg.build_tokenizer(OmegaConf.to_container(OmegaConf.structured(cfg.tokenizer)))
    torch.manual_seed(0)
    model = models_pkg.build_model(cfg, tok.vocab_size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    x = torch.as_tensor(tok.nucleotide_ids)[torch.randint(0, 4, (batch, seq))].to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with amp:
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    warm = 2
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warm + steps):
        if i == warm:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"model": name, "params_M": model.num_params() / 1e6, "seq": seq, "batch": batch,
            "tok_s": batch * seq / dt, "step_s": dt, "peak_GiB": mem}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["transformer", "hyena"])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--set", nargs="*", default=[], help="model overrides key=value (yaml values)")
    ap.add_argument("--against", default="", help="git revision whose model code is measured beside this tree's")
    ap.add_argument("--repeat", type=int, default=3, help="with --against: alternations per model")
    args = ap.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    if args.against:
        compare(args, overrides)
        return
    print(f"{'model':<22}{'params(M)':>10}{'seq':>9}{'batch':>7}{'tokens/s':>12}{'s/step':>9}{'peak GiB':>10}")
    for name in args.models:
        try:
            r = bench(name, args.seq, args.batch, args.steps, args.device, overrides)
            print(f"{r['model']:<22}{r['params_M']:>10.2f}{r['seq']:>9}{r['batch']:>7}{r['tok_s']:>12.0f}{r['step_s']:>9.3f}{r['peak_GiB']:>10.2f}", flush=True)
        except Exception as e:  # one failing row must not hide the others
            print(f"{name:<22} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()


def compare(args, overrides: dict) -> None:
    old = import_revision(args.against)
    print(f"{'model':<14}{'seq':>6}{'batch':>6}{args.against[:12]:>14}{'this tree':>12}{'ratio':>8}   (tokens/s, median of {args.repeat})")
    for name in args.models:
        runs: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(args.repeat):  # alternate so that load changes hit both versions alike
            runs["old"].append(bench(name, args.seq, args.batch, args.steps, args.device, overrides, old)["tok_s"])
            runs["new"].append(bench(name, args.seq, args.batch, args.steps, args.device, overrides)["tok_s"])
        a, b = statistics.median(runs["old"]), statistics.median(runs["new"])
        print(f"{name:<14}{args.seq:>6}{args.batch:>6}{a:>14.0f}{b:>12.0f}{b / a:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
