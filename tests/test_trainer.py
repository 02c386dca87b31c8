"""The training loop on small learnable stores: what a run writes, the split, regression, graph models,
the command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tracestore
from tracestore.errors import TrainConfigError
from tracestore.testing import synthetic_graphs, synthetic_ids, synthetic_sequences
from tracestore.train import TrainConfig, main, train
from tracestore.train.split import Split, make_split

L, D = 3, 8


def learnable_store(path: Path, n: int = 64, *, graphs: bool = False, regression: bool = False,
                    nan_scores: int = 0) -> str:
    """A store whose score is a function of the last layer's feature 0 (so a probe can learn it)."""
    seq = synthetic_sequences(n, L, D, seed=3, massive=False)
    f = seq[:, -1, 0]
    scores = (f / np.abs(f).max()).astype(np.float32) if regression else (f > np.median(f)).astype(np.float32)
    scores[:nan_scores] = np.nan
    url = str(path)
    with tracestore.create(url, num_layers=L, hidden_size=D, graphs=graphs) as w:
        w.append(synthetic_ids(n), seq, scores, graphs=synthetic_graphs(n, L, D, seed=3) if graphs else None)
    return url


def cfg(store: str, out: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = dict(store=store, out=str(out), epochs=3, batch_size=16, lr=1e-2, hidden=16,
                                   progress=False)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_classification_run_writes_metrics_summary_curves_split(tmp_path: Path) -> None:
    store = learnable_store(tmp_path / "s.zarr", nan_scores=4)
    run = tmp_path / "run"
    summary = train(cfg(store, run, epochs=6))  # the lstm's default regularisation learns in 6, not 3
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert [int(r["epoch"]) for r in rows] == list(range(6))
    assert {"train_loss", "val_loss", "val_auroc", "val_accuracy", "train_traces_per_s"} <= set(rows[0])
    assert all(float(r["train_traces_per_s"]) > 0 for r in rows)
    on_disk = json.loads((run / "summary.json").read_text())
    for key in ("val_auroc", "val_accuracy", "best_val_auroc", "best_epoch"):
        assert key in on_disk and on_disk[key] == summary[key]
    assert "val_mse" not in on_disk
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    split = Split.load(run)
    ids = set(tracestore.open(store).ids.tolist())
    assert set(split.train_ids).isdisjoint(split.val_ids) and set(split.test_ids).isdisjoint(split.train_ids)
    assert set(split.test_ids).isdisjoint(split.val_ids)
    assert set(split.train_ids) | set(split.val_ids) | set(split.test_ids) | set(split.unscored_ids) == ids
    assert len(split.unscored_ids) == 4
    assert summary["n_train"] + summary["n_val"] + summary["n_test"] == 60
    # the learnable signal is found
    assert summary["val_auroc"] > 0.7


def test_split_is_deterministic_order_free_and_stratified() -> None:
    ids = [f"t{i:03d}" for i in range(40)]
    scores = np.array([i % 4 == 0 for i in range(40)], np.float32)  # 10 positives
    a = make_split(ids, scores, val_fraction=0.25, seed=1, labels=scores.astype(int))
    perm = np.random.default_rng(0).permutation(40)
    b = make_split(np.array(ids)[perm], scores[perm], val_fraction=0.25, seed=1, labels=scores[perm].astype(int))
    assert (a.train_ids, a.val_ids) == (b.train_ids, b.val_ids)
    c = make_split(ids, scores, val_fraction=0.25, seed=2, labels=scores.astype(int))
    assert c.val_ids != a.val_ids
    pos = {i for i, s in zip(ids, scores, strict=True) if s == 1}
    assert len(pos & set(a.val_ids)) == 2 or len(pos & set(a.val_ids)) == 3  # 25% of 10, rounded
    assert len(a.val_ids) == 10


def test_split_needs_two_scored_traces() -> None:
    with pytest.raises(TrainConfigError, match="at least 2 traces"):
        make_split(["a", "b"], [np.nan, 1.0], val_fraction=0.5, seed=0)


def test_regression_reports_mse_and_pearson(tmp_path: Path) -> None:
    store = learnable_store(tmp_path / "s.zarr", regression=True)
    s = train(cfg(store, tmp_path / "run", task="regression", epochs=2))
    assert {"val_mse", "val_pearson", "best_val_mse"} <= set(s)
    assert "val_auroc" not in s
    assert np.isfinite(s["val_mse"]) and -1.0 <= s["val_pearson"] <= 1.0
    assert np.isfinite(s["test_mse"]) and "threshold" not in s and s["n_test"] > 0


@pytest.mark.parametrize("model", ["gnn", "hybrid", "seed-gnn-lstm", "seed-lstm"])
def test_graph_models_train(tmp_path: Path, model: str) -> None:
    store = learnable_store(tmp_path / "s.zarr", n=32, graphs=True)
    s = train(cfg(store, tmp_path / "run", model=model, epochs=1, graph_layer=1))
    assert np.isfinite(s["train_loss"]) and np.isfinite(s["val_loss"])
    assert s["epochs_done"] == 1


def test_graph_model_on_store_without_graphs_is_a_clear_error(tmp_path: Path) -> None:
    store = learnable_store(tmp_path / "s.zarr", n=16)
    with pytest.raises(TrainConfigError, match="has none; convert archives that carry graphs"):
        train(cfg(store, tmp_path / "run", model="gnn"))


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = learnable_store(tmp_path / "s.zarr", n=32)
    out = tmp_path / "run"
    rc = main(["--store", store, "--model", "lstm", "--task", "classification", "--epochs", "1", "--batch-size", "8",
               "--lr", "0.01", "--device", "cpu", "--out", str(out), "--hidden", "8", "--no-progress"])
    assert rc == 0
    assert "val_auroc=" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["epochs_done"] == 1
    rc = main(["--store", store, "--model", "gnn", "--epochs", "1", "--out", str(tmp_path / "r2"), "--no-progress"])
    assert rc == 2
    assert "this store has none" in capsys.readouterr().err


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", ["lstm", "gnn"])
def test_cuda_bf16_autocast(tmp_path: Path, model: str) -> None:
    store = learnable_store(tmp_path / "s.zarr", n=32, graphs=True)
    s = train(cfg(store, tmp_path / "run", model=model, epochs=2, device="cuda", bf16=True, graph_layer=1))
    assert np.isfinite(s["train_loss"]) and "note" not in s


def test_seed_labels_positive_below_on_a_converted_seed_store(tmp_path: Path) -> None:
    """The seed's rule (label 1 = hallucination = BLEURT < 0.5) on a store converted from its raw archives,
    graph models reading the graphs built at conversion; unscored traces stay out and are counted."""
    from tracestore.convert import convert
    from tracestore.testing.seed import seed_bleurt_scores, write_seed_raw_archive, write_seed_scores_csv

    ids = write_seed_raw_archive(tmp_path / "raw" / "b.pkl.gz", 40, L, D, num_heads=2, tokens=(3, 8))
    csv_path = write_seed_scores_csv(tmp_path / "gt.csv", ids[:36])  # 4 traces without a score
    convert([tmp_path / "raw"], tmp_path / "s.zarr", scores=csv_path, workers=0)
    store = str(tmp_path / "s.zarr")
    for model in ("lstm", "gnn", "hybrid"):
        s = train(cfg(store, tmp_path / model, model=model, epochs=1, batch_size=8, positive_below=0.5))
        assert s["n_unscored"] == 4 and s["label_rule"] == "score < 0.5"
        assert 0.0 <= s["val_auroc"] <= 1.0
    split = Split.load(tmp_path / "lstm")
    lab = {i: float(v < 0.5) for i, v in zip(ids[:36], seed_bleurt_scores(36), strict=True)}
    # the split was stratified on the seed's labels: both classes on both sides
    assert {lab[i] for i in split.train_ids} == {lab[i] for i in split.val_ids} == {0.0, 1.0}
    with pytest.raises(SystemExit):
        main(["--store", store, "--out", str(tmp_path / "x"), "--threshold", "0.3", "--positive-below", "0.5"])


def test_graph_models_need_token_states(tmp_path: Path) -> None:
    from tracestore.convert import convert
    from tracestore.testing.seed import write_seed_raw_archive

    write_seed_raw_archive(tmp_path / "raw" / "b.pkl.gz", 6, L, D, num_heads=2, tokens=4)
    convert([tmp_path / "raw"], tmp_path / "s.zarr", workers=0, tokens="ids")
    with pytest.raises(TrainConfigError, match=r"--tokens all"):
        train(cfg(str(tmp_path / "s.zarr"), tmp_path / "run", model="gnn"))


# -- issue 13 item 5: --seeds K, --balance ---------------------------------------------------------------------


def skewed_store(path: Path, n: int = 80, positives: float = 0.2) -> str:
    seq = synthetic_sequences(n, L, D, seed=5, massive=False)
    f = seq[:, -1, 0]
    scores = (f >= np.quantile(f, 1 - positives)).astype(np.float32)
    url = str(path)
    with tracestore.create(url, num_layers=L, hidden_size=D) as w:
        w.append(synthetic_ids(n), seq, scores)
    return url


def test_seeds_repeat_on_one_split_and_report_mean_and_std(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = learnable_store(tmp_path / "s.zarr")
    run = tmp_path / "run"
    rc = main(["--store", store, "--epochs", "2", "--batch-size", "16", "--hidden", "8", "--out", str(run),
               "--seeds", "3", "--seed", "7", "--no-progress"])
    assert rc == 0
    assert "3 seeds, test_auroc=" in capsys.readouterr().out
    s = json.loads((run / "summary.json").read_text())
    subs = [json.loads((run / f"seed{k}" / "summary.json").read_text()) for k in range(3)]
    assert [x["config"]["seed"] for x in subs] == [7, 8, 9] == s["seed_values"]
    # the split is fixed (split_seed = the first seed), the initialisation varies
    assert len({(run / f"seed{k}" / "split.json").read_text() for k in range(3)}) == 1
    assert (run / "split.json").read_text() == (run / "seed0" / "split.json").read_text()
    v = [x["test_auroc"] for x in subs]
    assert s["test_auroc_values"] == v
    assert s["test_auroc_mean"] == pytest.approx(np.mean(v)) and s["test_auroc_std"] == pytest.approx(np.std(v, ddof=1))
    assert {"test_f1_mean", "test_accuracy_std", "best_val_auroc_mean", "threshold_mean"} <= set(s)
    a = torch.load(run / "seed0" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(run / "seed1" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_balance_weighs_the_positive_class_when_labels_are_skewed(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    store = skewed_store(tmp_path / "s.zarr")  # 1 positive in 5: 4:1
    s = train(cfg(store, tmp_path / "auto", epochs=1, progress=True))
    bal = s["balance"]
    assert bal["mode"] == "auto" and bal["pos_weight"] == pytest.approx(bal["n_neg"] / bal["n_pos"])
    assert bal["n_neg"] / bal["n_pos"] > 3.5
    assert "lstm: labels skewed 3.7:1 (beyond 2:1): 12 positive, 44 negative" in capsys.readouterr().err  # said
    assert train(cfg(store, tmp_path / "none", epochs=1, balance="none"))["balance"]["pos_weight"] is None
    mild = skewed_store(tmp_path / "m.zarr", positives=0.4)  # 1.5:1: left alone by auto, weighed on request
    assert train(cfg(mild, tmp_path / "m_auto", epochs=1))["balance"]["pos_weight"] is None
    b = train(cfg(mild, tmp_path / "m_w", epochs=1, balance="weight"))["balance"]
    assert b["pos_weight"] == pytest.approx(b["n_neg"] / b["n_pos"]) and 1.4 < b["pos_weight"] < 1.6
    # the weight moves the predictions: identical runs but for the weight give a higher mean positive logit
    from tracestore.train.checkpoint import load_checkpoint
    from tracestore.train.models import build_model

    def mean_logit(run: str, **kw: object) -> float:
        train(cfg(store, tmp_path / run, epochs=3, patience=0, **kw))
        m = build_model("lstm", num_layers=L, hidden_size=D, hidden=16).eval()
        m.load_state_dict(load_checkpoint(tmp_path / run / "checkpoints" / "last.pt")["model"])
        x = torch.from_numpy(np.asarray(tracestore.open(store).sequences, np.float32))
        with torch.no_grad():
            return float(m(x).mean())

    assert mean_logit("w3", balance="weight") > mean_logit("n3", balance="none")
