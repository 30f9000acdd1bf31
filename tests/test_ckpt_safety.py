"""Loading a checkpoint never executes code: every format is read with weights_only semantics.

Each case plants a pickle payload -- an object whose ``__reduce__`` would create a marker file when
unpickled -- in one part of a checkpoint (file, sharded meta.pt / DCP .metadata / DCP byte entry,
DeepSpeed model or optimizer file).  The loader must refuse it with one line naming the file, and the
marker must never appear.  A control shows that the same bytes DO run the payload under a plain
``torch.load(weights_only=False)``, so the tests would notice a loader that unpickled freely.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch

from glmtrain import ckpt_formats
from glmtrain.checkpointing import CheckpointError, UnsafeCheckpointError, find_resume_checkpoint, read_meta, step_path


class Payload:
    """Unpickling this calls open(marker, 'w'): the marker file proves the code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _ckpt(**extra) -> dict:
    """A minimal checkpoint that passes glmtrain's metadata checks."""
    return {"glmtrain": {"consumed_samples": 8, "stage": 0, "offset": 0,
                         "compat": {"model": {}, "objective": {}, "stages": [{}]},
                         "rng": {"torch": torch.get_rng_state(), "cuda": []}},
            "global_step": 2, "state_dict": {"w": torch.ones(2, 3)}, "loops": {},
            "optimizer_states": [{"state": {}, "param_groups": []}], **extra}


def _one_line_naming(err: BaseException, path: Path) -> str:
    msg = str(err)
    assert "\n" not in msg and str(path) in msg and "refused" in msg, msg
    return msg


