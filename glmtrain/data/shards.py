"""Windowed webdataset tar shards: build (parallel, resumable, atomic) and random-access reading.

Layout of a shard directory::

    build.json                      fingerprint of the sources + policies (written first)
    train-000-000000.tar            webdataset tar: <key>.dna (window bases, case kept) + <key>.json (provenance)
    train-000-000000.idx.npy        per sample: data offset, length, crc32, record, start, end, strand
    train-000-000000.done.json      completion record of that shard (sizes, sha256) - written last
    ...
    manifest.json                   all of it together, with its own checksum (written when every shard is done)

Any webdataset reader can stream the tars (``webdataset.WebDataset(urls)``).
The training stream reads them through the ``.idx.npy`` side files instead:
a global sample index maps to (shard, sample), read with one ``pread`` and
checked against its crc32, which is what makes resuming exact by index cheap.

Every file is written to a temporary name and renamed into place, so an
interrupted or failed build leaves finished shards intact and re-running the
command skips them (after re-checking their sha256).  A directory built from
other sources or policies is refused, never mixed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import multiprocessing as mp
import os
import sys
import threading
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from glmtrain import __version__
from glmtrain.atomic import atomic_write
from glmtrain.config import first_difference
from glmtrain.data.fasta import DataInputError, fetch_bytes
from glmtrain.data.plan import FORMAT_VERSION, SPLITS, Plan, Unit, plan_from_state, plan_state, unit_windows
from glmtrain.locks import FileLock

IDX_DTYPE = np.dtype([("off", "<i8"), ("len", "<i4"), ("crc", "<u4"), ("rec", "<i4"),
                      ("start", "<i8"), ("end", "<i8"), ("strand", "i1")])

COMP = np.arange(256, dtype=np.uint8)
for _a, _b in zip(b"ACGTNRYKMSWBDHVacgtnrykmswbdhv", b"TGCANYRMKSWVHDBtgcanyrmkswvhdb"):
    COMP[_a] = _b

# ---------------------------------------------------------------- tar writing
_HDR_MID = b"0000644\x00" + b"0000000\x00" + b"0000000\x00"  # mode, uid, gid
_HDR_MTIME = b"00000000000\x00"  # mtime 0: shards are byte-for-byte reproducible
_HDR_TAIL = b"0" + b"\x00" * 100 + b"ustar\x0000" + b"\x00" * 247  # typeflag, linkname, magic+version, rest
_HDR_SUM = sum(_HDR_MID) + sum(_HDR_MTIME) + sum(_HDR_TAIL) + 8 * 32  # checksum field counts as spaces
_ZEROS = bytes(512)


def tar_header(name: bytes, size: int, name_sum: int | None = None) -> bytes:
    """A ustar header for a regular file (name < 100 bytes); ``name_sum`` = sum(name) if known."""
    sz = _size_field(size)
    chk = _HDR_SUM + (sum(name) if name_sum is None else name_sum) + _SIZE_SUMS[size]
    return b"".join((name, _ZEROS[: 100 - len(name)], _HDR_MID, sz, _HDR_MTIME, b"%06o\x00 " % chk, _HDR_TAIL))


class _SizeSums(dict):
    def __missing__(self, size: int) -> int:
        v = self[size] = sum(_size_field(size))
        return v


def _size_field(size: int) -> bytes:
    return b"%011o\x00" % size


_SIZE_SUMS = _SizeSums()
_DIGIT_SUMS = [sum(b"%04d" % i) for i in range(10000)]  # digit sums of 0000..9999 for key checksums


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_unit(plan: Plan, unit: Unit, out: Path, fetch) -> dict:
    """Write one shard (tar, index, done record), each atomically; return the done record."""
    name, split = unit.name, unit.split
    strands = plan.strands(split)
    tar_path, idx_path = out / f"{name}.tar", out / f"{name}.idx.npy"
    sha = hashlib.sha256()
    rows: list[tuple] = []
    pos = bases = j = 0
    tail = f',"split":"{split}"}}'
    prefix = name.encode() + b"_"
    sum_dna, sum_json = sum(prefix) + sum(b".dna"), sum(prefix) + sum(b".json")
    with atomic_write(tar_path) as f:
        buf: list[bytes] = []
        buflen = 0
        for rec, starts, ends, seq, a in unit_windows(plan, unit, fetch):
            r = plan.records[rec]
            head = '{"species":' + json.dumps(r.species) + ',"record":' + json.dumps(r.name) + ',"start":'
            for s, e in zip(starts.tolist(), ends.tolist()):
                fwd = seq[s - a : e - a]
                for strand in strands:
                    data = fwd.tobytes() if strand == "+" else COMP[fwd[::-1]].tobytes()
                    n = len(data)
                    key = prefix + b"%07d" % j
                    ksum = _DIGIT_SUMS[j // 10000 % 1000] - 48 + _DIGIT_SUMS[j % 10000] if j < 10**7 else None
                    meta = f'{head}{s},"end":{e},"strand":"{strand}"{tail}'.encode()
                    m = len(meta)
                    buf += (tar_header(key + b".dna", n, None if ksum is None else sum_dna + ksum), data,
                            _ZEROS[: -n % 512],
                            tar_header(key + b".json", m, None if ksum is None else sum_json + ksum), meta,
                            _ZEROS[: -m % 512])
                    rows.append((pos + 512, n, zlib.crc32(data), rec, s, e, strand == "-"))
                    step = 1024 + n + (-n % 512) + m + (-m % 512)
                    pos += step
                    buflen += step
                    bases += n
                    j += 1
                if buflen > (8 << 20):
                    chunk = b"".join(buf)
                    sha.update(chunk)
                    f.write(chunk)
                    buf, buflen = [], 0
        buf.append(bytes(1024))  # end-of-archive marker
        chunk = b"".join(buf)
        sha.update(chunk)
        f.write(chunk)
        pos += 1024
    idx = np.array(rows, dtype=IDX_DTYPE) if rows else np.zeros(0, dtype=IDX_DTYPE)
    bio = io.BytesIO()
    np.save(bio, idx, allow_pickle=False)
    idx_bytes = bio.getvalue()
    _atomic_write(idx_path, idx_bytes)
    done = {
        "name": name, "split": split, "source": unit.source, "file": tar_path.name, "index": idx_path.name,
        "samples": j, "bases": bases, "bytes": pos, "sha256": sha.hexdigest(),
        "index_bytes": len(idx_bytes), "index_sha256": hashlib.sha256(idx_bytes).hexdigest(),
        "digest": plan.digest,
    }
    _atomic_write(out / f"{name}.done.json", _json_bytes(done))
    return done


# --------------------------------------------------------------- build driver
_W: dict = {}


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this worker when the build process dies (SIGKILL, SIGTERM, crash), so no
    orphan goes on writing shards (or holding resources) after its parent is gone."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: workers notice a dead parent when their task queue breaks
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _worker_init(state: dict, out: str, parent: int | None = None) -> None:
    if parent is not None:
        _die_with_parent(parent)
    _W.clear()
    _W.update(plan=plan_from_state(state), out=Path(out), fastas={})
    _W["units"] = {u.name: u for us in _W["plan"].units.values() for u in us}


def _fetcher(plan: Plan, fastas: dict):
    import pyfaidx

    def fetch(rec: int, a: int, b: int) -> np.ndarray:
        r = plan.records[rec]
        fa = fastas.get(r.source)
        if fa is None:
            s = plan.sources[r.source]
            fa = fastas[r.source] = pyfaidx.Fasta(s.fasta, indexname=s.fai, as_raw=True,
                                                  sequence_always_upper=False, rebuild=False)
        return fetch_bytes(fa, r.name, a, b)

    return fetch


def _worker_task(name: str) -> dict:
    t0 = time.process_time()
    done = write_unit(_W["plan"], _W["units"][name], _W["out"], _fetcher(_W["plan"], _W["fastas"]))
    done["cpu_s"] = time.process_time() - t0
    return done


@contextmanager
def dir_lock(path: Path, verbose: bool = True) -> Iterator[None]:
    """An exclusive lock beside ``path``, held across processes and ranks (other processes wait, saying so
    once).  A POSIX lock (:mod:`glmtrain.locks`): released when its holder dies, never held by forked workers."""
    lock = FileLock(path.with_name(path.name + ".lock"))
    say = (lambda m: print(f"glmtrain: {m}", file=sys.stderr, flush=True)) if verbose else None
    lock.acquire(wait_s=float("inf"), say=say)
    lock.record()
    try:
        yield
    finally:
        lock.release()


def _finished(out: Path, unit: Unit, digest: str, check_sha: bool) -> dict | None:
    try:
        done = json.loads((out / f"{unit.name}.done.json").read_text())
    except (OSError, ValueError):
        return None
    if done.get("digest") != digest:
        return None
    tar, idx = out / done["file"], out / done["index"]
    try:
        if tar.stat().st_size != done["bytes"] or idx.stat().st_size != done["index_bytes"]:
            return None
    except OSError:
        return None
    if check_sha and (_sha256_file(tar) != done["sha256"] or _sha256_file(idx) != done["index_sha256"]):
        print(f"glmtrain: {tar} does not match its sha256; rebuilding it", file=sys.stderr)
        return None
    return done


def _check_dir(out: Path, plan: Plan) -> None:
    """Refuse a directory holding shards of other sources or policies."""
    old = None
    for fname in ("build.json", "manifest.json"):
        try:
            old = json.loads((out / fname).read_text())
            break
        except FileNotFoundError:
            continue
        except ValueError:
            raise DataInputError(f"{out / fname} is damaged (not JSON); delete {out} or choose another out=") from None
    if old is None:
        stray = [p.name for p in out.iterdir() if p.suffix in (".tar", ".npy") or p.name.endswith(".done.json")]
        if stray:
            raise DataInputError(f"{out} holds shard files ({stray[0]} ...) but no build.json: refusing to mix; "
                                 "choose another out= or delete them")
        return
    if old.get("digest") != plan.digest:
        diff = first_difference(old.get("fingerprint", {}), plan.fingerprint) or "format changed"
        raise DataInputError(f"{out} holds shards built from other sources or policies ({diff}); refusing to mix - "
                             "choose another out= (or delete that directory to rebuild)")


def build_shards(plan: Plan, out: Path, workers: int = 0, verbose: bool = True) -> dict:
    """Build every shard of ``plan`` into ``out`` (skipping finished ones) and write ``manifest.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda m: print(f"glmtrain: {m}", file=sys.stderr, flush=True)) if verbose else (lambda m: None)
    with dir_lock(out, verbose):
        _check_dir(out, plan)
        if not (out / "build.json").exists():
            _atomic_write(out / "build.json", _json_bytes({"digest": plan.digest, "fingerprint": plan.fingerprint,
                                                            "glmtrain_version": __version__}))
        for stale in out.glob(".*.tmp*"):  # partial files of an interrupted build (we hold the lock)
            stale.unlink(missing_ok=True)
        all_units = [u for s in SPLITS for u in plan.units[s]]
        done: dict[str, dict] = {}
        for u in all_units:
            rec = _finished(out, u, plan.digest, check_sha=True)
            if rec is not None:
                done[u.name] = rec
        todo = [u for u in all_units if u.name not in done]
        if done:
            say(f"{out}: {len(done)} shard(s) already built, skipped")
        t0 = time.perf_counter()
        cpu = 0.0
        if todo:
            n = workers or min(os.cpu_count() or 1, 8)
            n = max(1, min(n, len(todo)))
            # Worker processes are forked (fast, nothing to re-import).  Forking a process that runs
            # other threads (a DDP rank: gloo, OpenMP) can leave children deadlocked on inherited
            # locks, and spawn re-imports __main__ (Hydra apps, stdin scripts): build in-process there.
            if n > 1 and not ("fork" in mp.get_all_start_methods() and threading.active_count() == 1):
                say("this process runs other threads: building in-process (for a parallel build use "
                    "python -m glmtrain.data build ...)")
                n = 1
            say(f"building {len(todo)} shard(s) into {out} with {n} process(es)")
            state = plan_state(plan)
            names = [u.name for u in todo]
            ex = None
            if n == 1:
                _worker_init(state, str(out))
                results = map(_worker_task, names)
            else:  # a pool whose worker dies (e.g. out of memory) fails loudly instead of hanging
                ex = ProcessPoolExecutor(n, mp_context=mp.get_context("fork"), initializer=_worker_init,
                                         initargs=(state, str(out), os.getpid()))
                results = (f.result() for f in as_completed([ex.submit(_worker_task, nm) for nm in names]))
            try:
                for k, rec in enumerate(results, 1):
                    cpu += rec.pop("cpu_s", 0.0)
                    done[rec["name"]] = rec
                    if verbose and len(todo) >= 50 and k % (len(todo) // 10) == 0:
                        say(f"  {k}/{len(todo)} shards ({rec['name']}: {rec['samples']} samples)")
            except BrokenProcessPool:
                raise DataInputError(f"a shard-build process died (out of memory?); the {len(done)} finished shards "
                                     f"in {out} are kept - re-run the build (fewer workers=) to continue") from None
            finally:
                if ex is not None:
                    ex.shutdown(wait=True, cancel_futures=True)
                for stale in out.glob(".*.tmp*"):  # partial files of failed or cancelled shards
                    stale.unlink(missing_ok=True)
        manifest = _manifest(plan, [done[u.name] for u in all_units])
        manifest["build"] = {"seconds": round(time.perf_counter() - t0, 3), "cpu_seconds": round(cpu, 3),
                             "built": len(todo), "skipped": len(all_units) - len(todo)}
        _seal(manifest)
        _atomic_write(out / "manifest.json", _json_bytes(manifest))
        tot = manifest["totals"]
        say(f"{out}: {tot['train']['samples']} train / {tot['valid']['samples']} valid / "
            f"{tot['test']['samples']} test samples in {len(all_units)} shards")
        return manifest


def _manifest(plan: Plan, records: list[dict]) -> dict:
    shards = {s: [] for s in SPLITS}
    for rec in records:
        shards[rec["split"]].append({k: rec[k] for k in ("name", "source", "file", "index", "samples", "bases",
                                                         "bytes", "sha256", "index_bytes", "index_sha256")})
    return {
        "format": "glmtrain-shards",
        "format_version": FORMAT_VERSION,
        "glmtrain_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "digest": plan.digest,
        "fingerprint": plan.fingerprint,
        "sources": [{"path": s.path, "species": s.species, "size": s.size, "sha256": s.sha256,
                     "records": s.records or "all"} for s in plan.sources],
        "policies": plan.fingerprint["policy"],
        "records": plan.record_table(),
        "shards": shards,
        "totals": {s: {"shards": len(v), "samples": sum(x["samples"] for x in v), "bases": sum(x["bases"] for x in v),
                       "bytes": sum(x["bytes"] for x in v)} for s, v in shards.items()},
    }


def _canonical(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _seal(manifest: dict) -> None:
    manifest["manifest_sha256"] = hashlib.sha256(_canonical(manifest)).hexdigest()


def load_manifest(directory: Path) -> dict:
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise DataInputError(f"{directory}: no manifest.json; build the shards first "
                             "(python -m glmtrain.data build data=<name> out=<dir>) or fix data.shards")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataInputError(f"{path}: unreadable ({e}); rebuild the shards (finished ones are kept)") from None
    if manifest.get("format") != "glmtrain-shards" or manifest.get("format_version") != FORMAT_VERSION:
        raise DataInputError(f"{path}: not a glmtrain shard manifest of format {FORMAT_VERSION}; rebuild the shards")
    if manifest.get("manifest_sha256") != hashlib.sha256(_canonical(manifest)).hexdigest():
        raise DataInputError(f"{path}: manifest checksum mismatch (edited or damaged); re-run the build command to "
                             "rewrite it (finished shards are re-checked and kept)")
    return manifest


# ------------------------------------------------------------------- reading
class ShardStore:
    """Random access to the samples of a shard directory, split by split."""

    kind = "shards"

    def __init__(self, directory: str | Path, on_corrupt: str = "error", verify: str = "size", verbose: bool = True):
        self.dir = Path(directory)
        self.manifest = load_manifest(self.dir)
        self.digest = self.manifest["digest"]
        self.records = [tuple(r) for r in self.manifest["records"]]
        self.sources = self.manifest["sources"]
        self.on_corrupt = on_corrupt
        self.skipped: list[str] = []
        self.skipped_samples = 0
        self._units: dict[str, list[dict]] = {}
        for split in SPLITS:
            keep = []
            for sh in self.manifest["shards"][split]:
                problem = self._check(sh, verify)
                if problem is None:
                    keep.append(sh)
                    continue
                msg = f"shard {self.dir / sh['file']}: {problem}"
                if on_corrupt == "error":
                    raise DataInputError(f"{msg}; rebuild it (re-run the build: finished shards are kept) "
                                         "or set data.on_corrupt=skip")
                self.skipped.append(sh["name"])
                print(f"glmtrain: warning: skipping {msg} ({sh['samples']} samples; data.on_corrupt=skip)",
                      file=sys.stderr, flush=True)
            self._units[split] = keep
        if self.skipped:
            print(f"glmtrain: warning: skipped {len(self.skipped)} corrupt shard(s) of "
                  f"{sum(len(v) for v in self.manifest['shards'].values())}", file=sys.stderr, flush=True)
        self._pid = -1
        self._fds: dict[str, int] = {}
        self._idx: dict[str, np.ndarray] = {}

    def _check(self, sh: dict, verify: str) -> str | None:
        for fkey, bkey, skey in (("file", "bytes", "sha256"), ("index", "index_bytes", "index_sha256")):
            p = self.dir / sh[fkey]
            try:
                size = p.stat().st_size
            except OSError:
                return f"{sh[fkey]} is missing"
            if size != sh[bkey]:
                return f"{sh[fkey]} is truncated or damaged ({size} bytes, the manifest says {sh[bkey]})"
            if verify == "sha256" and _sha256_file(p) != sh[skey]:
                return f"{sh[fkey]} does not match the manifest's sha256 (checksum mismatch)"
        return None

    # -- the store interface (shared with MemoryStore)
    def units(self, split: str) -> list[tuple[str, int, int]]:
        return [(sh["name"], int(sh["source"]), int(sh["samples"])) for sh in self._units[split]]

    def record(self, rec: int) -> tuple[str, str]:
        return self.records[rec][0], self.records[rec][1]

    def _reset_after_fork(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._fds, self._idx = {}, {}

    def _index(self, sh: dict) -> np.ndarray:
        idx = self._idx.get(sh["name"])
        if idx is None:
            try:
                idx = np.load(self.dir / sh["index"], allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataInputError(f"shard index {self.dir / sh['index']} is unreadable ({e}); rebuild the shards") from None
            if len(self._idx) >= 64:
                self._idx.pop(next(iter(self._idx)))
            self._idx[sh["name"]] = idx
        return idx

    def _fd(self, sh: dict) -> int:
        fd = self._fds.get(sh["name"])
        if fd is None:
            if len(self._fds) >= 64:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[sh["name"]] = os.open(self.dir / sh["file"], os.O_RDONLY)
        return fd

    def read(self, split: str, u: int, i: int):
        """(bases uint8, record, start, end, strand) of sample ``i`` of unit ``u``; None if corrupt and skipped."""
        self._reset_after_fork()
        sh = self._units[split][u]
        row = self._index(sh)[i]
        off, n = int(row["off"]), int(row["len"])
        data = os.pread(self._fd(sh), n, off)
        if len(data) != n or zlib.crc32(data) != int(row["crc"]):
            msg = (f"shard {self.dir / sh['file']}: sample {i} (byte offset {off}) fails its crc32 check: "
                   "the shard is corrupted")
            if self.on_corrupt == "error":
                raise DataInputError(f"{msg}; rebuild it (re-run the build: damaged shards are rebuilt) "
                                     "or set data.on_corrupt=skip")
            self.skipped_samples += 1
            print(f"glmtrain: warning: {msg}; skipped (zero-weight padding instead; {self.skipped_samples} "
                  "so far in this process)", file=sys.stderr, flush=True)
            return None
        return (np.frombuffer(data, dtype=np.uint8), int(row["rec"]), int(row["start"]), int(row["end"]),
                "-" if row["strand"] else "+")

    def verify_all(self) -> list[str]:
        """sha256 of every shard and index against the manifest; list of problems (empty = all good)."""
        problems = []
        for split in SPLITS:
            for sh in self.manifest["shards"][split]:
                p = self._check(sh, "sha256")
                if p:
                    problems.append(f"{sh['name']}: {p}")
        return problems
