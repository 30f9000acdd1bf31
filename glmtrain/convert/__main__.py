"""``python -m glmtrain.convert`` -- released weights in, Hugging Face directories out.

    python -m glmtrain.convert import <family> <source> <out>   # a released checkpoint -> glmtrain/HF
    python -m glmtrain.convert export <run_dir> <out_dir>       # a glmtrain run (newest checkpoint) -> HF
    python -m glmtrain.convert layouts                          # what can be imported and exported

``<source>``: a weights file (``.safetensors``, ``weights.ckpt``, ``.pt``, ``pytorch_model.bin``) or the
directory holding it with its released config (``config.json`` / ``config.yml``).  ``<out>``: a
directory (a Hugging Face directory: config.json, model.safetensors, tokenizer, modeling code,
import.json) or a ``.safetensors`` file.  Either is accepted by ``trainer.init_from=<out>``; ``import``
prints the command to train from it (the closest shipped model config and the overrides it needs).
Problems are reported on one line (exit status 2); nothing is written before the import succeeded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from glmtrain.convert import ConvertError, build_imported_model, check_config, exporters, is_released, layouts, load_released, summary


def shipped_model_config(name: str | Path):
    """The model config of a shipped ``conf/model/<name>.yaml`` (or of a yaml file), schema defaults filled in."""
    from omegaconf import OmegaConf

    from glmtrain.cli import CONF_DIR
    from glmtrain.models import config_class

    raw = OmegaConf.load(name if isinstance(name, Path) else Path(CONF_DIR) / "model" / f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(config_class(raw.family)), raw))


def model_config_overrides(imp) -> dict[str, list[str]]:
    """For each shipped ``conf/model/*.yaml`` of the import's family: the overrides that make it take the
    release -- the model keys the release fixes (those that follow from others left out: ``mlp_dim: 0``
    derives from ``d_model``), then the release's tokenizer options."""
    from omegaconf import OmegaConf

    from glmtrain.cli import CONF_DIR
    from glmtrain.convert import _config_values, _same

    out = {}
    for path in sorted((Path(CONF_DIR) / "model").glob("*.yaml")):
        if OmegaConf.load(path).get("family") != imp.family:
            continue
        cfg = shipped_model_config(path)
        need = {k: v for k, v in imp.config.items() if not any(_same(h, v) for h in _config_values(cfg, k))}
        for key in list(need):
            rest = {k: v for k, v in need.items() if k != key}
            try:
                check_config(imp, dataclasses.replace(cfg, **rest))
            except (ConvertError, TypeError, ValueError):
                continue
            need = rest
        tok = {k: v for k, v in imp.tokenizer.items() if getattr(cfg.tokenizer, k, None) != v}
        out[path.stem] = ([f"model.{k}={_value(v)}" for k, v in need.items()]
                          + [f"model.tokenizer.{k}={_value(v)}" for k, v in tok.items()])
    return out


def _value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def matching_model_configs(imp, overrides: dict[str, list[str]] | None = None) -> list[str]:
    """Names of the shipped ``conf/model/*.yaml`` of the import's family that fit the release (tokenizer aside)."""
    overrides = model_config_overrides(imp) if overrides is None else overrides
    return [name for name, o in overrides.items() if all(x.startswith("model.tokenizer.") for x in o)]


def train_command(imp, init_from: str | Path, overrides: dict[str, list[str]] | None = None) -> str:
    """``python -m glmtrain model=<closest shipped config> <overrides> trainer.init_from=<init_from>``."""
    import shlex

    overrides = model_config_overrides(imp) if overrides is None else overrides
    if not overrides:
        return (f"python -m glmtrain model=<a {imp.family} config with the values of import.json's model_config> "
                f"trainer.init_from={shlex.quote(str(init_from))}")
    name = min(overrides, key=lambda n: len(overrides[n]))
    also = [f"model={n}" for n, o in overrides.items() if n != name and len(o) == len(overrides[name])]
    return (shlex.join(["python", "-m", "glmtrain", f"model={name}", *overrides[name], f"trainer.init_from={init_from}"])
            + (f"  # or {', '.join(also)}" if also else ""))


def load_run(src: str | Path):
    """A glmtrain run directory or checkpoint -> (model with its newest weights, tokenizer config)."""
    from omegaconf import OmegaConf

    from glmtrain import ckpt_formats
    from glmtrain.checkpointing import resolve_checkpoint
    from glmtrain.config import validate
    from glmtrain.models import build_model
    from glmtrain.tokenizers import build_tokenizer

    ckpt = resolve_checkpoint(src)
    full = ckpt_formats.load_full(ckpt)  # glmtrain's own formats, weights_only (refuses planted files)
    run_dir = Path(src) if Path(src).is_dir() else ckpt.parent.parent
    if (run_dir / "config.yaml").is_file():
        run = validate(OmegaConf.load(run_dir / "config.yaml"))
    else:
        run = validate(full["hyper_parameters"]["config"])
    tok_cfg = run.model.tokenizer
    if tok_cfg.kind == "bpe" and not tok_cfg.path:  # the run's own vocabulary
        tok_cfg = dataclasses.replace(tok_cfg, path=str(run_dir / "tokenizer.json"))
    model = build_model(run.model, build_tokenizer(dataclasses.asdict(tok_cfg)).vocab_size)
    sd = {k[len("model."):]: v for k, v in full["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(sd, strict=True)
    return model.eval(), tok_cfg, ckpt


def cmd_import(args) -> None:
    from glmtrain.convert.hf import export_model

    imp = load_released(args.source, family=args.family, config_path=args.config)
    model, cfg, tok_cfg, recomputed = build_imported_model(imp)
    lines = summary(imp, recomputed)
    report = {"source": imp.source, "layout": imp.layout, "family": imp.family, "model_config": dataclasses.asdict(cfg),
              "checked_config": imp.config, "tokenizer": dataclasses.asdict(tok_cfg), "mapped": imp.mapped,
              "dropped": imp.dropped, "recomputed": recomputed, "notes": imp.notes}
    single = str(args.out).endswith(".safetensors")
    files = export_model(model, args.out, tok_cfg, extra=None if single else report)
    print("\n".join(lines))
    print(f"wrote {args.out}: {', '.join(files)}")
    # the model config a run needs is what trainer.init_from=<out> checks: read the output back (not the release,
    # whose layout may accept more, e.g. Evo 2's vortex poles into either parametrisation); one copy in memory at a time
    del model
    imp.tensors.clear()
    written = load_released(args.out, family=imp.family)
    overrides = model_config_overrides(written)
    command = train_command(written, args.out, overrides)
    if not single:
        report.update(matching_model_configs=matching_model_configs(written, overrides), train_command=command)
        (Path(args.out) / "import.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"train from it: {command}")


def cmd_export(args) -> None:
    from glmtrain.convert.hf import export_model

    if is_released(args.run_dir):
        imp = load_released(args.run_dir)
        model, _, tok_cfg, _ = build_imported_model(imp)
        what = f"{imp.source} ({imp.layout})"
    else:
        model, tok_cfg, ckpt = load_run(args.run_dir)
        what = str(ckpt)
    files = export_model(model, args.out_dir, tok_cfg)
    print(f"exported {what} -> {args.out_dir}")
    for name, desc in files.items():
        print(f"  {name}: {desc}")


def cmd_layouts(_args) -> None:
    print("import layouts:")
    for lay in layouts().values():
        print(f"  {lay.name:<14} -> {lay.family or '(from the files)':<16} {lay.description}")
    print("export families: " + ", ".join(sorted(exporters())))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m glmtrain.convert", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("import", help="a released checkpoint -> a glmtrain/Hugging Face directory or .safetensors file")
    p.add_argument("family", help="glmtrain model family the weights are for (hyena, evo2, transformer, ...)")
    p.add_argument("source", help="released weights file or directory (with its config)")
    p.add_argument("out", help="output directory, or a .safetensors file")
    p.add_argument("--config", default=None, help="the released config, when it is not next to the weights")
    p.set_defaults(fn=cmd_import)
    p = sub.add_parser("export", help="a glmtrain run (or an imported checkpoint) -> a Hugging Face directory")
    p.add_argument("run_dir", help="run directory, checkpoint file, or imported/released checkpoint")
    p.add_argument("out_dir")
    p.set_defaults(fn=cmd_export)
    sub.add_parser("layouts", help="list the import layouts and export families").set_defaults(fn=cmd_layouts)
    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except ConvertError as e:
        print(f"glmtrain.convert: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # CheckpointError, ConfigError from the run side: still one line
        if type(e).__name__ in ("CheckpointError", "ConfigError"):
            print(f"glmtrain.convert: error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
