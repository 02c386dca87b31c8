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


def test_train_progress_off_a_terminal_is_one_line_per_epoch(tmp_path, capsys):
    # issue 11 item 22: under pytest stderr is not a terminal; per-batch bars would be redrawn into the log
    store = tmp_path / "s.zarr"
    write_synthetic_store(store, 48, 3, 16, binary_scores=True)
    rc = main(["train", "--store", str(store), "--model", "lstm", "--task", "classification", "--epochs", "3",
               "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert rc == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("lstm epoch ")]
    assert [line.split(":")[0] for line in lines] == ["lstm epoch 1/3", "lstm epoch 2/3", "lstm epoch 3/3"], err
    assert "train_loss " in lines[0] and "val_auroc " in lines[0] and "traces/s)" in lines[0]
