"""``python -m glmtrain task=score``: zero-shot variant-effect scores from a VCF and a reference FASTA.

For every ALT allele of every VCF record, a window of ``task.window`` reference bases centred on
the variant is cut from the FASTA (pyfaidx) and scored:

* ``llr`` (causal models): ``log P(alt window) - log P(ref window)``, the summed next-token
  log-likelihoods (natural log) of the two full windows -- substitutions and indels alike;
* ``masked_marginal`` (MLM encoders, Meier et al. 2021): the token holding the variant is masked
  in the reference window and ``log p(alt token) - log p(ref token)`` is read at that position
  (single-base substitutions; for k-mer tokenizers the k-mer containing the base).

Negative scores mean the model finds the alternative allele less likely.  Every VCF line that
cannot be scored -- unparseable, an unknown chromosome, a position past its end, REF that does not
match the reference, a symbolic or missing ALT, a variant the method cannot score -- is reported
with its line number and reason (stderr and ``<out>.rejected.tsv``) and counted in the summary;
nothing is dropped silently.  ``task.strict=true`` stops at the first such line instead.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from glmtrain.downstream.run import claim_run_dir, releases_run_dir
from glmtrain.data.fasta import DataInputError, open_fasta
from glmtrain.tokenizers import Tokenizer, TokenizerError

_BASES = re.compile(r"^[ACGTN]+$")
PRINT_LIMIT = 20  # rejected lines echoed on stderr (all of them go to the .rejected.tsv)


@dataclass
class Variant:
    line: int
    chrom: str
    pos: int  # 1-based, as in the VCF
    vid: str
    ref: str
    alt: str


@dataclass
class Rejected:
    line: int
    reason: str
    text: str


def _open_text(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace") if gz else \
        open(path, encoding="utf-8", errors="replace")


def parse_vcf(path: str | Path) -> Iterator[Variant | Rejected]:
    """Variants (one per ALT allele) and rejected lines, in file order; header lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise DataInputError(f"task.vcf={path}: no such file")
    try:
        with _open_text(p) as f:
            for n, raw in enumerate(f, start=1):
                line = raw.rstrip("\r\n")
                if not line.strip() or line.startswith("#"):
                    continue
                cols = line.split("\t")
                if len(cols) < 5:
                    yield Rejected(n, f"{len(cols)} tab-separated columns, a VCF record needs at least 5 (CHROM POS ID REF ALT)", line)
                    continue
                chrom, pos_s, vid, ref, alts = cols[0], cols[1], cols[2], cols[3].upper(), cols[4].upper()
                try:
                    pos = int(pos_s)
                except ValueError:
                    yield Rejected(n, f"POS {pos_s!r} is not an integer", line)
                    continue
                if pos < 1:
                    yield Rejected(n, f"POS {pos} is not a 1-based position", line)
                    continue
                if not _BASES.match(ref):
                    yield Rejected(n, f"REF {cols[3]!r} is not a run of A/C/G/T/N", line)
                    continue
                for alt in alts.split(","):
                    if not _BASES.match(alt):
                        yield Rejected(n, f"ALT {alt!r} is symbolic or missing (only explicit A/C/G/T/N alleles can be scored)", line)
                    elif alt == ref:
                        yield Rejected(n, f"ALT {alt!r} equals REF", line)
                    else:
                        yield Variant(n, chrom, pos, vid, ref, alt)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataInputError(f"task.vcf={path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:100]})") from None


@dataclass
class Windowed:
    v: Variant
    start: int  # 0-based start of the window on the chromosome
    ref_seq: str
    alt_seq: str
    offset: int  # index of the variant's first base in the window


