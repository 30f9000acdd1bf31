"""Shard build, manifest, memory/shard equivalence, bad input, and a property test of FASTA -> windows."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmtrain.config import ConfigError, validate_data
from glmtrain.data.fasta import DataInputError
from glmtrain.data.genome import MemoryStore, open_store
from glmtrain.data.plan import make_plan
from glmtrain.data.shards import ShardStore, build_shards, load_manifest
from glmtrain.data.stream import WindowEncoder
from glmtrain.tokenizers import CharTokenizer

REPO = Path(__file__).resolve().parents[1]
from tests._util import GENOMES  # noqa: E402 (shipped samples)


def data_cfg(tmp: Path, sources: list[dict], **kw):
    node = {"name": "t", "sources": sources, "cache_dir": str(tmp / "cache"), "window": 64, "shard_mb": 0.05,
            "split": {"kind": "fraction", "valid_fraction": 0.2}, "max_val_windows": 0, "num_workers": 0}
    for k, v in kw.items():
        node[k] = v
    return validate_data(node)


def write_fasta(path: Path, records: list[tuple[str, str]], width: int = 60, eol: str = "\n", gz: bool = False) -> Path:
    lines = []
    for name, seq in records:
        lines.append(f">{name}")
        lines += [seq[i : i + width] for i in range(0, len(seq), width)]
    text = (eol.join(lines) + eol).encode()
    if gz:
        path.write_bytes(gzip.compress(text))
    else:
        path.write_bytes(text)
    return path


def all_samples(store, split: str) -> list[tuple]:
    out = []
    for u, (_, _, n) in enumerate(store.units(split)):
        for i in range(n):
            raw, rec, s, e, strand = store.read(split, u, i)
            out.append((store.record(rec), s, e, strand, raw.tobytes()))
    return out


def rand_seq(rng, n, alphabet=b"ACGTACGTACGTacgtN"):
    return rng.choice(np.frombuffer(alphabet, dtype=np.uint8), size=n).tobytes().decode()


# ------------------------------------------------------------------ build
def test_build_manifest_webdataset_and_memory_equivalence(tmp_path):
    src = [{"path": str(GENOMES / "human_hg19_chr17_part_softmasked.fa.gz"), "species": "human"},
           {"path": str(GENOMES / "lambda_phage.fa.gz"), "species": "lambda", "weight": 0.5}]
    cfg = data_cfg(tmp_path, src, window=100, stride=50, min_length=60, rc_offline=True)
    plan = make_plan(cfg)
    out = tmp_path / "shards"
    m = build_shards(plan, out, workers=2, verbose=False)
    # manifest: per-shard counts and checksums, sources with size+sha256, policies, version
    assert m["glmtrain_version"] and m["policies"]["window"] == 100 and m["policies"]["rc_offline"] is True
    assert [s["species"] for s in m["sources"]] == ["human", "lambda"]
    assert all(len(s["sha256"]) == 64 and s["size"] > 0 for s in m["sources"])
    shards = m["shards"]["train"] + m["shards"]["valid"]
    assert len(m["shards"]["train"]) > 2 and all(len(s["sha256"]) == 64 for s in shards)
    assert m["totals"]["train"]["samples"] == sum(s["samples"] for s in m["shards"]["train"])
    # shards are plain webdataset tars: python's tarfile and webdataset read them; keys and provenance line up
    sh = m["shards"]["train"][0]
    with tarfile.open(out / sh["file"]) as tf:
        names = tf.getnames()
        assert len(names) == 2 * sh["samples"] and names[0].endswith(".dna") and names[1].endswith(".json")
        first = json.loads(tf.extractfile(names[1]).read())
    import webdataset as wds

    ds = wds.WebDataset(str(out / sh["file"]), shardshuffle=False)
    got = list(ds)
    assert len(got) == sh["samples"]
    assert json.loads(got[0]["json"]) == first and first["strand"] == "+" and first["split"] == "train"
    assert json.loads(got[1]["json"])["strand"] == "-"  # offline reverse complement stored beside each window
    # the shard store reads exactly what the in-memory store cuts, in the same units and order
    shard_store = ShardStore(out)
    mem = MemoryStore(plan)
    for split in ("train", "valid"):
        assert shard_store.units(split) == mem.units(split)
        a, b = all_samples(shard_store, split), all_samples(mem, split)
        assert a == b and len(a) > 0
    # window bases really are the genome (and offline '-' is its reverse complement)
    (sp, rec), s, e, strand, raw = all_samples(shard_store, "train")[0]
    fa = gzip.decompress((GENOMES / "human_hg19_chr17_part_softmasked.fa.gz").read_bytes()).decode()
    genome = "".join(fa.split("\n")[1:])
    assert raw.decode() == genome[s:e] and strand == "+"
    assert json.loads(got[0]["json"])["start"] == s
    # re-running skips finished shards; a deleted shard is rebuilt identically
    victim = m["shards"]["train"][1]
    (out / victim["file"]).unlink()
    m2 = build_shards(plan, out, workers=1, verbose=False)
    assert m2["build"] == {**m2["build"], "built": 1, "skipped": len(shards) - 1}
    assert m2["shards"] == m["shards"]
    # changed policies (or sources) are refused, never mixed
    cfg2 = data_cfg(tmp_path, src, window=128, stride=50, min_length=60, rc_offline=True)
    with pytest.raises(DataInputError, match="window was 100, is 128 now.*refusing to mix"):
        build_shards(make_plan(cfg2), out, verbose=False)


def test_build_cli_one_line_errors(tmp_path):
    env = {**os.environ, "GLMTRAIN_GENOMES": str(GENOMES)}
    base = [sys.executable, "-m", "glmtrain.data", "build", "data=multispecies_cgp", f"data.cache_dir={tmp_path / 'c'}"]
    ok = subprocess.run(base + [f"out={tmp_path / 'o'}"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["totals"]["train"]["samples"] > 1000 and report["built"] > 8
    assert load_manifest(tmp_path / "o")["policies"]["split"]["kind"] == "fraction"
    bad = subprocess.run(base + [f"out={tmp_path / 'o'}", "data.window=512"], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    assert bad.returncode == 2
    err = [line for line in bad.stderr.splitlines() if "error" in line]
    assert len(err) == 1 and "refusing to mix" in err[0] and "window was 1024, is 512" in err[0]


# -------------------------------------------------------------- bad input
def test_non_iupac_character_names_file_record_offset(tmp_path):
    rng = np.random.default_rng(0)
    seq = list(rand_seq(rng, 300))
    seq[137] = "X"
    f = write_fasta(tmp_path / "bad.fa", [("ok", rand_seq(rng, 200)), ("chrB", "".join(seq))], width=50)
    for fmt in ("memory", "shards"):
        cfg = data_cfg(tmp_path, [{"path": str(f)}], format=fmt, shards="")
        with pytest.raises(DataInputError) as e:
            open_store(cfg, verbose=False)
        msg = str(e.value)
        assert "\n" not in msg and str(f) in msg and "'chrB'" in msg and "offset 137" in msg and "'X'" in msg


def test_empty_and_duplicate_records_and_crlf(tmp_path):
    rng = np.random.default_rng(1)
    a, b = rand_seq(rng, 500), rand_seq(rng, 333)
    empty = tmp_path / "empty.fa"
    empty.write_text(f">a\n{a}\n>hollow\n>b\n{b}\n")
    with pytest.raises(DataInputError, match=r"record 'hollow' is empty"):
        make_plan(data_cfg(tmp_path, [{"path": str(empty)}]))
    make_plan(data_cfg(tmp_path, [{"path": str(empty), "records": ["a", "b"]}]))  # leaving it out is fine
    dup = write_fasta(tmp_path / "dup.fa", [("a", a), ("a", b)])
    with pytest.raises(DataInputError, match=r"duplicate record name 'a'") as e:
        make_plan(data_cfg(tmp_path, [{"path": str(dup)}]))
    assert "\n" not in str(e.value)
    # CRLF line endings are accepted and give exactly the windows of the LF file (gzip too)
    lf = write_fasta(tmp_path / "lf.fa", [("a", a), ("b", b)], width=61)
    crlf = write_fasta(tmp_path / "crlf.fa.gz", [("a", a), ("b", b)], width=61, eol="\r\n", gz=True)
    s1 = all_samples(MemoryStore(make_plan(data_cfg(tmp_path, [{"path": str(lf)}]))), "train")
    s2 = all_samples(MemoryStore(make_plan(data_cfg(tmp_path, [{"path": str(crlf)}]))), "train")
    assert s1 == s2 and len(s1) > 5 and b"\r" not in b"".join(x[4] for x in s2)


def test_truncated_corrupted_shards_and_manifest_checksum(tmp_path, capsys):
    rng = np.random.default_rng(2)
    f = write_fasta(tmp_path / "g.fa", [("r1", rand_seq(rng, 6000)), ("r2", rand_seq(rng, 4000))])
    cfg = data_cfg(tmp_path, [{"path": str(f)}])
    plan = make_plan(cfg)
    out = tmp_path / "s"
    m = build_shards(plan, out, verbose=False)
    names = [s["file"] for s in m["shards"]["train"]]
    assert len(names) >= 3
    # truncated shard: one line naming it; skip mode counts and logs it and streams the rest
    trunc = out / names[1]
    data = trunc.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataInputError) as e:
        ShardStore(out)
    assert str(trunc) in str(e.value) and "truncated" in str(e.value) and "\n" not in str(e.value)
    store = ShardStore(out, on_corrupt="skip")
    assert store.skipped == [m["shards"]["train"][1]["name"]]
    assert "skipped 1 corrupt shard(s)" in capsys.readouterr().err
    assert len(all_samples(store, "train")) == m["totals"]["train"]["samples"] - m["shards"]["train"][1]["samples"]
    # corrupted bytes (same size) inside a shard: the sample's crc32 names shard and sample
    bad = out / names[2]
    raw = bytearray(bad.read_bytes())
    raw[512 + 3] ^= 0x20  # first sample's bases
    bad.write_bytes(bytes(raw))
    store = ShardStore(out, on_corrupt="skip")
    u = [n for n, _, _ in store.units("train")].index(m["shards"]["train"][2]["name"])
    with pytest.raises(DataInputError, match=f"{names[2]}: sample 0 .* crc32"):
        _read_strict(out, names[2])
    assert store.read("train", u, 0) is None and store.skipped_samples == 1
    assert store.read("train", u, 1) is not None
    # verify=sha256 catches it at open; the build re-run rebuilds both damaged shards, keeping the rest
    problems = ShardStore(out, on_corrupt="skip").verify_all()
    assert len(problems) == 2 and any(names[2] in p and "sha256" in p for p in problems)
    m2 = build_shards(plan, out, verbose=False)
    assert m2["build"]["built"] == 2 and m2["shards"] == m["shards"]
    assert ShardStore(out, verify="sha256").verify_all() == []
    # a hand-edited manifest fails its own checksum
    man = json.loads((out / "manifest.json").read_text())
    man["totals"]["train"]["samples"] += 1
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataInputError, match="manifest checksum mismatch"):
        ShardStore(out)


def _read_strict(out: Path, fname: str):
    store = ShardStore(out, on_corrupt="skip")  # (another shard is truncated) ...
    store.on_corrupt = "error"  # ... but reads of this one must fail loudly
    u = [n for n, _, _ in store.units("train")].index(fname[: -len(".tar")])
    return store.read("train", u, 0)


def test_failed_build_keeps_finished_shards(tmp_path):
    rng = np.random.default_rng(3)
    good = write_fasta(tmp_path / "good.fa", [("g", rand_seq(rng, 5000))])
    seq = list(rand_seq(rng, 3000))
    seq[2500] = "*"
    badf = write_fasta(tmp_path / "bad.fa", [("b", "".join(seq))])
    cfg = data_cfg(tmp_path, [{"path": str(good)}, {"path": str(badf)}])
    out = tmp_path / "s"
    with pytest.raises(DataInputError, match="offset 2500"):
        build_shards(make_plan(cfg), out, workers=1, verbose=False)
    files = sorted(p.name for p in out.iterdir())
    assert not [n for n in files if ".tmp" in n] and "manifest.json" not in files
    finished = [n for n in files if n.endswith(".done.json")]
    assert any(n.startswith("train-000-") for n in finished)
    for n in finished:  # every finished shard is complete and matches its record
        rec = json.loads((out / n).read_text())
        assert (out / rec["file"]).stat().st_size == rec["bytes"]


def test_config_checks_are_one_line():
    for node, pat in (
        ({"sources": []}, "data.sources: empty"),
        ({"sources": [{"path": "x", "weight": -1}]}, "weight=-1"),
        ({"sources": [{"path": "x"}], "split": {"kind": "bed"}}, "data.split.bed"),
        ({"sources": [{"path": "x"}], "format": "zarr"}, "data.format"),
        ({"sources": [{"path": "x"}], "on_corrupt": "ignore"}, "data.on_corrupt"),
    ):
        with pytest.raises(ConfigError, match=pat) as e:
            validate_data(node)
        assert "\n" not in str(e.value)


# ------------------------------------------------------ property-based test
_ALPHABET = "ACGTacgtNNRYn"


@st.composite
def fasta_case(draw):
    n_rec = draw(st.integers(2, 3))
    recs = [(f"r{i}", draw(st.text(_ALPHABET, min_size=1, max_size=260))) for i in range(n_rec)]
    window = draw(st.integers(4, 40))
    return {
        "records": recs,
        "width": draw(st.integers(1, 70)),
        "eol": draw(st.sampled_from(["\n", "\r\n"])),
        "window": window,
        "stride": draw(st.integers(0, 50)),
        "min_length": draw(st.integers(0, window)),
        "max_n": draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        "rc_offline": draw(st.booleans()),
    }


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=fasta_case())
def test_property_fasta_to_windows(case):
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        f = write_fasta(tmp / "p.fa", case["records"], width=case["width"], eol=case["eol"])
        held = case["records"][-1][0]
        cfg = data_cfg(tmp, [{"path": str(f), "species": "sp"}], window=case["window"], stride=case["stride"],
                       min_length=case["min_length"], max_n_fraction=case["max_n"], rc_offline=case["rc_offline"],
                       split={"kind": "records", "valid_records": [held]}, shard_mb=0.004)
        plan = make_plan(cfg)
        mem = MemoryStore(plan)
        seqs = dict(case["records"])
        w = case["window"]
        min_len = case["min_length"] or w
        enc = WindowEncoder(cfg, CharTokenizer())
        for split in ("train", "valid"):
            stride = (case["stride"] or w) if split == "train" else w
            got = all_samples(mem, split)
            expect = []
            for name, seq in case["records"]:
                if (name == held) != (split == "valid"):
                    continue
                for s in range(0, len(seq) - min_len + 1, stride):
                    e = min(s + w, len(seq))
                    n_bad = sum(c not in "ACGTacgt" for c in seq[s:e])
                    if n_bad <= case["max_n"] * (e - s):
                        expect.append((name, s, e))
            strands = 2 if (case["rc_offline"] and split == "train") else 1
            assert [(r[0][1], r[1], r[2]) for r in got] == [x for x in expect for _ in range(strands)]
            comp = str.maketrans("ACGTNRYacgtnry", "TGCANYRtgcanyr")
            for (sp, name), s, e, strand, raw in got:
                window = seqs[name][s:e]
                assert raw.decode() == (window if strand == "+" else window.translate(comp)[::-1])
                ids, wt = enc(np.frombuffer(raw, dtype=np.uint8))
                assert len(ids) == w and (wt[e - s :] == 0).all()
                text = raw.decode().upper()
                assert CharTokenizer().decode(ids[: e - s]) == "".join(c if c in "ACGT" else "N" for c in text)
                assert wt[: e - s].tolist() == [1.0 if c in "ACGT" else 0.0 for c in text]
        out = tmp / "s"
        build_shards(plan, out, workers=1, verbose=False)
        sh = ShardStore(out)
        for split in ("train", "valid"):
            assert all_samples(sh, split) == all_samples(mem, split)


def test_train_from_a_built_directory_without_the_fasta(tmp_path):
    from glmtrain.data.genome import GenomeDataModule

    rng = np.random.default_rng(4)
    f = write_fasta(tmp_path / "g.fa", [("r1", rand_seq(rng, 5000)), ("r2", rand_seq(rng, 3000))])
    cfg = data_cfg(tmp_path, [{"path": str(f), "species": "sp"}])
    out = tmp_path / "built"
    build_shards(make_plan(cfg), out, verbose=False)
    expect = GenomeDataModule(cfg, CharTokenizer(), 4, 1)  # auto-built from the FASTA
    expect.setup()
    f.unlink()  # compute nodes may only have the shards
    for p in (tmp_path / "cache").glob("g.*"):
        p.unlink()
    dm = GenomeDataModule(data_cfg(tmp_path, [{"path": str(f), "species": "sp"}], shards=str(out)), CharTokenizer(), 4, 1)
    dm.setup()
    assert [dm.train_set[g]["key"] for g in range(40)] == [expect.train_set[g]["key"] for g in range(40)]
    assert dm.order.fingerprint() == expect.order.fingerprint()
    other = data_cfg(tmp_path, [{"path": str(f), "species": "sp"}], shards=str(out), window=32)
    with pytest.raises(DataInputError, match=r"built with other settings \(data.window was 64, is 32 now\)"):
        open_store(other, verbose=False)


# ------------------------------------------------------ no silent wrong data, no hangs
def test_fasta_replaced_under_an_older_index_is_reindexed_not_misread(tmp_path, capsys):
    """A FASTA rewritten at the same path while its .fai stays: the old record offsets and lengths must not
    be used -- also when the new file looks older than the index (copied with its mtime, cp -p / rsync -t)."""
    rng = np.random.default_rng(5)
    f = write_fasta(tmp_path / "g.fa", [("r1", rand_seq(rng, 3000)), ("r2", rand_seq(rng, 2000))])
    first = make_plan(data_cfg(tmp_path, [{"path": str(f)}]))
    assert [(r.name, r.length) for r in first.records] == [("r1", 3000), ("r2", 2000)]
    fai = Path(str(f) + ".fai")
    old = fai.stat().st_mtime_ns
    new = [("chrA", rand_seq(rng, 1000)), ("r1", rand_seq(rng, 4500))]
    write_fasta(f, new, width=70)
    os.utime(f, ns=(old - 10**9, old - 10**9))  # the FASTA now looks older than its stale index
    plan = make_plan(data_cfg(tmp_path, [{"path": str(f)}]))
    assert "does not fit" in capsys.readouterr().err
    assert [(r.name, r.length) for r in plan.records] == [("chrA", 1000), ("r1", 4500)]
    got = {(s[0][1], s[1], s[2]): s[4].decode() for s in all_samples(MemoryStore(plan), "train")}
    seqs = dict(new)
    assert got and all(seqs[name][a:b] == raw for (name, a, b), raw in got.items())


def test_classic_mac_line_endings_are_named(tmp_path):
    for gz in (False, True):
        f = write_fasta(tmp_path / f"mac{int(gz)}.fa{'.gz' if gz else ''}", [("a", "ACGT" * 40)], eol="\r", gz=gz)
        with pytest.raises(DataInputError, match=r"classic-Mac line endings \(CR only") as e:
            make_plan(data_cfg(tmp_path, [{"path": str(f)}]))
        assert "\n" not in str(e.value) and str(f) in str(e.value)


def test_shards_built_from_other_sources_are_refused(tmp_path):
    rng = np.random.default_rng(6)
    a = write_fasta(tmp_path / "a.fa", [("r1", rand_seq(rng, 4000))])
    b = write_fasta(tmp_path / "b.fa", [("r1", rand_seq(rng, 4000))])  # same names, lengths and species
    out = tmp_path / "shards"
    build_shards(make_plan(data_cfg(tmp_path, [{"path": str(a), "species": "x"}])), out, verbose=False)
    open_store(data_cfg(tmp_path, [{"path": str(a), "species": "x"}], shards=str(out)), verbose=False)  # its own: fine
    for src, says in (({"path": str(b), "species": "x"}, "is not the file the shards were built from"),
                      ({"path": str(a), "species": "x", "records": ["r1"]}, "records were all"),
                      ({"path": str(tmp_path / "gone.fa"), "species": "x"}, "not on this machine")):
        with pytest.raises(DataInputError, match=says) as e:
            open_store(data_cfg(tmp_path, [src], shards=str(out)), verbose=False)
        assert "\n" not in str(e.value) and str(out) in str(e.value)


_SLOW_BUILD = """
import json, sys, time
from glmtrain.config import validate_data
from glmtrain.data import shards
from glmtrain.data.plan import make_plan
write = shards.write_unit
def slow(plan, unit, out, fetch):  # the first shard is written, every other one hangs: killed mid-way
    if not unit.name.endswith("-000000"):
        time.sleep(120)
    return write(plan, unit, out, fetch)
