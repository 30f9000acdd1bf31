"""The package's layering, checked statically (cheap): who may import whom, who may read trainer state.

* ``glmtrain.config`` (the schema) imports nothing of ``glmtrain.parallel`` -- the strategy and schedule
  checks that need both live in ``glmtrain.schedule`` -- so there is no import cycle to hold apart;
* the data package never imports the entry module (``glmtrain.cli``) nor training (``train``, ``module``,
  ``parallel``): data flows one way;
* the data module reads its stream position from a ``StreamCursor``, never from the trainer;
* one module owns the checkpoint formats (``glmtrain.ckpt_formats``): ``checkpointing`` and
  ``parallel.strategies`` use it and do not import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "glmtrain"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_config_does_not_import_parallel():
    assert not {m for m in _imports(PKG / "config.py") if m.startswith("glmtrain.parallel")}


def test_one_module_owns_the_formats_checkpointing_and_strategies_do_not_import_each_other():
    a, b = _imports(PKG / "checkpointing.py"), _imports(PKG / "parallel" / "strategies.py")
    f = _imports(PKG / "ckpt_formats.py")
    assert "glmtrain.parallel.strategies" not in a and "glmtrain.checkpointing" not in b
    assert "glmtrain.ckpt_formats" in a and "glmtrain.ckpt_formats" in b
    assert not {m for m in f if m.startswith(("glmtrain.checkpointing", "glmtrain.parallel"))}


def test_data_package_does_not_import_entry_or_training_modules():
    banned = ("glmtrain.cli", "glmtrain.train", "glmtrain.module", "glmtrain.parallel", "glmtrain.schedule")
    for f in (PKG / "data").glob("*.py"):
        bad = {m for m in _imports(f) if m.startswith(banned)}
        assert not bad, f"{f.name} imports {bad}"


def test_data_module_does_not_read_trainer_state():
    tree = ast.parse((PKG / "data" / "genome.py").read_text())
    reads = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in ("trainer", "lightning_module")]
    assert not reads, f"glmtrain/data/genome.py reads trainer state at line(s) {reads}"
