"""FASTA access through pyfaidx, with the user-facing checks.

* ``pkg://`` paths point into the installed package (the bundled sample).
* Plain-gzip FASTA cannot be indexed by pyfaidx: it is decompressed once into a
  cache directory (atomically, with a message) and read from there.
* A FASTA in a read-only directory gets its ``.fai`` in the cache directory.
* Missing, unreadable, empty or malformed files raise :class:`DataInputError`
  with one line naming the file and what to do; so do duplicate record names
  and (:func:`check_iupac`) characters that are not IUPAC nucleotide codes.
  CRLF line endings are accepted (pyfaidx strips the carriage returns); classic-Mac CR-only files
  are refused with a line that says so.
* An existing ``.fai`` is checked against the FASTA (:func:`fai_problem`: newer than the FASTA,
  every record between its own header and the next): a FASTA replaced at the same path is
  re-indexed, never cut at another file's record lengths.
* bgzip files are decompressed like plain gzip (pyfaidx would need Biopython
  for BGZF random access, which glmtrain does not depend on).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import sys
from importlib import resources
from pathlib import Path

import json
import time

import numpy as np
import pyfaidx

from glmtrain.atomic import atomic_write


class DataInputError(ValueError):
    """Bad input data, phrased as one line naming the culprit and the remedy."""


def resolve_path(path: str) -> Path:
    if path.startswith("pkg://"):
        rel = path[len("pkg://") :]
        pkg, _, sub = rel.partition("/")
        return Path(str(resources.files(pkg))) / sub
    return Path(os.path.expanduser(path))


def default_cache_dir(cache_dir: str = "") -> Path:
    if cache_dir:
        return Path(os.path.expanduser(cache_dir))
    base = os.environ.get("GLMTRAIN_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "glmtrain")
    return Path(os.path.expanduser(base))


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _is_bgzip(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(18)
    # gzip with FEXTRA and the 'BC' subfield (SAM/BAM spec, BGZF)
    return len(head) == 18 and head[:2] == b"\x1f\x8b" and head[3] & 4 and head[12:14] == b"BC"


# IUPAC nucleotide codes, either case: everything else in a sequence line is an input error
IUPAC_OK = np.zeros(256, dtype=bool)
IUPAC_OK[list(b"ACGTNRYKMSWBDHVacgtnrykmswbdhv")] = True


def check_iupac(seq: np.ndarray, path: str, record: str, offset: int, what: str = "data.sources") -> None:
    """Raise one line naming file, record and 0-based offset of the first non-IUPAC character."""
    bad = ~IUPAC_OK[seq]
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        ch = chr(int(seq[pos]))
        raise DataInputError(
            f"{path}: record {record!r}, offset {offset + pos}: character {ch!r} is not a IUPAC nucleotide code "
            f"(allowed: ACGTN RYKMSWBDHV, either case); fix the FASTA or leave the record out via {what}.records"
        )


def fetch_bytes(fa: pyfaidx.Fasta, name: str, start: int, end: int) -> np.ndarray:
    """Bases ``[start, end)`` of a record as uint8, read with the ``.fai`` offsets (no str round trip)."""
    rec = fa.faidx.index[name]
    lenc, lenb = rec.lenc, rec.lenb
    end = min(end, rec.rlen)
    if end <= start:
        return np.zeros(0, dtype=np.uint8)
    if lenc > 0:
        b0 = rec.offset + (start // lenc) * lenb + start % lenc
        b1 = rec.offset + (end // lenc) * lenb + end % lenc
        raw = os.pread(fa.faidx.file.fileno(), b1 - b0, b0).translate(None, b"\r\n")
        if len(raw) == end - start:
            return np.frombuffer(raw, dtype=np.uint8)
    return np.frombuffer(fa[name][start:end].encode("latin-1"), dtype=np.uint8)  # pyfaidx's own path


def file_sha256(path: Path, cache_dir: str = "") -> str:
    """sha256 of a file, remembered in the cache by (path, size, mtime) so big genomes are hashed once."""
    path = Path(path)
    st = path.stat()
    memo = default_cache_dir(cache_dir) / "sha256" / f"{_cache_key(path)}.json"
    try:
        rec = json.loads(memo.read_text())
        if rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
            return rec["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                   "sha256": digest, "at": time.time()}))
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return digest


def _cache_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _decompress_once(path: Path, cache: Path) -> Path:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    out = cache / f"{Path(name).stem}.{_cache_key(path)}.fa"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    kind = "bgzip" if _is_bgzip(path) else "gzip"
    print(f"glmtrain: {path} is {kind}-compressed (pyfaidx needs random access); decompressing it once into {out}",
          file=sys.stderr, flush=True)
    try:
        with gzip.open(path, "rb") as src, atomic_write(out) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataInputError(f"{path}: cannot decompress ({e}); the file is truncated or not gzip - re-download it") from None
    return out


def fai_problem(fasta: Path, fai: Path) -> str | None:
    """Why ``fai`` does not index ``fasta`` as it is now, or None.  pyfaidx trusts an existing index, so a
    FASTA replaced at the same path would be cut at the old record lengths and offsets: the index must be
    newer than the FASTA, and every record must start right after its own header line and end where the
    next header (or the file) begins."""
    try:
        if fai.stat().st_mtime_ns < fasta.stat().st_mtime_ns:
            return "the FASTA was modified after the index was written"
        rows = [ln.split("\t") for ln in fai.read_text().splitlines() if ln.strip()]
        size = fasta.stat().st_size
        with open(fasta, "rb") as f:
            fd = f.fileno()
            for i, row in enumerate(rows):
                name, length, offset, lenc, lenb = row[0], int(row[1]), int(row[2]), int(row[3]), int(row[4])
                back = min(offset, 1 << 16)
                before = os.pread(fd, back, offset - back)
                header = before[:-1].rsplit(b"\n", 1)[-1].rstrip(b"\r") if before.endswith(b"\n") else b""
                if not (header[:1] == b">" and header[1:].split()[:1] == [name.encode()]):
                    return f"record {name!r} does not start at byte {offset} (no '>{name}' header line before it)"
                end = offset + ((length // lenc) * lenb + length % lenc if lenc else 0)
                after = os.pread(fd, 16, end)
                nxt = after.lstrip(b"\r\n")
                if end > size or (nxt and nxt[:1] != b">") or (not nxt and i + 1 < len(rows)):
                    return f"record {name!r} does not end at byte {end} (length {length} in the index)"
    except (OSError, ValueError, IndexError) as e:
        return f"the index is unreadable ({e})"
    return None


def _usable_index(p: Path, cache: Path) -> str | None:
    """The index pyfaidx should use for ``p`` (None: ``<p>.fai``, built by pyfaidx if missing).  A stale
    index beside the FASTA is rebuilt (atomically) where the directory is writable, else one is built in the
    cache directory; either way the reason is reported."""
    side = Path(str(p) + ".fai")
    cached = cache / f"{p.name}.{_cache_key(p)}.fai"
    writable = os.access(p.parent, os.W_OK) and (not side.exists() or os.access(side, os.W_OK))
    if side.exists():
        problem = fai_problem(p, side)
        if problem is None:
            return None
        target = side if writable else cached
        print(f"glmtrain: warning: {side} does not fit {p} ({problem}); re-indexing into {target}",
              file=sys.stderr, flush=True)
        _build_index(p, target)
        return None if writable else str(target)
    if writable:
        return None
    if cached.exists() and fai_problem(p, cached) is None:
        return str(cached)
    _build_index(p, cached)
    return str(cached)


def _build_index(p: Path, target: Path) -> None:
    """Build a fresh ``.fai`` for ``p`` under a temporary name and rename it onto ``target`` (a FASTA
    pyfaidx cannot index: the stale index is removed and :func:`open_fasta` reports the problem)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        pyfaidx.Faidx(str(p), indexname=str(tmp), rebuild=True).close()
        os.replace(tmp, target)
    except (pyfaidx.FastaIndexingError, ValueError):
        target.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)