shards.write_unit = slow
shards.build_shards(make_plan(validate_data(json.loads(sys.argv[1]))), sys.argv[2], workers=2)
"""


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_build_leaves_no_workers_holding_the_lock_and_rerun_resumes(tmp_path, sig):
    import signal
    import time

    from glmtrain.locks import FileLock

    rng = np.random.default_rng(7)
    f = write_fasta(tmp_path / "g.fa", [("r1", rand_seq(rng, 6000)), ("r2", rand_seq(rng, 4000))])
    node = {"name": "t", "sources": [{"path": str(f)}], "cache_dir": str(tmp_path / "cache"), "window": 64,
            "shard_mb": 0.05, "split": {"kind": "fraction", "valid_fraction": 0.2}, "max_val_windows": 0}
    out = tmp_path / "s"
    p = subprocess.Popen([sys.executable, "-c", _SLOW_BUILD, json.dumps(node), str(out)], cwd=REPO,
                         stderr=subprocess.DEVNULL)
    t0 = time.time()
    workers: list[str] = []
    while not ((out / "train-000-000000.done.json").exists() and len(workers) == 2):
        assert p.poll() is None and time.time() - t0 < 60, "the build never got going"
        workers = open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()
        time.sleep(0.05)
    p.send_signal(getattr(signal, sig))
    p.wait(30)
    t0 = time.time()
    while any(Path(f"/proc/{w}").exists() and "Z" not in open(f"/proc/{w}/stat").read().split()[2] for w in workers):
        assert time.time() - t0 < 10, f"build workers {workers} outlived their parent"
        time.sleep(0.05)
    lock = FileLock(out.with_name(out.name + ".lock"))
    assert lock.try_acquire(), "the build lock is still held"
    lock.release()
    m = build_shards(make_plan(data_cfg(tmp_path, [{"path": str(f)}])), out, workers=1, verbose=False)
    assert m["build"]["skipped"] >= 1 and m["build"]["built"] >= 1  # resumed: the finished shard was kept


def test_real_n_run_is_filtered_and_never_carries_loss(tmp_path):
    """hg19 chr22 with a real 100 kb run of N (shipped sample): windows over it are dropped by max_n_fraction,
    windows at its edges keep their bases and give the N positions weight 0."""
    src = [{"path": str(GENOMES / "human_hg19_chr22_nrun_140kb.fa.gz"), "species": "human"}]
    cfg = data_cfg(tmp_path, src, window=1000, stride=500, max_n_fraction=0.5,
                   split={"kind": "fraction", "valid_fraction": 0.1})
    mem = MemoryStore(make_plan(cfg))
    samples = all_samples(mem, "train")
    starts = [s for _, s, _, _, _ in samples]
    assert 19_500 in starts and 119_500 in starts  # half N: kept at max_n_fraction=0.5
    assert all(s <= 19_500 or s >= 119_500 for s in starts)  # nothing from inside the N run
    edge = next(raw for _, s, _, _, raw in samples if s == 19_000)  # 1000 real bases just before it
    assert b"N" not in edge
    enc = WindowEncoder(cfg, CharTokenizer())
    mixed = next(raw for _, s, _, _, raw in samples if s == 119_500)  # 500 N then 500 bases
    ids, w = enc(np.frombuffer(mixed, dtype=np.uint8))
    assert mixed[:500] == b"N" * 500 and (w[:500] == 0).all() and (w[500:] == 1).all()
