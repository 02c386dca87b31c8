"""Checkpoints of a training run, written atomically: the state goes to a temporary file in the same
directory, is flushed to disk, and is renamed over `last.pt` (rename is atomic on POSIX), so a run killed
mid-write leaves the previous checkpoint intact and never a truncated one.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (model and optimizer state,
epoch and step, every rank's loader state, RNG states, the metrics so far), loaded back with
`torch.load(weights_only=True)`: resuming never runs code from the file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_path", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "last.pt"


def checkpoint_path(run_dir: str | os.PathLike[str]) -> Path:
    """Where a run keeps its latest checkpoint: RUN_DIR/checkpoints/last.pt."""
    return Path(run_dir) / "checkpoints" / CHECKPOINT_NAME


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically (temporary file, fsync, rename) and return the path.

    Parameters
    ----------
    path : path-like
        Destination; its directory is created.
    state : dict
        Tensors and plain Python values only (what `torch.load(weights_only=True)` accepts).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # make the rename itself durable
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (weights_only: no code runs). Raises CheckpointError
    naming the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from; run without --resume to start a new run "
                              f"in this directory")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file: say which and what to do
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e}); delete it to start "
                              f"over, or restore it from a copy") from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a tracestore training checkpoint (no 'model' entry); point --out at "
                              f"the run directory that wrote it")
    return state
