"""Exact recovery: SIGKILL at a random step, rerun the same command, get the uninterrupted run bit for bit.

Also crash safety of the checkpoint files themselves (a failing save leaves the previous one intact),
validation on load, and retention (last K plus each stage's final checkpoint).
"""

from __future__ import annotations

import errno
import random

import pytest
import torch

from glmtrain.checkpointing import (
    AtomicCheckpointIO,
    CheckpointError,
    check_state_shapes,
    find_resume_checkpoint,
    keep_marker,
    list_checkpoints,
    prune,
    read_meta,
    remove_stale_temporaries,
    step_path,
)
from glmtrain.ckpt_formats import load_file
from tests.conftest import DDP, TINY, assert_same_training_state, final_checkpoint, kill_midway, losses, run_glmtrain

MAX_STEPS = 12


def _check_recovery(args, run_dir, reference, seed):
    rng = random.Random(seed)
    for attempt in range(3):  # a kill that lands after the run finished proves nothing: try an earlier point
        what = kill_midway(args, run_dir, rng, MAX_STEPS)
        if what["saved"] and what["saved"][-1] < MAX_STEPS:
            break
        import shutil

        shutil.rmtree(run_dir)
    else:
        pytest.fail(f"could not kill the run before it finished: {what}")
    assert what["rc"] == -9, what  # really SIGKILLed
    assert not (run_dir / "final.json").exists()
    resumed_from = what["saved"][-1]
    out = run_glmtrain(args)  # the same command again: resumes from the newest readable checkpoint
    assert f"resuming from {step_path(run_dir / 'checkpoints', resumed_from)}" in out.stdout + out.stderr
    a, b = final_checkpoint(reference), final_checkpoint(run_dir)
    assert b["global_step"] == MAX_STEPS
    assert_same_training_state(a, b)
    # the same sample stream: every logged per-step loss, before and after the kill, is identical (as text)
    la, lb = losses(reference), losses(run_dir)
    assert sorted(la) == list(range(MAX_STEPS)), sorted(la)
    assert all(lb[s] == la[s] for s in la if s in lb) and set(range(resumed_from, MAX_STEPS)) <= set(lb)
    print(f"[recovery] killed {what}; resumed from step {resumed_from}; final weights, optimizer state and "
          f"losses bit-identical to the uninterrupted run")


@pytest.mark.slow
def test_sigkill_at_random_step_single_process_is_bit_exact(tmp_path, reference_1p, recovery_seed):
    run_dir = tmp_path / "run"
    _check_recovery([*TINY, f"run_dir={run_dir}"], run_dir, reference_1p, recovery_seed)


@pytest.mark.slow
def test_sigkill_at_random_step_ddp_2proc_is_bit_exact(tmp_path, reference_ddp, recovery_seed):
    run_dir = tmp_path / "run"
    _check_recovery([*TINY, *DDP, f"run_dir={run_dir}"], run_dir, reference_ddp, recovery_seed + 1)
    assert final_checkpoint(run_dir)["glmtrain"]["world_size"] == 2


# ----------------------------------------------------------------------------- checkpoint files
@pytest.fixture(scope="module")
def one_checkpoint(reference_1p):
    return list_checkpoints(reference_1p / "checkpoints")[0][1]


def test_failing_save_leaves_previous_checkpoint_intact(tmp_path, one_checkpoint, monkeypatch):
    ckpt = load_file(one_checkpoint)
    io = AtomicCheckpointIO()
    good = tmp_path / "step-00000002.ckpt"
    io.save_checkpoint(ckpt, good)
    before = good.read_bytes()

    def disk_full(obj, f, *a, **k):
        f.write(b"\x00" * 4096)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint(ckpt, good)  # overwriting the same name
    with pytest.raises(OSError):
        io.save_checkpoint(ckpt, tmp_path / "step-00000004.ckpt")  # a newer one
    monkeypatch.undo()
    assert good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]  # no partial file, no tmp left
    assert read_meta(good)["global_step"] == ckpt["global_step"]


