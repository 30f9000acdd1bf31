"""DeepSpeed ZeRO 1/2/3 on CPU with the configs glmtrain generates (skipped when deepspeed is not installed).

Lightning's DeepSpeedStrategy refuses CPU, so ``scripts/deepspeed_cpu_parity.py`` drives DeepSpeed's
engine directly (its CPU accelerator, gloo) with a glmtrain model, glmtrain's objective and the
generated config, and compares the losses with plain PyTorch AdamW.  The Lightning path runs on a GPU
(``scripts/gpu_deepspeed.py``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is optional: pip install -e '.[deepspeed]' to enable these tests")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "deepspeed_cpu_parity.py"


def _port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def _run(nproc: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(PYTHONUNBUFFERED="1", MASTER_PORT=str(_port()), MASTER_ADDR="127.0.0.1")
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_port()}", str(SCRIPT)]
        env.pop("MASTER_PORT")
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_zero_stages_match_plain_adamw_on_cpu(nproc):
    rows = _run(nproc)
    assert [r["stage"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["world"] == nproc
        assert r["max_abs_diff"] < 1e-5, r
