"""``python -m glmtrain.evaluate run_dir=<dir>`` -- held-out bits/base as a function of context length.

For every stage of a run (each stage's final checkpoint; ``stages=last`` for the newest only) and
every evaluation context length ``c`` (``contexts=64,128,...``; default: the stage windows of the
schedule), the model scores the same target bases: the last ``target`` bases (default: half the
shortest context) of each held-out window of the longest context, given the ``c`` bases that end
with them.  Target base ``j`` of a window therefore sees ``c - target + j`` bases of context, and
because the targets are identical in every column, the columns differ only by how much context
the model was given: a paired comparison.  Causal models only.

    python -m glmtrain.evaluate run_dir=runs/ctx                       # every stage x the schedule's windows
    python -m glmtrain.evaluate run_dir=runs/ctx contexts=64,256,1024 windows=512 split=valid

Held-out windows are cut from the run's own data (``split=valid`` or ``test``) at the longest
context (which must divide the run's stored window), evenly spaced, at most ``windows`` of them.
Prints a table (rows: stage models; columns: contexts) and writes ``<run_dir>/context_eval.json``.
Errors are one line on stderr, exit status 2.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


def _fail(msg: str) -> None:
    print(f"glmtrain.evaluate: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def _args(argv: list[str]) -> dict[str, str] | None:
    """key=value arguments (None: help was asked for)."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        return None
    out = {}
    for a in argv:
        if "=" not in a:
            _fail(f"arguments are key=value (run_dir=, contexts=, target=, windows=, split=, stages=, batch=), not {a!r}")
        k, v = a.split("=", 1)
        if k not in ("run_dir", "contexts", "target", "windows", "split", "stages", "batch", "threads"):
            _fail(f"unknown argument {k!r}; allowed: run_dir, contexts, target, windows, split, stages, batch, threads")
        out[k] = v
    if "run_dir" not in out:
        _fail("give run_dir=<a run directory>")
    return out


def load_run(run_dir: Path):
    """The run's validated config and resolved schedule, from its config.yaml."""
    from omegaconf import OmegaConf

    from glmtrain.config import validate
    from glmtrain.schedule import resolve

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (not a glmtrain run directory)")
    run = validate(OmegaConf.load(cfg_path))
    return run, resolve(run, dp=1)


def held_out(run, window: int, split: str, limit: int):
    """(token ids [n, L], loss weights [n, L]) of ``limit`` evenly spaced held-out windows of ``window`` bases."""

    from glmtrain.data.genome import open_store
    from glmtrain.data.stream import EvalSamples, WindowEncoder, eval_rows
    from glmtrain.tokenizers import build_tokenizer

    tok = build_tokenizer(run.model.tokenizer, run_dir=run.run_dir)  # bpe: the run's own vocabulary
    data = replace(run.data, window=window, store_window=run.data.store_window or run.data.window)
    store = open_store(data, verbose=False)
    rows = eval_rows(store, split, limit)
    ds = EvalSamples(store, WindowEncoder(data, tok), split, rows)
    ids = torch.stack([ds[i]["input_ids"] for i in range(len(ds))])
    w = torch.stack([ds[i]["loss_weight"] for i in range(len(ds))])
    keep = w[:, -1] > 0  # windows whose last base is scored (drops padded tails)
    return ids[keep], w[keep]


@torch.no_grad()
def bits_by_context(model, ids: torch.Tensor, weights: torch.Tensor, contexts: list[int], target: int,
                    batch: int = 16) -> dict[int, dict[str, float]]:
    """Bits/base of the last ``target`` tokens of every window, given the last ``c`` tokens as input."""
    from glmtrain.inference import token_log_probs

    out = {}
    for c in contexts:
        nats = bases = 0.0
        for i in range(0, len(ids), batch):
            x = ids[i:i + batch, -c:]
            lp = token_log_probs(model, x)[:, -target:].double()  # log p(x_t | the c-1 .. bases before it)
            w = (weights[i:i + batch, -target:] > 0).double()
            nats -= float((lp * w).sum())
            bases += float(w.sum())
        out[c] = {"bits_per_base": nats / math.log(2) / max(bases, 1.0), "bases": bases}
    return out


