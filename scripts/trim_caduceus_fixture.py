#!/usr/bin/env python
"""Make the bundled copies of the Caduceus golden fixtures (tests/fixtures/caduceus_{ps,ph}_tiny).

    python scripts/trim_caduceus_fixture.py ../shared/data/reference tests/fixtures

From each ``../shared/data/reference/caduceus_{ps,ph}_tiny`` (made by the reference Caduceus code;
see the README there) it keeps: config.json unchanged; model.safetensors with the duplicate
entries of tied tensors left out (``mamba_rev.in_proj`` / ``out_proj``, the LM head), as Hugging
Face stores the released checkpoints -- every stored value is bit-identical to the original;
inputs.json and logits.safetensors for the first sequence only (seq0: float32 and float64 logits,
and for PS the float64 logits of the fused add-norm branch).  The copies are what a
fresh clone without ../shared tests against; the tests use the full fixtures when present.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file


def trim(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    keep = {k: v.contiguous() for k, v in tensors.items()
            if not (".mamba_rev.in_proj." in k or ".mamba_rev.out_proj." in k or k.startswith("lm_head.") and k.endswith("weight"))}
    save_file(keep, str(dst / "model.safetensors"), metadata={"format": "pt"})
    inputs = json.loads((src / "inputs.json").read_text())
    inputs["inputs"] = [x for x in inputs["inputs"] if x["name"] == "seq0"]
    (dst / "inputs.json").write_text(json.dumps(inputs, indent=1) + "\n")
    keys = ("seq0.f32", "seq0.f64", "seq0.fusedpath.f64")
    logits = {k: v.contiguous() for k, v in load_file(str(src / "logits.safetensors")).items() if k in keys}
    save_file(logits, str(dst / "logits.safetensors"), metadata={"format": "pt"})
    sums = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(src.iterdir()) if f.is_file()}
    (dst / "SOURCE_SHA256.json").write_text(json.dumps(sums, indent=1) + "\n")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    for name in ("caduceus_ps_tiny", "caduceus_ph_tiny"):
        trim(Path(argv[0]) / name, Path(argv[1]) / name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
