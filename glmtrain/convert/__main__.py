"""``python -m glmtrain.convert`` -- released weights in, Hugging Face directories out.

    python -m glmtrain.convert import <family> <source> <out>   # a released checkpoint -> glmtrain/HF
    python -m glmtrain.convert export <run_dir> <out_dir>       # a glmtrain run (newest checkpoint) -> HF
    python -m glmtrain.convert layouts                          # what can be imported and exported

``<source>``: a weights file (``.safetensors``, ``weights.ckpt``, ``.pt``, ``pytorch_model.bin``) or the
directory holding it with its released config (``config.json`` / ``config.yml``).  ``<out>``: a
directory (a Hugging Face directory: config.json, model.safetensors, tokenizer, modeling code,
import.json) or a ``.safetensors`` file.  Either is accepted by ``trainer.init_from=<out>``.
Problems are reported on one line (exit status 2); nothing is written before the import succeeded.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def matching_model_configs(imp) -> list[str]:
    """Names of the shipped ``conf/model/*.yaml`` of the import's family that fit the release."""
    from omegaconf import OmegaConf

    from glmtrain.cli import CONF_DIR

    out = []
    for path in sorted((Path(CONF_DIR) / "model").glob("*.yaml")):
        if OmegaConf.load(path).get("family") != imp.family:
            continue
        cfg = shipped_model_config(path)
        try:
            check_config(imp, cfg)
        except ConvertError:
            continue
        out.append(path.stem)
    return out


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
    matches = matching_model_configs(imp)
    report = {"source": imp.source, "layout": imp.layout, "family": imp.family, "model_config": dataclasses.asdict(cfg),
              "checked_config": imp.config, "tokenizer": dataclasses.asdict(tok_cfg), "mapped": imp.mapped,
              "dropped": imp.dropped, "recomputed": recomputed, "notes": imp.notes, "matching_model_configs": matches}
    files = export_model(model, args.out, tok_cfg, extra=None if str(args.out).endswith(".safetensors") else report)
    print("\n".join(lines))
    print(f"wrote {args.out}: {', '.join(files)}")
    if matches:
        also = f" (or {', '.join('model=' + m for m in matches[1:])})" if len(matches) > 1 else ""
        print(f"train from it: python -m glmtrain model={matches[0]} trainer.init_from={args.out}{also}")
    else:
        print(f"train from it: python -m glmtrain model=<a config with the values of import.json's model_config> "
              f"trainer.init_from={args.out}")


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
