"""Issue 11, items 13-14: a resumed run trains exactly the traces of an uninterrupted one, epoch by epoch, also
when it stopped on an epoch's last step; NaN predictions give NaN metrics and a diverged loss stops the run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from test_trainer import cfg, learnable_store
from tracestore.cli import main
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


@pytest.mark.parametrize("stop_step", [4, 6])  # the last step of epoch 0 (4 batches an epoch), and mid-epoch 1
def test_resume_after_max_steps_trains_what_an_uninterrupted_run_trains(tmp_path: Path, stop_step: int) -> None:
    store = learnable_store(tmp_path / "s.zarr")  # 52 training traces: 4 batches of 16 per epoch
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
        if (state["epoch"], state["step_in_epoch"]) == (1, 4):  # the --checkpoint-every checkpoint after the
            raise KeyboardInterrupt("killed")  # last step of epoch 1, before the epoch's own checkpoint
        return out

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(store, part, epochs=EPOCHS, record_ids=True, checkpoint_every=2))
    monkeypatch.undo()
    loader_state = load_checkpoint(checkpoint_path(part))["ranks"][0]["loader"]
    assert loader_state["consumed"] == loader_state["num_traces"]  # the whole epoch was consumed
    train(cfg(store, part, epochs=EPOCHS, record_ids=True, resume=True))
    _assert_same_run(tmp_path / "full", part)
