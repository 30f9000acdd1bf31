import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from glmtrain.tokenizers import (ByteTokenizer, CharTokenizer, KmerTokenizer, TokenizerError, build_tokenizer,
                                 reverse_complement)


def test_char_hyenadna_layout():
    t = CharTokenizer()
    assert t.encode("ACGTN").tolist() == [7, 8, 9, 10, 11]
    assert (t.cls_id, t.sep_id, t.bos_id, t.mask_id, t.pad_id, t.unk_id) == (0, 1, 2, 3, 4, 6)
    assert t.vocab_size == 16
    assert set(t.special_ids) == {0, 1, 2, 3, 4, 5, 6} | set(range(12, 16))
    assert t.nucleotide_ids.tolist() == [7, 8, 9, 10]


def test_char_lowercase_and_iupac_policies():
    assert CharTokenizer().encode("acgtR").tolist() == [7, 8, 9, 10, 11]  # fold to upper, IUPAC -> N
    keep = CharTokenizer(lowercase="keep", iupac="keep")
    ids = keep.encode("ACGTNacgtnRYry")
    assert len(set(ids.tolist())) == 14 and keep.decode(ids) == "ACGTNacgtnRYry"
    with pytest.raises(TokenizerError, match="offset 2"):
        CharTokenizer(lowercase="error").encode("ACgT")
    with pytest.raises(TokenizerError, match="'R'"):
        CharTokenizer(iupac="error").encode("ACRT")
    with pytest.raises(TokenizerError, match="'!'"):
        CharTokenizer().encode("AC!T")
    assert CharTokenizer(unknown="unk").encode("A!").tolist() == [7, 6]
    with pytest.raises(ValueError, match="allowed values"):
        CharTokenizer(lowercase="maybe")


def test_kmer_matches_published_nucleotide_transformer_ids():
    t = KmerTokenizer(k=6, pad_to_multiple=1)
    ids = t.encode("ATTCCGATTCCGATTCCAACGGATNATTCC")
    assert ids.tolist() == [367, 367, 364, 757, 4104, 4100, 4101, 4101, 4102, 4102]
    assert t.vocab_size == 4107 and (t.pad_id, t.mask_id, t.cls_id) == (1, 2, 3)
    assert t.bases_per_id[367] == 6 and t.bases_per_id[4104] == 1


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ACGTN", max_size=300), st.integers(1, 7))
def test_kmer_roundtrip(seq, k):
    t = KmerTokenizer(k=k)
    ids = t.encode(seq)
    assert t.decode(ids) == seq
    assert t.bases_per_id[ids].sum() == len(seq)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ACGTNacgtn", max_size=300))
def test_char_roundtrip(seq):
    assert CharTokenizer().decode(CharTokenizer().encode(seq)) == seq.upper()
    keep = CharTokenizer(lowercase="keep")
    assert keep.decode(keep.encode(seq)) == seq


def test_byte_evo2_layout():
    t = ByteTokenizer()
    assert t.vocab_size == 512 and t.eos_id == 0 and t.pad_id == 1
    assert t.encode("ACGT").tolist() == [65, 67, 71, 84]
    assert t.decode(t.encode("ACGTNacgt")) == "ACGTNacgt"


def test_build_and_batch():
    t = build_tokenizer({"kind": "kmer", "k": 3})
    batch = t.encode_batch(["ACGTAC", "ACG"], length=4)
    assert batch.shape == (2, 4) and batch[1, 1] == t.pad_id
    with pytest.raises(ValueError, match="allowed values are char, kmer, kmer_overlap, bpe, byte"):
        build_tokenizer({"kind": "wordpiece"})


def test_reverse_complement():
    assert reverse_complement("ACGTNacgtR") == "YacgtNACGT"


def test_one_special_token_mechanism_for_every_tokenizer():
    """The released HyenaDNA convention ([CLS] ... [SEP], anything but ACGTN -> [UNK]) is the general
    add_cls/add_sep of every tokenizer: encode() gives the bases' tokens, encode_window() wraps them;
    a config still naming the old add_cls_sep key is refused in one line rather than ignored."""
    hyena = build_tokenizer({"kind": "char", "add_cls": True, "add_sep": True, "lowercase": "unk", "iupac": "unk"})
    assert hyena.encode("ACgR").tolist() == [7, 8, 6, 6]
    assert hyena.encode_window("ACgR")[0].tolist() == [0, 7, 8, 6, 6, 1] and hyena.max_tokens(4) == 6
    nt = build_tokenizer({"kind": "kmer", "k": 2, "add_cls": True})
    assert nt.encode_window("ACGT")[0].tolist() == [nt.cls_id, *nt.encode("ACGT").tolist()]
    with pytest.raises(ValueError, match=r"unknown key\(s\) add_cls_sep") as e:
        build_tokenizer({"kind": "char", "add_cls_sep": True})
    assert "\n" not in str(e.value)