def test_control_the_payload_runs_under_a_plain_unpickler(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.ckpt"
    torch.save(_ckpt(extra=Payload(marker)), f)
    torch.load(f, weights_only=False)  # what glmtrain used to do
    assert marker.exists()


def test_file_checkpoint_with_payload_is_refused_and_resume_does_not_fall_back(tmp_path):
    marker = tmp_path / "pwned"
    d = tmp_path / "run" / "checkpoints"
    d.mkdir(parents=True)
    good, evil = step_path(d, 2), step_path(d, 4)
    ckpt_formats.save_file(_ckpt(), good)
    ckpt_formats.save_file(_ckpt(extra=Payload(marker)), evil)  # valid weights AND a payload, the newest
    assert read_meta(good)["global_step"] == 2
    with pytest.raises(UnsafeCheckpointError) as e:
        read_meta(evil)
    assert "references io.open" in _one_line_naming(e.value, evil)  # the global it asked for
    with pytest.raises(UnsafeCheckpointError):  # a planted newest file stops the resume; no silent fallback
        find_resume_checkpoint(d, lambda meta: None)
    with pytest.raises(UnsafeCheckpointError):  # Lightning's own load path (trainer.fit ckpt_path=...)
        ckpt_formats.AtomicCheckpointIO().load_checkpoint(evil, weights_only=False)
    assert not marker.exists()


def test_init_from_a_run_dir_whose_newest_checkpoint_carries_a_payload(tmp_path, capsys):
    """Through the CLI's run function: exit status 2, one line naming the file, the payload never runs."""
    from glmtrain import cli
    from glmtrain.cluster import FLAG
    from tests._util import compose_cfg

    marker = tmp_path / "pwned"
    src = tmp_path / "other-run"
    ckpt_formats.save_file(_ckpt(), step_path(src / "checkpoints", 2))
    evil = step_path(src / "checkpoints", 4)
    ckpt_formats.save_file(_ckpt(extra=Payload(marker)), evil)
    try:
        with pytest.raises(SystemExit) as e:
            cli.run_config(compose_cfg(["experiment=smoke", "trainer.progress=none", f"trainer.init_from={src}",
                                        f"run_dir={tmp_path / 'new'}"]))
    finally:
        FLAG.uninstall()
    assert e.value.code == 2
    stderr = capsys.readouterr().err
    err = [ln for ln in stderr.splitlines() if ln.startswith("glmtrain: error")]
    assert len(err) == 1 and str(evil) in err[0] and "refused" in err[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not marker.exists()


def _sharded(tmp_path: Path, optimizer: dict | None = None) -> Path:
    import torch.distributed.checkpoint as dcp

    d = tmp_path / "sharded.ckpt"
    state = {"state_dict": {"w": torch.ones(2, 3)}, "optimizer_0": optimizer or {"param_groups": [{"lr": 0.1}]}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=d, no_dist=True)
    meta = _ckpt()
    meta.pop("state_dict"), meta.pop("optimizer_states")
    torch.save(meta, d / ckpt_formats.META)
    return d


def test_sharded_directory_meta_metadata_and_byte_entries_are_read_safely(tmp_path):
    marker = tmp_path / "pwned"
    good = _sharded(tmp_path / "good")
    meta = read_meta(good)
    assert meta["global_step"] == 2 and meta["shapes"] == {"w": (2, 3)}
    full = ckpt_formats.load_sharded_as_full(good)
    assert torch.equal(full["state_dict"]["w"], torch.ones(2, 3)) and full["optimizer_states"][0]["param_groups"][0]["lr"] == 0.1
    # meta.pt
    bad_meta = _sharded(tmp_path / "m")
    torch.save(dict(_ckpt(), extra=Payload(marker)), bad_meta / ckpt_formats.META)
    with pytest.raises(UnsafeCheckpointError) as e:
        read_meta(bad_meta)
    _one_line_naming(e.value, bad_meta / ckpt_formats.META)
    # DCP's .metadata (torch reads it with a plain pickle.load)
    bad_md = _sharded(tmp_path / "md")
    (bad_md / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    for load in (read_meta, ckpt_formats.load_sharded_as_full):
        with pytest.raises(UnsafeCheckpointError) as e:
            load(bad_md)
        _one_line_naming(e.value, bad_md / ".metadata")
    # a non-tensor entry (DCP stores it as torch.save bytes; torch's planner loads those with weights_only=False)
    bad_bytes = _sharded(tmp_path / "b", optimizer={"param_groups": [{"lr": Payload(marker)}]})
    with pytest.raises(UnsafeCheckpointError) as e:
        ckpt_formats.load_sharded_as_full(bad_bytes)
    _one_line_naming(e.value, bad_bytes)
    assert not marker.exists()


def test_deepspeed_directory_files_are_checked_before_deepspeed_reads_them(tmp_path):
    marker = tmp_path / "pwned"

    def ds_dir(name: str, model_extra=None, optim_extra=None) -> Path:
        d = tmp_path / name / "checkpoint"
        d.mkdir(parents=True)
        model = {"module": {"w": torch.ones(2, 3)}, "param_shapes": [{"w": torch.Size([2, 3])}], **_ckpt()}
        model.pop("state_dict")
        if model_extra is not None:
            model["client"] = model_extra
        torch.save(model, d / "mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": {"zero_stage": 2, "extra": optim_extra}}, d / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        return d.parent

    good = ds_dir("good")
    assert ckpt_formats.kind(good) == "deepspeed" and read_meta(good)["shapes"] == {"w": (2, 3)}
    ckpt_formats.check_deepspeed(good)
    bad_model = ds_dir("m", model_extra=Payload(marker))
    with pytest.raises(UnsafeCheckpointError) as e:
        read_meta(bad_model)
    _one_line_naming(e.value, bad_model / "checkpoint" / "mp_rank_00_model_states.pt")
    bad_optim = ds_dir("o", optim_extra=Payload(marker))
    with pytest.raises(UnsafeCheckpointError) as e:
        ckpt_formats.check_deepspeed(bad_optim)
    _one_line_naming(e.value, bad_optim / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match="DeepSpeed directory"):  # init_from / non-DeepSpeed loads refuse it
        ckpt_formats.load_full(good)
    assert not marker.exists()


def test_nothing_reads_a_checkpoint_with_pickles_full_power():
    """(Which module owns the formats, and who may import whom: tests/test_layering.py.)"""
    import re

    from tests._util import ROOT

    for path in (ROOT / "glmtrain").rglob("*.py"):
        assert not re.search(r"weights_only\s*=\s*False\s*[,)]|pickle\.loads?\(", path.read_text()), path