def cut_window(v: Variant, fa, window: int) -> Windowed | str:
    """The reference and alternative windows around ``v``, or the reason it cannot be scored."""
    if v.chrom not in fa:
        return f"chromosome {v.chrom!r} is not in the reference FASTA"
    length = len(fa[v.chrom])
    p0, r = v.pos - 1, len(v.ref)
    if p0 + r > length:
        return f"{v.chrom}:{v.pos} with REF of {r} bases runs past the end of {v.chrom} ({length} bases)"
    found = str(fa[v.chrom][p0:p0 + r]).upper()
    if found != v.ref:
        return f"REF {v.ref!r} does not match the reference {found!r} at {v.chrom}:{v.pos}"
    left = max(0, p0 - window // 2)
    right = min(length, max(p0 + r, left + window))
    seq = str(fa[v.chrom][left:right]).upper()
    o = p0 - left
    return Windowed(v, left, seq, seq[:o] + v.alt + seq[o + r:], o)


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def llr_scores(model, tok: Tokenizer, items: list[Windowed], batch_size: int, device) -> list[tuple[float, float, float]]:
    """(score, log P(ref window), log P(alt window)) per item."""
    from glmtrain.inference import score_sequences

    seqs = [s for w in items for s in (w.ref_seq, w.alt_seq)]
    scored = score_sequences(model, tok, seqs, batch_size=batch_size, device=device)
    out = []
    for i in range(len(items)):
        ref, alt = scored[2 * i]["log_likelihood"], scored[2 * i + 1]["log_likelihood"]
        out.append((alt - ref, ref, alt))
    return out


def masked_marginal_inputs(tok: Tokenizer, w: Windowed) -> tuple[np.ndarray, int, int, int] | str:
    """(masked reference ids, position, ref id, alt id) or the reason this variant cannot be scored."""
    if len(w.v.ref) != 1 or len(w.v.alt) != 1:
        return "masked-marginal scoring needs a single-base substitution (indels need a causal model: task.method=llr)"
    ref_ids, alt_ids = tok.encode(w.ref_seq), tok.encode(w.alt_seq)
    diff = np.flatnonzero(ref_ids != alt_ids) if len(ref_ids) == len(alt_ids) else None
    if diff is None or len(diff) != 1:
        return "the substitution changes more than one token of the window; masked-marginal needs exactly one"
    i = int(diff[0])
    masked = ref_ids.copy()
    masked[i] = tok.mask_id
    return masked, i, int(ref_ids[i]), int(alt_ids[i])


@torch.no_grad()
def masked_marginal_scores(model, inputs: list[tuple[np.ndarray, int, int, int]], batch_size: int, device) -> list[float]:
    order = sorted(range(len(inputs)), key=lambda j: len(inputs[j][0]))
    out = [0.0] * len(inputs)
    was = model.training
    model.eval()
    try:
        i = 0
        while i < len(order):  # batches of equal length (no padding in an encoder)
            n = len(inputs[order[i]][0])
            group = [j for j in order[i:i + batch_size] if len(inputs[j][0]) == n]
            ids = torch.as_tensor(np.stack([inputs[j][0] for j in group]), device=device)
            logp = torch.log_softmax(model(ids).float(), -1)
            for row, j in enumerate(group):
                _, pos, r, a = inputs[j]
                out[j] = float(logp[row, pos, a] - logp[row, pos, r])
            i += len(group)
    finally:
        model.train(was)
    return out


def score_vcf(model, tok: Tokenizer, vcf: str | Path, fasta: str | Path, out: str | Path, window: int = 512,
              method: str = "auto", batch_size: int = 16, strict: bool = False, say=print) -> dict:
    """Score every variant of ``vcf``; write ``out`` (TSV) and ``<out>.rejected.tsv``; return the summary."""
    causal = getattr(model, "causal", True)
    if method == "auto":
        method = "llr" if causal else "masked_marginal"
    if method == "llr" and not causal:
        raise DataInputError("task.method=llr needs a causal model; this one is a bidirectional encoder (use masked_marginal)")
    if method == "masked_marginal" and (causal or tok.mask_id is None):
        raise DataInputError("task.method=masked_marginal needs an MLM encoder with a [MASK] token; use llr for causal models")
    device = next(model.parameters()).device
    fa = open_fasta(str(fasta), what="task.fasta")
    t0 = time.perf_counter()
    rejected: list[Rejected] = []

    def reject(r: Rejected) -> None:
        if strict:
            raise DataInputError(f"task.vcf={vcf} line {r.line}: {r.reason} (task.strict=true)")
        if len(rejected) < PRINT_LIMIT:
            print(f"glmtrain: warning: task.vcf line {r.line}: {r.reason}; not scored", file=sys.stderr, flush=True)
        rejected.append(r)

    items: list[Windowed] = []
    mm_inputs: list = []
    try:
        for rec in parse_vcf(vcf):
            if isinstance(rec, Rejected):
                reject(rec)
                continue
            w = cut_window(rec, fa, window)
            if isinstance(w, str):
                reject(Rejected(rec.line, w, f"{rec.chrom}\t{rec.pos}\t{rec.vid}\t{rec.ref}\t{rec.alt}"))
                continue
            if method == "masked_marginal":
                try:
                    got = masked_marginal_inputs(tok, w)
                except TokenizerError as e:
                    got = str(e)
                if isinstance(got, str):
                    reject(Rejected(rec.line, got, f"{rec.chrom}\t{rec.pos}\t{rec.vid}\t{rec.ref}\t{rec.alt}"))
                    continue
                mm_inputs.append(got)
            items.append(w)
    finally:
        fa.close()
    if method == "llr":
        scores = llr_scores(model, tok, items, batch_size, device)
    else:
        scores = [(s, float("nan"), float("nan")) for s in masked_marginal_scores(model, mm_inputs, batch_size, device)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        f.write("line\tchrom\tpos\tid\tref\talt\tmethod\tscore\tll_ref\tll_alt\twindow_start\twindow_end\n")
        for w, (s, lr, la) in zip(items, scores):
            v = w.v
            f.write(f"{v.line}\t{v.chrom}\t{v.pos}\t{v.vid}\t{v.ref}\t{v.alt}\t{method}\t{s:.6f}\t{lr:.6f}\t{la:.6f}\t"
                    f"{w.start}\t{w.start + len(w.ref_seq)}\n")
    rej_path = Path(str(out) + ".rejected.tsv")
    with open(rej_path, "w") as f:
        f.write("line\treason\trecord\n")
        for r in rejected:
            f.write(f"{r.line}\t{r.reason}\t{r.text[:200]}\n")
    seconds = time.perf_counter() - t0
    summary = {"scored": len(items), "rejected": len(rejected), "rejected_lines": sorted({r.line for r in rejected}),
               "method": method, "window": window, "out": str(out), "rejected_out": str(rej_path),
               "seconds": round(seconds, 3), "variants_per_s": round(len(items) / max(seconds, 1e-9), 2)}
    more = f" ({len(rejected) - PRINT_LIMIT} more not echoed)" if len(rejected) > PRINT_LIMIT else ""
    say(f"glmtrain: scored {len(items)} variants ({method}, window {window}) -> {out}; "
        f"{len(rejected)} VCF lines not scored{more} -> {rej_path}")
    return summary


@releases_run_dir
def run_score(run) -> dict:
    from glmtrain.downstream.pretrained import load_model

    task = run.task
    model, tok, pre = load_model(run)
    run_dir = Path(run.run_dir)
    claim_run_dir(run_dir)
    out = Path(task.out) if task.out else run_dir / "scores.tsv"
    summary = score_vcf(model, tok, task.vcf, task.fasta, out, task.window, task.method, task.batch_size, task.strict)
    summary["init_from"] = pre.source
    (run_dir / "score_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
