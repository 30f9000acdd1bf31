"""In-memory genome windows with an index-based, exactly resumable sample order.

For corpora that fit in memory (the bundled sample, test genomes, bacterial and
small eukaryotic genomes).  Order of samples is a pure function of
``(seed, global sample index)``: epoch ``e`` visits the training windows in the
permutation ``rng(seed, e)``; global sample ``g`` is window ``perm_e[g mod n]``.
Each optimizer micro-step consumes ``world * micro_batch`` consecutive global
indices, rank ``r`` taking the ``r``-th slice.  The only resume state is the
number of consumed samples (Megatron's convention), so a resumed run sees
exactly the samples the uninterrupted run sees, for any number of dataloader
workers, and a change of world size at constant global batch stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from glmtrain.config import DataConfig
from glmtrain.data.fasta import DataInputError, open_fasta
from glmtrain.tokenizers import Tokenizer, TokenizerError

_COMP = np.zeros(256, dtype=np.uint8)
for _a, _b in zip(b"ACGTNRYKMSWBDHVacgtnrykmswbdhv", b"TGCANYRMKSWVHDBtgcanyrmkswvhdb"):
    _COMP[_a] = _b
_ACGT = np.zeros(256, dtype=bool)
_ACGT[list(b"ACGTacgt")] = True
_LOWER = np.zeros(256, dtype=bool)
_LOWER[list(range(ord("a"), ord("z") + 1))] = True


@dataclass(frozen=True)
class Region:
    species: str
    record: str
    start: int
    end: int
    split: str  # train | valid | test


class Corpus:
    """Records of all sources held in memory as uint8 arrays, split into regions."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.seqs: dict[tuple[str, str], np.ndarray] = {}
        self.regions: list[Region] = []
        split = cfg.split
        held_valid, held_test = set(split.valid_records), set(split.test_records)
        for i, src in enumerate(cfg.sources):
            species = src.species or f"source{i}"
            fa = open_fasta(src.path, cfg.cache_dir, what=f"data.sources[{i}].path")
            names = list(src.records) or list(fa.keys())
            for name in names:
                if name not in fa:
                    raise DataInputError(f"data.sources[{i}].records: record {name!r} is not in {src.path} (it has: {', '.join(list(fa.keys())[:10])})")
                seq = np.frombuffer(str(fa[name][:]).encode("latin-1"), dtype=np.uint8)
                if len(seq) == 0:
                    raise DataInputError(f"data.sources[{i}].path: record {name!r} of {src.path} is empty; remove it or list only non-empty records")
                self.seqs[(species, name)] = seq
                n = len(seq)
                if split.kind == "records":
                    tag = "valid" if (name in held_valid or f"{species}:{name}" in held_valid) else (
                        "test" if (name in held_test or f"{species}:{name}" in held_test) else "train")
                    self.regions.append(Region(species, name, 0, n, tag))
                else:  # fraction: the tail of every record is held out
                    n_test = int(n * split.test_fraction)
                    n_valid = int(n * split.valid_fraction)
                    cut_v, cut_t = n - n_valid - n_test, n - n_test
                    self.regions.append(Region(species, name, 0, cut_v, "train"))
                    if n_valid:
                        self.regions.append(Region(species, name, cut_v, cut_t, "valid"))
                    if n_test:
                        self.regions.append(Region(species, name, cut_t, n, "test"))
            fa.close()
        for tag in ("train", "valid"):
            if not any(r.split == tag for r in self.regions):
                raise DataInputError(f"data.split: no {tag} region; check data.split.valid_records / valid_fraction against the records in data.sources")

    def windows(self, split: str, stride: int | None = None) -> np.ndarray:
        """[n, 3] int64 rows (region index, start, end) of windows passing the N filter."""
        cfg = self.cfg
        w = cfg.window
        stride = stride or cfg.stride or w
        min_len = cfg.min_length or w
        rows = []
        for ri, r in enumerate(self.regions):
            if r.split != split:
                continue
            seq = self.seqs[(r.species, r.record)]
            is_n = ~_ACGT[seq[r.start : r.end]]
            csum = np.concatenate(([0], np.cumsum(is_n)))
            starts = np.arange(0, max(r.end - r.start - min_len + 1, 0), stride)
            if len(starts) == 0:
                continue
            ends = np.minimum(starts + w, r.end - r.start)
            keep = (csum[ends] - csum[starts]) <= cfg.max_n_fraction * (ends - starts)
            rows.append(np.stack([np.full(keep.sum(), ri), starts[keep] + r.start, ends[keep] + r.start], axis=1))
        if not rows:
            return np.zeros((0, 3), dtype=np.int64)
        return np.concatenate(rows).astype(np.int64)

    def window_bytes(self, row: np.ndarray) -> np.ndarray:
        r = self.regions[int(row[0])]
        return self.seqs[(r.species, r.record)][int(row[1]) : int(row[2])]


