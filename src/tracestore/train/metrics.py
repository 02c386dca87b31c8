"""Metrics of a probe: AUROC, accuracy, precision, recall and F1 for binary classification, MSE and Pearson
for regression, and the decision threshold chosen on validation (Youden's J, as the seed pipeline did).
Computed with scikit-learn (`roc_auc_score`, `roc_curve`, `precision_recall_fscore_support`) on the gathered
predictions of a whole split (after every rank's predictions are collected), so the numbers do not depend on
batch size or world size.

Undefined cases return NaN rather than raising: AUROC with only one class present, Pearson of a constant,
precision when nothing is predicted positive. A training run must not die because one tiny validation split
happened to hold a single class.

A NaN prediction (a diverged probe) makes every metric NaN: it has no order to rank and no side of a threshold
(`NaN >= t` is False, which would count it as class 0). Infinite logits are predictions like any other: they
rank above (or below) every finite one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["auroc", "accuracy", "mse", "pearson", "classification_metrics", "regression_metrics",
           "youden_threshold", "thresholded_metrics"]


def _flat(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).reshape(-1)


def _check_pair(y_true: np.ndarray, y_pred: np.ndarray, what: str) -> None:
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{what}: y_true has {y_true.size} values and y_pred {y_pred.size}; pass one prediction "
                         f"per target")


def _check_binary(y: np.ndarray, what: str) -> None:
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"{what}: y_true holds values other than 0 and 1 (e.g. {y[~np.isin(y, (0.0, 1.0))][0]}); "
                         f"threshold the scores into binary labels first")


def _finite_order(s: np.ndarray) -> np.ndarray:
    """The scores with +-inf replaced by finite values beyond every finite score: the same order, which is
    all a ranking metric reads (scikit-learn refuses infinities)."""
    inf = np.isinf(s)
    if not inf.any():
        return s
    fin = s[~inf]
    lo, hi = (float(fin.min()), float(fin.max())) if fin.size else (0.0, 0.0)
    out = s.copy()
    out[s == np.inf] = hi + 1.0
    out[s == -np.inf] = lo - 1.0
    return out


def auroc(y_true: Any, y_score: Any) -> float:
    """Area under the ROC curve of binary labels `y_true` (0/1) against real-valued scores
    (`sklearn.metrics.roc_auc_score`): the probability that a random positive scores higher than a random
    negative, ties counting one half. Returns NaN when only one class is present, or when any score is NaN.

    Parameters
    ----------
    y_true : array-like of {0, 1}
        Labels.
    y_score : array-like of float
        Scores or logits; only their order matters.

    Returns
    -------
    float
        AUROC in [0, 1], or NaN.
    """
    from sklearn.metrics import roc_auc_score

    y = _flat(y_true)
    s = _flat(y_score)
    _check_pair(y, s, "auroc")
    _check_binary(y, "auroc")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size or np.isnan(s).any():
        return float("nan")
    return float(roc_auc_score(y, _finite_order(s)))


def accuracy(y_true: Any, y_prob: Any, threshold: float = 0.5) -> float:
    """Fraction of labels predicted right when `y_prob >= threshold` means class 1 (probabilities, not
    logits: pass sigmoid(logits) or use threshold=0 with logits). NaN for an empty set, or when any
    prediction is NaN."""
    from sklearn.metrics import accuracy_score

    y = _flat(y_true)
    p = _flat(y_prob)
    _check_pair(y, p, "accuracy")
    if y.size == 0 or np.isnan(p).any():
        return float("nan")
    return float(accuracy_score(y, (p >= threshold).astype(np.float64)))


def mse(y_true: Any, y_pred: Any) -> float:
    """Mean squared error. NaN for an empty set, or when any prediction is NaN."""
    from sklearn.metrics import mean_squared_error

    y = _flat(y_true)
    p = _flat(y_pred)
    _check_pair(y, p, "mse")
    if y.size == 0 or not np.isfinite(p).all():
        return float("nan") if y.size == 0 or np.isnan(p).any() else float("inf")
    return float(mean_squared_error(y, p))


def pearson(y_true: Any, y_pred: Any) -> float:
    """Pearson correlation coefficient. NaN when either side is constant or has fewer than 2 values, or when any
    prediction is NaN."""
    y = _flat(y_true)
    p = _flat(y_pred)
    _check_pair(y, p, "pearson")
    if y.size < 2:
        return float("nan")
    yc = y - y.mean()
    pc = p - p.mean()
    denom = np.sqrt((yc**2).sum() * (pc**2).sum())
    if denom == 0.0 or not np.isfinite(denom):
        return float("nan")
    return float(np.clip((yc * pc).sum() / denom, -1.0, 1.0))


def youden_threshold(y_true: Any, y_score: Any) -> float:
    """The decision threshold that maximises Youden's J = TPR - FPR on (`y_true`, `y_score`), read off
    `sklearn.metrics.roc_curve`: a score >= the threshold predicts class 1. Among equal J the highest
    threshold wins (fewer positives). NaN when only one class is present or any score is NaN (the caller
    then falls back to its default threshold)."""
    from sklearn.metrics import roc_curve

    y = _flat(y_true)
    s = _flat(y_score)
    _check_pair(y, s, "youden_threshold")
    _check_binary(y, "youden_threshold")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size or np.isnan(s).any():
        return float("nan")
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    # thr[0] is +inf (nothing predicted positive): a real score is always at least as good a cut
    j = (tpr - fpr)[1:]
    return float(thr[1:][int(np.argmax(j))])


def thresholded_metrics(y_true: Any, y_score: Any, threshold: float) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of `y_score >= threshold` as the class-1 prediction
    (`sklearn.metrics.precision_recall_fscore_support`, binary). Precision is NaN when nothing is predicted
    positive, recall when no label is positive; every value is NaN when a score is NaN."""
    from sklearn.metrics import precision_recall_fscore_support

    y = _flat(y_true)
    s = _flat(y_score)
    _check_pair(y, s, "thresholded_metrics")
    _check_binary(y, "thresholded_metrics")
    names = ("accuracy", "precision", "recall", "f1")
    if y.size == 0 or np.isnan(s).any() or math.isnan(threshold):
        return dict.fromkeys(names, float("nan"))
    pred = (s >= threshold).astype(np.float64)
    p, r, f, _ = precision_recall_fscore_support(y, pred, average="binary", pos_label=1, zero_division=np.nan)
    return {"accuracy": accuracy(y, pred, 0.5), "precision": float(p), "recall": float(r), "f1": float(f)}


def classification_metrics(labels: Any, logits: Any) -> dict[str, float]:
    """AUROC and accuracy (at probability 0.5, i.e. logit 0) of binary labels against logits."""
    lg = _flat(logits)
    return {"auroc": auroc(labels, lg), "accuracy": accuracy(labels, lg, threshold=0.0)}


def regression_metrics(targets: Any, preds: Any) -> dict[str, float]:
    """MSE and Pearson of targets against predictions."""
    return {"mse": mse(targets, preds), "pearson": pearson(targets, preds)}
