"""Sequence-classification data in the GUE layout: ``train.csv``, ``dev.csv``, ``test.csv``
(optionally gzip), header ``sequence,label``, integer labels 0..C-1.

Sequences are tokenized once.  Batches hold sequences of one token length only (length
buckets), so no padding ever enters a model -- exact for every family, causal or bidirectional,
with or without padding masks; the GUE tasks have one length (or a few) per task.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from glmtrain.data.fasta import DataInputError
from glmtrain.tokenizers import Tokenizer, TokenizerError, reverse_complement

SPLIT_FILES = ("train", "dev", "test")


def _open(path: Path):
    return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def split_path(data_dir: str | Path, split: str) -> Path:
    d = Path(data_dir)
    for name in (f"{split}.csv", f"{split}.csv.gz"):
        if (d / name).is_file():
            return d / name
    raise DataInputError(f"task.data_dir={data_dir}: no {split}.csv or {split}.csv.gz there "
                         f"(a GUE task folder holds {', '.join(f + '.csv' for f in SPLIT_FILES)})")


def read_split(data_dir: str | Path, split: str, limit: int = 0) -> tuple[list[str], np.ndarray]:
    """(sequences, labels) of one split; a malformed row is refused with its file and line number."""
    path = split_path(data_dir, split)
    seqs, labels = [], []
    try:
        with _open(path) as f:
            reader = csv.reader(f)
            header = [h.strip().lower() for h in next(reader, [])]
            if "sequence" not in header or "label" not in header:
                raise DataInputError(f"{path}: header {header} lacks 'sequence' and 'label' columns (GUE layout)")
            si, li = header.index("sequence"), header.index("label")
            for row in reader:
                if not row:
                    continue
                line = reader.line_num
                try:
                    seq, lab = row[si].strip(), int(row[li])
                except (IndexError, ValueError):
                    raise DataInputError(f"{path}:{line}: expected 'sequence,label' with an integer label, got {row[:3]}") from None
                if not seq or lab < 0:
                    raise DataInputError(f"{path}:{line}: empty sequence or negative label")
                seqs.append(seq)
                labels.append(lab)
                if limit and len(seqs) >= limit:
                    break
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError, csv.Error) as e:
        raise DataInputError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:100]})") from None
    if not seqs:
        raise DataInputError(f"{path}: no rows")
    return seqs, np.asarray(labels, dtype=np.int64)


@dataclass
class Encoded:
    ids: list[np.ndarray]
    rc_ids: list[np.ndarray] | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def encode(seqs: list[str], labels: np.ndarray, tok: Tokenizer, prefix: list[int], with_rc: bool, where: str) -> Encoded:
    def enc(s: str, i: int) -> np.ndarray:
        try:
            return np.concatenate([np.asarray(prefix, dtype=np.int64), tok.encode(s)])
        except TokenizerError as e:
            raise DataInputError(f"{where} row {i + 1}: {e}") from None

    ids = [enc(s, i) for i, s in enumerate(seqs)]
    rc = [enc(reverse_complement(s), i) for i, s in enumerate(seqs)] if with_rc else None
    return Encoded(ids, rc, labels)


def length_buckets(data: Encoded, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Index batches, each of one (length, rc length): shuffled within and across buckets when ``rng``."""
    keys = [(len(a), len(data.rc_ids[i]) if data.rc_ids is not None else 0) for i, a in enumerate(data.ids)]
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, k in enumerate(keys):
        buckets.setdefault(k, []).append(i)
    batches = []
    for k in sorted(buckets):
        idx = np.asarray(buckets[k], dtype=np.int64)
        if rng is not None:
            idx = rng.permutation(idx)
        batches += [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class BucketBatchSampler(torch.utils.data.Sampler):
    """Training batches of equal-length sequences, reshuffled every epoch (Lightning calls set_epoch)."""

    def __init__(self, data: Encoded, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed, self.epoch = data, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        return iter([b.tolist() for b in length_buckets(self.data, self.batch_size, rng)])

    def __len__(self) -> int:
        return len(length_buckets(self.data, self.batch_size, None))


class EncodedDataset(torch.utils.data.Dataset):
    def __init__(self, data: Encoded):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return i


def collate(data: Encoded, idx: list[int], rc: bool = False) -> dict[str, torch.Tensor]:
    src = data.rc_ids if rc else data.ids
    return {"input_ids": torch.from_numpy(np.stack([src[i] for i in idx])),
            "labels": torch.from_numpy(data.labels[np.asarray(idx)])}


def train_loader(data: Encoded, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(EncodedDataset(data), batch_sampler=BucketBatchSampler(data, batch_size, seed),
                                       collate_fn=lambda idx: collate(data, idx), num_workers=0)