def evaluate(run_dir: Path, contexts: list[int] | None = None, target: int = 0, windows: int = 256,
             split: str = "valid", stages: str = "all", batch: int = 16, say=print) -> dict:
    from glmtrain.checkpointing import load_weights
    from glmtrain.module import GLMModule

    run, schedule = load_run(run_dir)
    if run.objective.name != "clm":
        raise ValueError("bits/base by context is defined here for causal (objective=clm) models")
    if run.model.tokenizer.kind not in ("char", "byte"):  # contexts and targets are counted in bases = tokens
        raise ValueError(f"bits/base by context is defined here for single-base tokenizers, not "
                         f"model.tokenizer.kind={run.model.tokenizer.kind}")
    manifest = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {"stages": []}
    done = {s["name"]: s for s in manifest["stages"] if s.get("status") == "complete" and s.get("final_checkpoint")}
    chosen = [s for s in schedule.stages if s.name in done]
    if stages == "last":
        chosen = chosen[-1:]
    if not chosen:
        raise ValueError(f"{run_dir}: no complete stage to evaluate yet (run.json lists none)")
    contexts = sorted(contexts or {s.window for s in schedule.stages})
    stored = run.data.store_window or run.data.window
    if stored % contexts[-1]:
        raise ValueError(f"the longest context {contexts[-1]} does not divide the run's stored window {stored}")
    target = target or max(1, contexts[0] // 2)
    if target >= contexts[0]:
        raise ValueError(f"target={target} must be shorter than the shortest context {contexts[0]}")
    ids, w = held_out(run, contexts[-1], split, windows)
    if len(ids) == 0:
        raise ValueError(f"no held-out {split} window of {contexts[-1]} bases")
    say(f"scoring the last {target} bases of {len(ids)} held-out {split} windows with {', '.join(map(str, contexts))} "
        f"bases of context")
    table = []
    for stage in chosen:
        module = GLMModule(stage.run)  # the stage's model (its RoPE knobs), with its final weights
        load_weights(done[stage.name]["final_checkpoint"], module, say=lambda m: None)
        res = bits_by_context(module.model.eval(), ids, w, contexts, target, batch)
        table.append({"stage": stage.name, "trained_window": stage.window,
                      "bits_per_base": {str(c): r["bits_per_base"] for c, r in res.items()},
                      "bases": res[contexts[0]]["bases"]})
        say(f"  {stage.name}: " + "  ".join(f"{c}: {r['bits_per_base']:.4f}" for c, r in res.items()))
    result = {"run_dir": str(run_dir), "split": split, "target": target, "windows": len(ids), "contexts": contexts,
              "stages": table}
    (run_dir / "context_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_table(result: dict) -> str:
    cs = result["contexts"]
    head = f"held-out bits/base of the last {result['target']} bases of {result['windows']} {result['split']} windows, by context:"
    cols = f"{'stage model':<14}{'trained at':>11}" + "".join(f"{c:>10,}" for c in cs) + f"{'gain':>9}"
    lines = [head, cols]
    for row in result["stages"]:
        v = [row["bits_per_base"][str(c)] for c in cs]
        lines.append(f"{row['stage']:<14}{row['trained_window']:>11,}" + "".join(f"{x:>10.4f}" for x in v)
                     + f"{v[0] - v[-1]:>+9.4f}")
    lines.append(f"(gain: bits/base with {cs[0]:,} bases of context minus with {cs[-1]:,}; > 0 means longer context helps)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = _args(sys.argv[1:] if argv is None else argv)
    if a is None:
        print(__doc__)
        return 0
    from glmtrain.checkpointing import CheckpointError
    from glmtrain.config import ConfigError
    from glmtrain.data.fasta import DataInputError

    try:
        contexts = [int(x) for x in a["contexts"].split(",")] if "contexts" in a else None
        if "threads" in a:
            torch.set_num_threads(int(a["threads"]))
        result = evaluate(Path(a["run_dir"]), contexts, int(a.get("target", 0)), int(a.get("windows", 256)),
                          a.get("split", "valid"), a.get("stages", "all"), int(a.get("batch", 16)),
                          say=lambda m: print(f"glmtrain.evaluate: {m}", file=sys.stderr, flush=True))
    except (ValueError, FileNotFoundError, ConfigError, CheckpointError, DataInputError) as e:
        _fail(str(e).splitlines()[0])
    print(format_table(result))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
