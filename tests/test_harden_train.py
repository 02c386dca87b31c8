"""Issue 11, items 13-14: a resumed run trains exactly the traces of an uninterrupted one, epoch by epoch, also
when it stopped on an epoch's last step; NaN predictions give NaN metrics and a diverged loss stops the run."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from test_trainer import cfg, learnable_store
from tracestore.cli import main
from tracestore.errors import TrainingDivergedError
from tracestore.train import train
from tracestore.train.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint

EPOCHS = 3


def _ids(run: Path) -> list[list[str]]:
    """The ids each epoch trained on, in order (RUN_DIR/ids/epochNNN.rank0.txt, from --record-ids)."""
    return [(run / "ids" / f"epoch{e:03d}.rank0.txt").read_text().splitlines() for e in range(EPOCHS)]


def _rows(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))


def _train_cli(store: str, run: Path, *extra: str) -> None:
    argv = ["train", "--store", store, "--epochs", str(EPOCHS), "--batch-size", "16", "--lr", "0.01", "--hidden",
            "16", "--out", str(run), "--record-ids", "--no-progress", *extra]
    assert main(argv) == 0


def _assert_same_run(full: Path, part: Path) -> None:
    assert _ids(part) == _ids(full)  # the same traces in the same order, epoch by epoch
    a, b = load_checkpoint(checkpoint_path(full))["model"], load_checkpoint(checkpoint_path(part))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = _rows(full), _rows(part)
    assert [r["epoch"] for r in rb] == [str(e) for e in range(EPOCHS)]
    for x, y in zip(ra, rb, strict=True):
        assert (x["train_loss"], x["val_loss"], x["val_auroc"]) == (y["train_loss"], y["val_loss"], y["val_auroc"])
    sa, sb = json.loads((full / "summary.json").read_text()), json.loads((part / "summary.json").read_text())
    assert (sb["epochs_done"], sb["best_epoch"], sb["val_auroc"]) == (sa["epochs_done"], sa["best_epoch"],
                                                                     sa["val_auroc"])
    # the test split is scored with the same best weights (checkpoints/best.pt survives the interruption)
    assert (sb["test_auroc"], sb["threshold"], sb["test_f1"]) == (sa["test_auroc"], sa["threshold"], sa["test_f1"])


@pytest.mark.parametrize("stop_step", [3, 5])  # the last step of epoch 0 (3 batches an epoch), and mid-epoch 1
def test_resume_after_max_steps_trains_what_an_uninterrupted_run_trains(tmp_path: Path, stop_step: int) -> None:
    store = learnable_store(tmp_path / "s.zarr")  # 70/15/15 of 64: 44 training traces, 3 batches of 16 per epoch
    _train_cli(store, tmp_path / "full")
    part = tmp_path / "part"
    _train_cli(store, part, "--max-steps", str(stop_step))
    state = load_checkpoint(checkpoint_path(part))
    assert state["global_step"] == stop_step
    _train_cli(store, part, "--resume")
    _assert_same_run(tmp_path / "full", part)


def test_resume_after_a_kill_at_an_epoch_end_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tracestore.train.trainer as trainer

    store = learnable_store(tmp_path / "s.zarr")
    train(cfg(store, tmp_path / "full", epochs=EPOCHS, record_ids=True))
    part = tmp_path / "part"

    def save_then_die(path: Path, state: dict[str, object]) -> Path:
        out = save_checkpoint(path, state)
        if (state["epoch"], state.get("step_in_epoch")) == (1, 3):  # the --checkpoint-every checkpoint after the
            raise KeyboardInterrupt("killed")  # last step of epoch 1, before the epoch's own checkpoint
        return out

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(store, part, epochs=EPOCHS, record_ids=True, checkpoint_every=3))
    monkeypatch.undo()
    loader_state = load_checkpoint(checkpoint_path(part))["ranks"][0]["loader"]
    assert loader_state["consumed"] == loader_state["num_traces"]  # the whole epoch was consumed
    train(cfg(store, part, epochs=EPOCHS, record_ids=True, resume=True))
    _assert_same_run(tmp_path / "full", part)


# -- item 14: NaN predictions, a diverged loss ------------------------------------------------------------------


def test_nan_predictions_give_nan_metrics_whatever_the_label_order() -> None:
    from tracestore.train import metrics as M

    labels = np.array([0, 1, 0, 1, 1, 0], np.float64)
    preds = np.full(6, np.nan)
    for order in itertools.permutations(range(6)):
        o = list(order)
        m = M.classification_metrics(labels[o], preds[o])
        assert math.isnan(m["auroc"]) and math.isnan(m["accuracy"])
    one_nan = np.array([0.1, 0.9, 0.2, np.nan, 0.8, 0.3])
    assert math.isnan(M.auroc(labels, one_nan)) and math.isnan(M.accuracy(labels, one_nan))
    r = M.regression_metrics(labels, one_nan)
    assert math.isnan(r["mse"]) and math.isnan(r["pearson"])
    assert M.auroc(labels, [0.1, 0.9, 0.2, np.inf, 0.8, -np.inf]) == 1.0  # infinite logits still order


def test_a_diverged_loss_stops_training_with_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = learnable_store(tmp_path / "s.zarr")
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match=r"training loss is (nan|inf) at epoch 0, step \d+ .*lower --lr"):
        train(cfg(store, run, epochs=2, lr=float("inf")))
    argv = ["train", "--store", store, "--epochs", "2", "--batch-size", "16", "--lr", "inf", "--out", str(run),
            "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training loss is" in err[0]


def test_best_epoch_skips_nan_epochs(tmp_path: Path) -> None:
    from tracestore.train.split import make_split
    from tracestore.train.trainer import _Dist, _summary

    split = make_split([f"q{i}" for i in range(10)], np.linspace(0, 1, 10), val_fraction=0.2, seed=0)
    rows = [{"epoch": e, "train_loss": 1.0, "val_loss": v, "val_auroc": a, "val_accuracy": a, "train_traces_per_s": 1.0}
            for e, (v, a) in enumerate([(0.6, 0.7), (float("nan"), float("nan")), (0.5, 0.8)])]
    s = _summary(cfg("s", tmp_path), rows, split, _Dist(), 1.0, 8, 2, False, 1)
    assert (s["best_epoch"], s["best_by"]) == (2, "val_auroc")
    nan_rows = [{**r, "val_loss": float("nan"), "val_auroc": float("nan")} for r in rows]
    s = _summary(cfg("s", tmp_path), nan_rows, split, _Dist(), 1.0, 8, 2, False, 1)
    assert s["best_epoch"] is None and s["best_by"] is None  # no epoch to prefer, and no crash


def test_one_class_sides_are_said_and_a_one_class_training_split_refused(tmp_path, capsys) -> None:
    # a review found: a one-label store trained silently to accuracy 1.0, and the summary claimed a Youden
    # threshold where the 0.5 fallback was used
    import numpy as np

    import tracestore
    from tracestore.errors import TrainConfigError
    from tracestore.train import TrainConfig, train

    n, L, D = 40, 2, 8
    rng = np.random.default_rng(0)
    one = tmp_path / "one.zarr"
    with tracestore.create(one, num_layers=L, hidden_size=D) as w:
        w.append([f"t{i}" for i in range(n)], rng.normal(size=(n, L, D)).astype(np.float32), np.ones(n, np.float32))
    with pytest.raises(TrainConfigError, match=r"train split holds one class only .* all label 1"):
        train(TrainConfig(store=str(one), out=str(tmp_path / "r1"), model="lstm", epochs=1, progress=False))
    rare = tmp_path / "rare.zarr"
    scores = np.zeros(n, np.float32)
    scores[:2] = 1.0
    with tracestore.create(rare, num_layers=L, hidden_size=D) as w:
        w.append([f"t{i}" for i in range(n)], rng.normal(size=(n, L, D)).astype(np.float32), scores)
    s = train(TrainConfig(store=str(rare), out=str(tmp_path / "r2"), model="lstm", epochs=1, hidden=4,
                          batch_size=8))
    err = capsys.readouterr().err
    sides = [side for side in ("validation", "test") if f"note: the {side} split holds one class only" in err]
    assert sides, err  # 2 positives in 40: validation or test gets none
    if "validation" in sides:
        assert s["threshold_by"].startswith("default_0.5")


def test_balance_weight_on_a_regression_is_refused(tmp_path) -> None:
    import numpy as np

    import tracestore
    from tracestore.errors import TrainConfigError
    from tracestore.train import TrainConfig, train

    url = tmp_path / "s.zarr"
    with tracestore.create(url, num_layers=2, hidden_size=8) as w:
        w.append([f"t{i}" for i in range(20)], np.zeros((20, 2, 8), np.float32), np.linspace(0, 1, 20))
    with pytest.raises(TrainConfigError, match=r"--balance weight .* regression"):
        train(TrainConfig(store=str(url), out=str(tmp_path / "r"), task="regression", balance="weight", epochs=1))
