"""The training stream: ranks x workers cover an epoch once, resume is exact, mixing follows the weights.

Ranks are simulated in one process (``train_loader(consumed, rank, world)``), with real
DataLoader worker processes; the real multi-process check is tests/test_data_e2e.py.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from glmtrain.config import validate_data
from glmtrain.data.fasta import DataInputError
from glmtrain.data.genome import GenomeDataModule
from glmtrain.data.shards import COMP
from glmtrain.tokenizers import CharTokenizer

REPO = Path(__file__).resolve().parents[1]
from tests._util import GENOMES  # noqa: E402 (shipped samples)


def lambda_cfg(tmp: Path, **kw):
    node = {"name": "lambda", "sources": [{"path": str(GENOMES / "lambda_phage.fa.gz"), "species": "lambda"}],
            "cache_dir": str(tmp / "cache"), "window": 64, "shard_mb": 0.05, "shuffle_shards": 4,
            "split": {"kind": "fraction", "valid_fraction": 0.1}, "max_val_windows": 0, "num_workers": 0}
    node.update(kw)
    return validate_data(node)


def module(cfg, micro: int, seed: int = 7) -> GenomeDataModule:
    dm = GenomeDataModule(cfg, CharTokenizer(), micro, seed)
    dm.setup()
    return dm


def run(dm: GenomeDataModule, consumed: int, rank: int, world: int, steps: int, workers: int = 2):
    """(index, key) of every sample of ``steps`` micro-batches of one rank."""
    out = []
    it = iter(dm.train_loader(consumed, rank, world, num_workers=workers))
    for _ in range(steps):
        b = next(it)
        out += list(zip(b["index"].tolist(), b["key"]))
    del it
    return out


def train_keys(dm: GenomeDataModule) -> list[str]:
    st = dm.store
    keys = []
    for u, (_, _, n) in enumerate(st.units("train")):
        for i in range(n):
            _, rec, s, e, strand = st.read("train", u, i)
            sp, name = st.record(rec)
            keys.append(f"{sp}/{name}:{s}-{e}({strand})/train")
    return keys


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(tmp_path):
    dm = module(lambda_cfg(tmp_path), micro=5)
    everything = train_keys(dm)
    n = len(everything)
    assert n > 600 and len(set(everything)) == n and len(dm.store.units("train")) > 20
    world, micro = 2, 5
    steps = math.ceil(n / (world * micro)) + 3  # a little into the second epoch
    seen = {r: run(dm, 0, r, world, steps, workers=2) for r in range(world)}
    # every rank got its own slice of every global micro-batch; workers did not reorder anything
    for r in range(world):
        idx = [g for g, _ in seen[r]]
        assert idx == [t * world * micro + r * micro + j for t in range(steps) for j in range(micro)]
        assert [k for _, k in seen[r]] == [dm.train_set[g]["key"] for g in idx]
    epoch1 = [k for r in range(world) for g, k in seen[r] if g < n]
    assert len(epoch1) == n and len(set(epoch1)) == n and set(epoch1) == set(everything)  # none twice, none missed
    epoch2 = [k for r in range(world) for g, k in seen[r] if g >= n]
    assert epoch2 and len(set(epoch2)) == len(epoch2)
    # the shuffle really shuffles across shards: consecutive samples mostly come from different places
    first = [dm.train_set[g]["key"] for g in range(50)]
    assert first != sorted(first) and len({k.split(":")[1].split("-")[0][:2] for k in first}) > 5


def test_stop_and_resume_is_exact_across_ranks_workers_and_world_sizes(tmp_path):
    cfg = lambda_cfg(tmp_path, rc_prob=0.5)
    world, micro, k = 2, 4, 7
    m = world * micro
    full = module(cfg, micro)
    uninterrupted = {r: run(full, 0, r, world, 2 * k) for r in range(world)}
    first = module(cfg, micro)
    state = first.state_dict()
    state["stream"]["world_size"] = world  # what each rank of a 2-rank trainer saves
    part1 = {r: run(first, 0, r, world, k) for r in range(world)}
    resumed = module(cfg, micro)  # a fresh process after the restart
    resumed.load_state_dict(state)
    part2 = {r: run(resumed, k * m, r, world, k, workers=1) for r in range(world)}
    for r in range(world):
        assert part1[r] + part2[r] == uninterrupted[r]  # no repeats, no skips, same order
    # the same global batch on one rank (micro 8) continues exactly where two ranks stopped
    one = module(cfg, micro * world)
    one.load_state_dict(state)
    single = run(one, k * m, 0, 1, k, workers=2)
    merged = [x for t in range(k, 2 * k) for r in range(world) for x in uninterrupted[r][t * micro:(t + 1) * micro]]
    assert single == merged
    # a world size that cannot continue at this position is refused with one line
    three = module(cfg, micro)
    three.load_state_dict(state)
    with pytest.raises(DataInputError) as e:
        three.train_loader(k * m, 0, 3)
    assert "not a multiple of 12" in str(e.value) and "2 rank(s) x micro-batch 4" in str(e.value)
    assert "\n" not in str(e.value)
    # a changed stream (another shuffle) is refused instead of silently reshuffling
    other = module(lambda_cfg(tmp_path, rc_prob=0.5, shuffle_shards=2), micro)
    other.load_state_dict(state)
    with pytest.raises(DataInputError, match="stream.shuffle_shards was 4, is 2.*silently"):
        other.train_loader(k * m, 0, world)


def test_stream_reverse_complement_and_memory_format_give_the_same_stream(tmp_path):
    shards = module(lambda_cfg(tmp_path, rc_prob=0.5), micro=4)
    memory = module(lambda_cfg(tmp_path, rc_prob=0.5, format="memory"), micro=4)
    tok = CharTokenizer()
    flips = 0
    for g in range(200):
        a, b = shards.train_set[g], memory.train_set[g]
        assert a["key"] == b["key"] and (a["input_ids"] == b["input_ids"]).all()
        if a["key"].endswith("(-)/train"):
            flips += 1
            plus = a["key"].replace("(-)", "(+)")
            u, i = shards.order.locate(g)
            raw = shards.store.read("train", u, i)[0]
            assert tok.decode(a["input_ids"].numpy()) == COMP[raw[::-1]].tobytes().decode().upper()
            assert plus.startswith("lambda/")
    assert 70 < flips < 130
    assert shards.order.fingerprint() == memory.order.fingerprint()  # switching format keeps resume exact


def _ms_cfg(tmp: Path, **kw):
    node = OmegaConf.load(REPO / "conf" / "data" / "multispecies_cgp.yaml")
    os.environ.setdefault("GLMTRAIN_GENOMES", str(GENOMES))
    node = OmegaConf.to_container(node, resolve=True)
    node.update(cache_dir=str(tmp / "cache"), num_workers=0, **kw)
    return validate_data(node)


@pytest.mark.parametrize("resample", [False, True])
def test_multispecies_mix_follows_weights(tmp_path, resample):
    cfg = _ms_cfg(tmp_path, resample=resample, format="shards" if resample else "memory")
    dm = module(cfg, micro=8, seed=11)
    weights = {s.species: s.weight for s in cfg.sources}
    total = sum(weights.values())
    n = 10_000
    species = [dm.train_set[g]["key"].split("/")[0] for g in range(n)]
    for sp, w in weights.items():
        assert abs(species.count(sp) / n - w / total) < 0.02, (sp, species.count(sp) / n, w / total)
    if not resample:  # epoch mode: within each source's own epoch no window repeats
        for k, stream in enumerate(dm.order.streams):
            size = stream.total
            seen = [stream.locate(j) for j in range(size)]
            assert len(set(seen)) == size
    else:  # endless resampled mode: deterministic far out, and draws shards with replacement
        far = [dm.train_set[10**7 + j]["key"] for j in range(20)]
        again = module(cfg, micro=8, seed=11)
        assert far == [again.train_set[10**7 + j]["key"] for j in range(20)]
        human = dm.order.streams[0]
        assert human.total > 0 and len(set(human.locate(j) for j in range(3 * human.total))) < 3 * human.total


def test_validation_is_split_across_ranks_without_overlap(tmp_path):
    dm = module(lambda_cfg(tmp_path), micro=4)
    a, b = dm.eval_dataset("valid", 0, 2), dm.eval_dataset("valid", 1, 2)
    ka = {a[i]["key"] for i in range(len(a))}
    kb = {b[i]["key"] for i in range(len(b))}
    assert ka and kb and not ka & kb and len(ka) + len(kb) == len(dm.val_rows)
    assert all(k.endswith("(+)/valid") for k in ka | kb)
    starts = sorted(int(k.split(":")[1].split("-")[0]) for k in ka | kb)
    assert np.all(np.diff(starts) >= 64)  # held-out windows never overlap
