"""Tokenizers: one interface, vectorised with numpy lookup tables.

Every tokenizer maps a DNA string to integer ids and back, and knows

* which ids are special (never selected for MLM, never a random replacement),
* which ids are nucleotide tokens (the pool for MLM's random 10 %),
* how many bases each id stands for (``bases_per_id``), so that any objective
  can report bits per *base* whatever the tokenization.

Built-in layouts follow the published models so checkpoints line up:

* ``char``  -- HyenaDNA / Caduceus character ids ``[CLS]0 [SEP]1 [BOS]2 [MASK]3
  [PAD]4 [RESERVED]5 [UNK]6 A7 C8 G9 T10 N11``, padded to a multiple of 8 (16).
  Optional extra tokens for lowercase (soft-masked) bases and IUPAC codes.  The released
  HyenaDNA tokenizer's conventions are options: ``add_cls`` + ``add_sep`` ([CLS] first, [SEP]
  last) and ``lowercase: unk`` / ``iupac: unk`` / ``unknown: unk`` (anything but A C G T N -> [UNK]).
* ``kmer``  -- Nucleotide Transformer v2 non-overlapping k-mers: ``<unk>0 <pad>1
  <mask>2 <cls>3``, then 4**k k-mers over the alphabet ``ATCG``, then single
  ``A T C G N``, then ``<eos> <bos>`` (4,107 ids for k=6).  Runs containing a
  non-ACGT base and leftovers shorter than k become single-base tokens.
* ``kmer_overlap`` -- DNABERT overlapping k-mers: ``[PAD]0 [UNK]1 [CLS]2 [SEP]3
  [MASK]4`` then the 4**k k-mers in lexicographic ``ACGT`` order; L bases give
  L-k+1 tokens, each new token adding one base (``bases_per_id`` 1); a k-mer
  holding N is ``[UNK]``.  MLM masks contiguous spans of k tokens
  (``mlm_span``) so that a masked base cannot be read from its neighbours.
* ``bpe``   -- DNABERT-2 style byte-pair encoding trained with HF ``tokenizers``
  (:func:`train_bpe`, ``python -m glmtrain.tokenizers train-bpe``): ``[UNK]0
  [CLS]1 [SEP]2 [PAD]3 [MASK]4``, then the alphabet ``ACGTN`` and the merges
  (4,096 ids by default).  The vocabulary file lives with the run
  (``<run_dir>/tokenizer.json``) or at ``model.tokenizer.path``.
* ``byte``  -- Evo 2 byte tokenizer: id = byte value, vocabulary 512, end of
  document 0, pad 1.

Two sizes are kept apart: ``n_tokens`` is the tokenizer's vocabulary (the ids it
can emit: 4,107 for NT's 6-mers, 12 for the HyenaDNA characters) and
``vocab_size`` the embedding's row count, ``n_tokens`` padded to a multiple of
``model.tokenizer.pad_to_multiple`` (default 8: 4,112 and 16) so that the
embedding and LM-head matmuls have friendly shapes.  The extra rows are special
(never an input, never a label).  Exports to Hugging Face write ``n_tokens`` rows.

``add_cls`` / ``add_sep`` wrap every window as the published tokenizers do
(NT prepends ``<cls>``; DNABERT / DNABERT-2 write ``[CLS] ... [SEP]``):
:meth:`Tokenizer.encode_window` returns the wrapped ids, cut to a token budget.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

IUPAC_AMBIGUOUS = "RYKMSWBDHV"
IUPAC_ALL = "ACGTN" + IUPAC_AMBIGUOUS
_COMPLEMENT = str.maketrans("ACGTNRYKMSWBDHVacgtnrykmswbdhv", "TGCANYRMKSWVHDBtgcanyrmkswvhdb")


def reverse_complement(seq: str) -> str:
    """Reverse complement, IUPAC-aware and case-preserving."""
    return seq.translate(_COMPLEMENT)[::-1]


class TokenizerError(ValueError):
    """A sequence holds a character the tokenizer is configured to reject."""


@dataclass
class TokenizerConfig:
    """Hydra schema of ``model.tokenizer``."""

    kind: str = "char"  # char | kmer | kmer_overlap | bpe | byte
    k: int = 6  # kmer, kmer_overlap
    lowercase: str = "upper"  # upper: fold to uppercase | keep: own tokens | error | unk (char only: [UNK])
    iupac: str = "N"  # N: ambiguous codes become N | keep: own tokens | error | unk (char only: [UNK])
    unknown: str = "error"  # any other character: error | unk
    pad_to_multiple: int = 8  # embedding rows = the vocabulary padded to this multiple (1 = unpadded)
    add_cls: bool = False  # prepend the class token to every window (NT: <cls>; DNABERT(-2): [CLS])
    add_sep: bool = False  # append the separator token (DNABERT, DNABERT-2: [SEP])
    vocab_size: int = 4096  # bpe: vocabulary trained (specials included)
    train_bases: int = 4_000_000  # bpe: bases of evenly spaced training windows the vocabulary is trained on
    path: str = ""  # bpe: tokenizer.json to use ("" = <run_dir>/tokenizer.json, trained on the run's data if absent)


class Tokenizer(ABC):
    """Common interface. Ids are ``np.int64`` arrays; batches are 2-D arrays."""

    name: str
    n_tokens: int  # the vocabulary: ids this tokenizer emits
    vocab_size: int  # embedding rows: n_tokens padded to a multiple of pad_to_multiple
    pad_id: int
    mask_id: int | None
    unk_id: int | None
    bos_id: int | None
    eos_id: int | None
    cls_id: int | None
    special_ids: frozenset[int]
    nucleotide_ids: np.ndarray  # ids usable as MLM random replacements (A, C, G, T)
    bases_per_id: np.ndarray  # float32 [vocab_size]; 0 for specials and padding ids
    acgt_ids: np.ndarray  # ids whose label counts in bits/base (unambiguous bases)

    add_cls: bool = False
    add_sep: bool = False
    mlm_span: int = 1  # MLM masks spans of this many consecutive tokens (overlapping k-mers: k)
    variable_length: bool = False  # True: tokens per window vary with the content (BPE)

    @abstractmethod
    def encode(self, seq: str) -> np.ndarray: ...

    @property
    def n_wrap(self) -> int:
        """Special tokens :meth:`encode_window` adds around the bases."""
        return int(self.add_cls) + int(self.add_sep)

    def encode_window(self, seq: str, max_tokens: int = 0) -> tuple[np.ndarray, int]:
        """(ids with the class/separator tokens, number of body tokens); the body is cut so that the
        whole fits ``max_tokens`` (0 = no limit)."""
        body = self.encode(seq)
        if max_tokens:
            body = body[: max(0, max_tokens - self.n_wrap)]
        parts = ([np.array([self.cls_id], dtype=np.int64)] if self.add_cls else []) + [body]
        if self.add_sep:
            parts.append(np.array([self.sep_id], dtype=np.int64))
        return np.concatenate(parts).astype(np.int64), len(body)

    def max_tokens(self, n_bases: int) -> int:
        """Tokens :meth:`encode_window` gives for ``n_bases`` unambiguous bases (BPE: at most)."""
        return self.n_wrap + self.token_length(n_bases)

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    def encode_batch(self, seqs: Sequence[str], length: int | None = None) -> np.ndarray:
        """Encode and right-pad (or truncate) to ``length`` (default: the longest)."""
        encoded = [self.encode(s) for s in seqs]
        length = length or max(len(e) for e in encoded)
        out = np.full((len(seqs), length), self.pad_id, dtype=np.int64)
        for i, e in enumerate(encoded):
            n = min(len(e), length)
            out[i, :n] = e[:n]
        return out

    def special_mask(self, ids: np.ndarray) -> np.ndarray:
        lut = np.zeros(self.vocab_size, dtype=bool)
        lut[list(self.special_ids)] = True
        return lut[ids]

    def token_length(self, seq_len: int) -> int:
        """Number of tokens :meth:`encode` makes of ``seq_len`` unambiguous bases (without the
        class/separator tokens: :meth:`max_tokens` counts those)."""
        return seq_len

    def _check_specials(self) -> None:
        for what, tid in (("add_cls", self.cls_id if self.add_cls else 0), ("add_sep", self.sep_id if self.add_sep else 0)):
            if tid is None:
                raise ValueError(f"model.tokenizer.{what}=true: the {self.name} tokenizer has no such token")


def _padded(n: int, multiple: int) -> int:
    return n if multiple <= 1 else -(-n // multiple) * multiple


def _check_policies(kind: str, k: int | None, k_range: tuple[int, int] | None, lowercase: str, iupac: str) -> None:
    """The multi-base tokenizers fold lowercase or refuse it, and map ambiguous codes to N or refuse them."""
    if k_range is not None and not k_range[0] <= k <= k_range[1]:
        raise ValueError(f"model.tokenizer.k={k}: allowed values are {k_range[0]}..{k_range[1]} for {kind}")
    if lowercase not in ("upper", "error"):
        raise ValueError(f"model.tokenizer.lowercase={lowercase!r}: the {kind} tokenizer allows upper, error")
    if iupac not in ("N", "error"):
        raise ValueError(f"model.tokenizer.iupac={iupac!r}: the {kind} tokenizer allows N, error")


def _base_codes(alphabet: str, lowercase: str, iupac: str, unknown: int) -> np.ndarray:
    """byte -> 0..3 (``alphabet`` order), 4 for N and ambiguous codes (iupac=N), -1 rejected, ``unknown`` else."""
    code = np.full(256, unknown, dtype=np.int64)
    for i, b in enumerate(alphabet):
        code[ord(b)] = i
        code[ord(b.lower())] = i if lowercase == "upper" else -1
    for b in "N" + IUPAC_AMBIGUOUS:
        code[ord(b)] = 4 if iupac == "N" else -1
        code[ord(b.lower())] = (4 if iupac == "N" else -1) if lowercase == "upper" else -1
    return code


def _describe_bad(seq: str, bad: np.ndarray) -> str:
    pos = int(np.flatnonzero(bad)[0])
    return f"character {seq[pos]!r} at offset {pos}"


class CharTokenizer(Tokenizer):
    """Single-nucleotide tokenizer in the HyenaDNA/Caduceus id layout."""

    SPECIALS = ("[CLS]", "[SEP]", "[BOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]")

    def __init__(self, lowercase: str = "upper", iupac: str = "N", unknown: str = "error", pad_to_multiple: int = 8,
                 add_cls: bool = False, add_sep: bool = False):
        for key, value, allowed in (
            ("lowercase", lowercase, ("upper", "keep", "error", "unk")),
            ("iupac", iupac, ("N", "keep", "error", "unk")),
            ("unknown", unknown, ("error", "unk")),
        ):
            if value not in allowed:
                raise ValueError(f"model.tokenizer.{key}={value!r}: allowed values are {', '.join(allowed)}")
        self.name = "char"
        self.lowercase, self.iupac, self.unknown = lowercase, iupac, unknown
        tokens = list(self.SPECIALS) + list("ACGTN")
        if iupac == "keep":
            tokens += list(IUPAC_AMBIGUOUS)
        if lowercase == "keep":
            tokens += [t.lower() for t in tokens[len(self.SPECIALS):]]
        self.tokens = tokens
        self.n_tokens = len(tokens)
        self.vocab_size = _padded(len(tokens), pad_to_multiple)
        ids = {t: i for i, t in enumerate(tokens)}
        self.cls_id, self.eos_id, self.bos_id, self.mask_id = 0, 1, 2, 3
        self.sep_id = 1
        self.add_cls, self.add_sep = add_cls, add_sep
        self.pad_id, self.unk_id = 4, 6
        self.special_ids = frozenset(range(len(self.SPECIALS))) | frozenset(range(len(tokens), self.vocab_size))
        self.nucleotide_ids = np.array([ids[b] for b in "ACGT"], dtype=np.int64)
        acgt = [ids[b] for b in "ACGT"] + ([ids[b] for b in "acgt"] if lowercase == "keep" else [])
        self.acgt_ids = np.array(acgt, dtype=np.int64)
        self.bases_per_id = np.zeros(self.vocab_size, dtype=np.float32)
        self.bases_per_id[len(self.SPECIALS):len(tokens)] = 1.0
        # byte -> id lookup; -1 = reject, -2 = unknown (map per policy)
        lut = np.full(256, -2, dtype=np.int64)
        for t, i in ids.items():
            if len(t) == 1:
                lut[ord(t)] = i
        for b in IUPAC_ALL:
            up, low = ord(b), ord(b.lower())
            if lut[up] == -2:  # ambiguous code without its own token
                lut[up] = {"N": ids["N"], "unk": self.unk_id}.get(iupac, -1)
            if lut[low] == -2:
                if lowercase == "unk":
                    lut[low] = self.unk_id
                elif lowercase == "upper":
                    lut[low] = lut[up]
                elif lowercase == "error":
                    lut[low] = -1
                else:  # keep, but ambiguous lowercase code without own token
                    lut[low] = {"N": ids["n"], "unk": self.unk_id}.get(iupac, -1)
        if unknown == "unk":
            lut[lut == -2] = self.unk_id
        self._lut = lut
        self._id_to_char = np.array([t if len(t) == 1 else "?" for t in tokens] + ["?"] * (self.vocab_size - len(tokens)))

    def encode(self, seq: str) -> np.ndarray:
        raw = np.frombuffer(seq.encode("latin-1", errors="replace"), dtype=np.uint8)
        ids = self._lut[raw]
        if (ids < 0).any():
            raise TokenizerError(
                f"{_describe_bad(seq, ids < 0)} is not allowed by the char tokenizer "
                f"(lowercase={self.lowercase}, iupac={self.iupac}, unknown={self.unknown}); "
                "change model.tokenizer.* or clean the input"
            )
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        out = []
        for i in ids.tolist():
            t = self.tokens[i] if i < len(self.tokens) else "[RESERVED]"
            out.append(t if len(t) == 1 else "")
        return "".join(out)


class KmerTokenizer(Tokenizer):
    """Non-overlapping k-mers in the Nucleotide Transformer v2 layout."""

    ALPHABET = "ATCG"

    def __init__(self, k: int = 6, lowercase: str = "upper", iupac: str = "N", unknown: str = "error", pad_to_multiple: int = 8,
                 add_cls: bool = False, add_sep: bool = False):
        _check_policies("kmer", k, (1, 8), lowercase, iupac)
        self.name, self.k = "kmer", k
        self.lowercase, self.iupac, self.unknown = lowercase, iupac, unknown
        self.unk_id, self.pad_id, self.mask_id, self.cls_id = 0, 1, 2, 3
        n_kmers = 4**k
        self.single_offset = 4 + n_kmers
        self.eos_id = self.single_offset + 5
        self.bos_id = self.eos_id + 1
        self.sep_id = self.eos_id
        self.add_cls, self.add_sep = add_cls, add_sep
        n_tokens = self.n_tokens = self.bos_id + 1
        self.vocab_size = _padded(n_tokens, pad_to_multiple)
        self.special_ids = frozenset({0, 1, 2, 3, self.eos_id, self.bos_id}) | frozenset(range(n_tokens, self.vocab_size))
        self.nucleotide_ids = np.arange(4, self.single_offset + 4, dtype=np.int64)  # k-mers and single A,T,C,G
        self.acgt_ids = self.nucleotide_ids
        self.bases_per_id = np.zeros(self.vocab_size, dtype=np.float32)
        self.bases_per_id[4 : 4 + n_kmers] = k
        self.bases_per_id[self.single_offset : self.single_offset + 5] = 1
        # base -> 0..3 ATCG, 4 = N, -1 = reject, 5 = <unk> (unknown=unk) else -1
        self._code = _base_codes(self.ALPHABET, lowercase, iupac, 5 if unknown == "unk" else -1)
        self._vocab = ["<unk>", "<pad>", "<mask>", "<cls>"]
        self._vocab += ["".join(self.ALPHABET[(i // 4 ** (k - 1 - j)) % 4] for j in range(k)) for i in range(n_kmers)]
        self._vocab += list("ATCGN") + ["<eos>", "<bos>"]

    def token_length(self, seq_len: int) -> int:
        return seq_len // self.k + seq_len % self.k

    def encode(self, seq: str) -> np.ndarray:
        raw = np.frombuffer(seq.encode("latin-1", errors="replace"), dtype=np.uint8)
        c = self._code[raw]
        if (c < 0).any():
            raise TokenizerError(
                f"{_describe_bad(seq, c < 0)} is not allowed by the kmer tokenizer "
                f"(lowercase={self.lowercase}, iupac={self.iupac}, unknown={self.unknown}); "
                "change model.tokenizer.* or clean the input"
            )
        k = self.k
        out: list[np.ndarray] = []
        # Split into runs of unambiguous bases; everything else is a single token.
        ambiguous = c >= 4
        bounds = np.flatnonzero(np.diff(np.concatenate(([1], ambiguous.view(np.int8), [1]))) != 0)
        pos = 0
        for start, stop in zip(bounds[::2], bounds[1::2]):
            for s in range(pos, start):  # ambiguous singles before this run
                out.append(np.array([self._single(c[s])]))
            run = c[start:stop]
            n_full = len(run) // k
            if n_full:
                chunks = run[: n_full * k].reshape(n_full, k)
                weights = 4 ** np.arange(k - 1, -1, -1, dtype=np.int64)
                out.append(4 + chunks @ weights)
            rest = run[n_full * k :]
            if len(rest):
                out.append(self.single_offset + rest)
            pos = stop
        for s in range(pos, len(c)):
            out.append(np.array([self._single(c[s])]))
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)

    def _single(self, code: int) -> int:
        return self.unk_id if code == 5 else self.single_offset + int(code)

    def decode(self, ids: Iterable[int]) -> str:
        parts = []
        for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).tolist():
            if 4 <= i < self.single_offset + 5:
                parts.append(self._vocab[i])
        return "".join(parts)

    def id_to_token(self, i: int) -> str:
        return self._vocab[i]

    def vocab(self) -> list[str]:
        """The n_tokens token strings in id order (the vocab.txt of NT's Hugging Face tokenizer)."""
        return list(self._vocab)


class OverlapKmerTokenizer(Tokenizer):
    """DNABERT's overlapping k-mers: one token per position, each adding one base to the previous one."""

    ALPHABET = "ACGT"
    SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

    def __init__(self, k: int = 6, lowercase: str = "upper", iupac: str = "N", unknown: str = "error", pad_to_multiple: int = 8,
                 add_cls: bool = False, add_sep: bool = False):
        _check_policies("kmer_overlap", k, (2, 8), lowercase, iupac)
        self.name, self.k = "kmer_overlap", k
        self.lowercase, self.iupac, self.unknown = lowercase, iupac, unknown
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = 0, 1, 2, 3, 4
        self.bos_id, self.eos_id = None, self.sep_id
        self.add_cls, self.add_sep = add_cls, add_sep
        self.mlm_span = k
        n_kmers = 4**k
        self.n_tokens = len(self.SPECIALS) + n_kmers
        self.vocab_size = _padded(self.n_tokens, pad_to_multiple)
        self.special_ids = frozenset(range(len(self.SPECIALS))) | frozenset(range(self.n_tokens, self.vocab_size))
        self.nucleotide_ids = np.arange(len(self.SPECIALS), self.n_tokens, dtype=np.int64)
        self.acgt_ids = self.nucleotide_ids
        self.bases_per_id = np.zeros(self.vocab_size, dtype=np.float32)
        self.bases_per_id[len(self.SPECIALS) : self.n_tokens] = 1.0  # each token adds one new base
        # 0..3 ACGT, 4 ambiguous or unknown (-> [UNK] k-mers), -1 reject
        self._code = _base_codes(self.ALPHABET, lowercase, iupac, 4 if unknown == "unk" else -1)

    def token_length(self, seq_len: int) -> int:
        return max(0, seq_len - self.k + 1)

    def encode(self, seq: str) -> np.ndarray:
        raw = np.frombuffer(seq.encode("latin-1", errors="replace"), dtype=np.uint8)
        c = self._code[raw]
        if (c < 0).any():
            raise TokenizerError(f"{_describe_bad(seq, c < 0)} is not allowed by the kmer_overlap tokenizer "
                                 f"(lowercase={self.lowercase}, iupac={self.iupac}, unknown={self.unknown}); "
                                 "change model.tokenizer.* or clean the input")
        n = len(c) - self.k + 1
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        windows = np.lib.stride_tricks.sliding_window_view(c, self.k)
        ids = len(self.SPECIALS) + windows @ (4 ** np.arange(self.k - 1, -1, -1, dtype=np.int64))
        ids[(windows == 4).any(-1)] = self.unk_id
        return ids.astype(np.int64)

    def kmer(self, i: int) -> str:
        j = i - len(self.SPECIALS)
        return "".join(self.ALPHABET[(j // 4 ** (self.k - 1 - p)) % 4] for p in range(self.k))

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).tolist():
            if len(self.SPECIALS) <= i < self.n_tokens:
                out.append(self.kmer(i) if not out else self.kmer(i)[-1])
        return "".join(out)

    def vocab(self) -> list[str]:
        return list(self.SPECIALS) + [self.kmer(i) for i in range(len(self.SPECIALS), self.n_tokens)]


class BpeTokenizer(Tokenizer):
    """Byte-pair encoding over DNA in the DNABERT-2 layout, backed by a HF ``tokenizers`` JSON file.

    The special ids are fixed (``[UNK]0 [CLS]1 [SEP]2 [PAD]3 [MASK]4``) and the embedding rows follow
    ``model.tokenizer.vocab_size`` (padded), so a run can be validated and planned before its vocabulary
    exists; everything else is read from the file on first use.
    """

    SPECIALS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
    variable_length = True

    def __init__(self, path: str | None = None, vocab_size: int = 4096, pad_to_multiple: int = 8, add_cls: bool = False,
                 add_sep: bool = False, lowercase: str = "upper", iupac: str = "N", unknown: str = "error", **_: object):
        if vocab_size < 16:
            raise ValueError(f"model.tokenizer.vocab_size={vocab_size}: must be >= 16 for bpe")
        _check_policies("bpe", None, None, lowercase, iupac)
        self.name = "bpe"
        self.path = path
        self.target_vocab = vocab_size
        self.vocab_size = _padded(vocab_size, pad_to_multiple)
        self.unk_id, self.cls_id, self.sep_id, self.pad_id, self.mask_id = 0, 1, 2, 3, 4
        self.bos_id, self.eos_id = None, self.sep_id
        self.add_cls, self.add_sep = add_cls, add_sep
        self.lowercase, self.iupac, self.unknown = lowercase, iupac, unknown
        code = np.full(256, 0, dtype=np.uint8)  # 0 = reject
        for b in "ACGTN":
            code[ord(b)] = ord(b)
            code[ord(b.lower())] = ord(b) if lowercase == "upper" else 0
        for b in IUPAC_AMBIGUOUS:
            code[ord(b)] = ord("N") if iupac == "N" else 0
            code[ord(b.lower())] = (ord("N") if iupac == "N" else 0) if lowercase == "upper" else 0
        if unknown == "unk":
            code[code == 0] = ord("N")
        self._code = code
        self._tk = None

    def _load(self):
        if self._tk is None:
            import os

            from tokenizers import Tokenizer as HFTokenizer

            # windows are encoded one at a time (in DataLoader workers): no thread pool that a fork could break
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

            if not self.path or not Path(self.path).is_file():
                raise TokenizerError(f"no BPE vocabulary at {self.path or '(no path)'}: train one with `python -m glmtrain.tokenizers "
                                     "train-bpe data=<name> out=<file>` and set model.tokenizer.path, or let a training run "
                                     "train it into its run_dir")
            tk = HFTokenizer.from_file(str(self.path))
            vocab = tk.get_vocab()
            for i, t in enumerate(self.SPECIALS):
                if vocab.get(t) != i:
                    raise TokenizerError(f"{self.path}: not a glmtrain/DNABERT-2 BPE vocabulary ({t} is not id {i})")
            n = tk.get_vocab_size()
            if n > self.vocab_size:
                raise TokenizerError(f"{self.path}: {n} tokens do not fit model.tokenizer.vocab_size={self.target_vocab}")
            self.n_tokens_, self._tk = n, tk
            strings = [""] * n
            for t, i in vocab.items():
                strings[i] = t
            self._strings = strings
            bases = np.zeros(self.vocab_size, dtype=np.float32)
            clean = np.zeros(self.vocab_size, dtype=bool)
            for i, t in enumerate(strings):
                if i >= len(self.SPECIALS):
                    bases[i] = len(t)
                    clean[i] = bool(t) and set(t) <= set("ACGT")
            self._bases, self._clean = bases, clean
        return self._tk

    @property
    def n_tokens(self) -> int:
        self._load()
        return self.n_tokens_

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(range(len(self.SPECIALS))) | frozenset(range(self.n_tokens, self.vocab_size))

    @property
    def nucleotide_ids(self) -> np.ndarray:  # MLM random replacements: any base-only token
        self._load()
        return np.flatnonzero(self._clean).astype(np.int64)

    @property
    def acgt_ids(self) -> np.ndarray:
        return self.nucleotide_ids

    @property
    def bases_per_id(self) -> np.ndarray:
        self._load()
        return self._bases

    def encode(self, seq: str) -> np.ndarray:
        raw = np.frombuffer(seq.encode("latin-1", errors="replace"), dtype=np.uint8)
        c = self._code[raw]
        if (c == 0).any():
            raise TokenizerError(f"{_describe_bad(seq, c == 0)} is not allowed by the bpe tokenizer "
                                 f"(lowercase={self.lowercase}, iupac={self.iupac}, unknown={self.unknown}); "
                                 "change model.tokenizer.* or clean the input")
        if not len(c):
            return np.zeros(0, dtype=np.int64)
        # no post-processing: a vocabulary file exported with [CLS]/[SEP] templates (glmtrain.convert) adds none here
        return np.asarray(self._load().encode(c.tobytes().decode("ascii"), add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        self._load()
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).tolist()
        return "".join(self._strings[i] for i in arr if len(self.SPECIALS) <= i < self.n_tokens_)

    def vocab(self) -> list[str]:
        self._load()
        return list(self._strings)


def train_bpe(sequences: Iterable[str], vocab_size: int = 4096, out: str | None = None, min_frequency: int = 2):
    """Train a DNA BPE vocabulary (DNABERT-2 layout) with HF ``tokenizers``; save it to ``out`` if given.

    ``sequences``: uppercase DNA strings (windows of the training split); any character outside ACGT
    becomes N first.  Returns the ``tokenizers.Tokenizer``.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, trainers

    table = bytes(c if chr(c) in "ACGTN" else ord("N") for c in range(256))
    tk = HFTokenizer(models.BPE(unk_token="[UNK]"))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(BpeTokenizer.SPECIALS),
                                  initial_alphabet=list("ACGTN"), show_progress=False)
    tk.train_from_iterator((s.upper().encode("latin-1").translate(table).decode("ascii") for s in sequences), trainer)
    if out:
        from pathlib import Path

        from glmtrain.atomic import atomic_write

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(out) as f:
            f.write(tk.to_str().encode())
    return tk


class ByteTokenizer(Tokenizer):
    """Evo 2's byte-level tokenizer: id = byte, vocab 512, EOD 0, pad 1."""

    def __init__(self, lowercase: str = "keep", **_: object):
        self.name = "byte"
        self.n_tokens = self.vocab_size = 512
        self.eos_id, self.pad_id = 0, 1
        self.mask_id = self.unk_id = self.bos_id = self.cls_id = None
        self.lowercase = lowercase
        self.special_ids = frozenset({0, 1}) | frozenset(range(256, 512))
        self.nucleotide_ids = np.array([ord(b) for b in "ACGT"], dtype=np.int64)
        acgt = "ACGTacgt" if lowercase == "keep" else "ACGT"
        self.acgt_ids = np.array([ord(b) for b in acgt], dtype=np.int64)
        self.bases_per_id = np.zeros(512, dtype=np.float32)
        self.bases_per_id[2:256] = 1.0

    def encode(self, seq: str) -> np.ndarray:
        if self.lowercase == "upper":
            seq = seq.upper()
        return np.frombuffer(seq.encode("latin-1", errors="replace"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        return bytes(int(i) for i in arr.tolist() if 2 <= i < 256).decode("latin-1")


KINDS = ("char", "kmer", "kmer_overlap", "bpe", "byte")


def build_tokenizer(cfg: TokenizerConfig | dict | None, run_dir: str | None = None) -> Tokenizer:
    """The tokenizer of ``model.tokenizer`` -- the one path every run, test and tool takes.

    Missing keys take the :class:`TokenizerConfig` defaults.  ``bpe``: the vocabulary file is
    ``cfg.path`` or ``<run_dir>/tokenizer.json`` (read on first use).
    """
    import dataclasses

    if cfg is None:
        cfg = {}
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    full = dataclasses.asdict(TokenizerConfig())
    extra = sorted(set(cfg) - set(full))
    if extra:  # e.g. a tokenizer config written before add_cls_sep became add_cls + add_sep
        raise ValueError(f"model.tokenizer: unknown key(s) {', '.join(extra)} (allowed: {', '.join(full)})")
    full.update(dict(cfg))
    kind = full.pop("kind")
    common = {key: full[key] for key in ("lowercase", "iupac", "unknown", "pad_to_multiple", "add_cls", "add_sep")}
    if kind == "char":
        tok = CharTokenizer(**common)
    elif kind == "kmer":
        tok = KmerTokenizer(k=full["k"], **common)
    elif kind == "kmer_overlap":
        tok = OverlapKmerTokenizer(k=full["k"], **common)
    elif kind == "bpe":
        path = full["path"] or (str(Path(run_dir) / "tokenizer.json") if run_dir else None)
        tok = BpeTokenizer(path=path, vocab_size=full["vocab_size"], **common)
    elif kind == "byte":
        if full["add_cls"] or full["add_sep"]:
            raise ValueError("model.tokenizer.add_cls/add_sep: the byte tokenizer has no class or separator token")
        return ByteTokenizer(lowercase=cfg.get("lowercase", "keep"))
    else:
        raise ValueError(f"model.tokenizer.kind={kind!r}: allowed values are {', '.join(KINDS)}")
    tok._check_specials()
    return tok


# ----------------------------------------------------------------------------- token-level complement
def complement_map(tok: Tokenizer) -> np.ndarray:
    """``comp[id]`` = id of the complementary token, for reverse-complement equivariant models and
    id-level RC augmentation: A<->T, C<->G (and a<->t, c<->g, IUPAC codes when they have their own
    tokens); N, specials and padding ids map to themselves.  The reverse complement of an id
    sequence is then ``comp[ids[::-1]]`` (:func:`reverse_complement_ids`).

    Only tokenizers whose tokens are single bases (char, byte) have one: a k-mer tokenizer is
    refused, because the non-overlapping k-mers of the reverse strand start at other offsets, so
    the reverse complement of a sequence is not a per-token map of its k-mer ids.
    """
    if isinstance(tok, CharTokenizer):
        ids = {t: i for i, t in enumerate(tok.tokens)}
        comp = np.arange(tok.vocab_size, dtype=np.int64)
        for t, i in ids.items():
            if len(t) == 1:
                comp[i] = ids[reverse_complement(t)]
        return comp
    if isinstance(tok, ByteTokenizer):
        comp = np.arange(tok.vocab_size, dtype=np.int64)
        for b in IUPAC_ALL + IUPAC_ALL.lower():
            comp[ord(b)] = ord(reverse_complement(b))
        return comp
    raise TokenizerError(
        f"the {tok.name} tokenizer has no token-level complement map (the reverse strand's k-mers start at other "
        "offsets, so reverse-complementing is not a per-token map); use model.tokenizer.kind=char for "
        "reverse-complement models"
    )


def reverse_complement_ids(tok: Tokenizer, ids: np.ndarray) -> np.ndarray:
    """Reverse complement of id sequences (last axis) through :func:`complement_map`."""
    return complement_map(tok)[np.asarray(ids)[..., ::-1]]


def sample_tokens(tok: Tokenizer, window: int, window_tokens: int = 0) -> int:
    """Token positions per training sample: ``data.window_tokens`` if set, else what a clean window of
    ``data.window`` bases becomes (class/separator tokens included; BPE: at most)."""
    return window_tokens if window_tokens > 0 else tok.max_tokens(window)


def training_windows(data_cfg, max_bases: int) -> Iterable[str]:
    """Evenly spaced windows of the training split (the shards a run trains on), as uppercase strings."""
    from glmtrain.data.genome import open_store
    from glmtrain.data.stream import eval_rows

    store = open_store(data_cfg, verbose=False)
    for u, i in eval_rows(store, "train", max(1, max_bases // data_cfg.window)):
        got = store.read("train", int(u), int(i))
        if got is not None:
            yield got[0].tobytes().decode("latin-1").upper()


def prepare_vocabulary(run, say=print) -> None:
    """A ``bpe`` run's vocabulary, before anything builds its tokenizer: ``<run_dir>/tokenizer.json`` is the
    run's own copy -- trained on the run's training split when the run starts without one, reused
    unchanged on every resume; ``model.tokenizer.path`` (if set) is copied there and must keep matching it."""
    t = run.model.tokenizer
    if t.kind != "bpe":
        return
    from glmtrain.data.fasta import DataInputError, resolve_path
    from glmtrain.data.shards import dir_lock

    run_dir = Path(run.run_dir)
    dest = run_dir / "tokenizer.json"
    run_dir.mkdir(parents=True, exist_ok=True)
    with dir_lock(run_dir / ".tokenizer"):  # one rank trains, the others wait and reuse
        if t.path:
            src = resolve_path(t.path)
            if not src.is_file():
                raise DataInputError(f"model.tokenizer.path={t.path}: no such file (a tokenizer.json from "
                                     "`python -m glmtrain.tokenizers train-bpe`)")
            if dest.exists():
                if dest.read_bytes() != src.read_bytes():
                    raise DataInputError(f"model.tokenizer.path={t.path} differs from the vocabulary this run started with "
                                         f"({dest}); use that file or a new run_dir")
            else:
                from glmtrain.atomic import atomic_write

                with atomic_write(dest) as f:
                    f.write(src.read_bytes())
            return
        if dest.exists():
            return
        say(f"training a BPE vocabulary ({t.vocab_size} ids) on {t.train_bases} bases of the training split -> {dest}")
        train_bpe(training_windows(run.data, t.train_bases), t.vocab_size, out=str(dest))


def main(argv: list[str] | None = None) -> int:
    """``python -m glmtrain.tokenizers train-bpe data=<name> out=<tokenizer.json> [vocab_size=4096]
    [train_bases=4000000] [data.<key>=<value> ...]``: train a DNABERT-2 style BPE vocabulary on the
    training split of a data config (the same shards a run with those overrides trains on)."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(main.__doc__)
        return 0
    if argv[0] != "train-bpe":
        print(f"glmtrain.tokenizers: error: unknown command {argv[0]!r} (commands: train-bpe)", file=sys.stderr)
        return 2
    out, vocab, bases, overrides = "", 4096, 4_000_000, []
    for a in argv[1:]:
        key, _, value = a.partition("=")
        if key == "out":
            out = value
        elif key == "vocab_size":
            vocab = int(value)
        elif key == "train_bases":
            bases = int(value)
        elif key.startswith(("data", "+data")):
            overrides.append(a)
        else:
            print(f"glmtrain.tokenizers: error: train-bpe takes data=, data.<key>=, out=, vocab_size=, train_bases= "
                  f"(not {a!r})", file=sys.stderr)
            return 2
    if not out:
        print("glmtrain.tokenizers: error: train-bpe needs out=<path of the tokenizer.json to write>", file=sys.stderr)
        return 2
    from hydra import compose, initialize_config_dir

    from glmtrain.cli import CONF_DIR
    from glmtrain.config import ConfigError, validate_data
    from glmtrain.data.fasta import DataInputError

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            data = validate_data(compose(config_name="config", overrides=overrides).data)
        tk = train_bpe(training_windows(data, bases), vocab, out=out)
    except (ConfigError, DataInputError, ValueError) as e:
        print(f"glmtrain.tokenizers: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {tk.get_vocab_size()} tokens trained on {bases} bases of data={data.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
