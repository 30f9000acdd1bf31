"""Classification metrics (numpy): MCC, accuracy, F1, AUROC.

Definitions as in scikit-learn (checked against it and against hand-computed cases in
tests/test_downstream_metrics.py):

* MCC: Matthews correlation from the confusion matrix; the multi-class generalisation
  (Gorodkin 2004) which equals the binary formula for two classes; 0 when undefined;
* F1: binary -> F1 of class 1; multi-class -> unweighted mean over classes (macro);
* AUROC: binary -> probability that a random positive scores above a random negative (ties
  count 1/2), computed from average ranks; multi-class -> macro one-vs-rest.
"""

from __future__ import annotations

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def mcc(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int | None = None) -> float:
    n_classes = n_classes or int(max(np.max(y_true), np.max(y_pred)) + 1)
    cm = confusion(y_true, y_pred, n_classes).astype(np.float64)
    t, p = cm.sum(1), cm.sum(0)  # true / predicted counts per class
    c, s = np.trace(cm), cm.sum()
    denom = np.sqrt(s * s - p @ p) * np.sqrt(s * s - t @ t)
    return float((c * s - t @ p) / denom) if denom > 0 else 0.0


def f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    cm = confusion(y_true, y_pred, n_classes).astype(np.float64)
    tp = np.diag(cm)
    denom = cm.sum(0) + cm.sum(1)  # 2TP + FP + FN
    per_class = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(per_class[1]) if n_classes == 2 else float(per_class.mean())


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    bounds = np.flatnonzero(np.diff(xs)) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [len(x)]))
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return ranks


def binary_auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    y = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(np.asarray(score, dtype=np.float64))
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc(y_true: np.ndarray, probs: np.ndarray) -> float:
    if probs.shape[1] == 2:
        return binary_auroc(y_true, probs[:, 1])
    vals = [binary_auroc(y_true == c, probs[:, c]) for c in range(probs.shape[1])]
    vals = [v for v in vals if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """All four metrics from true labels [N] and class probabilities [N, C]."""
    y_true = np.asarray(y_true, dtype=np.int64)
    n_classes = probs.shape[1]
    y_pred = probs.argmax(1)
    return {
        "mcc": mcc(y_true, y_pred, n_classes),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else float("nan"),
        "f1": f1(y_true, y_pred, n_classes),
        "auroc": auroc(y_true, probs),
        "n": int(len(y_true)),
    }
