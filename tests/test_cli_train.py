"""`tracestore train` and `tracestore demo` reach their own parsers through the main command line."""

from __future__ import annotations

import json

import pytest

from tracestore.cli import main
from tracestore.testing import write_synthetic_store


def test_tracestore_train_runs_through_the_cli(tmp_path):
    store = tmp_path / "s.zarr"
    write_synthetic_store(store, 48, 3, 16, binary_scores=True)
    out = tmp_path / "run"
    rc = main(["train", "--store", str(store), "--model", "lstm", "--task", "classification", "--epochs", "2",
               "--batch-size", "16", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "val_auroc" in summary and "val_accuracy" in summary
    assert (out / "metrics.csv").read_text().count("\n") >= 3  # header + one row per epoch


def test_tracestore_train_bad_store_is_one_clear_line(tmp_path, capsys):
    rc = main(["train", "--store", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "run")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tracestore train: error:") and "missing.zarr" in err[0]


def test_tracestore_demo_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    assert "--tiny" in capsys.readouterr().out
