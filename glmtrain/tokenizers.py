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
  HyenaDNA tokenizer's conventions are options: ``add_cls_sep`` ([CLS] first, [SEP] last)
  and ``lowercase: unk`` / ``iupac: unk`` / ``unknown: unk`` (anything but A C G T N -> [UNK]).
* ``kmer``  -- Nucleotide Transformer v2 non-overlapping k-mers: ``<unk>0 <pad>1
  <mask>2 <cls>3``, then 4**k k-mers over the alphabet ``ATCG``, then single
  ``A T C G N``, then ``<eos> <bos>`` (4,107 ids for k=6).  Runs containing a
  non-ACGT base and leftovers shorter than k become single-base tokens.
* ``byte``  -- Evo 2 byte tokenizer: id = byte value, vocabulary 512, end of
  document 0, pad 1.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
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

    kind: str = "char"  # char | kmer | byte
    k: int = 6  # kmer only
    lowercase: str = "upper"  # upper: fold to uppercase | keep: own tokens | error | unk (char: [UNK])
    iupac: str = "N"  # N: ambiguous codes become N | keep: own tokens | error | unk (char: [UNK])
    unknown: str = "error"  # any other character: error | unk
    pad_to_multiple: int = 8  # vocabulary padded for efficient embeddings
    add_cls_sep: bool = False  # char only: [CLS] before and [SEP] after every sequence (released HyenaDNA)


class Tokenizer(ABC):
    """Common interface. Ids are ``np.int64`` arrays; batches are 2-D arrays."""

    name: str
    vocab_size: int  # padded size the embedding must have
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
    n_prefix: int = 0  # special tokens encode() puts before / after the bases of a sequence
    n_suffix: int = 0

    @abstractmethod
    def encode(self, seq: str) -> np.ndarray: ...

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
        """Number of tokens a sequence of ``seq_len`` unambiguous bases becomes."""
        return seq_len + self.n_prefix + self.n_suffix


def _padded(n: int, multiple: int) -> int:
    return n if multiple <= 1 else -(-n // multiple) * multiple


def _describe_bad(seq: str, bad: np.ndarray) -> str:
    pos = int(np.flatnonzero(bad)[0])
    return f"character {seq[pos]!r} at offset {pos}"


class CharTokenizer(Tokenizer):
    """Single-nucleotide tokenizer in the HyenaDNA/Caduceus id layout."""

    SPECIALS = ("[CLS]", "[SEP]", "[BOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]")

    def __init__(self, lowercase: str = "upper", iupac: str = "N", unknown: str = "error", pad_to_multiple: int = 8,
                 add_cls_sep: bool = False):
        for key, value, allowed in (
            ("lowercase", lowercase, ("upper", "keep", "error", "unk")),
            ("iupac", iupac, ("N", "keep", "error", "unk")),
            ("unknown", unknown, ("error", "unk")),
        ):
            if value not in allowed:
                raise ValueError(f"model.tokenizer.{key}={value!r}: allowed values are {', '.join(allowed)}")
        self.name = "char"
        self.lowercase, self.iupac, self.unknown = lowercase, iupac, unknown
        self.add_cls_sep = add_cls_sep
        self.n_prefix = self.n_suffix = int(add_cls_sep)
        tokens = list(self.SPECIALS) + list("ACGTN")
        if iupac == "keep":
            tokens += list(IUPAC_AMBIGUOUS)
        if lowercase == "keep":
            tokens += [t.lower() for t in tokens[len(self.SPECIALS):]]
        self.tokens = tokens
        self.vocab_size = _padded(len(tokens), pad_to_multiple)
        ids = {t: i for i, t in enumerate(tokens)}
        self.cls_id, self.eos_id, self.bos_id, self.mask_id = 0, 1, 2, 3
        self.sep_id = 1
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
        if self.add_cls_sep:
            ids = np.concatenate(([self.cls_id], ids, [self.sep_id]))
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

    def __init__(self, k: int = 6, lowercase: str = "upper", iupac: str = "N", unknown: str = "error", pad_to_multiple: int = 1):
        if not 1 <= k <= 8:
            raise ValueError(f"model.tokenizer.k={k}: allowed values are 1..8")
        if lowercase not in ("upper", "error"):
            raise ValueError(f"model.tokenizer.lowercase={lowercase!r}: the kmer tokenizer allows upper, error")
        if iupac not in ("N", "error"):
            raise ValueError(f"model.tokenizer.iupac={iupac!r}: the kmer tokenizer allows N, error")
        self.name, self.k = "kmer", k
        self.lowercase, self.iupac, self.unknown = lowercase, iupac, unknown
        self.unk_id, self.pad_id, self.mask_id, self.cls_id = 0, 1, 2, 3
        n_kmers = 4**k
        self.single_offset = 4 + n_kmers
        self.eos_id = self.single_offset + 5
        self.bos_id = self.eos_id + 1
        n_tokens = self.bos_id + 1
        self.vocab_size = _padded(n_tokens, pad_to_multiple)
        self.special_ids = frozenset({0, 1, 2, 3, self.eos_id, self.bos_id}) | frozenset(range(n_tokens, self.vocab_size))
        self.nucleotide_ids = np.arange(4, self.single_offset + 4, dtype=np.int64)  # k-mers and single A,T,C,G
        self.acgt_ids = self.nucleotide_ids
        self.bases_per_id = np.zeros(self.vocab_size, dtype=np.float32)
        self.bases_per_id[4 : 4 + n_kmers] = k
        self.bases_per_id[self.single_offset : self.single_offset + 5] = 1
        code = np.full(256, -1, dtype=np.int64)  # base -> 0..3 ATCG, 4 = N, -1 = reject, -2 = unknown
        code[:] = -2
        for i, b in enumerate(self.ALPHABET):
            code[ord(b)] = i
            code[ord(b.lower())] = i if lowercase == "upper" else -1
        for b in "N" + IUPAC_AMBIGUOUS:
            code[ord(b)] = 4 if iupac == "N" else -1
            code[ord(b.lower())] = (4 if iupac == "N" else -1) if lowercase == "upper" else -1
        if unknown == "unk":
            code[code == -2] = 5  # 5 = <unk>
        self._code = code
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


class ByteTokenizer(Tokenizer):
    """Evo 2's byte-level tokenizer: id = byte, vocab 512, EOD 0, pad 1."""

    def __init__(self, lowercase: str = "keep", **_: object):
        self.name = "byte"
        self.vocab_size = 512
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


def build_tokenizer(cfg: TokenizerConfig | dict | None) -> Tokenizer:
    cfg = dict(cfg or {})
    kind = cfg.pop("kind", "char")
    if kind != "char" and cfg.pop("add_cls_sep", False):
        raise ValueError(f"model.tokenizer.add_cls_sep=true: only the char tokenizer adds [CLS]/[SEP] (kind={kind})")
    if kind == "char":
        cfg.pop("k", None)
        return CharTokenizer(**cfg)
    if kind == "kmer":
        cfg.setdefault("pad_to_multiple", 1)
        return KmerTokenizer(**cfg)
    if kind == "byte":
        return ByteTokenizer(lowercase=cfg.get("lowercase", "keep"))
    raise ValueError(f"model.tokenizer.kind={kind!r}: allowed values are char, kmer, byte")


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
