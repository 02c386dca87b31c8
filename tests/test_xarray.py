"""store.to_xarray(): dims and coords, values equal to the store, and lazy: only the selected traces and
layers are read."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from conftest import D, L, expected_f16
from tracestore.store.shards import ShardedArray

xr = pytest.importorskip("xarray")


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[int], tuple[Any, ...]]]:
    """Every ShardedArray.take() call as (rows, sub)."""
    calls: list[tuple[list[int], tuple[Any, ...]]] = []
    orig = ShardedArray.take

    def spy(self: ShardedArray, rows: Any, out: Any = None, sub: tuple[Any, ...] = ()) -> np.ndarray:
        calls.append((np.asarray(rows).tolist(), tuple(sub)))
        return orig(self, rows, out=out, sub=sub)

    monkeypatch.setattr(ShardedArray, "take", spy)
    return calls


def test_dataset_shape_coords_values(make_store: Any) -> None:
    s = make_store(9)
    ds = s.to_xarray()
    assert ds["sequences"].dims == ("trace", "layer", "hidden")
    assert ds["sequences"].shape == (9, L, D) and ds["sequences"].dtype == np.float16
    assert ds["id"].values.tolist() == s.ids.tolist()
    np.testing.assert_array_equal(ds["score"].values, s.scores)
    assert ds["layer"].values.tolist() == list(range(L))
    assert ds.attrs["url"] == s.url
    np.testing.assert_array_equal(ds["sequences"].values, expected_f16(9))


def test_lazy_reads_only_the_selection(make_store: Any, reads: list[Any]) -> None:
    s = make_store(9)
    want = expected_f16(9)
    ds = s.to_xarray()
    assert reads == []  # building the dataset reads no trace
    got = ds["sequences"].isel(trace=[7, 2], layer=1).values
    np.testing.assert_array_equal(got, want[[7, 2], 1])
    assert sorted(r for rows, _ in reads for r in rows) == [2, 7]
    assert all(sub[0] == 1 for _, sub in reads)  # the layer is applied per row, not after a full read

    reads.clear()
    got = ds["sequences"].isel(trace=slice(3, 6), hidden=slice(0, 4)).values
    np.testing.assert_array_equal(got, want[3:6, :, :4])
    assert sorted(r for rows, _ in reads for r in rows) == [3, 4, 5]

    reads.clear()
    one = ds["sequences"].isel(trace=4).values
    np.testing.assert_array_equal(one, want[4])
    assert [rows for rows, _ in reads] == [[4]]


def test_outer_indexing_and_selection_by_id(make_store: Any) -> None:
    s = make_store(9)
    want = expected_f16(9)
    ds = s.to_xarray().set_index(trace="id")
    got = ds["sequences"].sel(trace=["q000008", "q000001"]).isel(layer=[2, 0], hidden=[1, 5, 6]).values
    np.testing.assert_array_equal(got, want[[8, 1]][:, [2, 0]][:, :, [1, 5, 6]])
    sel = s.select(["q000005", "q000000"]).to_xarray()
    np.testing.assert_array_equal(sel["sequences"].values, want[[5, 0]])
    assert sel["id"].values.tolist() == ["q000005", "q000000"]
