"""Downstream use of pretrained models: fine-tuning on classification tasks (with full, probe and
parameter-efficient methods), zero-shot variant-effect scoring and sequence generation.

Each is a value of the ``task`` config group (``python -m glmtrain task=finetune|score|generate``);
see docs/downstream.md.
"""
