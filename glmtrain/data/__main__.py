"""``python -m glmtrain.data`` - build, verify and describe webdataset shards.

    python -m glmtrain.data build data=hg38 out=/scratch/hg38-shards [workers=16] [data.window=2048 ...]
    python -m glmtrain.data verify /scratch/hg38-shards      # sha256 of every shard against the manifest
    python -m glmtrain.data info /scratch/hg38-shards

``build`` composes the same Hydra config as training (``conf/``, group ``data``
and ``data.*`` overrides), so the shards match a run with the same overrides:
train with ``data=hg38 data.shards=/scratch/hg38-shards``.  Re-running skips
finished shards; a directory built from other sources or policies is refused.
Errors are one line on stderr, exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _fail(msg: str) -> None:
    print(f"glmtrain.data: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def _compose(overrides: list[str]):
    from glmtrain.config import compose

    return compose(overrides)


def build(args: list[str]) -> int:
    from glmtrain.config import ConfigError, validate_data
    from glmtrain.data.fasta import DataInputError
    from glmtrain.data.plan import make_plan, plan_summary
    from glmtrain.data.shards import build_shards

    out, workers, overrides = None, 0, []
    for a in args:
        if a.startswith("out="):
            out = a[4:]
        elif a.startswith("workers="):
            workers = int(a[8:])
        else:
            overrides.append(a)
    if not out:
        _fail("build needs out=<directory for the shards>")
    bad = [a for a in overrides if not (a.startswith(("data=", "data.", "+data.")))]
    if bad:
        _fail(f"build takes data=<name>, data.<key>=<value>, out=, workers= (not {bad[0]!r})")
    try:
        cfg = validate_data(_compose(overrides).data)
        t0 = time.perf_counter()
        plan = make_plan(cfg)
        t_plan = time.perf_counter() - t0
        summary = plan_summary(plan)
        print(f"glmtrain.data: plan {cfg.name}: " + ", ".join(f"{s} {v['candidates']} windows in {v['units']} shards"
                                                             for s, v in summary.items()) + f" ({t_plan:.1f} s)",
              file=sys.stderr)
        manifest = build_shards(plan, Path(out), workers)
    except (ConfigError, DataInputError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; finished shards are kept - re-run the same command to continue")
    b = manifest["build"]
    print(json.dumps({"out": str(out), "digest": manifest["digest"], "totals": manifest["totals"],
                      "seconds": b["seconds"], "plan_seconds": round(t_plan, 3), "built": b["built"],
                      "skipped": b["skipped"]}, indent=1))
    return 0


def verify(args: list[str]) -> int:
    from glmtrain.data.fasta import DataInputError
    from glmtrain.data.shards import ShardStore

    if len(args) != 1:
        _fail("verify takes one shard directory")
    try:
        store = ShardStore(args[0], on_corrupt="skip", verify="size", verbose=False)
        problems = store.verify_all()
    except DataInputError as e:
        _fail(str(e))
    for p in problems:
        print(f"glmtrain.data: {p}", file=sys.stderr)
    n = sum(len(v) for v in store.manifest["shards"].values())
    print(f"glmtrain.data: {args[0]}: {n - len(problems)}/{n} shards match the manifest")
    return 1 if problems else 0


def info(args: list[str]) -> int:
    from glmtrain.data.fasta import DataInputError
    from glmtrain.data.shards import load_manifest

    if len(args) != 1:
        _fail("info takes one shard directory")
    try:
        m = load_manifest(Path(args[0]))
    except DataInputError as e:
        _fail(str(e))
    print(json.dumps({k: m[k] for k in ("digest", "glmtrain_version", "created", "sources", "policies", "totals")},
                     indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "build":
        return build(rest)
    if cmd == "verify":
        return verify(rest)
    if cmd == "info":
        return info(rest)
    _fail(f"unknown command {cmd!r}; use build, verify or info")
    return 2


if __name__ == "__main__":
    sys.exit(main())
