"""Staged context extension end to end on CPU with ``context=tiny_64_to_1k`` (64 -> 128 -> 256 -> 512 -> 1,024).

* the staged run completes from one command; every stage keeps its own final checkpoint (marked to
  survive retention); stage k+1 starts from exactly stage k's final weights (checksum of the file,
  computed here, against the checksum of the weights the run started the stage with);
* tokens per optimizer step stay as configured (1,024) in every stage, and every stage re-windows the
  same stored windows (one shard build for the whole schedule);
* a run killed with SIGKILL in the middle of stage 3 resumes in stage 3 at the right step and finishes
  bit-identical (weights, optimizer state, schedule, data position, every logged loss) to the
  uninterrupted schedule;
* compatibility: a restart with a speed-only knob changed resumes; a math knob of a finished or the
  current stage is refused with one line; stages after the checkpoint's may change.
"""

from __future__ import annotations

import hashlib
import math
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from glmtrain.checkpointing import CheckpointError, list_checkpoints, step_path
from glmtrain.locks import LOCK_NAME
from glmtrain.train import train
from tests._util import compose_run
from tests.conftest import ROOT, assert_same_training_state, child_env, cli_cmd, losses

pytestmark = pytest.mark.usefixtures("one_thread")

# a tiny HyenaDNA (d 32) and one thread: every stage is a fraction of a second on a CPU
TINY = ["context=tiny_64_to_1k", "model=hyena", "model.d_model=32", "model.filter_order=16", "trainer.threads=1",
        "trainer.deterministic=true", "trainer.accelerator=cpu", "trainer.progress=none", "trainer.val_every=0",
        "trainer.keep_last=0", "trainer.log_every=1", "data.max_val_windows=4", "data.num_workers=0",
        "eval.baselines=[]"]
ENDS = [4, 8, 16, 20, 24]  # last global step of each stage
WINDOWS = [64, 128, 256, 512, 1024]


def _sha(state_dict: dict) -> str:
    """Checksum of weights, computed independently of glmtrain: name, dtype, shape, bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _ckpt(run_dir: Path, step: int) -> dict:
    return torch.load(step_path(run_dir / "checkpoints", step), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> Path:
    """The uninterrupted schedule, in-process."""
    run_dir = tmp_path_factory.mktemp("ctxref") / "run"
    result = train(compose_run([*TINY, f"run_dir={run_dir}", f"data.cache_dir={cache}"]))
    assert result["steps"] == 24
    return run_dir


def test_staged_run_completes_with_checksummed_carry_over_and_constant_tokens_per_step(reference, cache):
    manifest = json.loads((reference / "run.json").read_text())
    assert manifest["schedule"] == "tiny_64_to_1k" and [s["status"] for s in manifest["stages"]] == ["complete"] * 5
    for k, (end, window) in enumerate(zip(ENDS, WINDOWS)):
        path = step_path(reference / "checkpoints", end)
        assert path.exists() and Path(f"{path}.keep").exists(), f"stage {k + 1} lost its final checkpoint"
        ck = _ckpt(reference, end)
        meta = ck["glmtrain"]
        assert (meta["stage"], meta["offset"] + ck["global_step"]) == (k, end)
        assert ck["hyper_parameters"]["config"]["data"]["window"] == window
        steps = end - (ENDS[k - 1] if k else 0)
        assert meta["consumed_samples"] * window == steps * 1024  # 1,024 tokens in every optimizer step
        row = manifest["stages"][k]
        assert row["tokens_per_step"] == 1024 and row["window"] == window
        assert row["final_sha256"] == _sha(ck["state_dict"])
        if k:  # stage k+1 started from exactly stage k's final weights
            prev = _ckpt(reference, ENDS[k - 1])
            assert row["init_from"] == str(step_path(reference / "checkpoints", ENDS[k - 1]))
            assert row["init_sha256"] == _sha(prev["state_dict"]) == manifest["stages"][k - 1]["final_sha256"]
            assert row["init_sha256"] != row["final_sha256"]  # and then trained
        assert row["val_bits_per_base"] > 0
    assert sorted(losses(reference)) == list(range(24))  # one loss per global step, across all stages
    built = [p for p in (cache / "shards").iterdir() if p.is_dir()]
    assert len(built) == 1, f"one shard build for all stages, found {built}"
    assert json.loads((built[0] / "manifest.json").read_text())["policies"]["window"] == 1024


def _kill_in_stage3(args: list[str], run_dir: Path, rng: random.Random) -> list[int]:
    """Run in its own process group; once stage 3 wrote its first checkpoint (step 10), SIGKILL it."""
    p = subprocess.Popen(cli_cmd(args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=child_env(), start_new_session=True)
    target = step_path(run_dir / "checkpoints", 10)
    t0 = time.time()
    try:
        while not target.exists():
            if p.poll() is not None:
                raise AssertionError(f"run ended before step 10: rc={p.returncode}\n{p.stdout.read()[-3000:]}")
            assert time.time() - t0 < 180, "no checkpoint of step 10 after 180 s"
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.005))  # stage 3 is 8 short steps: kill within it (retried if not)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(30)
    assert p.returncode == -9, p.returncode
    return [s for s, _ in list_checkpoints(run_dir / "checkpoints")]


def test_sigkill_in_stage3_resumes_in_stage3_and_ends_bit_identical(tmp_path, reference, cache, recovery_seed, capsys):
    rng = random.Random(recovery_seed)
    run_dir = tmp_path / "run"
    args = [*TINY, f"run_dir={run_dir}", f"data.cache_dir={cache}"]
    for attempt in range(3):  # a kill that lands after stage 3 proves nothing: try again
        saved = _kill_in_stage3(args, run_dir, rng)
        if 8 < saved[-1] < 16:
            break
        shutil.rmtree(run_dir)
    else:
        pytest.fail(f"could not kill the run inside stage 3: checkpoints {saved}")
    assert not (run_dir / "final.json").exists()
    capsys.readouterr()
    train(compose_run(args))  # the same command again
    out = capsys.readouterr()
    log = out.out + out.err
    assert "resuming in stage 3 (3-256)" in log
    assert f"resuming from {step_path(run_dir / 'checkpoints', saved[-1])}" in log
    assert "stage 1 (1-64): window" not in log and "stage 2 (2-128): window" not in log  # finished stages: not re-run
    for end in ENDS[2:]:  # every later stage's final state, and the end of the schedule, bit for bit
        assert_same_training_state(_ckpt(reference, end), _ckpt(run_dir, end))
    la, lb = losses(reference), losses(run_dir)
    # (rows the killed process had not flushed are gone; every loss that was logged is identical)
    assert all(lb[s] == la[s] for s in la if s in lb) and set(range(saved[-1], 24)) <= set(lb)
    print(f"[context] killed in stage 3 with checkpoints {saved}; resumed in stage 3 from step {saved[-1]}; "
          "stages 3-5 bit-identical to the uninterrupted schedule")


def _partial(reference: Path, tmp_path: Path, last: int) -> Path:
    """A copy of the reference run directory as it stood after global step ``last``."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for step, path in list_checkpoints(run_dir / "checkpoints"):
        if step > last:
            path.unlink()
    (run_dir / "final.json").unlink()
    return run_dir


