"""Metrics against values worked out by hand, and AUROC against a brute-force count of pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracestore.train import metrics as M


def test_auroc_hand_checked() -> None:
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3 of 4 pairs
    assert M.auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_auroc_ties_count_half() -> None:
    # pos 0.5 vs neg 0.5 tie (0.5), pos 0.5 > neg 0.2, pos 0.9 > both -> 3.5 / 4
    assert M.auroc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    assert M.auroc([0, 1, 0, 1], [1.0, 1.0, 1.0, 1.0]) == pytest.approx(0.5)


def test_auroc_perfect_reversed_and_undefined() -> None:
    assert M.auroc([0, 0, 1], [-3.0, -1.0, 2.0]) == 1.0
    assert M.auroc([1, 1, 0], [-3.0, -1.0, 2.0]) == 0.0
    assert math.isnan(M.auroc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_auroc_rejects_non_binary_labels() -> None:
    with pytest.raises(ValueError, match="other than 0 and 1"):
        M.auroc([0, 0.5, 1], [0.1, 0.2, 0.3])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(-3, 3)), min_size=2, max_size=30))
def test_auroc_equals_pair_count(pairs: list[tuple[int, int]]) -> None:
    y = np.array([p[0] for p in pairs], float)
    s = np.array([p[1] for p in pairs], float)  # small integers: many ties
    pos, neg = s[y == 1], s[y == 0]
    got = M.auroc(y, s)
    if pos.size == 0 or neg.size == 0:
        assert math.isnan(got)
        return
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    assert got == pytest.approx(wins / (pos.size * neg.size))


def test_pearson_hand_checked() -> None:
    # dx = [-2,-1,0,1,2], dy = [-2,0,1,0,1]: sum dx*dy = 6, sum dx^2 = 10, sum dy^2 = 6 -> 6 / sqrt(60)
    assert M.pearson([1, 2, 3, 4, 5], [2, 4, 5, 4, 5]) == pytest.approx(6 / math.sqrt(60))
    assert M.pearson([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(M.pearson([1, 2, 3], [7, 7, 7]))


def test_mse_and_accuracy_hand_checked() -> None:
    assert M.mse([1, 2, 3], [1, 3, 5]) == pytest.approx(5 / 3)
    # 0.9 -> 1 right, 0.6 -> 1 wrong, 0.4 -> 0 wrong, 0.1 -> 0 right
    assert M.accuracy([1, 0, 1, 0], [0.9, 0.6, 0.4, 0.1]) == pytest.approx(0.5)


def test_classification_metrics_take_logits() -> None:
    m = M.classification_metrics([1, 0, 1, 0], [2.0, 0.5, -0.1, -3.0])  # logit 0 is probability 0.5
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["auroc"] == pytest.approx(0.75)


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="one prediction per target"):
        M.mse([1, 2], [1, 2, 3])


def test_youden_threshold_hand_checked() -> None:
    # negatives 0.1, 0.2, 0.8; positives 0.5, 0.6, 0.9. Cuts (score >= t): t=0.9 TPR 1/3 FPR 0 J 1/3; t=0.8
    # 1/3, 1/3 J 0; t=0.6 2/3, 1/3 J 1/3; t=0.5 1, 1/3 J 2/3 (the best); t=0.2 1, 2/3 J 1/3; t=0.1 J 0
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.8, 0.5, 0.6, 0.9]
    assert M.youden_threshold(y, s) == 0.5
    # at 0.5: predicted positive 0.8, 0.5, 0.6, 0.9 -> TP 3, FP 1, TN 2, FN 0
    m = M.thresholded_metrics(y, s, 0.5)
    assert m == pytest.approx({"accuracy": 5 / 6, "precision": 0.75, "recall": 1.0, "f1": 2 * 0.75 / 1.75})
    # equal J: the higher cut wins (0.8 and 0.35 both reach J 1/2 here)
    assert M.youden_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.8
    assert np.isnan(M.youden_threshold([1, 1], [0.2, 0.3]))  # one class: nothing to choose by
    assert all(np.isnan(v) for v in M.thresholded_metrics(y, [0.1, np.nan, 0.2, 0.3, 0.4, 0.5], 0.3).values())


def test_metrics_agree_with_scikit_learn_and_keep_infinite_logits_in_order() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    s = rng.normal(size=50)
    assert M.auroc(y, s) == pytest.approx(roc_auc_score(y, s))
    s[np.flatnonzero(y == 1)[0]] = np.inf  # scikit-learn refuses infinities; their order is what counts
    s[np.flatnonzero(y == 0)[0]] = -np.inf
    finite = np.where(np.isinf(s), np.sign(s) * 1e6, s)
    assert M.auroc(y, s) == pytest.approx(roc_auc_score(y, finite))
