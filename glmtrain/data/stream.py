"""The training stream: global sample index -> sample, deterministic and resumable by index.

The order of training samples is a pure function of ``(seed, global sample
index g)`` and the store's unit (shard) list - never of the number of ranks or
DataLoader workers:

1. **Mix.**  Sources with a positive weight are mixed in blocks of
   ``mix_block`` samples; in every block source ``s`` gets exactly its quota
   ``q_s`` (largest-remainder rounding of its weight), in a seeded order.  So
   ``g`` maps to (source ``s``, position ``n`` in that source's own stream) in
   O(1): ``n = block * q_s + rank of g within its block``.
2. **Source stream.**  Pass ``e`` of a source visits its shards in a seeded
   permutation (``resample``: draws them with replacement, weighted by size).
   The pass is cut into groups of ``shuffle_shards`` consecutive shards whose
   samples are permuted together by a seeded permutation: a shuffle buffer
   spanning that many shards, computed instead of filled, so that position
   ``n`` maps to (shard, sample) directly, with no replay.
3. **Ranks and workers.**  Micro-step ``t`` consumes the global indices
   ``[c, c + world*micro)`` with ``c = consumed_samples``; rank ``r`` takes the
   ``r``-th slice (:class:`ResumableBatchSampler`).  DataLoader workers fetch
   whole micro-batches in round-robin and the loader returns them in order.

The only resume state is ``consumed_samples`` (saved by the LightningModule);
the data module also saves a fingerprint of everything the order depends on, and
a resume with a different order - or a world size that cannot continue at the
saved position - is refused with one line instead of silently reshuffling.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from glmtrain.config import DataConfig
from glmtrain.data.fasta import DataInputError
from glmtrain.data.shards import COMP
from glmtrain.tokenizers import Tokenizer, TokenizerError

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


@dataclass
class StreamCursor:
    """Position of the training stream: the only data state a run saves (owned by the LightningModule)."""

    consumed: int = 0  # global training samples consumed so far (all data-parallel ranks)
    rank: int = 0  # data-parallel rank of this process
    world: int = 1  # data-parallel size


def hash_uniform(seed: int, salt: int, g: int) -> float:
    """A uniform [0, 1) number from (seed, salt, g): cheap, stateless, identical in every process."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _M64) ^ salt) ^ g) / 2.0**64