def open_fasta(path: str, cache_dir: str = "", what: str = "data.sources") -> pyfaidx.Fasta:
    """Open a FASTA (plain, gzip or bgzip) for random access; ``what`` names the config key in errors."""
    p = resolve_path(path)
    if not p.exists():
        raise DataInputError(f"{what}: FASTA file {p} does not exist; fix the path or download it (see README, 'Data')")
    if p.is_dir():
        raise DataInputError(f"{what}: {p} is a directory, not a FASTA file")
    if not os.access(p, os.R_OK):
        raise DataInputError(f"{what}: FASTA file {p} is not readable (permissions); fix them with chmod or copy the file")
    if p.stat().st_size == 0:
        raise DataInputError(f"{what}: FASTA file {p} is empty; point to a FASTA with at least one sequence record")
    cache = default_cache_dir(cache_dir)
    if _is_gzip(p):
        p = _decompress_once(p, cache)
    with open(p, "rb") as f:
        head = f.read(1 << 16).lstrip()
    if not head.startswith(b">"):
        raise DataInputError(f"{what}: {path} does not look like FASTA (no '>' header at the start); check the file")
    if b"\r" in head and b"\n" not in head:
        raise DataInputError(f"{what}: {path} has classic-Mac line endings (CR only, no LF); convert them, e.g. "
                             f"tr '\\r' '\\n' < {path} > fixed.fa (CRLF and LF are fine)")
    indexname = _usable_index(p, cache)
    try:
        fa = pyfaidx.Fasta(str(p), indexname=indexname, as_raw=True, sequence_always_upper=False, rebuild=False)
    except pyfaidx.FastaIndexingError as e:
        raise DataInputError(f"{what}: cannot index {path}: {str(e).splitlines()[0]}; fix the FASTA (uneven line lengths?)") from None
    except ValueError as e:  # duplicate record names, among others
        msg = str(e).splitlines()[0]
        if msg.startswith("Duplicate key"):
            name = msg.split('"')[1] if '"' in msg else msg
            raise DataInputError(f"{what}: {path}: duplicate record name {name!r}; record names (the header's first "
                                 "word) must be unique - rename or remove one") from None
        raise DataInputError(f"{what}: {path}: {msg}") from None
    if len(fa.keys()) == 0 or all(len(fa[k]) == 0 for k in fa.keys()):
        raise DataInputError(f"{what}: FASTA file {path} contains no sequence; point to a FASTA with at least one non-empty record")
    return fa
