"""glmtrain: config-driven pretraining of genomic language models."""

from pathlib import Path

__version__ = "0.1.0"

#: The Hydra config tree (``conf/``, one group per folder), beside the package.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
