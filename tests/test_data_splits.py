"""No base position of validation/test ever appears in a training window (records, fraction and bed splits)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from glmtrain.config import validate_data
from glmtrain.data.genome import MemoryStore
from glmtrain.data.plan import make_plan, merge_intervals, subtract_intervals
from glmtrain.data.shards import ShardStore, build_shards

REPO = Path(__file__).resolve().parents[1]
from tests._util import GENOMES  # noqa: E402 (shipped samples)


def coverage(store, plan) -> dict[str, dict[tuple[str, str], np.ndarray]]:
    lengths = {(r.species, r.name): r.length for r in plan.records}
    cov = {s: {k: np.zeros(n, dtype=bool) for k, n in lengths.items()} for s in ("train", "valid", "test")}
    for split in cov:
        for u, (_, _, n) in enumerate(store.units(split)):
            for i in range(n):
                _, rec, s, e, _ = store.read(split, u, i)
                cov[split][store.record(rec)][s:e] = True
    return cov


def assert_no_leak(cov, need_test: bool) -> None:
    held_bases = 0
    for key, train in cov["train"].items():
        held = cov["valid"][key] | cov["test"][key]
        assert not (train & held).any(), f"{key}: held-out bases inside training windows"
        assert not (cov["valid"][key] & cov["test"][key]).any()
        held_bases += held.sum()
    assert sum(t.sum() for t in cov["train"].values()) > 0 and held_bases > 0
    assert sum(t.sum() for t in cov["valid"].values()) > 0
    if need_test:
        assert sum(t.sum() for t in cov["test"].values()) > 0


def cfg(tmp: Path, sources, split, **kw):
    node = {"name": "s", "sources": sources, "split": split, "cache_dir": str(tmp / "cache"), "window": 256,
            "stride": 100, "shard_mb": 0.2, "max_val_windows": 0}
    node.update(kw)
    return validate_data(node)


def test_record_holdout_per_species(tmp_path):
    c = cfg(tmp_path, [{"path": str(GENOMES / "worm_ce_7records.fa.gz"), "species": "worm"},
                       {"path": str(GENOMES / "lambda_phage.fa.gz"), "species": "phage"}],
            {"kind": "records", "valid_records": ["worm:CHROMOSOME_V"], "test_records": ["CHROMOSOME_X"]},
            window=2048, stride=1024)
    plan = make_plan(c)
    store = MemoryStore(plan)
    cov = coverage(store, plan)
    assert_no_leak(cov, need_test=True)
    assert cov["valid"][("worm", "CHROMOSOME_V")].any() and not cov["train"][("worm", "CHROMOSOME_V")].any()
    assert cov["test"][("worm", "CHROMOSOME_X")].any() and cov["train"][("phage", plan.records[-1].name)].any()


def test_fraction_split_with_overlapping_windows_multispecies(tmp_path):
    srcs = [{"path": str(p), "species": p.name.split(".")[0]} for p in sorted((GENOMES / "multispecies_cgp").glob("*.fa.gz"))]
    assert len(srcs) == 8
    c = cfg(tmp_path, srcs, {"kind": "fraction", "valid_fraction": 0.1, "test_fraction": 0.05}, rc_offline=True)
    plan = make_plan(c)
    out = tmp_path / "shards"
    build_shards(plan, out, workers=2, verbose=False)
    cov = coverage(ShardStore(out), plan)
    assert_no_leak(cov, need_test=True)
    for key, train in cov["train"].items():  # each record: train at the front, held-out tail
        assert train.any() and cov["valid"][key].any()


def test_bed_intervals_overlapping_across_splits(tmp_path):
    src = [{"path": str(GENOMES / "human_hg19_chr17_part_softmasked.fa.gz"), "species": "human"}]
    # overlapping train/valid/test intervals, an unknown chromosome, a header and a 'validation' label
    bed = "\n".join([
        "track name=test", "chr17\t0\t15000\ttrain", "chr17\t9000\t14000\tvalidation", "chr17\t12000\t20000\ttest",
        "chr17\t19000\t40000\ttrain", "chr17\t30000\t33000\tvalid", "chr17\t31000\t31500\ttrain", "chrUn\t0\t100\ttrain",
    ]) + "\n"
    bedf = tmp_path / "seq.bed.gz"
    bedf.write_bytes(gzip.compress(bed.encode()))
    c = cfg(tmp_path, src, {"kind": "bed", "bed": str(bedf)}, window=500, stride=150)
    plan = make_plan(c)
    cov = coverage(MemoryStore(plan), plan)
    assert_no_leak(cov, need_test=True)
    key = ("human", "chr17")
    # every window lies inside its split's bed intervals (test wins over valid wins over train)
    test_iv = [(12000, 20000)]
    valid_iv = subtract_intervals(merge_intervals([(9000, 14000), (30000, 33000)]), test_iv)
    for split, iv in (("test", test_iv), ("valid", valid_iv)):
        allowed = np.zeros(len(cov["train"][key]), dtype=bool)
        for s, e in iv:
            allowed[s:e] = True
        assert not (cov[split][key] & ~allowed).any()
    assert not cov["train"][key][9000:20000].any() and not cov["train"][key][30000:33000].any()
    assert cov["train"][key][:9000].any() and cov["train"][key][20000:30000].any()


def test_interval_arithmetic():
    assert merge_intervals([(5, 10), (0, 3), (3, 4), (9, 12), (20, 20)]) == [(0, 4), (5, 12)]
    assert subtract_intervals([(0, 10), (20, 30)], [(2, 3), (8, 22), (29, 40)]) == [(0, 2), (3, 8), (22, 29)]
