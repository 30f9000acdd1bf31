"""glmtrain: config-driven pretraining of genomic language models."""

__version__ = "0.1.0"
