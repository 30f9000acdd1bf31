#!/usr/bin/env python
"""Caduceus through Hugging Face against the reference code's logits (a measurement, not a test).

    python scripts/parity_caduceus_export.py [--reference ../shared/data/reference]

Each golden fixture ``caduceus_{ps,ph}_tiny`` is imported (``caduceus-hf`` layout) and exported; the exported
``AutoModelForMaskedLM`` (trust_remote_code) is run on the fixture's inputs and compared with the reference
code's logits: max |difference| per key (float32, float64, forward and reverse-complement inputs; PS also the
released fused add-norm branch).  The round trip against glmtrain itself (every family, fp32 and fp64, and
the bitwise re-import) is in scripts/parity_released.py.
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
from glmtrain.convert.caduceus import load_reference  # noqa: E402
from glmtrain.convert.hf import export_model  # noqa: E402


def auto(out: Path, dtype: torch.dtype):
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True, dtype=dtype).eval()


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
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for kind in ("ps", "ph"):
            fix = Path(args.reference) / f"caduceus_{kind}_tiny"
            if not fix.is_dir():
                fix = ROOT / "tests" / "fixtures" / fix.name
            print("\n".join(fixture_rows(fix, tmp)))


if __name__ == "__main__":
    main()
