"""Issue 13, point 4: zero-shot variant-effect scoring on VCFs whose answers are known.

* an oracle causal model (hand-built: the next base continues the ACGT cycle with probability
  0.97) on a periodic reference: every log-likelihood ratio is known in closed form;
* an oracle MLM (the masked base continues its left neighbour's cycle): masked marginals known;
* a real tiny HyenaDNA / encoder: the scores equal a brute-force computation over both full windows;
* malformed lines, REF mismatches, unknown chromosomes, symbolic alleles: reported and counted.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch

from glmtrain.data.fasta import DataInputError
from glmtrain.downstream.vcf import score_vcf
from glmtrain.models.base import GenomicModel, ModelConfig
from glmtrain.tokenizers import build_tokenizer

from _downstream import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = build_tokenizer({"kind": "char"})
A, C, G, T = (int(i) for i in TOK.encode("ACGT"))
NEXT = {A: C, C: G, G: T, T: A}
P_HIT = 0.97  # probability of the cycle's next base; the other three bases share the rest
P_MISS = (1 - P_HIT) / 3


class CycleOracle(GenomicModel):
    """Causal (or, with ``causal=False``, masked) oracle of the ACGT cycle: the distribution at
    position t puts P_HIT on the successor of base t (causal) / of base t-1 (masked)."""

    def __init__(self, causal: bool = True):
        super().__init__(ModelConfig(family="oracle", name="cycle-oracle"), 16)
        self.causal = causal
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        src = ids if self.causal else torch.cat([ids[:, :1], ids[:, :-1]], 1)
        probs = torch.full((*ids.shape, 16), 1e-12)
        for b, n in NEXT.items():
            row = torch.full((16,), 1e-12)
            row[[A, C, G, T]] = P_MISS
            row[n] = P_HIT
            probs[src == b] = row
        return probs.log() + self.dummy


def write_case(tmp_path, records: list[str]):
    ref = ("ACGT" * 50)  # chr1: 200 bases of the cycle
    (tmp_path / "ref.fa").write_text(">chr1 periodic\n" + "\n".join(ref[i:i + 60] for i in range(0, len(ref), 60)) + "\n")
    header = "##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
    (tmp_path / "v.vcf").write_text(header + "\n".join(records) + "\n")
    return ref


def read_tsv(path):
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_llr_known_by_construction_and_bad_lines_counted(tmp_path, capsys):
    # POS 101 is an A (0-based 100); its neighbours T (99) and C (101)
    recs = [
        "chr1\t101\tsnv_break\tA\tC\t.\t.\t.",   # T->C and C->C both break the cycle: 2 misses replace 2 hits
        "chr1\t101\tmulti\tA\tG,T\t.\t.\t.",     # two ALT alleles: two scores
        "chr1\t103\tdel\tGT\tG\t.\t.\t.",        # deletion of T: ...G A... G->A misses, A->C hits; one base fewer
        "chr1\t101\tbad_ref\tG\tC\t.\t.\t.",     # REF does not match the reference (A)
        "chr1\tfoo\tbad_pos\tA\tC\t.\t.\t.",     # unparseable POS
        "chr2\t5\tno_chrom\tA\tC\t.\t.\t.",      # chromosome absent from the FASTA
        "chr1\t101\tsymbolic\tA\t<DEL>\t.\t.\t.",  # symbolic ALT
        "chr1\t101",                              # too few columns
        "chr1\t199\tend\tGTA\tG\t.\t.\t.",       # runs past the end of chr1
    ]
    write_case(tmp_path, recs)
    out = tmp_path / "scores.tsv"
    summary = score_vcf(CycleOracle(), TOK, tmp_path / "v.vcf", tmp_path / "ref.fa", out, window=40, batch_size=3)
    rows = {(r["id"], r["alt"]): float(r["score"]) for r in read_tsv(out)}
    hit, miss = math.log(P_HIT), math.log(P_MISS)
    assert rows[("snv_break", "C")] == pytest.approx(2 * (miss - hit), abs=1e-5)
    # A->G: T->G misses, G->C misses; A->T: T->T misses, T->C misses
    assert rows[("multi", "G")] == pytest.approx(2 * (miss - hit), abs=1e-5)
    assert rows[("multi", "T")] == pytest.approx(2 * (miss - hit), abs=1e-5)
    # deletion: the alt window lacks the T (1 hit fewer) and has G->A (a miss for a hit), same right flank
    assert rows[("del", "G")] == pytest.approx(miss - 2 * hit, abs=1e-5)
    assert summary["scored"] == 4 and summary["rejected"] == 6
    assert summary["rejected_lines"] == [6, 7, 8, 9, 10, 11]  # file lines (2 header lines first)
    rejected = {int(r["line"]): r["reason"] for r in read_tsv(str(out) + ".rejected.tsv")}
    assert "does not match the reference 'A'" in rejected[6] and "not an integer" in rejected[7]
    assert "'chr2' is not in the reference" in rejected[8] and "symbolic" in rejected[9]
    assert "at least 5" in rejected[10] and "past the end" in rejected[11]
    err = capsys.readouterr().err
    assert "task.vcf line 6: REF 'G' does not match" in err and err.count("not scored") == 6
    with pytest.raises(DataInputError, match="line 6: REF 'G' does not match"):
        score_vcf(CycleOracle(), TOK, tmp_path / "v.vcf", tmp_path / "ref.fa", out, window=40, strict=True)


def test_masked_marginal_known_by_construction(tmp_path):
    write_case(tmp_path, ["chr1\t101\tbreak\tA\tG\t.\t.\t.", "chr1\t102\tsecond\tC\tT\t.\t.\t.",
                          "chr1\t101\tindel\tA\tAC\t.\t.\t."])
    out = tmp_path / "mm.tsv"
    summary = score_vcf(CycleOracle(causal=False), TOK, tmp_path / "v.vcf", tmp_path / "ref.fa", out, window=30)
    rows = {r["id"]: float(r["score"]) for r in read_tsv(out)}
    # masked position sees its left neighbour (T before A, A before C): p(ref) = P_HIT, p(alt) = P_MISS
    assert rows["break"] == pytest.approx(math.log(P_MISS / P_HIT), abs=1e-5)
    assert rows["second"] == pytest.approx(math.log(P_MISS / P_HIT), abs=1e-5)
    assert summary["method"] == "masked_marginal" and summary["rejected"] == 1  # the indel, with its reason
    assert "single-base substitution" in read_tsv(str(out) + ".rejected.tsv")[0]["reason"]


@pytest.mark.parametrize("family", ["hyena", "encoder"])
def test_scores_equal_brute_force(tmp_path, family):
    """A real tiny model: LLR = LL(alt window) - LL(ref window), each summed token by token from one
    forward pass of the full window; masked marginal = log-softmax at the masked position."""
    model, tok = tiny(family)
    model = model.double().eval()
    ref = write_case(tmp_path, ["chr1\t50\ta\tC\tT\t.\t.\t.", "chr1\t3\tb\tG\tA\t.\t.\t.", "chr1\t120\tc\tT\tTGG\t.\t.\t."]
                     if family == "hyena" else ["chr1\t50\ta\tC\tT\t.\t.\t.", "chr1\t3\tb\tG\tA\t.\t.\t."])
    out = tmp_path / "s.tsv"
    score_vcf(model, tok, tmp_path / "v.vcf", tmp_path / "ref.fa", out, window=24, batch_size=2)
    for r in read_tsv(out):
        s, e, p0 = int(r["window_start"]), int(r["window_end"]), int(r["pos"]) - 1
        ref_seq = ref[s:e]
        alt_seq = ref[s:p0] + r["alt"] + ref[p0 + len(r["ref"]):e]
        if family == "hyena":
            @torch.no_grad()
            def ll(seq):
                ids = torch.as_tensor(tok.encode(seq))[None]
                logp = torch.log_softmax(model(ids)[0], -1)
                return sum(float(logp[t - 1, ids[0, t]]) for t in range(1, ids.shape[1]))
            assert float(r["score"]) == pytest.approx(ll(alt_seq) - ll(ref_seq), abs=1e-5)
        else:
            ids = torch.as_tensor(tok.encode(ref_seq))[None]
            ids[0, p0 - s] = tok.mask_id
            with torch.no_grad():
                logp = torch.log_softmax(model(ids)[0, p0 - s], -1)
            expect = float(logp[int(tok.encode(r["alt"])[0])] - logp[int(tok.encode(r["ref"])[0])])
            assert float(r["score"]) == pytest.approx(expect, abs=1e-5)
