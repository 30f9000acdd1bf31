#!/usr/bin/env python
"""Parity of glmtrain's importers and exporters against the golden fixtures (a measurement, not a test).

    python scripts/parity_released.py [--reference ../shared/data/reference] [--json out.json]

For each fixture (HyenaDNA's standalone code, Evo 2's vortex; see their READMEs) it imports the
released-layout checkpoint, runs glmtrain's model in float32 and float64 on the fixture's inputs and
prints, per sequence and variant, the max |logit difference|, that difference relative to the largest
|reference logit|, and the difference of the mean next-token log-likelihood.  Then it exports the
imported model to a Hugging Face directory, loads it with ``transformers`` (AutoModelForCausalLM,
trust_remote_code) and reports the relative logit error (||a - b|| / ||b||) and whether the export
imports back bit for bit; the same for every shipped tiny model config (each family, each Transformer
variant) with random weights, in float32 and float64.
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
    """Export -> transformers Auto class: worst relative logit error in fp32 and fp64 (the first ``n`` columns
    both have), and whether the export imports back bit for bit."""
    import transformers

    out = tmp / "".join(c if c.isalnum() else "_" for c in name)  # transformers imports the folder as a module
    export_model(model, out, tok_cfg)
    hf = getattr(transformers, auto).from_pretrained(out, trust_remote_code=True).eval()
    back = build_imported_model(load_released(out, family=model.cfg.family))[0]
    sa, sb = model.state_dict(), back.state_dict()
    same = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    worst = {}
    for dtype in (torch.float32, torch.float64):
        worst[dtype] = 0.0
        for ids in inputs:
            with torch.no_grad():
                a, b = hf.to(dtype)(ids[None]).logits, model.to(dtype)(ids[None])
            n = min(a.shape[-1], b.shape[-1])
            worst[dtype] = max(worst[dtype], float((a[..., :n] - b[..., :n]).norm() / b[..., :n].norm()))
    model.float()
    return {"case": f"{name} -> HF ({type(hf).__name__})", "rel_err": worst[torch.float32],
            "rel_err_fp64": worst[torch.float64], "reimport_bitwise_equal": same}


TINY = ("transformer", "transformer_encoder", "transformer_kmer", "nt_v1", "nt_v2", "dnabert1", "dnabert2", "generator",
        "hyena", "evo2", "caduceus_ph", "caduceus_ps")


def tiny_model(name: str, tmp: Path):
    """conf/model/<name>.yaml with its own initialisation, every parameter perturbed (norms and biases too)."""
    import dataclasses

    from glmtrain.convert.__main__ import shipped_model_config
    from glmtrain.models import build_model
    from glmtrain.tokenizers import build_tokenizer, train_bpe

    cfg = shipped_model_config(name)
    if cfg.tokenizer.kind == "bpe":
        g = torch.Generator().manual_seed(0)
        seqs = ["".join("ACGT"[i] for i in torch.randint(0, 4, (3000,), generator=g)) for _ in range(20)]
        train_bpe(seqs, vocab_size=128, out=str(tmp / "bpe.json"))
        cfg.tokenizer.path, cfg.tokenizer.vocab_size = str(tmp / "bpe.json"), 128
    tok = build_tokenizer(dataclasses.asdict(cfg.tokenizer))
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.as_tensor(tok.encode_window("".join("ACGT"[(7 * i * i + 3 * i) % 4] for i in range(400)))[0][:256])
    return model, cfg.tokenizer, [ids]


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
        for name in TINY:  # every family and Transformer variant, as shipped (tiny shapes), random weights
            model, tok_cfg, x = tiny_model(name, tmp)
            try:
                trips.append(round_trip(f"model={name}", model, tok_cfg, x, tmp,
                                        "AutoModelForCausalLM" if getattr(model, "causal", True) else "AutoModelForMaskedLM"))
            except Exception as e:  # a family without an exporter is reported, not hidden
                trips.append({"case": f"model={name}", "error": f"{type(e).__name__}: {e}"})
    print(f"{'case':<44} {'max|diff|':>10} {'rel':>10} {'mean loglik diff':>17}")
    for r in rows:
        print(f"{r['case']:<44} {r['max_abs']:10.2e} {r['max_rel']:10.2e} {r['loglik_diff']:17.2e}")
    print()
    print(f"{'export round trip':<64} {'fp32 rel':>9} {'fp64 rel':>9}  re-import bit-equal")
    for t in trips:
        if "error" in t:
            print(f"{t['case']:<64} FAILED: {t['error']}")
            continue
        print(f"{t['case']:<64} {t['rel_err']:9.2e} {t['rel_err_fp64']:9.2e}  {t['reimport_bitwise_equal']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"parity": rows, "round_trip": trips}, indent=2) + "\n")


if __name__ == "__main__":
    main()