class SourceStream:
    """Position ``n`` of one source's endless stream -> (unit id, sample within the unit)."""

    def __init__(self, unit_ids: list[int], counts: list[int], seed: int, source: int, group: int, resample: bool):
        self.unit_ids = np.asarray(unit_ids, dtype=np.int64)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.seed, self.source, self.resample = seed, source, resample
        self.group = group if group > 0 else len(unit_ids)
        self.total = int(self.counts.sum())
        self._pass_starts = [0]  # resample: first position of each pass, grown on demand
        self._passes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _pass(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        got = self._passes.get(e)
        if got is None:
            rng = np.random.default_rng([self.seed, 0x5EED, self.source, e])
            if self.resample:
                order = rng.choice(len(self.counts), size=len(self.counts), p=self.counts / self.total)
            else:
                order = rng.permutation(len(self.counts))
            cum = np.concatenate(([0], np.cumsum(self.counts[order])))
            if len(self._passes) >= 4:
                self._passes.pop(next(iter(self._passes)))
            got = self._passes[e] = (order, cum)
        return got

    def _locate_pass(self, n: int) -> tuple[int, int]:
        if not self.resample:
            return divmod(n, self.total)
        starts = self._pass_starts
        while starts[-1] <= n:
            starts.append(starts[-1] + int(self._pass(len(starts) - 1)[1][-1]))
        e = int(np.searchsorted(starts, n, side="right")) - 1
        return e, n - starts[e]

    def _perm(self, e: int, gi: int, size: int) -> np.ndarray:
        p = self._perms.get((e, gi))
        if p is None:
            p = np.random.default_rng([self.seed, 0x6B0, self.source, e, gi]).permutation(size)
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            self._perms[(e, gi)] = p
        return p

    def locate(self, n: int) -> tuple[int, int]:
        e, r = self._locate_pass(n)
        order, cum = self._pass(e)
        k = int(np.searchsorted(cum, r, side="right")) - 1  # unit position holding r (before shuffling)
        gi = k // self.group
        u0, u1 = gi * self.group, min(gi * self.group + self.group, len(order))
        g0 = int(cum[u0])
        p = g0 + int(self._perm(e, gi, int(cum[u1]) - g0)[r - g0])
        k = int(np.searchsorted(cum, p, side="right")) - 1
        return int(self.unit_ids[order[k]]), p - int(cum[k])


def quotas(weights: list[float], block: int) -> np.ndarray:
    """Largest-remainder integer quotas of ``block`` proportional to ``weights``."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * block
    q = np.floor(exact).astype(np.int64)
    rest = block - int(q.sum())
    if rest:
        q[np.argsort(-(exact - q), kind="stable")[:rest]] += 1
    return q


class Mixture:
    """Global index -> (stream k, position in stream k), exact quotas per block."""

    def __init__(self, q: np.ndarray, seed: int):
        self.q, self.seed, self.block = q, seed, int(q.sum())
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        got = self._blocks.get(b)
        if got is None:
            assign = np.random.default_rng([self.seed, 0x313, b]).permutation(np.repeat(np.arange(len(self.q)), self.q))
            rank = np.empty(self.block, dtype=np.int64)
            for k in range(len(self.q)):
                pos = np.flatnonzero(assign == k)
                rank[pos] = np.arange(len(pos))
            if len(self._blocks) >= 4:
                self._blocks.pop(next(iter(self._blocks)))
            got = self._blocks[b] = (assign, rank)
        return got

    def locate(self, g: int) -> tuple[int, int]:
        if len(self.q) == 1:
            return 0, g
        b, j = divmod(g, self.block)
        assign, rank = self._block(b)
        k = int(assign[j])
        return k, b * int(self.q[k]) + int(rank[j])


class TrainOrder:
    """Global training sample index -> (unit, sample) over a store's train units."""

    def __init__(self, store, cfg: DataConfig, seed: int):
        units = store.units("train")
        self.sources: list[int] = []
        self.streams: list[SourceStream] = []
        weights = []
        for s, src in enumerate(cfg.sources):
            if src.weight <= 0:
                continue
            ids = [u for u, (_, source, n) in enumerate(units) if source == s and n > 0]
            if not ids:
                if any(source == s for _, source, _ in units):  # training regions, but every window filtered out
                    print(f"glmtrain: warning: data.sources[{s}] ({src.path}): no training window passes the filters; "
                          "it is left out of the training mix", file=sys.stderr)
                continue  # held out entirely (e.g. a validation chromosome)
            self.sources.append(s)
            self.streams.append(SourceStream(ids, [units[u][2] for u in ids], seed, s, cfg.shuffle_shards, cfg.resample))
            weights.append(src.weight)
        if not self.streams:
            raise DataInputError("data: no training window survives the filters; lower data.window, raise "
                                 "data.max_n_fraction or check data.split")
        self.q = quotas(weights, cfg.mix_block) if len(weights) > 1 else np.array([cfg.mix_block])
        for k, s in enumerate(self.sources):
            if self.q[k] == 0:
                raise DataInputError(f"data.sources[{s}].weight={cfg.sources[s].weight} is too small for "
                                     f"data.mix_block={cfg.mix_block} (quota 0); raise data.mix_block")
        self.mixture = Mixture(self.q, seed)
        self._fp = {
            "store": store.digest,
            "train_units": hashlib.sha256(json.dumps(units).encode()).hexdigest()[:16],
            "seed": seed,
            "sources": self.sources,
            "quotas": self.q.tolist() if len(self.q) > 1 else [],
            "shuffle_shards": cfg.shuffle_shards,
            "resample": cfg.resample,
            "rc_prob": cfg.rc_prob,
        }

    def fingerprint(self) -> dict:
        return dict(self._fp)

    def source_total(self, k: int) -> int:
        return self.streams[k].total

    def locate(self, g: int) -> tuple[int, int]:
        k, n = self.mixture.locate(g)
        return self.streams[k].locate(n)


class WindowEncoder:
    """Bases of a window -> (token ids, loss weights) under the data policies, padded to a fixed length.

    The length is the tokens per sample (:func:`glmtrain.tokenizers.sample_tokens`): ``data.window_tokens``
    or what a clean window becomes.  Multi-base tokenizers turn a window into a variable number of tokens
    (N and leftovers are single-base k-mer tokens; BPE tokens vary): longer encodings are cut at the
    length (class/separator tokens kept), shorter ones padded with the pad id, which carries no loss and,
    through ``attention_mask`` (= ids != pad), no attention.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer):
        from glmtrain.tokenizers import sample_tokens

        self.cfg, self.tok = cfg, tokenizer
        self.per_base = tokenizer.name in ("char", "byte")
        if cfg.softmask == "weight" and not self.per_base:
            raise DataInputError(f"data.softmask=weight needs a one-token-per-base tokenizer; {tokenizer.name} is not (use upper)")
        self.length = sample_tokens(tokenizer, cfg.window, cfg.window_tokens)
        # BPE without a token budget: samples are padded to the worst case here and each batch is trimmed
        # to its longest sample by the loader's collate (trim_padding)
        self.trim = tokenizer.variable_length and cfg.window_tokens == 0
        self._acgt_ids = None
        self._upper = np.arange(256, dtype=np.uint8)
        self._upper[ord("a") : ord("z") + 1] -= 32
        self._lower = np.zeros(256, dtype=bool)
        self._lower[ord("a") : ord("z") + 1] = True
        self._acgt_bytes = np.zeros(256, dtype=bool)
        self._acgt_bytes[list(b"ACGTacgt")] = True

    def _acgt(self) -> np.ndarray:
        if self._acgt_ids is None:  # built lazily: a BPE vocabulary is read on first use
            acgt = np.zeros(self.tok.vocab_size, dtype=bool)
            acgt[self.tok.acgt_ids] = True
            self._acgt_ids = acgt
        return self._acgt_ids

    def __call__(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mode = self.cfg.softmask
        lower = self._lower[raw] if mode == "weight" else None
        if mode != "keep":
            raw = self._upper[raw]
        ids, n_body = self.tok.encode_window(raw.tobytes().decode("latin-1"), self.length)
        head = int(self.tok.add_cls)
        w = np.zeros(len(ids), dtype=np.float32)  # class / separator tokens carry no loss
        if self.per_base:
            wb = self._acgt_bytes[raw[:n_body]].astype(np.float32)  # N / ambiguous bases carry no loss
            if lower is not None:
                wb[lower[:n_body]] *= self.cfg.softmask_weight
            w[head : head + n_body] = wb
        else:
            w[head : head + n_body] = self._acgt()[ids[head : head + n_body]]
        out_ids = np.full(self.length, self.tok.pad_id, dtype=np.int64)
        out_w = np.zeros(self.length, dtype=np.float32)
        n = min(len(ids), self.length)
        out_ids[:n], out_w[:n] = ids[:n], w[:n]
        return out_ids, out_w

    def blank(self) -> tuple[np.ndarray, np.ndarray]:
        return np.full(self.length, self.tok.pad_id, dtype=np.int64), np.zeros(self.length, dtype=np.float32)


def trim_padding(batch: dict, pad_id: int, multiple: int = 8) -> dict:
    """Drop the trailing columns that are padding in every sample (kept to a multiple of ``multiple``)."""
    mask = batch["attention_mask"]
    longest = int(mask.sum(-1).max()) if mask.numel() else 0
    keep = min(mask.shape[1], max(multiple, -(-longest // multiple) * multiple))
    for key in ("input_ids", "loss_weight", "attention_mask"):
        batch[key] = batch[key][:, :keep].contiguous()
    return batch


class TrimCollate:
    """DataLoader collate: default collation, then :func:`trim_padding` (picklable for worker processes)."""

    def __init__(self, pad_id: int, multiple: int = 8):
        self.pad_id, self.multiple = pad_id, multiple

    def __call__(self, samples: list[dict]) -> dict:
        from torch.utils.data import default_collate

        return trim_padding(default_collate(samples), self.pad_id, self.multiple)


def make_sample(store, encoder: WindowEncoder, split: str, u: int, i: int, index: int, flip: bool) -> dict:
    got = store.read(split, u, i)
    if got is None:  # corrupt and skipped (data.on_corrupt=skip): a zero-weight sample keeps the batch shape
        ids, w = encoder.blank()
        key = f"corrupt:{store.units(split)[u][0]}#{i}/{split}"
    else:
        raw, rec, start, end, strand = got
        if flip:
            raw = COMP[raw[::-1]]
            strand = "+" if strand == "-" else "-"
        species, name = store.record(rec)
        try:
            ids, w = encoder(raw)
        except TokenizerError as e:
            raise DataInputError(f"{species}/{name}:{start}-{end}: {e}") from None
        key = f"{species}/{name}:{start}-{end}({strand})/{split}"
    return {"input_ids": torch.from_numpy(ids), "loss_weight": torch.from_numpy(w),
            "attention_mask": torch.from_numpy(ids != encoder.tok.pad_id), "index": index, "key": key}


class TrainSamples(Dataset):
    """Map-style: global sample index -> training sample (endless; no __len__ is meaningful)."""

    def __init__(self, store, order: TrainOrder, encoder: WindowEncoder, seed: int, rc_prob: float):
        self.store, self.order, self.encoder, self.seed, self.rc_prob = store, order, encoder, seed, rc_prob

    def __getitem__(self, g: int) -> dict:
        u, i = self.order.locate(g)
        flip = self.rc_prob > 0 and hash_uniform(self.seed, 1, g) < self.rc_prob
        return make_sample(self.store, self.encoder, "train", u, i, g, flip)


def eval_rows(store, split: str, limit: int) -> np.ndarray:
    """[k, 2] (unit, sample) of a split's samples in store order, evenly subsampled to ``limit`` (0 = all)."""
    counts = np.array([n for _, _, n in store.units(split)], dtype=np.int64)
    cum = np.concatenate(([0], np.cumsum(counts)))
    total = int(cum[-1])
    if limit > 0 and total > limit:
        pos = np.linspace(0, total - 1, limit).round().astype(np.int64)
    else:
        pos = np.arange(total, dtype=np.int64)
    u = np.searchsorted(cum, pos, side="right") - 1
    return np.stack([u, pos - cum[u]], axis=1).reshape(-1, 2)


class EvalSamples(Dataset):
    def __init__(self, store, encoder: WindowEncoder, split: str, rows: np.ndarray):
        self.store, self.encoder, self.split, self.rows = store, encoder, split, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int) -> dict:
        u, i = self.rows[j]
        return make_sample(self.store, self.encoder, self.split, int(u), int(i), int(j), False)


class ResumableBatchSampler(Sampler[list[int]]):
    """Endless micro-batches of global sample indices for one rank, starting after ``consumed``."""

    def __init__(self, micro_batch: int, rank: int, world: int, consumed: int, saved: str = ""):
        if consumed % (micro_batch * world):
            raise DataInputError(
                f"cannot resume the data stream exactly at sample {consumed} with {world} rank(s) x micro-batch "
                f"{micro_batch}: it is not a multiple of {micro_batch * world}{saved}; resume with a world size and "
                "micro-batch whose product divides it (e.g. the checkpoint's own)"
            )
        self.micro, self.rank, self.world, self.consumed = micro_batch, rank, world, consumed

    def __iter__(self) -> Iterator[list[int]]:
        g = self.consumed
        while True:
            base = g + self.rank * self.micro
            yield list(range(base, base + self.micro))
            g += self.micro * self.world