def test_crash_leftovers_are_ignored_and_cleaned(tmp_path, one_checkpoint):
    d = tmp_path / "checkpoints"
    d.mkdir()
    good = d / "step-00000002.ckpt"
    good.write_bytes(one_checkpoint.read_bytes())
    (d / ".step-00000004.ckpt.tmp-4242").write_bytes(b"partial")  # a save killed before its rename
    (d / "step-00000006.ckpt").write_bytes(b"\x80\x02garbage")  # damaged by hand / foreign
    found, meta = find_resume_checkpoint(d, lambda meta: None)  # every readable checkpoint is compatible here
    assert found == good  # the newest *readable* one, with its own metadata
    ref = read_meta(good)  # (the saved RNG state is a tensor: compared with torch.equal, not ==)
    assert torch.equal(meta.pop("rng")["torch"], ref.pop("rng")["torch"]) and meta == ref
    assert [p.name for p in remove_stale_temporaries(d)] == [".step-00000004.ckpt.tmp-4242"]
    assert (d / "step-00000006.ckpt").exists()  # damaged files are reported, never deleted


def test_metadata_and_shapes_are_validated_on_load(tmp_path, one_checkpoint):
    from tests._util import compose_run

    from glmtrain.module import GLMModule

    ckpt = load_file(one_checkpoint)
    bad = dict(ckpt, glmtrain=dict(ckpt["glmtrain"], consumed_samples=-4))
    torch.save(bad, tmp_path / "a.ckpt")
    with pytest.raises(CheckpointError, match=r"invalid metadata \(consumed_samples=-4"):
        read_meta(tmp_path / "a.ckpt")
    partial = {k: v for k, v in ckpt.items() if k != "optimizer_states"}
    torch.save(partial, tmp_path / "b.ckpt")
    with pytest.raises(CheckpointError, match="not a full training checkpoint"):
        read_meta(tmp_path / "b.ckpt")
    module = GLMModule(compose_run([*TINY, f"run_dir={tmp_path}"]))
    check_state_shapes(one_checkpoint, module)  # the same model: fine
    sd = dict(ckpt["state_dict"])
    key = next(k for k in sd if sd[k].ndim == 2)
    sd[key] = sd[key][:, :-1].clone()
    torch.save(dict(ckpt, state_dict=sd), tmp_path / "c.ckpt")
    with pytest.raises(CheckpointError, match=rf"tensor {key} has shape \[\d+, \d+\] in the checkpoint, \[\d+, \d+\] in the model"):
        check_state_shapes(tmp_path / "c.ckpt", module)


def test_retention_keeps_last_k_and_every_stage_final(tmp_path):
    d = tmp_path
    for s in (2, 4, 6, 8, 10, 12):
        step_path(d, s).write_bytes(b"x")
    keep_marker(step_path(d, 4)).touch()  # the final checkpoint of an earlier stage
    prune(d, 2)
    assert [s for s, _ in list_checkpoints(d)] == [4, 10, 12]


