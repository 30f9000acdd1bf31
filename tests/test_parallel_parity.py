"""Strategy parity and resharded resume on CPU (gloo), through the real training entry point.

Every family x every strategy that runs on CPU (ddp, fsdp, tp, fsdp+tp; tp also with a
vocabulary-parallel embedding/head and without sequence parallelism) trains 4 fp32 steps from
the same seed on the same global batch and must log the single-process losses within 1e-5.  The
single-process reference takes the global batch of 4 windows in 2 accumulated micro-batches of 2,
the 2-rank runs in one micro-batch of 2 per rank: the loss normalisation must be exact across both
splits.  Checkpoints of step 2 written under one strategy and world size are then resumed under
another, and the resumed steps 3 and 4 must log the uninterrupted run's losses (step 3 checks the
weights, step 4 the optimizer state).

Multi-process runs are subprocesses (``torchrun ... scripts/parity.py``, one launch per strategy
runs all families, so process start-up is paid once per strategy).  Adding a family = adding it
to ``FAMILIES``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
STEPS = 4

# tiny shapes: divisible by tp=2 everywhere; no dropout (parity needs identical arithmetic, not RNG streams)
FAMILIES: dict[str, list[str]] = {
    "transformer": ["model=transformer", "model.d_model=32", "model.n_layers=2", "model.n_heads=4"],
    "hyena": ["model=hyena", "model.d_model=32", "model.n_layers=2", "model.filter_order=16", "model.max_seq_len=64",
              "model.embed_dropout=0.0"],
    "evo2": ["model=evo2", "model.d_model=32", "model.pattern=SDH*", "model.n_heads=4", "model.mlp_dim=64",
             "model.se_filter_groups=4", "model.mr_filter_groups=4", "model.mr_filter_length=16"],
}
# (processes, overrides)
STRATEGIES: dict[str, tuple[int, list[str]]] = {
    "single": (1, []),
    "ddp": (2, ["strategy=ddp", "trainer.devices=2"]),
    "fsdp": (2, ["strategy=fsdp", "trainer.devices=2"]),
    "tp": (2, ["strategy=tp", "trainer.devices=2"]),
    "tp_vocab_nosp": (2, ["strategy=tp", "trainer.devices=2", "strategy.vocab_parallel=true", "strategy.sequence_parallel=false"]),
    "fsdp_tp": (4, ["strategy=fsdp_tp", "trainer.devices=4"]),
    # Lightning's DeepSpeedStrategy through GLMModule on DeepSpeed's CPU accelerator (GLMDeepSpeedStrategy)
    "deepspeed": (2, ["strategy=deepspeed", "trainer.devices=2", "strategy.zero_stage=2"]),
    # context parallel: each window split over the 2 ranks (ring attention, gathered Hyena mixers)
    "fsdp_cp": (2, ["strategy=fsdp", "trainer.devices=2", "strategy.cp_size=2"]),
}
# (written under, resumed under): the examples plus file -> 2-D
RESUMES = [("fsdp", "ddp"), ("tp", "single"), ("ddp", "fsdp_tp")]
# launch order (strategies of one launch share its processes and pay start-up once): a resume runs in
# the launch of its target strategy, after every job of that launch (its source was written before)
LAUNCHES = [["fsdp", "ddp", "tp", "tp_vocab_nosp", "fsdp_cp", "deepspeed"], ["fsdp_tp"], ["single"]]


def base_overrides(cache: Path) -> list[str]:
    return [
        "experiment=smoke", f"trainer.max_steps={STEPS}", "trainer.log_every=1", "trainer.progress=none",
        "trainer.val_every=0", "eval.final=false", "trainer.ckpt_every=2", "trainer.keep_last=0",
        "trainer.accelerator=cpu", "trainer.threads=1", "data.format=memory", f"data.cache_dir={cache}",
        "data.window=64", "data.num_workers=0", "trainer.micro_batch_size=2", "trainer.global_batch_tokens=256",
        "logger=csv",
    ]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    for k in [k for k in env if k.startswith(("SLURM_", "TORCHELASTIC_")) or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")]:
        env.pop(k)
    return env


def losses(run_dir: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for f in sorted(Path(run_dir).glob("logs/version_*/metrics.csv")):
        for row in csv.DictReader(open(f)):
            if row.get("loss"):
                out[int(float(row["step"]))] = float(row["loss"])
    return out


class Launches:
    def __init__(self, base: Path):
        self.base = base
        self.cache = base / "cache"
        self.logs: dict[str, str] = {}
        self.failed: dict[str, str] = {}

    def run_dir(self, strategy: str, family: str) -> Path:
        return self.base / f"{strategy}-{family}"

    def resume_dir(self, src: str, dst: str, family: str) -> Path:
        return self.base / f"resume-{src}-to-{dst}-{family}"

    def launch(self, group: list[str]) -> None:
        strategy = group[0]
        nproc = STRATEGIES[strategy][0]
        base = base_overrides(self.cache)
        jobs = [{"overrides": [*base, *FAMILIES[f], *STRATEGIES[s][1]], "run_dir": str(self.run_dir(s, f))}
                for s in group for f in FAMILIES]
        for src, dst in RESUMES:
            if dst not in group:
                continue
            for f in FAMILIES:
                d = self.resume_dir(src, dst, f)
                ckpt = self.run_dir(src, f) / "checkpoints" / "step-00000002.ckpt"
                # copied into d/checkpoints by scripts/parity.py when the job starts (the source may be
                # written earlier in the same launch)
                jobs.append({"overrides": [*base, *FAMILIES[f], *STRATEGIES[dst][1]], "run_dir": str(d),
                             "resume_from": str(ckpt)})
        ports = _free_ports(len(jobs) + 1)
        spec = self.base / f"{strategy}.json"
        # job 0 rendezvouses on torchrun's --master_port; job i > 0 on its own free port
        spec.write_text(json.dumps({"jobs": jobs, "ports": [ports[0], *ports[1:len(jobs)]]}))
        if nproc == 1:
            cmd = [sys.executable, str(ROOT / "scripts" / "parity.py"), str(spec)]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={ports[0]}",
                   str(ROOT / "scripts" / "parity.py"), str(spec)]
        try:
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, env=_env())
            log = res.stdout + res.stderr
            if res.returncode != 0:
                self.failed[strategy] = f"rc={res.returncode}"
        except subprocess.TimeoutExpired as e:
            log = f"timeout: {e}"
            self.failed[strategy] = "timeout"
        for s in group:
            self.logs[s] = log
            if strategy in self.failed:
                self.failed[s] = self.failed[strategy]
        (self.base / f"{strategy}.log").write_text(log)

    def why(self, strategy: str) -> str:
        log = self.logs.get(strategy, "")
        lines = [ln for ln in log.splitlines() if "JOB FAILED" in ln or "Error" in ln]
        return f"launch {strategy} {self.failed.get(strategy, 'ok')}: " + "\n".join(lines[:6] or log.splitlines()[-30:])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Launches:
    runs = Launches(tmp_path_factory.mktemp("parity"))
    for group in LAUNCHES:
        runs.launch(group)
    table = [f"{'family':<12}" + "".join(f"{s:>15}" for s in STRATEGIES if s != "single")]
    for f in FAMILIES:
        ref = losses(runs.run_dir("single", f))
        row = f"{f:<12}"
        for s in STRATEGIES:
            if s == "single":
                continue
            got = losses(runs.run_dir(s, f))
            d = max((abs(got[k] - ref[k]) for k in ref if k in got), default=float("nan")) if len(got) == len(ref) == STEPS else float("nan")
            row += f"{d:>15.2e}"
        table.append(row)
    (runs.base / "parity_table.txt").write_text("\n".join(table) + "\n")
    print("\n[parity] max |loss - single-process loss| over 4 steps\n" + "\n".join(table))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "single"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_parity(runs, family, strategy):
    ref = losses(runs.run_dir("single", family))
    assert len(ref) == STEPS, runs.why("single")
    got = losses(runs.run_dir(strategy, family))
    assert len(got) == STEPS, runs.why(strategy)
    diffs = {k: abs(got[k] - ref[k]) for k in ref}
    assert max(diffs.values()) <= TOL, f"{family}/{strategy}: {got} vs single {ref}"
    if strategy not in ("ddp", "deepspeed"):  # the model really was sharded (DeepSpeed: inside its engine)
        m = re.search(rf"sharded {family} \(tp (\d), fsdp (on|off)\): ([\d,]+) of ([\d,]+) parameter values", runs.logs[strategy])
        assert m, runs.why(strategy)
        local, total = (int(m.group(i).replace(",", "")) for i in (3, 4))
        assert local < total, m.group(0)


@pytest.mark.slow
@pytest.mark.parametrize("src,dst", RESUMES, ids=[f"{a}-to-{b}" for a, b in RESUMES])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_resharded_resume(runs, family, src, dst):
    ckpt = runs.run_dir(src, family) / "checkpoints" / "step-00000002.ckpt"
    assert ckpt.exists(), runs.why(src)
    if src in ("fsdp", "tp", "fsdp_tp"):
        assert ckpt.is_dir() and (ckpt / "meta.pt").is_file()  # sharded: torch.distributed.checkpoint directory
    d = runs.resume_dir(src, dst, family)
    got = losses(d)
    assert sorted(got) == [2, 3], runs.why(dst)
    assert "resuming from" in runs.logs[dst]
    ref = losses(runs.run_dir("single", family))
    for k in (2, 3):  # steps 3 and 4 (0-based 2, 3): weights, then optimizer state
        assert abs(got[k] - ref[k]) <= TOL, f"{family} {src}->{dst}: step {k + 1}: {got[k]} vs {ref[k]}"


@pytest.mark.slow
def test_sharded_checkpoint_metadata_and_weights(runs):
    """A sharded checkpoint directory passes the resume checks and converts to the plain layout."""
    import torch

    from glmtrain.checkpointing import read_meta
    from glmtrain.ckpt_formats import load_file, load_sharded_as_full

    d = runs.run_dir("tp", "hyena") / "checkpoints" / "step-00000002.ckpt"
    plain = runs.run_dir("ddp", "hyena") / "checkpoints" / "step-00000002.ckpt"
    assert d.is_dir(), runs.why("tp")
    meta = read_meta(d)
    assert meta["global_step"] == 2 and meta["consumed_samples"] == 8
    ref = load_file(plain)
    assert meta["shapes"] == {k: tuple(v.shape) for k, v in ref["state_dict"].items()}
    full = load_sharded_as_full(d)
    for k, v in ref["state_dict"].items():  # same weights as DDP's after 2 steps, in the same layout
        assert torch.allclose(full["state_dict"][k], v, atol=1e-5), k
