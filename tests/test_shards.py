"""The direct shard reader returns bit-identical data to zarr-python: random stores made with zarr directly
(missing inner chunks, missing shards, partial edge shards, odd fill values, with and without an inner
crc32c) and random selections; the [2, E] edge_index layout; and stores written by tracestore."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.codecs import BytesCodec, Crc32cCodec

from tracestore.errors import CorruptStoreError
from tracestore.store.shards import MISSING, ShardedArray, UnsupportedLayout
from tracestore.store.urls import LocalLocation

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _make(root: str, path: str, shape: tuple[int, ...], inner: tuple[int, ...], shard: tuple[int, ...],
          dtype: str, fill: Any, crc: bool, data: np.ndarray) -> zarr.Array:
    arr = zarr.create_array(root, name=path, shape=shape, chunks=inner, shards=shard, dtype=dtype, fill_value=fill,
                            serializer=BytesCodec(endian="little"), compressors=[Crc32cCodec()] if crc else None,
                            filters=None, config={"write_empty_chunks": False}, overwrite=True)
    arr[...] = data
    return arr


@st.composite
def row_stores(draw: st.DrawFn) -> dict[str, Any]:
    """An [N, L, D] array, one row per inner chunk, some rows equal to the fill value (so zarr leaves their
    chunk out), possibly a whole shard deleted."""
    n = draw(st.integers(0, 23))
    L = draw(st.integers(1, 3))
    D = draw(st.integers(1, 5))
    rps = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(["float16", "float32", "int32"]))
    fill = draw(st.sampled_from([0, 1, "NaN"] if dtype != "int32" else [0, -3]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal((n, L, D)) * 100).astype(dtype)
    fill_np = np.asarray(np.nan if fill == "NaN" else fill).astype(dtype)
    empty = rng.random(n) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    data[empty] = fill_np
    return {"n": n, "L": L, "D": D, "rps": rps, "dtype": dtype, "fill": fill, "data": data,
            "crc": draw(st.booleans()), "delete_shard": draw(st.booleans()), "seed": seed}


@SETTINGS
@given(spec=row_stores(), picks=st.lists(st.integers(0, 10**6), max_size=12), data=st.data())
def test_rows_bit_identical_to_zarr(spec: dict[str, Any], picks: list[int], data: st.DataObject) -> None:
    n, L, D = spec["n"], spec["L"], spec["D"]
    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(tmp) / "a.zarr")
        arr = _make(root, "x", (n, L, D), (1, L, D), (spec["rps"], L, D), spec["dtype"], spec["fill"], spec["crc"],
                    spec["data"])
        nshards = -(-n // spec["rps"])
        if spec["delete_shard"] and nshards:
            victim = spec["seed"] % nshards
            (Path(root) / "x" / "c" / str(victim) / "0" / "0").unlink(missing_ok=True)
        arr = zarr.open_array(root, path="x", mode="r")
        want = arr[...]
        for verify in (False, True):
            sa = ShardedArray.open(LocalLocation(root), "x", verify=verify)
            assert sa.shape == (n, L, D)
            np.testing.assert_array_equal(sa.read(0, n), want, strict=True)
            if n == 0:
                continue
            rows = np.asarray([p % n for p in picks], np.int64)
            np.testing.assert_array_equal(sa.take(rows), arr.oindex[rows], strict=True)
            srt = np.sort(rows)  # neighbours in one shard with gaps: the np.take path
            np.testing.assert_array_equal(sa.take(srt), want[srt], strict=True)
            np.testing.assert_array_equal(sa.take(srt, sub=(slice(None), 0)), want[srt, :, 0], strict=True)
            for r in rows[:3].tolist():
                np.testing.assert_array_equal(sa.row(r), want[r], strict=True)
            # a run of consecutive rows (one strided copy), a sub-selection of layers and hidden dims
            a = data.draw(st.integers(0, n - 1))
            b = data.draw(st.integers(a, n))
            run = np.arange(a, b)
            np.testing.assert_array_equal(sa.take(run), want[a:b], strict=True)
            np.testing.assert_array_equal(sa.read(a, b), want[a:b], strict=True)
            lay = data.draw(st.integers(0, L - 1))
            np.testing.assert_array_equal(sa.take(rows, sub=(lay,)), want[rows, lay], strict=True)
            np.testing.assert_array_equal(sa.take(rows, sub=(slice(None), slice(1, None, 2))),
                                          want[rows][:, :, 1::2], strict=True)
            out = np.empty((rows.size, L, D), dtype=want.dtype)
            assert sa.take(rows, out=out) is out
            np.testing.assert_array_equal(out, want[rows], strict=True)


@SETTINGS
@given(E=st.integers(0, 200), chunk=st.integers(1, 40), per_shard=st.integers(1, 4), seed=st.integers(0, 999),
       spans=st.lists(st.tuples(st.integers(0, 250), st.integers(0, 250)), max_size=8),
       sparse=st.booleans())
def test_edge_index_layout_bit_identical(E: int, chunk: int, per_shard: int, seed: int,
                                         spans: list[tuple[int, int]], sparse: bool) -> None:
    """graphs/edge_index [2, E] (chunked along axis 1) and edge_attr [E, H] (many rows per chunk)."""
    rng = np.random.default_rng(seed)
    ei = rng.integers(0, 50, (2, E)).astype(np.int32)
    ea = rng.random((E, 2)).astype(np.float16)
    if sparse and E:
        ei[:, : min(E, chunk)] = 0  # a whole chunk equal to the fill value: left out
    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(tmp) / "g.zarr")
        _make(root, "ei", (2, E), (2, chunk), (2, chunk * per_shard), "int32", 0, True, ei)
        _make(root, "ea", (E, 2), (chunk, 2), (chunk * per_shard, 2), "float16", 0, True, ea)
        zei = zarr.open_array(root, path="ei", mode="r")
        zea = zarr.open_array(root, path="ea", mode="r")
        sei = ShardedArray.open(LocalLocation(root), "ei", axis=1)
        sea = ShardedArray.open(LocalLocation(root), "ea")
        assert sei.meta.axis == 1
        for a, b in [(0, E), *spans]:
            a, b = min(a, b), max(a, b)
            np.testing.assert_array_equal(sei.read(a, b), zei[:, a:b], strict=True)
            np.testing.assert_array_equal(sea.read(a, b), zea[a:b], strict=True)


def test_edge_index_axis_when_array_is_exactly_one_chunk(tmp_path: Path) -> None:
    # shape == inner == shard: the metadata cannot tell the chunked axis; without the hint axis 0 was chosen
    root = str(tmp_path / "g.zarr")
    ei = np.arange(16, dtype=np.int32).reshape(2, 8)
    _make(root, "ei", (2, 8), (2, 8), (2, 8), "int32", 0, True, ei)
    sa = ShardedArray.open(LocalLocation(root), "ei", axis=1)
    np.testing.assert_array_equal(sa.read(2, 5), ei[:, 2:5])


def test_written_store_matches_zarr(make_store: Any) -> None:
    s = make_store(23, graphs=True)
    root = zarr.open_group(s.url, mode="r")
    for name, arr in (("sequences", s._seq), ("tokens/hidden", s._hidden), ("graphs/edge_attr", s._ea)):
        want = root[name][...]
        np.testing.assert_array_equal(arr.direct.read(0, want.shape[0]), want, strict=True)
    want = root["graphs/edge_index"][...]
    np.testing.assert_array_equal(s._ei.direct.read(0, want.shape[1]), want, strict=True)
    assert s._seq.direct.verify_all() == 23
    assert s._hidden.direct.verify_all() == root["tokens/hidden"].shape[0]


def test_shard_views_and_index(make_store: Any) -> None:
    s = make_store(11)
    sa = s._seq.direct
    m = sa.meta
    assert (m.rows_per_shard, m.chunks_per_shard, m.num_shards, m.axis) == (4, 4, 3, 0)
    idx = sa.index(2)  # the partial last shard: 3 rows, the 4th slot is empty
    assert idx.shape == (4, 2) and idx[3, 0] == MISSING and (idx[:3, 1] == m.chunk_nbytes + 4).all()
    assert sa.index(2) is idx  # cached
    full = s.sequences[:]
    np.testing.assert_array_equal(sa.shard_rows_view(1), full[4:8])
    np.testing.assert_array_equal(sa.shard_rows_view(2), full[8:11])
    assert sa.shard_view(0).shape == (4, 1, 3, 8)
    assert not sa.shard_rows_view(0).flags.writeable


def test_take_errors(make_store: Any) -> None:
    sa = make_store(5)._seq.direct
    with pytest.raises(IndexError, match=r"row 5 out of range for 'sequences' with 5 rows"):
        sa.take([0, 5])
    with pytest.raises(IndexError, match=r"row -6 out of range"):
        sa.row(-6)
    np.testing.assert_array_equal(sa.row(-1), sa.take([4])[0])


def test_missing_zarr_json_and_unsupported_layout(tmp_path: Path) -> None:
    with pytest.raises(CorruptStoreError, match=r"array 'nope' has no zarr.json; the store is damaged"):
        ShardedArray.open(LocalLocation(tmp_path), "nope")
    zarr.create_array(str(tmp_path), name="plain", shape=(4, 2), chunks=(2, 2), dtype="float16")
    with pytest.raises(UnsupportedLayout, match=r"not a sharded array"):
        ShardedArray.open(LocalLocation(tmp_path), "plain")
    zarr.create_array(str(tmp_path), name="zstd", shape=(4, 2), chunks=(1, 2), shards=(2, 2), dtype="float16")
    with pytest.raises(UnsupportedLayout, match=r"inner codecs"):
        ShardedArray.open(LocalLocation(tmp_path), "zstd")


def test_pickled_array_reopens(make_store: Any) -> None:
    import pickle

    sa = make_store(6)._seq.direct
    first = sa.take([5, 0]).copy()
    sa2 = pickle.loads(pickle.dumps(sa))
    assert len(sa.cache) > 0 and len(sa2.cache) == 0  # maps are not pickled
    assert sa2.cache.generation == sa.cache.generation  # the store opened, checked in the new process too
    np.testing.assert_array_equal(sa2.take([5, 0]), first)
