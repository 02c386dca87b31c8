"""Issue 11, reader side: a replaced store is detected (StaleStoreError), mapped shards are bounded (an LRU,
close(), a context manager), numpy's rules for several integer arrays, read-only metadata arrays, and damaged
stores named as CorruptStoreError at open and by `tracestore verify`."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import tracestore
from conftest import SHARD_BYTES, D, L, expected_f16, synthetic_batch


def write_store(url: Any, n: int = 9, *, graphs: bool = False, fields: bool = False, seed: int = 0,
                **kw: Any) -> tracestore.TraceStore:
    """n synthetic traces (4 per shard) in batches of 5, with a str and a float field if asked; opened."""
    kw.setdefault("shard_bytes", SHARD_BYTES)
    with tracestore.create(url, num_layers=L, hidden_size=D, graphs=graphs, **kw) as w:
        for a in range(0, n, 5):
            b = min(n, a + 5)
            extra = {"lang": [f"l{i % 2}" for i in range(a, b)], "len": [float(i) for i in range(a, b)]}
            w.append(**synthetic_batch(b - a, a, graphs=graphs, seed=seed), fields=extra if fields else None)
    return tracestore.open(url)


# -- item 8: metadata arrays are read-only ---------------------------------------------------------------
def test_ids_scores_fields_and_pointers_are_read_only(tmp_path: Any) -> None:
    s = write_store(tmp_path / "s.zarr", graphs=True, fields=True)
    before_ids, before_scores = s.ids.copy(), s.scores.copy()
    for arr in (s.ids, s.scores, s.token_ptr, s.edge_ptr, s.rows, *s.fields.values()):
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = arr[1]
    sel = s.select(["q000003", "q000001"])
    for arr in (sel.ids, sel.scores, sel.rows, *sel.fields.values()):
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = arr[1]
    np.testing.assert_array_equal(s.ids, before_ids)
    np.testing.assert_array_equal(s.scores, before_scores, strict=True)
    assert s[0].id == "q000000" and s.fields["lang"][0] == "l0"


# -- item 7: several integer arrays follow numpy (broadcast together), not outer indexing -------------------
@pytest.mark.parametrize("key", [
    (slice(None), [0, 1], [2, 3]), (slice(None), [0, 2], [3, 5]), (slice(None), [[0], [2]], [1, 4, 7]),
    ([0, 1], [1, 2]), ([1, 8], slice(None), [3, 4]), (0, slice(None), [1, 2]), ([3, 5], 1, [0, 7]),
    (np.array([[0, 1], [2, 3]]),), (np.array([[0, 1], [2, 3]]), slice(None), 2), ([2, 2, 7], [0, 1, 2], 5),
    (4, [0, 2], [1, 1]), (Ellipsis, [0, 2], [1, 1]), (slice(1, 8, 2), [True, False, True], [2, 3]),
    (np.arange(9) % 2 == 0, [0, 1, 2, 0, 1]), ([-1, 0], [-1, 0], [-1, 0]),
    # single advanced index, or ints only: the fast paths, pinned against numpy too
    (slice(None), [0, 2]), (slice(None), 1, [2, 3]), (slice(2, 7), [2, 1], 3), ([4, 1], 2), (3, [1, 2]),
])
def test_several_integer_arrays_broadcast_like_numpy(tmp_path: Any, key: tuple[Any, ...]) -> None:
    s = write_store(tmp_path / "s.zarr")
    want = expected_f16(9)
    np.testing.assert_array_equal(s.sequences[key], want[key], strict=True)


def test_index_arrays_that_do_not_broadcast_raise_indexerror(tmp_path: Any) -> None:
    s = write_store(tmp_path / "s.zarr")
    with pytest.raises(IndexError, match=r"sequences\[.*\]: shape mismatch"):
        s.sequences[[0, 1], [0, 1, 2]]
    with pytest.raises(IndexError, match=r"trace index out of range for a store of 9 traces"):
        s.sequences[[0, 9], [0, 1]]
