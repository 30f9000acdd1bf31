"""Genome data for training: stores (shards or memory), the resumable stream, and Lightning glue.

* ``data.format=shards`` (default): windowed webdataset shards built once by
  ``python -m glmtrain.data build`` (``data.shards=<dir>``) or, when
  ``data.shards`` is empty, automatically on first use into
  ``<cache_dir>/shards/<name>-<digest>`` (a file lock lets one rank build while
  the others wait).
* ``data.format=memory``: the same plan, windows and units cut from FASTA in RAM
  every run - no disk writes; the sample order is identical to ``shards``.

Windows are stored at ``data.store_window`` (default ``data.window``) and trained at
``data.window``: each stored window is cut into ``store_window / window`` consecutive pieces
(:class:`PieceStore`), so the stages of a context schedule (64 -> ... -> 1,024, or 8k -> ... -> 1M)
all read the same shards, built once at the longest window.  A piece is a sample of its own in the
index-based stream (:mod:`glmtrain.data.stream`), which therefore stays exact across restarts for
every stage.  Pieces are not N-filtered again: ``max_n_fraction`` applies to the stored window, and
N bases carry no loss wherever they are.

The training order is index-based: a :class:`StreamCursor` (global samples consumed, data-parallel
rank and size) is the whole resume position.  The LightningModule owns and advances it; this data
module only reads it (it never looks at the trainer).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pyfaidx
import torch
from torch.utils.data import DataLoader

from glmtrain.config import DataConfig, first_difference
from glmtrain.data.fasta import DataInputError, default_cache_dir, fetch_bytes, file_sha256, resolve_path
from glmtrain.data.plan import SPLITS, Plan, make_plan, policy, unit_windows
from glmtrain.data.shards import COMP, ShardStore, build_shards, dir_lock
from glmtrain.data.stream import (EvalSamples, ResumableBatchSampler, StreamCursor, TrainOrder, TrainSamples, TrimCollate,
                                  WindowEncoder, eval_rows)
from glmtrain.tokenizers import Tokenizer

__all__ = ["DataInputError", "GenomeDataModule", "MemoryStore", "PieceStore", "StreamCursor", "open_store"]



class MemoryStore:
    """The plan's windows held in memory (records as uint8 arrays + per-unit window tables)."""

    kind = "memory"

    def __init__(self, plan: Plan):
        self.plan, self.digest = plan, plan.digest
        self.records = [(r.species, r.name) for r in plan.records]
        used = sorted({plan.regions[gi].record for us in plan.units.values() for u in us for gi, _, _ in u.segments})
        self.seqs: dict[int, np.ndarray] = {}
        by_source: dict[int, list[int]] = {}
        for rec in used:
            by_source.setdefault(plan.records[rec].source, []).append(rec)
        for src, recs in by_source.items():
            s = plan.sources[src]
            fa = pyfaidx.Fasta(s.fasta, indexname=s.fai, as_raw=True, sequence_always_upper=False, rebuild=False)
            try:
                for rec in recs:
                    r = plan.records[rec]
                    self.seqs[rec] = fetch_bytes(fa, r.name, 0, r.length)
            finally:
                fa.close()
        fetch = lambda rec, a, b: self.seqs[rec][a:b]  # noqa: E731
        self._units: dict[str, list[tuple[str, int, np.ndarray]]] = {}
        for split in SPLITS:
            strands = plan.strands(split)
            out = []
            for u in plan.units[split]:
                parts = []
                for rec, starts, ends, _, _ in unit_windows(plan, u, fetch):
                    n, k = len(starts), len(strands)  # offline RC: '+' then '-' per window, as in the shards
                    t = np.empty((n, k, 4), dtype=np.int64)
                    t[:, :, 0], t[:, :, 1], t[:, :, 2], t[:, :, 3] = rec, starts[:, None], ends[:, None], np.arange(k)
                    parts.append(t.reshape(n * k, 4))
                tab = np.concatenate(parts) if parts else np.zeros((0, 4), dtype=np.int64)
                out.append((u.name, u.source, tab))
            self._units[split] = out

    def units(self, split: str) -> list[tuple[str, int, int]]:
        return [(name, src, len(tab)) for name, src, tab in self._units[split]]

    def record(self, rec: int) -> tuple[str, str]:
        return self.records[rec]

    def read(self, split: str, u: int, i: int):
        rec, s, e, minus = self._units[split][u][2][i].tolist()
        raw = self.seqs[rec][s:e]
        return (COMP[raw[::-1]] if minus else raw), rec, s, e, ("-" if minus else "+")


