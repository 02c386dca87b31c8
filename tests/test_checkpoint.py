"""Checkpoints: atomic writes, clear errors, and resume that reproduces an uninterrupted run exactly --
from an epoch boundary and from the middle of an epoch (the loader's position included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_trainer import cfg, learnable_store
from tracestore.errors import CheckpointError
from tracestore.train import train
from tracestore.train.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint


def test_save_is_atomic_and_leaves_no_partial_file(tmp_path: Path) -> None:
    p = tmp_path / "ck" / "last.pt"
    save_checkpoint(p, {"model": {"w": torch.ones(2)}, "epoch": 1})
    with pytest.raises(Exception):  # noqa: B017 - torch.save's own error type for an unpicklable object
        save_checkpoint(p, {"model": {"w": torch.zeros(2)}, "bad": lambda: None})
    assert load_checkpoint(p)["epoch"] == 1  # the old checkpoint is intact
    assert sorted(x.name for x in p.parent.iterdir()) == ["last.pt"]


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt: cannot read"):
        load_checkpoint(bad)


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(checkpoint_path(run))["model"]


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_epoch_boundary_matches_uninterrupted_run(tmp_path: Path) -> None:
    store = learnable_store(tmp_path / "s.zarr")
    full = train(cfg(store, tmp_path / "full", epochs=3))
    train(cfg(store, tmp_path / "part", epochs=1))
    resumed = train(cfg(store, tmp_path / "part", epochs=3, resume=True))
    assert _same_weights(_final(tmp_path / "full"), _final(tmp_path / "part"))
    assert resumed["val_auroc"] == full["val_auroc"] and resumed["val_loss"] == full["val_loss"]
    assert resumed["epochs_done"] == 3


@pytest.mark.parametrize("how", ["max_steps", "checkpoint_every"])
def test_resume_mid_epoch_continues_at_the_loaders_position(tmp_path: Path, how: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    store = learnable_store(tmp_path / "s.zarr")  # 44 training traces (70% of 64): 3 batches of 16, 16, 12
    train(cfg(store, tmp_path / "full", epochs=2))
    part = tmp_path / "part"
    if how == "max_steps":
        s = train(cfg(store, part, epochs=2, max_steps=5))  # stops after batch 2 of epoch 1
        assert s["stopped_early"] and s["epochs_done"] == 1
    else:
        # the process dies right after the checkpoint of epoch 1, step 2
        import tracestore.train.trainer as trainer

        def save_then_die(path: Path, state: dict[str, object]) -> Path:
            out = save_checkpoint(path, state)
            if (state.get("epoch"), state.get("step_in_epoch")) == (1, 2):  # not best.pt
                raise KeyboardInterrupt("killed")
            return out

        monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train(cfg(store, part, epochs=2, checkpoint_every=2))
        monkeypatch.undo()
    state = load_checkpoint(checkpoint_path(part))
    assert state["epoch"] == 1 and state["ranks"][0]["loader"]["consumed"] == 16 * state["step_in_epoch"]
    train(cfg(store, part, epochs=2, resume=True))
    assert _same_weights(_final(tmp_path / "full"), _final(part))
    full_rows = json.loads((tmp_path / "full" / "summary.json").read_text())
    part_rows = json.loads((part / "summary.json").read_text())
    assert part_rows["val_auroc"] == full_rows["val_auroc"]


def test_resume_with_different_model_options_is_refused(tmp_path: Path) -> None:
    store = learnable_store(tmp_path / "s.zarr", n=32)
    train(cfg(store, tmp_path / "run", epochs=1))
    with pytest.raises(CheckpointError, match="hidden=16 and is resumed with hidden=32"):
        train(cfg(store, tmp_path / "run", epochs=2, hidden=32, resume=True))
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        train(cfg(store, tmp_path / "other", epochs=2, resume=True))