def test_speed_only_knobs_may_change_math_knobs_are_refused(tmp_path, reference, cache):
    run_dir = _partial(reference, tmp_path, 12)  # inside stage 3
    base = [*TINY, f"run_dir={run_dir}", f"data.cache_dir={cache}"]
    def files():  # all but the run-dir lock, which records its latest holder (glmtrain.locks)
        return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != LOCK_NAME}

    before = files()
    for change, expect in (
        (["model.d_model=48"], r"model\.d_model was 32 in the checkpoint, is 48 now"),
        (["+context.stages.1.lr=0.001"], r"context\.stages\[1\]\.lr was 0\.002 in the checkpoint, is 0\.001 now"),
        (["context.stages.2.window=128"], r"context\.stages\[2\]\.window was 256 in the checkpoint, is 128 now"),
        (["context.stages.2.steps=3"], r"past the end of stage 3"),
    ):
        with pytest.raises(CheckpointError, match=expect) as e:
            train(compose_run([*base, *change]))
        assert "\n" not in str(e.value)
    assert before == files()  # nothing touched
    # speed-only knobs (fused kernel, filter chunking, activation checkpointing) and a later stage's definition
    result = train(compose_run([*base, "model.fused_hyena=false", "model.filter_chunk=100",
                                "+context.stages.3.activation_checkpointing=true", "context.stages.4.steps=5"]))
    assert result["steps"] == 25
    ref, got = _ckpt(reference, 16), _ckpt(run_dir, 16)  # stage 3 finished from the same checkpoint: same maths
    for k, v in ref["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][k], v, rtol=1e-4, atol=1e-5)


def test_time_cap_and_run_dir_lock_span_the_stages(tmp_path, reference, cache, monkeypatch, capsys):
    """trainer.max_time_s is one budget per invocation across its stages: spent inside a stage it stops there
    (NOT FINISHED, the step of the whole schedule); spent at a stage's last step it lets that stage complete
    and stops before the next.  The run directory's lock is held through every stage of an invocation."""
    import sys

    import glmtrain.train as tr

    run_dir = _partial(reference, tmp_path, 2)  # inside stage 1 (steps 1-4)
    args = [*TINY, f"run_dir={run_dir}", f"data.cache_dir={cache}", "eval.final=false"]
    capped = [*args, "trainer.max_time_s=1e-6"]
    r = train(compose_run(capped))
    assert (r["stopped"], r["steps"], r["max_steps"]) == ("max_time_s", 3, 24)
    assert "NOT FINISHED: stopped by trainer.max_time_s=1e-06 at step 3 of 24" in capsys.readouterr().out
    r = train(compose_run(capped))  # a fresh budget: step 4 ends stage 1, which completes; stage 2 does not start
    assert (r["stopped"], r["steps"]) == ("max_time_s", 4)
    assert json.loads((run_dir / "final.json").read_text())["stopped"] == "max_time_s"
    rows = json.loads((run_dir / "run.json").read_text())["stages"]
    assert [s["status"] for s in rows[:2]] == ["complete", "pending"] and Path(f"{step_path(run_dir / 'checkpoints', 4)}.keep").exists()

    held, inner = [], tr._train_stage

    def probe(run, schedule, stage, *a, **kw):  # another process tries the lock as each stage starts
        code = "import sys; from glmtrain.locks import FileLock; sys.exit(0 if FileLock(sys.argv[1]).try_acquire() else 3)"
        held.append(subprocess.run([sys.executable, "-c", code, str(run_dir / LOCK_NAME)], cwd=ROOT).returncode == 3)
        return inner(run, schedule, stage, *a, **kw)

    monkeypatch.setattr(tr, "_train_stage", probe)
    r = train(compose_run(args))
    assert r["steps"] == 24 and "stopped" not in r and held == [True] * 4
    assert_same_training_state(_ckpt(reference, 24), _ckpt(run_dir, 24))  # the stops changed nothing


def test_evaluation_by_context_scores_the_same_bases_for_every_context(reference):
    from glmtrain.evaluate import evaluate, format_table, held_out, load_run
    from glmtrain.models import build_model

    res = evaluate(reference, contexts=[64, 256, 1024], windows=4, say=lambda m: None)
    assert [r["stage"] for r in res["stages"]] == ["1-64", "2-128", "3-256", "4-512", "5-1024"]
    assert res["target"] == 32 and (reference / "context_eval.json").exists()
    for row in res["stages"]:
        assert all(0 < v < 4 for v in row["bits_per_base"].values())
    assert "gain" in format_table(res)
    # one cell recomputed by hand: the last stage's model on the whole 1,024-base windows
    run, schedule = load_run(reference)
    ids, w = held_out(run, 1024, "valid", 4)
    model = build_model(schedule.stages[-1].run.model, 16).eval()
    sd = _ckpt(reference, 24)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in sd.items()})
    with torch.no_grad():
        logits = model(ids)[:, -33:-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 16).double(), ids[:, -32:].reshape(-1), reduction="none")
    mask = (w[:, -32:] > 0).reshape(-1).double()
    bits = float((ce * mask).sum() / mask.sum()) / math.log(2)
    assert abs(bits - res["stages"][-1]["bits_per_base"]["1024"]) < 1e-6


