"""A store made of parts reads as numpy reads the concatenation: rows sorted, unsorted, repeated, in one part or
across parts, with and without `out`, under every kind of layer/hidden index (the parted.PartedArray paths that
benchmarks/bench_parts.py times)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import tracestore
from conftest import SHARD_BYTES, D, L
from tracestore.store.parts import commit_parts, part_url

BOUNDS = [0, 7, 9, 18, 23]  # parts of 7, 2, 9, 5 traces: boundaries inside shards of 4, partial last shards


@pytest.fixture(scope="module")
def parted(tmp_path_factory: pytest.TempPathFactory) -> tuple[tracestore.TraceStore, np.ndarray]:
    dest = str(tmp_path_factory.mktemp("parts") / "p.zarr")
    data = np.random.default_rng(0).standard_normal((BOUNDS[-1], L, D)).astype(np.float16)
    for k in range(len(BOUNDS) - 1):
        a, b = BOUNDS[k], BOUNDS[k + 1]
        with tracestore.create(part_url(dest, k), num_layers=L, hidden_size=D, shard_bytes=SHARD_BYTES) as w:
            w.append([f"t{i}" for i in range(a, b)], data[a:b], np.zeros(b - a, np.float32))
    commit_parts(dest)
    store = tracestore.open(dest)
    assert store.num_parts == 4
    return store, data


SUBS: list[tuple[Any, ...]] = [(), (2,), (slice(1, 3),), (np.array([2, 0]),), (np.array([1, 2]), slice(2, 5)),
                               (1, np.array([0, 7]))]


@pytest.mark.parametrize("sub", SUBS, ids=range(len(SUBS)))
def test_take_matches_numpy(parted: tuple[tracestore.TraceStore, np.ndarray], sub: tuple[Any, ...]) -> None:
    store, data = parted
    n = data.shape[0]
    rng = np.random.default_rng(1)
    cases = [np.arange(n), np.arange(n)[::-1], np.array([8, 7, 8, 0, 22]), np.arange(10, 16), np.zeros(0, np.int64)]
    cases += [rng.choice(n, int(rng.integers(1, 2 * n)), replace=True) for _ in range(20)]
    for rows in cases:
        want = data[rows][(slice(None), *sub)]
        got = store._seq.take(rows, sub=sub)
        assert got.shape == want.shape and np.array_equal(got, want), rows
        out = np.empty_like(want)
        assert store._seq.take(rows, out=out, sub=sub) is out and np.array_equal(out, want), rows


def test_rows_views_and_layers(parted: tuple[tracestore.TraceStore, np.ndarray]) -> None:
    store, data = parted
    for i in range(data.shape[0]):
        np.testing.assert_array_equal(store[i].sequence, data[i])
    np.testing.assert_array_equal(store.layer(1), data[:, 1])
    ids = ["t20", "t3", "t8", "t7", "t15"]
    np.testing.assert_array_equal(store.select(ids).sequences[:], data[[20, 3, 8, 7, 15]])


def test_take_into_positions_matches_numpy(parted: tuple[tracestore.TraceStore, np.ndarray]) -> None:
    """ShardedArray.take(positions=): each row to its place, runs and single rows, with and without `sub`."""
    store, ref = parted
    part = store._seq.arrays[1].direct
    n = part.shape[0]
    rows = np.array([0, 1, 2, n - 1, 3, 5, 4], np.int64) % n
    pos = np.array([6, 0, 1, 2, 4, 3, 5], np.int64)
    base = int(store._seq.offsets[1])
    for sub in ((), (slice(0, 2),), (np.array([1, 0]),)):
        out = np.zeros((7, *part.take(rows[:1], sub=sub).shape[1:]), np.float16)
        part.take(rows, out=out, sub=sub, positions=pos)
        want = np.empty_like(out)
        want[pos] = ref[base + rows][(slice(None), *sub)]
        np.testing.assert_array_equal(out, want)
    with pytest.raises(ValueError, match="given out"):
        part.take(rows, positions=pos)
