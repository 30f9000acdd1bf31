"""Issue 13, point 5: generation. Cached decoding (KV cache, FIR and modal-filter states, the Hyena
long-convolution history) equals full recomputation; sampling knobs; FASTA + statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from glmtrain.downstream.generate import js_distance, kmer_spectrum, sequence_stats
from glmtrain.inference import _top_p, generate
from glmtrain.models.decode import DecodeError, decoding

from _downstream import fabricate_run, tiny
from _util import compose_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["hyena", "evo2", "transformer"])
def test_cached_decoding_equals_full_recomputation(family):
    model, tok = tiny(family)
    model = model.double().eval()  # fp64: any difference is a bug, not rounding
    rng = np.random.default_rng(0)
    ids = torch.as_tensor(tok.nucleotide_ids[rng.integers(0, 4, (2, 24))])
    with torch.no_grad():
        full = model(ids)
        with decoding(model, 2, 24):  # a prompt of 9, then one token at a time, then a chunk of 3
            parts = [model(ids[:, :9])] + [model(ids[:, t:t + 1]) for t in range(9, 21)] + [model(ids[:, 21:])]
    assert torch.allclose(torch.cat(parts, 1), full, rtol=0, atol=1e-9)
    m = model.float()
    greedy = [generate(m, ids[:, :5], 16, temperature=0.0, cached=c) for c in (True, False)]
    assert torch.equal(greedy[0], greedy[1])
    sampled = [generate(m, ids[:, :5], 16, temperature=1.0, top_k=3, top_p=0.9, cached=c,
                        generator=torch.Generator().manual_seed(3)) for c in (True, False)]
    assert torch.equal(sampled[0], sampled[1])


def test_decoding_refusals():
    enc, _ = tiny("encoder")
    with pytest.raises(DecodeError, match="not causal"):
        with decoding(enc, 1, 8):
            pass
    model, tok = tiny("hyena")
    with pytest.raises(DecodeError, match="past the cache length"):
        with torch.no_grad(), decoding(model.eval(), 1, 4):
            model(torch.as_tensor(tok.encode("ACGTA"))[None])
    assert all(b.mixer.decode_state is None for b in model.blocks)  # states removed on exit


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: torch.isfinite(_top_p(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.79) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(1.0) == [True] * 4


def test_statistics_against_hand_counts():
    counts = kmer_spectrum(["ACGTNAC", "acg"], 2)  # AC CG GT (TN NA skipped) AC ; ac cg
    expect = np.zeros(16, dtype=int)
    for km in ("AC", "CG", "GT", "AC", "AC", "CG"):
        expect["ACGT".index(km[0]) * 4 + "ACGT".index(km[1])] += 1
    assert counts.tolist() == expect.tolist()
    assert js_distance(counts, counts * 3) == 0.0
    assert js_distance(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1.0)
    st = sequence_stats(["GGCC", "AATT"], [b"ACGT" * 100], [b"ACGT" * 10], k=2)
    assert st["gc_per_sample"] == [1.0, 0.0] and st["gc"] == 0.5 and st["train_gc"] == 0.5
    st = sequence_stats(["ACGT" * 25 + "A"], [b"ACGT" * 100], [b"TTTT" * 100], k=2)
    assert st["kmer_js_distance_to_train"] < 0.01 < 0.3 < st["kmer_js_distance_iid_to_train"]
    assert st["kmer_js_distance_valid_to_train"] == 1.0  # TT never occurs in the training spectrum


def test_generate_command_writes_fasta_and_stats(tmp_path, capsys):
    from glmtrain.downstream.generate import run_generate

    rng = np.random.default_rng(0)
    genome = "".join(rng.choice(list("ACGT"), 6000))
    (tmp_path / "g.fa").write_text(">r1\n" + "\n".join(genome[i:i + 60] for i in range(0, 6000, 60)) + "\n")
    model = ["model=transformer", "model.d_model=32", "model.n_layers=2", "model.n_heads=2"]
    fabricate_run(tmp_path / "pre", compose_run(model))
    data = [f"data.sources=[{{path:{tmp_path / 'g.fa'}}}]", "data.split.kind=fraction", "data.format=memory",
            "data.window=200", f"data.cache_dir={tmp_path / 'cache'}"]
    run = compose_run(["task=generate", f"task.init_from={tmp_path / 'pre'}", *data, "task.num_samples=3",
                       "task.length=50", "task.batch_size=2", "task.top_p=0.95", "task.stats_k=3", "task.prompt=ACGTTG",
                       f"run_dir={tmp_path / 'gen'}"])
    # one run per run directory (glmtrain.locks): a run held by another process is refused before writing
    from glmtrain.locks import LockBusy
    from test_locks import _holder

    holder = _holder(tmp_path / "gen")
    try:
        with pytest.raises(LockBusy, match=f"is in use by pid {holder.pid}"):
            run_generate(run)
        assert [p.name for p in (tmp_path / "gen").iterdir()] == [".glmtrain.lock"]
    finally:
        holder.kill()
        holder.wait(30)
    stats = run_generate(run)
    fasta = (tmp_path / "gen" / "samples.fa").read_text().split("\n")
    headers = [line for line in fasta if line.startswith(">")]
    seqs = "".join(line for line in fasta if line and not line.startswith(">"))
    assert len(headers) == 3 and "top_p=0.95" in headers[0] and len(seqs) == 150 and set(seqs) <= set("ACGT")
    saved = json.loads((tmp_path / "gen" / "samples.fa.stats.json").read_text())
    assert saved == json.loads(json.dumps(stats)) and saved["cached"] is True and saved["bases"] == 150
    assert 0 <= saved["kmer_js_distance_to_train"] <= 1 and "kmer_js_distance_iid_to_train" in saved
    assert "3 samples x 50 bases" in capsys.readouterr().out