def test_carry_weights_and_optimizer_continues_adam(tmp_path, cache):
    """carry=weights+optimizer (HyenaDNA's warm-up): stage 2 continues stage 1's AdamW moments and step count,
    with its own learning rate; carry=weights starts them afresh."""
    steps = {}
    for carry in ("weights", "weights+optimizer"):
        run_dir = tmp_path / carry
        train(compose_run([*TINY, f"run_dir={run_dir}", f"data.cache_dir={cache}", "eval.final=false",
                           f"context.stages=[{{window:64,steps:2}},{{window:128,steps:2,carry:'{carry}',lr:0.001}}]"]))
        ck = _ckpt(run_dir, 4)
        state = ck["optimizer_states"][0]
        steps[carry] = {int(v["step"]) for v in state["state"].values()}
        assert all(abs(g["lr"] - 0.001 * g.get("lr_scale", 1.0) * ck["lr_schedulers"][0]["_last_lr"][0] / 0.001
                       / g.get("lr_scale", 1.0)) < 1e-12 for g in state["param_groups"])
    assert steps == {"weights": {2}, "weights+optimizer": {4}}


def test_init_from_starts_the_first_stage_from_another_runs_weights(tmp_path, reference, cache):
    """trainer.init_from (weights only) is where the first stage starts: e.g. released 8k weights for the Evo 2 ladder."""
    run_dir = tmp_path / "run"
    train(compose_run([*TINY, f"run_dir={run_dir}", f"data.cache_dir={cache}", f"trainer.init_from={reference}",
                       "eval.final=false", "context.stages=[{window:256,steps:2}]"]))
    row = json.loads((run_dir / "run.json").read_text())["stages"][0]
    assert row["init_from"] == str(step_path(reference / "checkpoints", 24))  # the newest checkpoint of that run
    assert row["init_sha256"] == _sha(_ckpt(reference, 24)["state_dict"])
    ck = _ckpt(run_dir, 2)
    assert ck["global_step"] == 2 and ck["glmtrain"]["consumed_samples"] == 2 * 4  # fresh schedule and data position
