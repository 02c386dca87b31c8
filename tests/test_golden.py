"""The golden v1 store (tests/data/golden_v1, written by tracestore 0.1 from the values in
tests/data/make_golden_v1.py) pins format v1, which tracestore still reads: its metadata is asserted field
by field and tracestore must read the values it was made from, through the same description as a v2 store
(graph nodes = tokens with hidden states only). It is never rewritten: the writer writes v2
(tests/test_golden_v2.py pins that)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tracestore
import tracestore.convert
from tracestore.format import schema

DATA = Path(__file__).resolve().parent / "data"
GOLDEN = DATA / "golden_v1"


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("make_golden_v1", DATA / "make_golden_v1.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _meta(root: Path, path: str) -> dict[str, Any]:
    return json.loads((root / path / "zarr.json").read_text())


LE = {"name": "bytes", "configuration": {"endian": "little"}}
CRC = {"name": "crc32c"}


def _sharded(inner: list[int]) -> list[dict[str, Any]]:
    return [{"name": "sharding_indexed", "configuration": {
        "chunk_shape": inner, "codecs": [LE, CRC], "index_codecs": [LE, CRC], "index_location": "end"}}]


# path: (data_type, shape, chunk_grid shape (the shard), fill_value, dimension_names, codecs)
EXPECTED_ARRAYS: dict[str, tuple[Any, ...]] = {
    "sequences": ("float16", [5, 2, 4], [3, 2, 4], 0.0, ["trace", "layer", "hidden"], _sharded([1, 2, 4])),
    "scores": ("float32", [5], [5], "NaN", ["trace"], [LE, CRC]),
    "ids": ("string", [5], [5], "", ["trace"], [{"name": "vlen-utf8", "configuration": {}},
                                               {"name": "zstd", "configuration": {"level": 3, "checksum": False}},
                                               CRC]),
    "graphs/node_ptr": ("int64", [6], [6], 0, ["trace_ptr"], [LE, CRC]),
    "graphs/edge_ptr": ("int64", [11], [11], 0, ["trace_layer_ptr"], [LE, CRC]),
    "graphs/x": ("float16", [15, 2, 4], [3, 2, 4], 0.0, ["node", "layer", "hidden"], _sharded([1, 2, 4])),
    "graphs/edge_index": ("int32", [2, 30], [2, 256], 0, ["src_dst", "edge"], _sharded([2, 256])),
    "graphs/edge_attr": ("float16", [30, 2], [256, 2], 0.0, ["edge", "attr"], _sharded([256, 2])),
}

EXPECTED_FILES = sorted([
    "zarr.json", "graphs/zarr.json",
    *(f"{p}/zarr.json" for p in EXPECTED_ARRAYS),
    "sequences/c/0/0/0", "sequences/c/1/0/0", "scores/c/0", "ids/c/0", "graphs/node_ptr/c/0", "graphs/edge_ptr/c/0",
    *(f"graphs/x/c/{i}/0/0" for i in range(5)), "graphs/edge_index/c/0/0", "graphs/edge_attr/c/0/0",
])


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_golden_files() -> None:
    assert _files(GOLDEN) == EXPECTED_FILES


def test_golden_root_attributes() -> None:
    root = json.loads((GOLDEN / "zarr.json").read_text())
    assert root["zarr_format"] == 3 and root["node_type"] == "group"
    assert set(root["attributes"]) == {"tracestore"}
    a = root["attributes"]["tracestore"]
    assert set(a) == {"format_version", "committed", "num_traces", "num_layers", "hidden_size", "has_graphs",
                      "model_name", "provenance", "created_by", "edge_attr_size", "float16_report"}
    assert a["format_version"] == 1 and 1 in schema.READABLE_VERSIONS
    assert a["committed"] is True
    assert (a["num_traces"], a["num_layers"], a["hidden_size"], a["has_graphs"], a["edge_attr_size"]) == (5, 2, 4, True, 2)
    assert a["model_name"] == "golden/tiny"
    assert a["provenance"] == {"sources": {"golden.pkl": "sha256:00"}}
    assert a["created_by"].startswith("tracestore ")
    assert set(a["float16_report"]) == {"sequences", "graphs/x", "graphs/edge_attr"}
    rep = a["float16_report"]["sequences"]
    assert set(rep) == {"values", "float16_max", "max_abs", "max_abs_error", "max_rel_error", "overflow", "clipped",
                        "nan", "inf"}
    assert rep["values"] == 40 and rep["float16_max"] == 65504.0
    assert rep["max_abs"] == [2.5, 2.375] and rep["max_abs_error"] == [0.0, 0.0]
    assert rep["overflow"] == rep["clipped"] == rep["nan"] == rep["inf"] == [0, 0]
    assert _meta(GOLDEN, "graphs") == {"attributes": {}, "zarr_format": 3, "node_type": "group"}


@pytest.mark.parametrize("path", sorted(EXPECTED_ARRAYS))
def test_golden_array_metadata(path: str) -> None:
    assert _meta(GOLDEN, path) == array_meta(*EXPECTED_ARRAYS[path])


def array_meta(dtype: str, shape: list[int], shard: list[int], fill: Any, dims: list[str],
               codecs: list[dict[str, Any]]) -> dict[str, Any]:
    """The zarr.json of an array as tracestore writes it (shared with test_golden_v2.py)."""
    return {
        "shape": shape,
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": shard}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill,
        "codecs": codecs,
        "attributes": {},
        "dimension_names": dims,
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def test_schema_agrees_with_golden() -> None:
    dtypes = {schema.SEQUENCES: schema.SEQUENCE_DTYPE, schema.SCORES: schema.SCORE_DTYPE,
              schema.V1_NODE_PTR: schema.PTR_DTYPE, schema.EDGE_PTR: schema.PTR_DTYPE,
              schema.V1_NODE_X: schema.TOKEN_HIDDEN_DTYPE, schema.EDGE_INDEX: schema.EDGE_INDEX_DTYPE,
              schema.EDGE_ATTR: schema.EDGE_ATTR_DTYPE}
    for path, dt in dtypes.items():
        assert np.dtype(EXPECTED_ARRAYS[path][0]) == dt, path


def test_golden_values_through_tracestore() -> None:
    inp = _script().golden_inputs()
    s = tracestore.open(str(GOLDEN))
    assert len(s) == 5 and s.num_layers == 2 and s.hidden_size == 4 and s.has_graphs
    assert s.ids.tolist() == inp["ids"]
    np.testing.assert_array_equal(s.scores, inp["scores"])
    np.testing.assert_array_equal(s.sequences[:], inp["sequences"].astype(np.float16), strict=True)
    assert s._seq.direct.verify_all() == 5
    for i, g in enumerate(inp["graphs"]):
        got = s[i].graph
        np.testing.assert_array_equal(got.x, g["x"].astype(np.float16))
        for layer in range(2):
            np.testing.assert_array_equal(got.edge_index[layer], g["edge_index"][layer])
            np.testing.assert_array_equal(got.edge_attr[layer], g["edge_attr"][layer].astype(np.float16))
    np.testing.assert_array_equal(s.token_ptr, [0, 1, 3, 6, 10, 15])
    assert s.format_version == 1 and s.pool is None and s.fields == {}
    tr = s[3]
    tok = tr.tokens
    assert tok is not None and tok.ids is None and tok.text is None and tok.hidden.shape == (4, 2, 4)
    assert tr.graph is not None and tr.graph.x is tok.hidden
    info = s.info()
    assert info["tokens"] == {"hidden": True, "ids": False, "text": False} and info["num_tokens"] == 15
    assert tracestore.convert.verify_store(str(GOLDEN))["num_traces"] == 5
    np.testing.assert_array_equal(s.edge_ptr, np.concatenate([[0], np.cumsum(np.repeat([1, 2, 3, 4, 5], 2))]))
