#!/usr/bin/env python
"""Parity of glmtrain's importers and exporters against the golden fixtures (a measurement, not a test).

    python scripts/parity_released.py [--reference ../shared/data/reference] [--json out.json]

For each fixture (HyenaDNA's standalone code, Evo 2's vortex; see their READMEs) it imports the
released-layout checkpoint, runs glmtrain's model in float32 and float64 on the fixture's inputs and
prints, per sequence and variant, the max |logit difference|, that difference relative to the largest
|reference logit|, and the difference of the mean next-token log-likelihood.  Then it exports the
imported model to a Hugging Face directory, loads it with ``transformers`` (AutoModelForCausalLM,
trust_remote_code) and reports the relative logit error (||a - b|| / ||b||) and whether the export
imports back bit for bit; the same for a random Transformer exported as GPT-NeoX.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glmtrain.convert import build_imported_model, load_released  # noqa: E402
from glmtrain.convert.hf import export_model  # noqa: E402


def loglik(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(torch.log_softmax(logits.double(), -1)[:-1].gather(-1, ids[1:, None]).mean())


def compare(name, logits, ref, ids, ref_ll) -> dict:
    d = (logits.double() - ref.double()).abs().max().item()
    return {"case": name, "max_abs": d, "max_rel": d / ref.abs().max().item(), "loglik_diff": abs(loglik(logits, ids) - ref_ll)}


def hyena_rows(fix: Path) -> tuple[list[dict], torch.nn.Module, object, list]:
    from safetensors.torch import load_file

    model, _, tok_cfg, _ = build_imported_model(load_released(fix))
    ref = load_file(fix / "logits.safetensors")
    rows, inputs = [], []
    for i in (0, 1):
        ids = ref[f"seq{i}.input_ids"]
        inputs.append(ids)
        with torch.no_grad():
            lg32, lg64 = model.float()(ids[None])[0], model.double()(ids[None])[0]
        rows.append(compare(f"hyena seq{i} fp32", lg32, ref[f"seq{i}.logits.float32"], ids,
                            ref[f"seq{i}.mean_next_token_loglik.float32"].item()))
        for var in ("float64", "float64_residual_fp64", "float64_residual_fp64_zt_fp64"):
            rows.append(compare(f"hyena seq{i} fp64 vs {var}", lg64, ref[f"seq{i}.logits.{var}"], ids,
                                ref[f"seq{i}.mean_next_token_loglik.{var}"].item()))
    return rows, model.float(), tok_cfg, inputs


def evo2_rows(fix: Path) -> tuple[list[dict], torch.nn.Module, object, list]:
    from safetensors.torch import load_file

    model, _, tok_cfg, _ = build_imported_model(load_released(fix))
    ref = load_file(fix / "logits.safetensors")
    rows, inputs = [], []
    for j, ids in enumerate(json.loads((fix / "inputs.json").read_text())["input_ids"]):
        ids = torch.tensor(ids)
        inputs.append(ids)
        with torch.no_grad():
            lg32, lg64 = model.float()(ids[None])[0], model.double()(ids[None])[0]
        rows.append(compare(f"evo2 seq{j} fp32", lg32, ref[f"seq{j}.logits_f32"], ids, ref["mean_loglik_f32"][j].item()))
        rows.append(compare(f"evo2 seq{j} fp64", lg64, ref[f"seq{j}.logits_f64"], ids, ref["mean_loglik_f64"][j].item()))
    return rows, model.float(), tok_cfg, inputs


def round_trip(name, model, tok_cfg, inputs, tmp: Path, auto: str = "AutoModelForCausalLM") -> dict:
    import transformers

    out = tmp / "".join(c if c.isalnum() else "_" for c in name)  # transformers imports the folder as a module
    export_model(model, out, tok_cfg)
    hf = getattr(transformers, auto).from_pretrained(out, trust_remote_code=True).eval()
    worst = 0.0
    for ids in inputs:
        with torch.no_grad():
            a, b = hf(ids[None]).logits, model(ids[None])
        worst = max(worst, float((a - b).norm() / b.norm()))
    back = build_imported_model(load_released(out, family=model.cfg.family))[0]
    sa, sb = model.state_dict(), back.state_dict()
    same = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    return {"case": f"{name} -> HF ({type(hf).__name__})", "rel_err": worst, "reimport_bitwise_equal": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", default=str(ROOT.parent / "shared" / "data" / "reference"))
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    ref = Path(args.reference)
    rows, trips = [], []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for fix, fn, name in ((ref / "hyenadna_tiny", hyena_rows, "hyena"), (ref / "evo2_vortex_tiny", evo2_rows, "evo2")):
            if not fix.is_dir():
                print(f"skipping {name}: {fix} is absent")
                continue
            r, model, tok_cfg, inputs = fn(fix)
            rows += r
            trips.append(round_trip(f"{name} (imported fixture)", model, tok_cfg, inputs, tmp))
        from glmtrain.models.transformer import Transformer, TransformerConfig
        from glmtrain.tokenizers import TokenizerConfig

        torch.manual_seed(0)
        for causal in (True, False):
            cfg = TransformerConfig(d_model=64, n_layers=2, n_heads=4, causal=causal, tokenizer=TokenizerConfig(kind="char"))
            tf = Transformer(cfg, 16).eval()
            with torch.no_grad():
                for p in tf.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            x = [torch.randint(7, 12, (300,))]
            trips.append(round_trip(f"transformer causal={causal}", tf, cfg.tokenizer, x, tmp,
                                    "AutoModelForCausalLM" if causal else "AutoModelForMaskedLM"))
    print(f"{'case':<44} {'max|diff|':>10} {'rel':>10} {'mean loglik diff':>17}")
    for r in rows:
        print(f"{r['case']:<44} {r['max_abs']:10.2e} {r['max_rel']:10.2e} {r['loglik_diff']:17.2e}")
    print()
    for t in trips:
        print(f"{t['case']:<60} rel err {t['rel_err']:.2e}  re-import bitwise equal: {t['reimport_bitwise_equal']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"parity": rows, "round_trip": trips}, indent=2) + "\n")


if __name__ == "__main__":
    main()
