"""One torchrun launch for the multi-process checks of tests/test_scale.py (start-up paid once).

    torchrun --nproc_per_node 2 tests/_dist_checks.py OUT.json CHECK [CHECK ...]

CHECK: ``grad:<strategy>`` (tests/_grad_probe.py).  Rank 0 writes ``{check: result}`` as JSON; a
check that raises is recorded as ``{"error": ...}`` and the launch goes on when it safely can.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_check(name: str) -> dict:
    kind, _, arg = name.partition(":")
    if kind == "grad":
        from tests._grad_probe import probe

        return probe(arg)
    raise ValueError(f"unknown check {name!r}")


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)
    out, names = Path(argv[0]), argv[1:]
    results: dict[str, dict] = {}
    rc = 0
    for name in names:
        t0 = time.perf_counter()
        try:
            results[name] = run_check(name)
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails with it
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            rc = 1
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        if int(os.environ.get("RANK", "0")) == 0:
            out.write_text(json.dumps(results, indent=1))
        if rc:
            break  # a failed collective cannot be continued safely
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