class WindowEncoder:
    """Bytes of a window -> (token ids, loss weights) under the data policies."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer):
        self.cfg, self.tok = cfg, tokenizer
        self.per_base = tokenizer.name in ("char", "byte")
        if cfg.softmask == "weight" and not self.per_base:
            raise DataInputError(f"data.softmask=weight needs a one-token-per-base tokenizer; {tokenizer.name} is not (use upper)")
        self.length = tokenizer.token_length(cfg.window)
        acgt = np.zeros(tokenizer.vocab_size, dtype=bool)
        acgt[tokenizer.acgt_ids] = True
        self._acgt_ids = acgt

    def __call__(self, raw: np.ndarray, reverse: bool = False) -> tuple[np.ndarray, np.ndarray]:
        if reverse:
            raw = _COMP[raw[::-1]]
        lower = _LOWER[raw]
        if self.cfg.softmask != "keep":
            raw = np.where(lower, raw - 32, raw).astype(np.uint8)
        ids = self.tok.encode(raw.tobytes().decode("latin-1"))
        if self.per_base:
            w = _ACGT[raw].astype(np.float32)  # N / ambiguous bases carry no loss
            if self.cfg.softmask == "weight":
                w[lower] *= self.cfg.softmask_weight
        else:
            w = self._acgt_ids[ids].astype(np.float32)
        out_ids = np.full(self.length, self.tok.pad_id, dtype=np.int64)
        out_w = np.zeros(self.length, dtype=np.float32)
        n = min(len(ids), self.length)
        out_ids[:n], out_w[:n] = ids[:n], w[:n]
        return out_ids, out_w


class TrainWindows(Dataset):
    """Global sample index -> sample, through per-epoch permutations of the windows."""

    def __init__(self, corpus: Corpus, encoder: WindowEncoder, windows: np.ndarray, seed: int, rc_prob: float):
        if len(windows) == 0:
            raise DataInputError("data: no training window survives the filters; lower data.window or raise data.max_n_fraction")
        self.corpus, self.encoder, self.windows = corpus, encoder, windows
        self.seed, self.rc_prob = seed, rc_prob
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.windows)

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.windows)))
        return self._perm[1]

    def window_of(self, g: int) -> np.ndarray:
        n = len(self.windows)
        return self.windows[self.permutation(g // n)[g % n]]

    def __getitem__(self, g: int) -> dict:
        row = self.window_of(g)
        reverse = bool(self.rc_prob) and np.random.default_rng([self.seed, 1, g]).random() < self.rc_prob
        return _sample(self.corpus, self.encoder, row, reverse, g)


class EvalWindows(Dataset):
    def __init__(self, corpus: Corpus, encoder: WindowEncoder, windows: np.ndarray):
        self.corpus, self.encoder, self.windows = corpus, encoder, windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        return _sample(self.corpus, self.encoder, self.windows[i], False, i)


def _sample(corpus: Corpus, encoder: WindowEncoder, row: np.ndarray, reverse: bool, index: int) -> dict:
    r = corpus.regions[int(row[0])]
    try:
        ids, w = encoder(corpus.window_bytes(row), reverse)
    except TokenizerError as e:
        raise DataInputError(f"{r.species}/{r.record}:{row[1]}-{row[2]}: {e}") from None
    return {
        "input_ids": torch.from_numpy(ids),
        "loss_weight": torch.from_numpy(w),
        "index": index,
        "key": f"{r.species}/{r.record}:{int(row[1])}-{int(row[2])}({'-' if reverse else '+'})",
    }


class ResumableBatchSampler(Sampler[list[int]]):
    """Endless micro-batches of global sample indices for one rank, starting after ``consumed``."""

    def __init__(self, micro_batch: int, rank: int, world: int, consumed: int):
        if consumed % (micro_batch * world):
            raise ValueError(
                f"resume position {consumed} is not a multiple of the global micro-batch {micro_batch}x{world}; "
                "resume with the micro-batch size and world size the checkpoint was written with"
            )
        self.micro, self.rank, self.world, self.consumed = micro_batch, rank, world, consumed

    def __iter__(self) -> Iterator[list[int]]:
        g = self.consumed
        while True:
            base = g + self.rank * self.micro
            yield list(range(base, base + self.micro))
            g += self.micro * self.world


def subsample_evenly(rows: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or len(rows) <= k:
        return rows
    return rows[np.linspace(0, len(rows) - 1, k).round().astype(int)]


class GenomeDataModule(L.LightningDataModule):
    """Lightning glue: builds the corpus once per process, hands out resumable loaders."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, micro_batch_size: int, seed: int):
        super().__init__()
        self.cfg, self.tok, self.micro, self.seed = cfg, tokenizer, micro_batch_size, seed
        self.corpus: Corpus | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.corpus is None:
            self.corpus = Corpus(self.cfg)
            self.encoder = WindowEncoder(self.cfg, self.tok)
            self.train_rows = self.corpus.windows("train")
            self.val_rows = subsample_evenly(self.corpus.windows("valid", stride=self.cfg.window), self.cfg.max_val_windows)
            self.train_set = TrainWindows(self.corpus, self.encoder, self.train_rows, self.seed, self.cfg.rc_prob)

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_loader(self, consumed: int, rank: int = 0, world: int = 1) -> DataLoader:
        self.setup()
        sampler = ResumableBatchSampler(self.micro, rank, world, consumed)
        return DataLoader(self.train_set, batch_sampler=sampler, num_workers=self.cfg.num_workers,
                          persistent_workers=False, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        module = self.trainer.lightning_module if self.trainer is not None else None
        consumed = getattr(module, "consumed_samples", 0)
        return self.train_loader(consumed, rank, world)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        rank, world = self._rank_world()
        rows = self.val_rows[rank::world]
        return DataLoader(EvalWindows(self.corpus, self.encoder, rows), batch_size=self.micro, shuffle=False,
                          num_workers=0)

    # plain strings for the Markov baselines (fit on exactly the training windows)
    def sequences(self, split: str) -> list[np.ndarray]:
        self.setup()
        rows = self.train_rows if split == "train" else self.val_rows
        return [self.corpus.window_bytes(r) for r in rows]
