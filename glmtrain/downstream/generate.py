"""``python -m glmtrain task=generate``: sample DNA from a causal model, write FASTA + statistics.

Sampling (:func:`glmtrain.inference.generate`): temperature, top-k, top-p, a seed, plain A/C/G/T
only, with cached decoding (KV cache, FIR / modal-filter states, the Hyena long-convolution
history) unless ``task.cached=false``.  Statistics (``<out>.stats.json``): GC content per sample
and overall, and the Jensen-Shannon distance between the k-mer spectrum of the samples and that
of the training data (the ``data`` group's train split, the data the model was trained on by
default) -- beside the same distance for held-out real sequence (the valid split) and for
i.i.d. sequence with the training base composition, which bracket what "close" means.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from glmtrain.downstream.run import claim_run_dir, releases_run_dir
from glmtrain.tokenizers import Tokenizer

_CODE = np.full(256, 4, dtype=np.int64)
for _i, _b in enumerate(b"ACGT"):
    _CODE[_b] = _i
    _CODE[_b + 32] = _i  # lowercase


def kmer_spectrum(seqs: list[bytes | str | np.ndarray], k: int) -> np.ndarray:
    """Counts of the 4**k k-mers over A/C/G/T (k-mers with any other character are skipped)."""
    counts = np.zeros(4**k, dtype=np.int64)
    weights = 4 ** np.arange(k - 1, -1, -1, dtype=np.int64)
    for s in seqs:
        raw = np.frombuffer(s.encode() if isinstance(s, str) else bytes(s), dtype=np.uint8)
        c = _CODE[raw]
        if len(c) < k:
            continue
        win = np.lib.stride_tricks.sliding_window_view(c, k)
        ok = (win < 4).all(1)
        np.add.at(counts, win[ok] @ weights, 1)
    return counts


def js_distance(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """Jensen-Shannon distance (sqrt of the divergence, base 2: 0 = identical, 1 = disjoint)."""
    p = p_counts / max(p_counts.sum(), 1)
    q = q_counts / max(q_counts.sum(), 1)
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return float(np.sqrt(max(0.0, 0.5 * kl(p) + 0.5 * kl(q))))


def gc_content(seq: str) -> float:
    s = seq.upper()
    acgt = sum(s.count(b) for b in "ACGT")
    return (s.count("G") + s.count("C")) / acgt if acgt else float("nan")


def sequence_stats(samples: list[str], train: list, valid: list, k: int, seed: int = 0) -> dict:
    """GC content and k-mer spectrum distances (see the module docstring)."""
    ref = kmer_spectrum(train, k)
    gen = kmer_spectrum(samples, k)
    base = kmer_spectrum(train, 1).astype(np.float64)  # A C G T
    total = sum(len(s) for s in samples)
    out = {"k": k, "samples": len(samples), "bases": total,
           "gc_per_sample": [round(gc_content(s), 4) for s in samples],
           "gc": round(gc_content("".join(samples)), 4),
           "train_gc": round(float(base[1:3].sum() / max(base.sum(), 1)), 4),
           "kmer_js_distance_to_train": round(js_distance(gen, ref), 4)}
    # bracket: real held-out sequence and order-0 random sequence of the same total length
    if valid:
        joined = b"".join(bytes(v) for v in valid)[:total]
        out["kmer_js_distance_valid_to_train"] = round(js_distance(kmer_spectrum([joined], k), ref), 4)
    rng = np.random.default_rng(seed)
    iid = "".join(np.array(list("ACGT"))[rng.choice(4, size=total, p=base / base.sum())])
    out["kmer_js_distance_iid_to_train"] = round(js_distance(kmer_spectrum([iid], k), ref), 4)
    return out


def sample_sequences(model, tok: Tokenizer, prompt: str, num: int, length: int, temperature: float, top_k: int,
                     top_p: float, seed: int, batch_size: int, cached: bool) -> tuple[list[str], float]:
    """``num`` continuations of ``prompt`` (new bases only) and the decoding speed (new tokens/s)."""
    from glmtrain.inference import generate

    device = next(model.parameters()).device
    ids = torch.as_tensor(tok.encode(prompt), dtype=torch.long, device=device)[None]
    g = torch.Generator(device=device).manual_seed(seed)
    out, t, n_new = [], 0.0, 0
    for b0 in range(0, num, batch_size):
        b = min(batch_size, num - b0)
        t0 = time.perf_counter()
        got = generate(model, ids.repeat(b, 1), length, temperature=temperature, top_k=top_k, top_p=top_p,
                       allowed_ids=tok.nucleotide_ids.tolist(), generator=g, cached=cached)
        t += time.perf_counter() - t0
        n_new += b * length
        out += [tok.decode(row[ids.shape[1]:].tolist()) for row in got]
    return out, n_new / max(t, 1e-9)


def write_fasta(path: Path, samples: list[str], header: str) -> None:
    from glmtrain.atomic import atomic_write

    with atomic_write(path) as f:
        for i, s in enumerate(samples):
            lines = [s[j:j + 80] for j in range(0, len(s), 80)] or [""]
            f.write((f">sample_{i} {header} gc={gc_content(s):.3f}\n" + "\n".join(lines) + "\n").encode())


@releases_run_dir
def run_generate(run) -> dict:
    from glmtrain.data.fasta import DataInputError
    from glmtrain.data.genome import GenomeDataModule
    from glmtrain.downstream.pretrained import load_model

    task = run.task
    model, tok, pre = load_model(run)
    if not getattr(model, "causal", True):
        raise DataInputError(f"task=generate needs a causal model; {pre.model_cfg.name} is a bidirectional encoder")
    from glmtrain.inference import supports_cache

    if task.cached and not supports_cache(model):
        raise DataInputError(f"task.cached=true: {pre.model_cfg.name} has blocks without a decoding cache "
                             "(glmtrain/models/decode.py); use task.cached=false")
    samples, tok_s = sample_sequences(model, tok, task.prompt, task.num_samples, task.length, task.temperature,
                                      task.top_k, task.top_p, task.seed, task.batch_size, task.cached)
    data = GenomeDataModule(run.data, tok, 1, run.seed)
    train = data.sequences("train", task.stats_max_bases)
    valid = data.sequences("valid", task.stats_max_bases)
    stats = sequence_stats(samples, train, valid, task.stats_k, task.seed)
    stats.update({"init_from": pre.source, "prompt": task.prompt, "temperature": task.temperature, "top_k": task.top_k,
                  "top_p": task.top_p, "seed": task.seed, "cached": task.cached, "new_tokens_per_s": round(tok_s, 1),
                  "reference_data": run.data.name})
    run_dir = Path(run.run_dir)
    claim_run_dir(run_dir)
    out = Path(task.out) if task.out else run_dir / "samples.fa"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_fasta(out, samples, f"model={pre.model_cfg.name} T={task.temperature} top_k={task.top_k} "
                              f"top_p={task.top_p} seed={task.seed}")
    Path(str(out) + ".stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(f"glmtrain: {len(samples)} samples x {task.length} bases -> {out} ({tok_s:.0f} tokens/s, "
          f"{'cached' if task.cached else 'full recomputation'}); GC {stats['gc']:.3f} (train {stats['train_gc']:.3f}); "
          f"{task.stats_k}-mer JS distance to train {stats['kmer_js_distance_to_train']:.4f} "
          f"(held-out real {stats.get('kmer_js_distance_valid_to_train', float('nan')):.4f}, "
          f"i.i.d. {stats['kmer_js_distance_iid_to_train']:.4f})", flush=True)
    return stats