def test_checkpoint_names_parse_unquoted_and_old_names_are_still_read(tmp_path):
    """`step-N.ckpt` goes through Hydra's override parser unquoted (`step=N.ckpt` did not); run directories
    of earlier versions (`step=N.ckpt`, their `.keep` markers) are still listed, resumed, pruned and kept."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    new = step_path(tmp_path / "checkpoints", 12)
    (ov,) = OverridesParser.create().parse_overrides([f"trainer.init_from={new}"])
    assert ov.value() == str(new) and new.name == "step-00000012.ckpt"
    d = tmp_path / "old"
    d.mkdir()
    for s in (2, 4, 6):
        (d / f"step={s:08d}.ckpt").write_bytes(b"old")
    (d / "step=00000002.ckpt.keep").touch()  # an earlier stage's final checkpoint, old name
    step_path(d, 6).write_bytes(b"new")  # the same step saved again under the current name
    for s in (8, 10):
        step_path(d, s).write_bytes(b"new")
    assert list_checkpoints(d) == [(2, d / "step=00000002.ckpt"), (4, d / "step=00000004.ckpt"), (6, step_path(d, 6)),
                                   (8, step_path(d, 8)), (10, step_path(d, 10))]
    prune(d, 2)
    assert sorted(p.name for p in d.iterdir()) == ["step-00000008.ckpt", "step-00000010.ckpt", "step=00000002.ckpt",
                                                  "step=00000002.ckpt.keep"]


def test_completed_run_marks_its_final_checkpoint(reference_1p):
    assert keep_marker(step_path(reference_1p / "checkpoints", MAX_STEPS)).exists()
    assert not keep_marker(step_path(reference_1p / "checkpoints", MAX_STEPS - 2)).exists()


@pytest.mark.slow
def test_sigterm_to_one_ddp_rank_stops_all_ranks_at_one_step_then_resumes_exactly(tmp_path, reference_ddp):
    """The signal reaches rank 1 only: both ranks still agree on one step boundary, checkpoint it and exit
    75 (interrupted); rerunning the command finishes bit-identical to the uninterrupted DDP run."""
    import os
    import signal
    import subprocess
    import time

    from tests.conftest import ROOT, child_env, cli_cmd, steps_saved

    run_dir = tmp_path / "run"
    args = [*TINY, *DDP, f"run_dir={run_dir}"]
    p = subprocess.Popen(cli_cmd(args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=child_env(), start_new_session=True)
    try:
        t0 = time.time()
        while not (run_dir / "checkpoints" / "step-00000002.ckpt").exists():
            assert p.poll() is None and time.time() - t0 < 180, "DDP run ended or stalled before step 2"
            time.sleep(0.01)
        children = open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()
        rank1 = next(int(c) for c in children if b"LOCAL_RANK=1" in open(f"/proc/{c}/environ", "rb").read())
        os.kill(rank1, signal.SIGTERM)
        out, _ = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 75, out[-3000:]
    line = next(ln for ln in out.splitlines() if "saving a checkpoint at step" in ln)
    stopped_at = int(line.split("at step ")[1].split()[0])
    assert line.startswith("glmtrain: another rank received a signal: saving a checkpoint"), line  # rank 0 got none
    assert steps_saved(run_dir)[-1] == stopped_at < 12 and not (run_dir / "final.json").exists()
    run_glmtrain(args)
    assert_same_training_state(final_checkpoint(reference_ddp), final_checkpoint(run_dir))
    la, lb = losses(reference_ddp), losses(run_dir)
    assert all(lb[s] == la[s] for s in la if s in lb) and set(range(12)) <= set(lb)


def test_in_process_signal_stops_with_checkpoint_and_handlers_are_restored(tmp_path, monkeypatch):
    """SIGUSR1 in the middle of step 3 (outside SLURM: requeue = stop): checkpoint of that step, no final
    evaluation; the process's handlers are restored afterwards; calling train() again resumes and finishes."""
    import os
    import signal

    from glmtrain.module import GLMModule
    from glmtrain.train import train
    from tests._util import compose_run

    args = ["experiment=smoke", "model=transformer", "trainer.max_steps=6", "trainer.ckpt_every=100",
            "trainer.val_every=0", "trainer.progress=none", "logger=none", "trainer.threads=1", f"run_dir={tmp_path}"]
    orig = GLMModule.training_step

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == 2:  # during optimizer step 3
            os.kill(os.getpid(), signal.SIGUSR1)
        return orig(self, batch, batch_idx)

    monkeypatch.setattr(GLMModule, "training_step", training_step)
    before = signal.getsignal(signal.SIGUSR1)
    first = train(compose_run(args))
    assert first["interrupted"] == "SIGUSR1" and first["steps"] == 3 and first["requeued"] is False
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [3] and not (tmp_path / "final.json").exists()
    assert signal.getsignal(signal.SIGUSR1) == before
    monkeypatch.undo()
    second = train(compose_run(args))
    assert second["steps"] == 6 and "interrupted" not in second and (tmp_path / "final.json").exists()