class PieceStore:
    """A store whose stored windows are cut into ``pieces`` consecutive pieces of ``window`` bases.

    Piece ``i`` of a unit is piece ``i % pieces`` of its stored sample ``i // pieces``; the provenance
    (start, end) is that of the piece on the genome (for a reverse-complement sample, counted from the
    stored window's end).  A stored window shorter than ``pieces * window`` (a region's tail, when
    ``min_length`` allows it) gives short or empty pieces: padded, and without loss.
    """

    def __init__(self, store, window: int, pieces: int):
        self.base, self.window, self.pieces = store, window, pieces
        self.kind = store.kind
        self.digest = f"{store.digest}:{window}x{pieces}"

    def units(self, split: str) -> list[tuple[str, int, int]]:
        return [(name, src, n * self.pieces) for name, src, n in self.base.units(split)]

    def record(self, rec: int) -> tuple[str, str]:
        return self.base.record(rec)

    def read(self, split: str, u: int, i: int):
        got = self.base.read(split, u, i // self.pieces)
        if got is None:
            return None
        raw, rec, start, end, strand = got
        a = (i % self.pieces) * self.window
        b = min(len(raw), a + self.window)
        a = min(a, b)
        if strand == "+":
            return raw[a:b], rec, start + a, start + b, strand
        return raw[a:b], rec, end - b, end - a, strand


def stored_config(cfg: DataConfig) -> DataConfig:
    """The data config the stored windows are planned and built with (window = the stored window)."""
    return dataclasses.replace(cfg, window=cfg.store_window or cfg.window, store_window=0)


def auto_shard_dir(cfg: DataConfig, plan: Plan) -> Path:
    return default_cache_dir(cfg.cache_dir) / "shards" / f"{cfg.name}-{plan.digest[:16]}"


def check_compatible(store: ShardStore, cfg: DataConfig) -> None:
    """An explicit data.shards directory must match the config's build policies and sources."""
    built = copy.deepcopy(store.manifest["policies"])
    built.get("split", {}).pop("bed_sha256", None)
    diff = first_difference(built, policy(cfg), "data.")
    if diff is None:
        have = [s["species"] for s in store.sources]
        want = [src.species or f"source{i}" for i, src in enumerate(cfg.sources)]
        if have != want:
            diff = f"data.sources species were {have}, are {want} now"
    if diff is None:
        diff = _sources_difference(store.sources, cfg)
    if diff:
        raise DataInputError(f"data.shards={store.dir} was built with other settings ({diff}); rebuild the shards "
                             "with this config (python -m glmtrain.data build ...) or restore the settings")


def _sources_difference(built: list[dict], cfg: DataConfig) -> str | None:
    """The shards' sources (manifest: path, size, sha256, records) against ``data.sources``: training on one
    genome while config.yaml names another is refused.  A configured FASTA that is not on this machine
    passes only under the path the shards were built from (their sha256 is then the record)."""
    for i, (b, src) in enumerate(zip(built, cfg.sources)):
        key = f"data.sources[{i}]"
        want_records = list(src.records) or "all"
        if b.get("records") != want_records:
            return f"{key}.records were {b.get('records')}, are {want_records} now"
        p = resolve_path(src.path)
        if not p.is_file():
            if src.path != b.get("path"):
                return f"{key}.path is {src.path} (not on this machine); the shards were built from {b.get('path')}"
            continue
        if p.stat().st_size != b.get("size") or file_sha256(p, cfg.cache_dir) != b.get("sha256"):
            return f"{key}.path={src.path} is not the file the shards were built from ({b.get('path')}, sha256 {str(b.get('sha256'))[:12]}...)"
    return None


def open_store(cfg: DataConfig, verbose: bool = True):
    """The samples of ``cfg``: stored windows (shards or memory), viewed as pieces of ``cfg.window``."""
    store = _open_stored(stored_config(cfg), verbose)
    pieces = (cfg.store_window or cfg.window) // cfg.window
    return PieceStore(store, cfg.window, pieces) if pieces > 1 else store


def _open_stored(cfg: DataConfig, verbose: bool):
    if cfg.shards and cfg.format == "shards":
        store = ShardStore(resolve_path(cfg.shards), cfg.on_corrupt, cfg.verify, verbose)
        check_compatible(store, cfg)
        return store
    # one process at a time plans (decompresses, writes .fai files) and builds; other ranks wait, then reuse
    with dir_lock(default_cache_dir(cfg.cache_dir) / "locks" / cfg.name, verbose):
        plan = make_plan(cfg)
        if cfg.format == "memory":
            return MemoryStore(plan)
        out = auto_shard_dir(cfg, plan)
        try:
            return ShardStore(out, cfg.on_corrupt, cfg.verify, verbose)
        except DataInputError as e:
            if (out / "manifest.json").exists() and verbose:
                print(f"glmtrain: {e}; rebuilding what is damaged", file=sys.stderr)
        # in a training process build in-process unless asked otherwise (a corpus worth parallel
        # processes is better built once with `python -m glmtrain.data build`)
        build_shards(plan, out, cfg.build_workers or 1, verbose=verbose)
        return ShardStore(out, cfg.on_corrupt, cfg.verify, verbose)


def _rank_env() -> int:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


class GenomeDataModule(L.LightningDataModule):
    """Lightning glue: opens the store once per process, hands out index-resumable loaders.

    ``cursor`` is the stream position (consumed samples, data-parallel rank and size), owned and
    advanced by the LightningModule; the loaders start where it says.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, micro_batch_size: int, seed: int,
                 cursor: StreamCursor | None = None):
        super().__init__()
        self.cfg, self.tok, self.micro, self.seed = cfg, tokenizer, micro_batch_size, seed
        self.cursor = cursor if cursor is not None else StreamCursor()
        self.store = None
        self._resume: dict | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.store is None:
            self.store = open_store(self.cfg, verbose=_rank_env() == 0)
            self.encoder = WindowEncoder(self.cfg, self.tok)
            self.order = TrainOrder(self.store, self.cfg, self.seed)
            self.train_set = TrainSamples(self.store, self.order, self.encoder, self.seed, self.cfg.rc_prob)
            self.val_rows = eval_rows(self.store, "valid", self.cfg.max_val_windows)
            if len(self.val_rows) == 0:
                raise DataInputError("data: no validation window survives the filters; lower data.window, raise "
                                     "data.max_n_fraction or hold out more (data.split)")

    # ---- resume state beside the cursor's position (checked, never used to reposition)
    def stream_state(self) -> dict:
        self.setup()
        return {"fingerprint": self.order.fingerprint(), "world_size": self.cursor.world, "micro_batch_size": self.micro}

    def state_dict(self) -> dict:
        return {"stream": self.stream_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = state_dict.get("stream")

    def _check_resume(self, consumed: int, world: int) -> str:
        if not self._resume:
            return ""
        diff = first_difference(self._resume.get("fingerprint", {}), self.order.fingerprint(), "stream.")
        if diff:
            raise DataInputError(f"the training stream differs from the checkpoint's ({diff}); resuming would silently "
                                 "reshuffle the samples - restore the data settings or start a new run_dir=...")
        old_w, old_m = self._resume.get("world_size"), self._resume.get("micro_batch_size")
        saved = f" (the checkpoint ran {old_w} rank(s) x micro-batch {old_m})"
        if (old_w, old_m) != (world, self.micro) and consumed % (world * self.micro) == 0 and _rank_env() == 0:
            print(f"glmtrain: resuming the data stream exactly at sample {consumed} with {world} rank(s) x micro-batch "
                  f"{self.micro}{saved}", file=sys.stderr, flush=True)
        return saved

    def train_loader(self, consumed: int, rank: int = 0, world: int = 1, num_workers: int | None = None) -> DataLoader:
        self.setup()
        saved = self._check_resume(consumed, world)
        sampler = ResumableBatchSampler(self.micro, rank, world, consumed, saved)
        workers = self.cfg.num_workers if num_workers is None else num_workers
        return DataLoader(self.train_set, batch_sampler=sampler, num_workers=workers, persistent_workers=False,
                          pin_memory=torch.cuda.is_available(), **self._collate())

    def _collate(self) -> dict:
        return {"collate_fn": TrimCollate(self.tok.pad_id)} if self.encoder.trim else {}

    def train_dataloader(self) -> DataLoader:
        c = self.cursor
        return self.train_loader(c.consumed, c.rank, c.world)

    def eval_dataset(self, split: str = "valid", rank: int = 0, world: int = 1) -> EvalSamples:
        self.setup()
        rows = self.val_rows if split == "valid" else eval_rows(self.store, split, self.cfg.max_val_windows)
        return EvalSamples(self.store, self.encoder, split, rows[rank::world])

    def val_dataloader(self) -> DataLoader:
        c = self.cursor
        return DataLoader(self.eval_dataset("valid", c.rank, c.world), batch_size=self.micro, shuffle=False, num_workers=0,
                          **self._collate())

    def token_counts(self, max_bases: int = 1_000_000) -> np.ndarray:
        """How often each id carries loss in evenly spaced training windows (the unigram baseline's data)."""
        self.setup()
        counts = np.zeros(self.tok.vocab_size, dtype=np.int64)
        for u, i in eval_rows(self.store, "train", max(1, max_bases // self.cfg.window)):
            got = self.store.read("train", int(u), int(i))
            if got is not None:
                ids, w = self.encoder(got[0])
                counts += np.bincount(ids[w > 0], minlength=len(counts))
        return counts

    # plain window bases for the Markov baselines (train: evenly spaced, at most max_bases)
    def sequences(self, split: str, max_bases: int = 8_000_000) -> list[np.ndarray]:
        self.setup()
        if split == "train":
            rows = eval_rows(self.store, "train", max(1, max_bases // self.cfg.window))
        else:
            rows = self.val_rows if split == "valid" else eval_rows(self.store, split, 0)
        out = []
        for u, i in rows:
            got = self.store.read("train" if split == "train" else split, int(u), int(i))
            if got is not None:
                out.append(got[0])
        return out
