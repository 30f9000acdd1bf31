"""The published id layouts the long-convolution families rely on."""

from __future__ import annotations

import numpy as np

from glmtrain.tokenizers import build_tokenizer


def test_hyenadna_char_layout():
    tok = build_tokenizer({"kind": "char"})
    assert tok.vocab_size == 16
    specials = ["[CLS]", "[SEP]", "[BOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]"]
    assert tok.tokens[:7] == specials
    assert (tok.cls_id, tok.sep_id, tok.bos_id, tok.mask_id, tok.pad_id, tok.unk_id) == (0, 1, 2, 3, 4, 6)
    assert tok.encode("ACGTN").tolist() == [7, 8, 9, 10, 11]
    assert set(range(12, 16)) <= tok.special_ids
    assert tok.decode([7, 8, 9, 10, 11, 4]) == "ACGTN"


def test_evo2_byte_layout():
    tok = build_tokenizer({"kind": "byte", "lowercase": "keep"})
    assert tok.vocab_size == 512
    assert (tok.eos_id, tok.pad_id) == (0, 1)
    assert tok.encode("ACGTacgtN").tolist() == [65, 67, 71, 84, 97, 99, 103, 116, 78]
    assert np.array_equal(tok.nucleotide_ids, [65, 67, 71, 84])
    assert tok.decode([0, 1, 65, 99]) == "Ac"
