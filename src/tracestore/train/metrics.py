"""Validation metrics of a probe: AUROC and accuracy for binary classification, MSE and Pearson for
regression. Plain numpy on the gathered predictions of the whole validation set (after every rank's
predictions are collected), so the numbers do not depend on batch size or world size.

Undefined cases return NaN rather than raising: AUROC with only one class present, Pearson of a constant.
A training run must not die because one tiny validation split happened to hold a single class.

A NaN prediction (a diverged probe) makes every metric NaN: it has no order to rank and no side of a threshold
(`np.argsort` would sort NaN last, giving an AUROC that depends on the label order, and `NaN >= t` is False,
counting it as class 0). Infinite logits are predictions like any other.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["auroc", "accuracy", "mse", "pearson", "classification_metrics", "regression_metrics"]


def _flat(a: Any, name: str) -> np.ndarray:
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    return x


def _check_pair(y_true: np.ndarray, y_pred: np.ndarray, what: str) -> None:
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{what}: y_true has {y_true.size} values and y_pred {y_pred.size}; pass one prediction "
                         f"per target")


def auroc(y_true: Any, y_score: Any) -> float:
    """Area under the ROC curve of binary labels `y_true` (0/1) against real-valued scores.

    Computed as the Mann-Whitney U statistic: the probability that a random positive scores higher than a
    random negative, ties counting one half (average ranks). Returns NaN when only one class is present, or
    when any score is NaN.

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
    y = _flat(y_true, "y_true")
    s = _flat(y_score, "y_score")
    _check_pair(y, s, "auroc")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"auroc: y_true holds values other than 0 and 1 (e.g. {y[~np.isin(y, (0.0, 1.0))][0]}); "
                         f"threshold the scores into binary labels first")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0 or np.isnan(s).any():
        return float("nan")
    ranks = _average_ranks(s)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # boundaries of runs of equal values
    new_run = np.r_[True, sorted_s[1:] != sorted_s[:-1]]
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.r_[starts[1:], s.size]
    mean_rank = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1 .. end
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def accuracy(y_true: Any, y_prob: Any, threshold: float = 0.5) -> float:
    """Fraction of labels predicted right when `y_prob >= threshold` means class 1 (probabilities, not
    logits: pass sigmoid(logits) or use threshold=0 with logits). NaN for an empty set, or when any
    prediction is NaN."""
    y = _flat(y_true, "y_true")
    p = _flat(y_prob, "y_prob")
    _check_pair(y, p, "accuracy")
    if y.size == 0 or np.isnan(p).any():
        return float("nan")
    return float(np.mean((p >= threshold).astype(np.float64) == y))


def mse(y_true: Any, y_pred: Any) -> float:
    """Mean squared error. NaN for an empty set, or when any prediction is NaN."""
    y = _flat(y_true, "y_true")
    p = _flat(y_pred, "y_pred")
    _check_pair(y, p, "mse")
    if y.size == 0:
        return float("nan")
    return float(np.mean((p - y) ** 2))


def pearson(y_true: Any, y_pred: Any) -> float:
    """Pearson correlation coefficient. NaN when either side is constant or has fewer than 2 values, or when any
    prediction is NaN."""
    y = _flat(y_true, "y_true")
    p = _flat(y_pred, "y_pred")
    _check_pair(y, p, "pearson")
    if y.size < 2:
        return float("nan")
    yc = y - y.mean()
    pc = p - p.mean()
    denom = np.sqrt((yc**2).sum() * (pc**2).sum())
    if denom == 0.0:
        return float("nan")
    return float(np.clip((yc * pc).sum() / denom, -1.0, 1.0))


def classification_metrics(labels: Any, logits: Any) -> dict[str, float]:
    """AUROC and accuracy (at probability 0.5, i.e. logit 0) of binary labels against logits."""
    lg = _flat(logits, "logits")
    return {"auroc": auroc(labels, lg), "accuracy": accuracy(labels, lg, threshold=0.0)}


def regression_metrics(targets: Any, preds: Any) -> dict[str, float]:
    """MSE and Pearson of targets against predictions."""
    return {"mse": mse(targets, preds), "pearson": pearson(targets, preds)}
