"""Shared fixtures: tiny stores (3 layers x 8 hidden, 4 traces per shard) so that every test crosses shard
boundaries and ends on a partial shard while staying fast."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tracestore
from tracestore.testing import synthetic_graphs, synthetic_ids, synthetic_scores, synthetic_sequences

L, D = 3, 8
#: 4 traces of [3, 8] float16 per shard
SHARD_BYTES = 4 * L * D * 2


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return str(tmp_path / "store.zarr")


@pytest.fixture
def make_store(tmp_path: Path) -> Callable[..., tracestore.TraceStore]:
    """make_store(n, graphs=False, name="s", batch=5, **create_kwargs) -> an opened store of n synthetic
    traces written in batches of `batch` (so batches straddle shards)."""
    counter = iter(range(1_000_000))

    def make(n: int = 11, *, graphs: bool = False, batch: int = 5, seed: int = 0, **kw: Any) -> tracestore.TraceStore:
        url = str(tmp_path / f"s{next(counter)}.zarr")
        kw.setdefault("shard_bytes", SHARD_BYTES)
        return tracestore.testing.write_synthetic_store(url, n, L, D, graphs=graphs, batch=batch, seed=seed, **kw)

    return make


def synthetic_batch(n: int, start: int = 0, *, graphs: bool = False, seed: int = 0) -> dict[str, Any]:
    """Keyword arguments for StoreWriter.append(): traces start..start+n of the synthetic set."""
    return {
        "ids": synthetic_ids(n, start),
        "sequences": synthetic_sequences(n, L, D, seed, start=start),
        "scores": synthetic_scores(start + n, seed)[start:],
        "graphs": synthetic_graphs(n, L, D, seed, start=start) if graphs else None,
    }


def expected_f16(n: int, seed: int = 0) -> np.ndarray:
    return synthetic_sequences(n, L, D, seed).astype(np.float16)
