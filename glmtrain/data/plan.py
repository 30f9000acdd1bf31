"""From a ``data`` config to a build plan: records, split regions, windows, shards.

Everything here is a pure function of the config and the FASTA files (their
record names and lengths), so the in-memory path and the shard build cut
*identical* windows into *identical* units (one unit = one shard):

* **Regions.**  Each split (train / valid / test) is a set of disjoint
  ``[start, end)`` regions of records:

  - ``records``: whole records held out by name (``chr4`` or ``human:chr4``);
  - ``fraction``: the tail of every record (``valid_fraction``, ``test_fraction``);
  - ``bed``: intervals of a ``chrom start end split`` file.  Intervals of one
    split are merged; test is removed from valid, and valid and test are removed
    from train, so no held-out base can ever sit in a training window.

* **Windows.**  Window ``k`` of a region starts at ``region.start + k*stride``
  and ends at ``min(start + window, region.end)``; candidates need at least
  ``min_length`` bases.  Held-out splits use ``stride = window``.  Windows never
  cross a region boundary.  The N filter (``max_n_fraction``) runs when the
  bases are read (:func:`unit_windows`).

* **Units.**  The candidate windows of each (split, source) are cut in order
  into runs of about ``shard_mb`` of shard bytes; a unit lists
  ``(region, k0, k1)`` segments.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np

from glmtrain.config import DataConfig
from glmtrain.data.fasta import DataInputError, check_iupac, file_sha256, open_fasta, resolve_path

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")

_ACGT = np.zeros(256, dtype=bool)
_ACGT[list(b"ACGTacgt")] = True


@dataclass(frozen=True)
class Record:
    source: int
    species: str
    name: str
    length: int


@dataclass(frozen=True)
class Region:
    record: int  # index into Plan.records
    start: int
    end: int
    split: str


@dataclass
class Unit:
    name: str  # also the shard's file stem
    split: str
    source: int
    segments: list[tuple[int, int, int]]  # (region index, first window k, one past the last k)
    candidates: int  # windows before the N filter


@dataclass
class SourceInfo:
    path: str  # as configured
    species: str
    weight: float
    fasta: str  # local, uncompressed FASTA pyfaidx reads (may be a cache copy)
    fai: str  # its index
    size: int
    sha256: str
    records: list[str] = field(default_factory=list)


def species_of(cfg: DataConfig, i: int) -> str:
    return cfg.sources[i].species or f"source{i}"


def effective_stride(cfg: DataConfig, split: str) -> int:
    return (cfg.stride or cfg.window) if split == "train" else cfg.window


def effective_min_length(cfg: DataConfig) -> int:
    return cfg.min_length or cfg.window


def n_candidates(length: int, stride: int, min_len: int) -> int:
    return 0 if length < min_len else (length - min_len) // stride + 1


def _sample_bytes_estimate(cfg: DataConfig) -> int:
    """Tar bytes of one sample: header + padded bases, header + padded provenance json."""
    return 512 + -(-cfg.window // 512) * 512 + 1024


def policy(cfg: DataConfig) -> dict:
    """Build-time policies: what shard contents depend on besides the source files."""
    sp = cfg.split
    split: dict = {"kind": sp.kind}
    if sp.kind == "records":
        split.update(valid_records=sorted(sp.valid_records), test_records=sorted(sp.test_records))
    elif sp.kind == "fraction":
        split.update(valid_fraction=sp.valid_fraction, test_fraction=sp.test_fraction)
    else:
        split.update(bed_species=sp.bed_species)
    return {
        "window": cfg.window,
        "stride": effective_stride(cfg, "train"),
        "min_length": effective_min_length(cfg),
        "max_n_fraction": cfg.max_n_fraction,
        "rc_offline": cfg.rc_offline,
        "shard_mb": cfg.shard_mb,
        "case": "preserved (soft-mask policy applied at stream time)",
        "split": split,
    }


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ------------------------------------------------------------------ intervals
def merge_intervals(iv: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, e in sorted(iv):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def subtract_intervals(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """a minus b; both merged and sorted."""
    out = []
    j = 0
    for s, e in a:
        cur = s
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


_SPLIT_NAMES = {"train": "train", "training": "train", "valid": "valid", "val": "valid", "validation": "valid",
                "test": "test", "testing": "test"}


def read_bed(path: str) -> dict[str, dict[str, list[tuple[int, int]]]]:
    """``chrom start end split`` (0-based, half-open) -> {chrom: {split: [(start, end)]}}."""
    p = resolve_path(path)
    if not p.is_file():
        raise DataInputError(f"data.split.bed: {p} does not exist; fix the path (or download it: scripts/download_hg38.sh)")
    opener = gzip.open if p.read_bytes()[:2] == b"\x1f\x8b" else open
    out: dict[str, dict[str, list[tuple[int, int]]]] = {}
    try:
        with opener(p, "rt") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line.strip() or line.startswith(("#", "track", "browser")):
                    continue
                cols = line.split("\t") if "\t" in line else line.split()
                if len(cols) < 4:
                    raise DataInputError(f"{p}:{n}: expected 'chrom start end split', found {len(cols)} column(s)")
                try:
                    s, e = int(cols[1]), int(cols[2])
                except ValueError:
                    raise DataInputError(f"{p}:{n}: start/end {cols[1]!r} {cols[2]!r} are not integers") from None
                if s < 0 or e < s:
                    raise DataInputError(f"{p}:{n}: bad interval {s}-{e} (need 0 <= start <= end)")
                split = _SPLIT_NAMES.get(cols[3].strip().lower())
                if split is None:
                    raise DataInputError(f"{p}:{n}: split {cols[3]!r} is not one of train, valid, test")
                out.setdefault(cols[0], {}).setdefault(split, []).append((s, e))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataInputError(f"{p}: cannot read the bed file ({e}); re-download it") from None
    if not out:
        raise DataInputError(f"{p}: no intervals; expected lines 'chrom start end split'")
    return out


# ----------------------------------------------------------------------- plan
@dataclass
class Plan:
    cfg: DataConfig
    sources: list[SourceInfo]
    records: list[Record]
    regions: list[Region]
    units: dict[str, list[Unit]]
    fingerprint: dict
    digest: str

    def window_bounds(self, region: Region, k0: int, k1: int) -> tuple[np.ndarray, np.ndarray]:
        stride = effective_stride(self.cfg, region.split)
        starts = region.start + np.arange(k0, k1, dtype=np.int64) * stride
        ends = np.minimum(starts + self.cfg.window, region.end)
        return starts, ends

    def strands(self, split: str) -> tuple[str, ...]:
        return ("+", "-") if (self.cfg.rc_offline and split == "train") else ("+",)

    def record_table(self) -> list[list]:
        return [[r.species, r.name, r.length] for r in self.records]


def make_plan(cfg: DataConfig) -> Plan:
    sources: list[SourceInfo] = []
    records: list[Record] = []
    for i, src in enumerate(cfg.sources):
        what = f"data.sources[{i}]"
        fa = open_fasta(src.path, cfg.cache_dir, what=f"{what}.path")
        try:
            names = list(fa.keys())
            chosen = list(src.records) or names
            for name in chosen:
                if name not in fa:
                    raise DataInputError(f"{what}.records: record {name!r} is not in {src.path} "
                                         f"(it has: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''})")
            species = species_of(cfg, i)
            for name in chosen:
                n = len(fa[name])
                if n == 0:
                    raise DataInputError(f"{src.path}: record {name!r} is empty; remove it from the FASTA "
                                         f"or list only non-empty records in {what}.records")
                records.append(Record(i, species, name, n))
            local, fai = fa.filename, fa.faidx.indexname
        finally:
            fa.close()
        p = resolve_path(src.path)
        sources.append(SourceInfo(src.path, species_of(cfg, i), src.weight, str(local), str(fai),
                                  p.stat().st_size, file_sha256(p, cfg.cache_dir), list(src.records)))
    regions = _regions(cfg, records)
    for tag in ("train", "valid"):
        if not any(r.split == tag for r in regions):
            raise DataInputError(f"data.split: no {tag} region; check data.split ({cfg.split.kind}) "
                                 "against the records in data.sources")
    units = _units(cfg, records, regions)
    pol = policy(cfg)
    if cfg.split.kind == "bed":
        pol["split"]["bed_sha256"] = file_sha256(resolve_path(cfg.split.bed), cfg.cache_dir)
    fp = {
        "format_version": FORMAT_VERSION,
        "sources": [{"species": s.species, "sha256": s.sha256, "size": s.size, "records": s.records or "all"}
                    for s in sources],
        "policy": pol,
    }
    return Plan(cfg, sources, records, regions, units, fp, _digest(fp))


def _regions(cfg: DataConfig, records: list[Record]) -> list[Region]:
    sp = cfg.split
    regions: list[Region] = []
    if sp.kind == "records":
        valid, test = set(sp.valid_records), set(sp.test_records)
        known = {r.name for r in records} | {f"{r.species}:{r.name}" for r in records}
        for name in sorted((valid | test) - known):
            print(f"glmtrain: warning: data.split: held-out record {name!r} is in no source", file=sys.stderr)
        for ri, r in enumerate(records):
            tags = {r.name, f"{r.species}:{r.name}"}
            split = "test" if tags & test else ("valid" if tags & valid else "train")
            regions.append(Region(ri, 0, r.length, split))
    elif sp.kind == "fraction":
        for ri, r in enumerate(records):
            n_test, n_valid = int(r.length * sp.test_fraction), int(r.length * sp.valid_fraction)
            cut_v, cut_t = r.length - n_valid - n_test, r.length - n_test
            for s, e, tag in ((0, cut_v, "train"), (cut_v, cut_t, "valid"), (cut_t, r.length, "test")):
                if e > s:
                    regions.append(Region(ri, s, e, tag))
    else:
        bed = read_bed(sp.bed)
        used = set()
        for ri, r in enumerate(records):
            if sp.bed_species and r.species != sp.bed_species:
                continue
            per = bed.get(r.name)
            if not per:
                continue
            used.add(r.name)
            clip = lambda iv: [(max(0, s), min(r.length, e)) for s, e in iv]  # noqa: E731
            test = merge_intervals(clip(per.get("test", [])))
            valid = subtract_intervals(merge_intervals(clip(per.get("valid", []))), test)
            held = merge_intervals(test + valid)
            train = subtract_intervals(merge_intervals(clip(per.get("train", []))), held)
            for tag, iv in (("train", train), ("valid", valid), ("test", test)):
                regions.extend(Region(ri, s, e, tag) for s, e in iv)
        if not used:
            raise DataInputError(f"data.split.bed: none of the bed's chromosomes ({', '.join(list(bed)[:5])} ...) "
                                 "is a record of data.sources; check the record names (e.g. chr1 vs 1)")
        missing = sorted(set(bed) - used)
        if missing:
            print(f"glmtrain: warning: data.split.bed: {len(missing)} chromosome(s) of the bed are in no source "
                  f"(e.g. {missing[0]}); their intervals are unused", file=sys.stderr)
    regions.sort(key=lambda g: (g.record, g.start))
    return regions


def _units(cfg: DataConfig, records: list[Record], regions: list[Region]) -> dict[str, list[Unit]]:
    per_sample = _sample_bytes_estimate(cfg)
    min_len = effective_min_length(cfg)
    units: dict[str, list[Unit]] = {s: [] for s in SPLITS}
    for split in SPLITS:
        stride = effective_stride(cfg, split)
        copies = 2 if (cfg.rc_offline and split == "train") else 1
        target = max(1, int(cfg.shard_mb * 1e6) // (per_sample * copies))
        for src in range(len(cfg.sources)):
            j = 0
            cur: list[tuple[int, int, int]] = []
            filled = 0
            for gi, g in enumerate(regions):
                if g.split != split or records[g.record].source != src:
                    continue
                n = n_candidates(g.end - g.start, stride, min_len)
                k = 0
                while k < n:
                    take = min(n - k, target - filled)
                    cur.append((gi, k, k + take))
                    filled += take
                    k += take
                    if filled == target:
                        units[split].append(Unit(f"{split}-{src:03d}-{j:06d}", split, src, cur, filled))
                        j, cur, filled = j + 1, [], 0
            if cur:
                units[split].append(Unit(f"{split}-{src:03d}-{j:06d}", split, src, cur, filled))
    return units


# -------------------------------------------------------------------- windows
Fetch = Callable[[int, int, int], np.ndarray]  # (record index, start, end) -> uint8 bases


def unit_windows(plan: Plan, unit: Unit, fetch: Fetch) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, int]]:
    """Per segment: (record, starts, ends, bases of the segment, segment offset) of windows passing the N filter.

    Every fetched base is checked for IUPAC codes (one-line error naming file, record, offset).
    """
    cfg = plan.cfg
    for gi, k0, k1 in unit.segments:
        region = plan.regions[gi]
        rec = plan.records[region.record]
        starts, ends = plan.window_bounds(region, k0, k1)
        a, b = int(starts[0]), int(ends[-1])
        seq = fetch(region.record, a, b)
        if len(seq) != b - a:
            raise DataInputError(f"{plan.sources[rec.source].path}: record {rec.name!r}: read {len(seq)} bases at "
                                 f"offset {a}, expected {b - a}; the FASTA or its index is damaged (delete the .fai)")
        check_iupac(seq, plan.sources[rec.source].path, rec.name, a, what=f"data.sources[{rec.source}]")
        is_n = ~_ACGT[seq]
        ctype = np.int32 if len(seq) < 2**31 else np.int64  # half the memory of int64 on a shard's worth
        csum = np.zeros(len(seq) + 1, dtype=ctype)
        np.cumsum(is_n.view(np.uint8), dtype=ctype, out=csum[1:])
        n_bad = csum[ends - a] - csum[starts - a]
        keep = n_bad <= cfg.max_n_fraction * (ends - starts)
        if keep.any():
            yield region.record, starts[keep], ends[keep], seq, a


def plan_summary(plan: Plan) -> dict:
    return {s: {"units": len(u), "candidates": sum(x.candidates for x in u)} for s, u in plan.units.items()}


def plan_state(plan: Plan) -> dict:
    """A picklable description (for build worker processes)."""
    return {
        "cfg": plan.cfg, "sources": [asdict(s) for s in plan.sources], "records": plan.records,
        "regions": plan.regions, "units": plan.units, "fingerprint": plan.fingerprint, "digest": plan.digest,
    }


def plan_from_state(state: dict) -> Plan:
    return Plan(state["cfg"], [SourceInfo(**s) for s in state["sources"]], state["records"], state["regions"],
                state["units"], state["fingerprint"], state["digest"])

