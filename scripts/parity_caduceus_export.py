#!/usr/bin/env python
"""Caduceus through Hugging Face: measured errors of the remote-code export (a measurement, not a test).

    python scripts/parity_caduceus_export.py [--reference ../shared/data/reference] [--length 1000]

1. Round trip: tiny Caduceus-PS (released fused add-norm half order) and Caduceus-Ph (RC-averaged evaluation)
   with every parameter perturbed -> ``export_model`` -> ``AutoModelForMaskedLM`` (trust_remote_code) in float32
   and float64: relative L2 error of the logits against glmtrain's, and whether the export reads back into
   glmtrain bit for bit.
2. Fixtures: each ``caduceus_{ps,ph}_tiny`` imported (``caduceus-hf`` layout) and exported; the AutoModel's
   logits against the reference code's, max |difference| per key (float32, float64; PS also the fused path).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glmtrain.convert import build_imported_model, load_released  # noqa: E402
from glmtrain.convert.caduceus import load_reference  # noqa: E402
from glmtrain.convert.hf import export_model  # noqa: E402
from glmtrain.models.caduceus import Caduceus, CaduceusConfig  # noqa: E402
from glmtrain.tokenizers import build_tokenizer  # noqa: E402


def auto(out: Path, dtype: torch.dtype):
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True, dtype=dtype).eval()


def round_trip(name: str, cfg: CaduceusConfig, tmp: Path, length: int) -> str:
    torch.manual_seed(0)
    model = Caduceus(cfg, build_tokenizer(dataclasses.asdict(cfg.tokenizer)).vocab_size).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    out = tmp / name
    export_model(model, out, cfg.tokenizer)
    x = torch.randint(7, 12, (2, length))
    errs = []
    for dtype in (torch.float32, torch.float64):
        with torch.no_grad():
            a, b = auto(out, dtype)(x).logits.double(), model.to(dtype)(x).double()
        errs.append(float((a - b).norm() / b.norm()))
    model.float()
    back = build_imported_model(load_released(out, family="caduceus"))[0]
    sa, sb = model.state_dict(), back.state_dict()
    same = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    return f"{name:<34} rel L2 fp32 {errs[0]:.2e}  fp64 {errs[1]:.2e}  re-import bitwise equal: {same}"


def fixture_rows(fix: Path, tmp: Path) -> list[str]:
    from safetensors.torch import load_file

    ref = load_file(str(fix / "logits.safetensors"))
    inputs = json.loads((fix / "inputs.json").read_text())["inputs"]
    rows = []
    for fused in (False, True):
        if fused and not any(".fusedpath." in k for k in ref):
            continue
        model, _ = load_reference(fix, fused_add_norm=fused) if fused else (None, None)
        if fused:
            out = tmp / f"{fix.name}_fused"
            export_model(model, out, model.cfg.tokenizer)
        else:
            out = tmp / fix.name
            imp = load_released(fix, family="caduceus")
            m, _, tok_cfg, _ = build_imported_model(imp)
            export_model(m, out, tok_cfg)
        for dtype, tag in ((torch.float32, "f32"), (torch.float64, "f64")):
            hf = auto(out, dtype)
            for x in inputs:
                for rc in ("", ".rc"):
                    key = f"{x['name']}{'.fusedpath' if fused else ''}{rc}.{tag}"
                    if key in ref:
                        with torch.no_grad():
                            lg = hf(torch.tensor([x["rc_input_ids" if rc else "input_ids"]])).logits[0].double()
                        d = (lg - ref[key].double()).abs().max().item()
                        rows.append(f"{fix.name:<18} {key:<24} max|diff| {d:.2e}  (max|logit| {ref[key].abs().max():.1f})")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", default=str(ROOT.parent / "shared" / "data" / "reference"))
    ap.add_argument("--length", type=int, default=1000, help="sequence length of the round trip")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(round_trip("caduceus_ps", CaduceusConfig(d_model=32, n_layers=2, rcps=True, fused_add_norm=True), tmp, args.length))
        print(round_trip("caduceus_ph", CaduceusConfig(d_model=32, n_layers=2, rcps=False, rc_average="eval"), tmp, args.length))
        for kind in ("ps", "ph"):
            fix = Path(args.reference) / f"caduceus_{kind}_tiny"
            if not fix.is_dir():
                fix = ROOT / "tests" / "fixtures" / fix.name
            print("\n".join(fixture_rows(fix, tmp)))


if __name__ == "__main__":
    main()
