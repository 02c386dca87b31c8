"""Issue 13 item 1, the protocol: a three-way split (no id on two sides, groups whole, deterministic,
stratified), the threshold chosen on validation, early stopping, and test metrics from the best checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import tracestore
from test_trainer import D, L, cfg, learnable_store
from tracestore.errors import TrainConfigError
from tracestore.testing import synthetic_ids, synthetic_sequences
from tracestore.train import metrics as M
from tracestore.train import train
from tracestore.train.checkpoint import load_checkpoint
from tracestore.train.models import build_model
from tracestore.train.split import Split, make_split


def _grouped(n_groups: int = 40, per: int = 3) -> tuple[list[str], np.ndarray, np.ndarray]:
    ids = [f"q{g:03d}_s{k}" for g in range(n_groups) for k in range(per)]
    labels = np.array([g % 3 == 0 for g in range(n_groups) for _ in range(per)], np.int64)  # 1 in 3 groups
    return ids, labels.astype(np.float32), labels


def test_three_way_split_sides_are_disjoint_and_cover_every_scored_id() -> None:
    ids = [f"t{i:03d}" for i in range(200)]
    scores = np.array([float(i % 4 == 0) for i in range(200)], np.float32)
    scores[:6] = np.nan
    labels = np.where(np.isnan(scores), -1, scores).astype(np.int64)
    s = make_split(ids, scores, val_fraction=0.15, test_fraction=0.15, seed=0, labels=labels)
    tr, va, te = map(set, s.sides())
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert tr | va | te | set(s.unscored_ids) == set(ids) and len(s.unscored_ids) == 6
    # 70/15/15 within each class: 50 - 2 NaN positives (48 -> 7 + 7) and 144 - 4 negatives... per class shares
    pos = {i for i, v in zip(ids, scores, strict=True) if v == 1}
    for side in (va, te):
        assert abs(len(side) - 0.15 * 194) <= 2
        assert abs(len(side & pos) / len(side) - len(pos) / 194) < 0.03  # stratified: the class balance kept


def test_three_way_split_keeps_groups_whole_and_is_deterministic() -> None:
    ids, scores, labels = _grouped()
    a = make_split(ids, scores, val_fraction=0.15, test_fraction=0.15, seed=3, labels=labels, group_pattern=r"^(q\d+)_")
    side = {i: k for k, ids_ in enumerate(a.sides()) for i in ids_}
    groups: dict[str, set[int]] = {}
    for i in ids:
        groups.setdefault(re.match(r"^(q\d+)_", i).group(1), set()).add(side[i])  # type: ignore[union-attr]
    assert all(len(v) == 1 for v in groups.values())  # no group on two sides
    assert {len([g for g, v in groups.items() if v == {k}]) for k in (1, 2)} == {6}  # 15% of 40 groups each
    # both classes of groups reach validation and test (stratified by the group's label)
    for k in (1, 2):
        assert {labels[ids.index(i)] for i in a.sides()[k]} == {0, 1}
    # the same split from any order of the ids, and from a store field that names the same groups
    perm = np.random.default_rng(0).permutation(len(ids))
    b = make_split(np.array(ids)[perm], scores[perm], val_fraction=0.15, test_fraction=0.15, seed=3,
                   labels=labels[perm], group_pattern=r"^(q\d+)_")
    assert a.sides() == b.sides()
    c = make_split(ids, scores, val_fraction=0.15, test_fraction=0.15, seed=3, labels=labels,
                   groups=[i.split("_")[0] for i in ids], group_field="question_id")
    assert c.sides() == a.sides() and c.group_field == "question_id"
    assert make_split(ids, scores, val_fraction=0.15, test_fraction=0.15, seed=4, labels=labels,
                      group_pattern=r"^(q\d+)_").sides() != a.sides()


def test_split_fractions_are_checked() -> None:
    with pytest.raises(TrainConfigError, match="leave traces to train on"):
        make_split(["a", "b", "c"], [0, 1, 0], val_fraction=0.5, test_fraction=0.5, seed=0)


def test_run_records_the_three_way_split_and_groups_by_a_store_field(tmp_path: Path) -> None:
    n = 60
    url = str(tmp_path / "s.zarr")
    seq = synthetic_sequences(n, L, D, seed=3, massive=False)
    qid = [f"qb_{i // 2}" for i in range(n)]  # two answers per question
    with tracestore.create(url, num_layers=L, hidden_size=D) as w:
        w.append(synthetic_ids(n), seq, (seq[:, -1, 0] > 0).astype(np.float32), fields={"question_id": qid})
    s = train(cfg(url, tmp_path / "run", epochs=1, group_field="question_id"))
    split = Split.load(tmp_path / "run")
    assert split.test_fraction == 0.15 and split.group_field == "question_id"
    q = dict(zip(synthetic_ids(n), qid, strict=True))
    sides = [{q[i] for i in ids_} for ids_ in split.sides()]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert s["n_train"] + s["n_val"] + s["n_test"] == n and s["n_test"] == len(split.test_ids) > 0
    with pytest.raises(TrainConfigError, match="'prompt' is not a field of this store"):
        train(cfg(url, tmp_path / "r2", epochs=1, group_field="prompt"))


def test_early_stopping_after_patience_epochs_without_improvement(tmp_path: Path) -> None:
    store = learnable_store(tmp_path / "s.zarr")
    # a learning rate too small to move the weights: the validation AUROC never beats epoch 0's
    s = train(cfg(store, tmp_path / "run", epochs=20, lr=1e-30, patience=2))
    assert s["early_stopped"] and s["epochs_done"] == 3 and s["best_epoch"] == 0
    s = train(cfg(store, tmp_path / "run0", epochs=4, lr=1e-30, patience=0))
    assert not s["early_stopped"] and s["epochs_done"] == 4


def test_test_metrics_come_from_the_best_checkpoint_and_the_validation_threshold(tmp_path: Path) -> None:
    store_url = learnable_store(tmp_path / "s.zarr", n=96)
    run = tmp_path / "run"
    s = train(cfg(store_url, run, epochs=6, patience=0))
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["epoch"] == s["best_epoch"] == s["test_from_epoch"]
    # recompute the test figures by hand from the best weights
    model = build_model("lstm", num_layers=L, hidden_size=D, hidden=16).eval()
    model.load_state_dict(best["model"])
    split = Split.load(run)
    store = tracestore.open(store_url)

    def logits(ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        v = store.select(ids)
        with torch.no_grad():
            out = model(torch.from_numpy(np.asarray(v.sequences, np.float32))).numpy()
        return (v.scores >= 0.5).astype(np.float64), out.astype(np.float64)

    yv, pv = logits(split.val_ids)
    yt, pt = logits(split.test_ids)
    t = M.youden_threshold(yv, pv)
    assert s["threshold_logit"] == pytest.approx(t, abs=1e-5)
    assert s["threshold"] == pytest.approx(1 / (1 + np.exp(-t)), abs=1e-6)
    assert s["test_auroc"] == pytest.approx(M.auroc(yt, pt))
    m = M.thresholded_metrics(yt, pt, t)
    for k in ("accuracy", "precision", "recall", "f1"):
        assert s[f"test_{k}"] == pytest.approx(m[k], nan_ok=True)
    assert s["n_test"] == len(split.test_ids) and json.loads((run / "summary.json").read_text())["test_auroc"] == s[
        "test_auroc"]
    # the old keys stay beside the new ones
    assert {"val_auroc", "val_accuracy", "best_val_auroc", "best_epoch"} <= set(s)
