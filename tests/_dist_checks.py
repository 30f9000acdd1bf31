"""One torchrun launch for the multi-process checks of tests/test_scale.py (start-up paid once).

    torchrun --nproc_per_node 2 tests/_dist_checks.py OUT.json CHECK [CHECK ...]

CHECK: ``meta_memory`` (must come first: it reads the process's RSS high-water mark), ``meta_init``,
``cp`` (context parallelism, degree 2 vs 1), ``grad:<strategy>`` (tests/_grad_probe.py).  Rank 0 writes ``{check: result}`` as JSON; a
check that raises is recorded as ``{"error": ...}`` and the launch goes on when it safely can.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


CP_MODELS = {
    "transformer-causal": ["model=transformer", "model.d_model=32", "model.n_layers=2", "model.n_heads=4"],
    "transformer-encoder": ["model=transformer_encoder", "objective=mlm", "model.d_model=32", "model.n_layers=2", "model.n_heads=4"],
    "evo2-SDH*": ["model=evo2", "model.d_model=32", "model.pattern=SDH*", "model.n_heads=4", "model.mlp_dim=64",
                  "model.se_filter_groups=4", "model.mr_filter_groups=4", "model.mr_filter_length=16"],
    "hyena": ["model=hyena", "model.d_model=32", "model.n_layers=2", "model.filter_order=16", "model.max_seq_len=64",
              "model.embed_dropout=0.0"],
}


def _init_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")


def check_cp() -> dict:
    """Context-parallel degree 2 (ring attention, gathered Hyena mixers) vs degree 1, fp64: logits and
    parameter gradients of sum(logits * P) for a fixed random P."""
    import copy

    import torch
    import torch.distributed as dist

    from glmtrain.models import build_model
    from glmtrain.parallel.context import apply_context_parallel, gather_sequence, sequence_chunk
    from glmtrain.tokenizers import build_tokenizer
    from tests._util import compose_run

    _init_group()
    rank, size = dist.get_rank(), dist.get_world_size()
    out = {}
    for name, overrides in CP_MODELS.items():
        run = compose_run([*overrides, "trainer.accelerator=cpu"])
        vocab = build_tokenizer(__import__("dataclasses").asdict(run.model.tokenizer)).vocab_size
        torch.manual_seed(0)
        ref_model = build_model(run.model, vocab).double()
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(7, 11, (2, 32), generator=g)
        proj = torch.randn(2, 32, vocab, generator=g, dtype=torch.float64)
        ref = ref_model(ids)
        ref_grads = torch.autograd.grad((ref * proj).sum(), list(ref_model.parameters()))
        cp_model = copy.deepcopy(ref_model)
        converted = apply_context_parallel(cp_model, dist.group.WORLD)
        local = cp_model(sequence_chunk(ids, rank, size))
        grads = torch.autograd.grad((local * sequence_chunk(proj, rank, size)).sum(), list(cp_model.parameters()))
        full = gather_sequence(local.detach(), dist.group.WORLD)
        gerr = 0.0
        for a, b in zip(grads, ref_grads):
            a = a.contiguous()
            dist.all_reduce(a)  # each rank holds its chunk's contribution
            gerr = max(gerr, float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)))
        out[name] = {"logits_max_abs_err": float((full - ref).abs().max()), "grad_max_rel_err": gerr, **converted}
    return out


def _rss_peak_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def check_meta_memory() -> dict:
    """FSDP2 over 2 ranks of a Transformer whose fp32 parameters take 1.2 GB: built on the meta device
    and materialised block by block (each block sharded right after), no rank's peak RSS reaches the
    full model's size.  Imports stay light (no Lightning) so the baseline is the interpreter + torch."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from glmtrain.models import build_model
    from glmtrain.models.init import materialize
    from glmtrain.models.transformer import TransformerConfig
    from glmtrain.parallel.plans import plan_for, shard_model

    _init_group()
    base = _rss_peak_bytes()
    cfg = TransformerConfig(d_model=1024, n_layers=24, n_heads=16, bias=False)
    model = build_model(cfg, 16, seed=3, meta=True)
    full = sum(p.numel() for p in model.parameters()) * 4
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp",))
    shard_model(model, plan_for("transformer"), dp_mesh=mesh, fsdp=True,
                materialize=lambda prefix: materialize(model, "cpu", 3, prefix))
    local = sum(p.to_local().numel() for p in model.parameters()) * 4
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, (_rss_peak_bytes(), base))
    del model
    return {"full_fp32_bytes": full, "local_bytes_rank0": local, "peak_rss_bytes": [p for p, _ in peaks],
            "baseline_rss_bytes": [b for _, b in peaks]}


def check_meta_init() -> dict:
    """Meta-device build materialised block by block under FSDP2 (2 ranks) and under tensor parallelism
    (2 ranks) == the plain build with the same seed, bit for bit (every parameter, gathered)."""
    import dataclasses

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from glmtrain.models import build_model
    from glmtrain.models.init import materialize
    from glmtrain.parallel.plans import plan_for, shard_model
    from glmtrain.tokenizers import build_tokenizer
    from tests._util import compose_run

    _init_group()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("x",))
    out = {}
    for name in ("transformer-causal", "evo2-SDH*", "hyena"):
        run = compose_run([*CP_MODELS[name], "trainer.accelerator=cpu", "data.window=64"])
        vocab = build_tokenizer(dataclasses.asdict(run.model.tokenizer)).vocab_size
        plain = dict(build_model(run.model, vocab, seed=11).named_parameters())
        for how in ("fsdp", "tp"):
            model = build_model(run.model, vocab, seed=11, meta=True)
            shard_model(model, plan_for(run.model.family), dp_mesh=mesh if how == "fsdp" else None,
                        tp_mesh=mesh if how == "tp" else None, fsdp=how == "fsdp", sequence_parallel=how == "tp",
                        materialize=lambda prefix, m=model: materialize(m, "cpu", 11, prefix))
            diff, n = 0.0, 0
            for pn, p in model.named_parameters():
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                diff = max(diff, float((full.detach() - plain[pn].detach()).abs().max()))
                n += 1
            out[f"{name}/{how}"] = {"max_abs_diff": diff, "params": n, "plain_params": len(plain)}
    return out


def run_check(name: str) -> dict:
    kind, _, arg = name.partition(":")
    if kind == "meta_memory":
        return check_meta_memory()
    if kind == "meta_init":
        return check_meta_init()
    if kind == "cp":
        return check_cp()
    if kind == "grad":
        from tests._grad_probe import probe

        return probe(arg)
    raise ValueError(f"unknown check {name!r}")


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)
    out, names = Path(argv[0]), argv[1:]
    results: dict[str, dict] = {}
    rc = 0
    for name in names:
        t0 = time.perf_counter()
        try:
            results[name] = run_check(name)
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails with it
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            rc = 1
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        if int(os.environ.get("RANK", "0")) == 0:
            out.write_text(json.dumps(results, indent=1))
        if rc:
            break  # a failed collective cannot be continued safely
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
