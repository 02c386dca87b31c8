"""format/: schema.py mirrors docs/format.md; layout sizes; the float16 report."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tracestore import config
from tracestore.format import layout, schema
from tracestore.format.report import FLOAT16_TINY, Float16Report

DOC = (Path(__file__).resolve().parents[1] / "docs" / "format.md").read_text()


def _doc_table_rows() -> dict[str, tuple[str, str]]:
    """path -> (dtype, shape) from the arrays table of docs/format.md."""
    rows = {}
    for m in re.finditer(r"^\| `([a-z_/]+)` \| (\w+)(?: \(UTF-8\))? \| `(\[[^`]+\])` \|", DOC, re.M):
        rows[m.group(1)] = (m.group(2), m.group(3))
    return rows


def test_doc_arrays_match_schema() -> None:
    rows = _doc_table_rows()
    want = {schema.SEQUENCES: schema.SEQUENCE_DTYPE, schema.SCORES: schema.SCORE_DTYPE, schema.IDS: None,
            schema.TOKEN_PTR: schema.PTR_DTYPE, schema.TOKEN_HIDDEN: schema.TOKEN_HIDDEN_DTYPE,
            schema.TOKEN_IDS: schema.TOKEN_ID_DTYPE, schema.TOKEN_TEXT: None,
            schema.EDGE_PTR: schema.PTR_DTYPE, schema.EDGE_INDEX: schema.EDGE_INDEX_DTYPE,
            schema.EDGE_ATTR: schema.EDGE_ATTR_DTYPE}
    assert set(rows) == set(want)
    for path, dt in want.items():
        if dt is None:
            assert rows[path][0] == "string"
        else:
            assert np.dtype(rows[path][0]) == dt, path
    assert rows[schema.SEQUENCES][1] == "[N, L, D]" and rows[schema.TOKEN_HIDDEN][1] == "[T, L, D]"
    assert rows[schema.EDGE_INDEX][1] == "[2, E]" and rows[schema.TOKEN_PTR][1] == "[N + 1]"
    # the version-1 arrays are documented as such, and every field kind has its dtype
    for path in (schema.V1_NODE_PTR, schema.V1_NODE_X):
        assert f"| `{path}` (v1) |" in DOC
    for kind in schema.FIELD_DTYPES:
        assert f'"{kind}"' in DOC


def test_doc_names_every_attribute_key() -> None:
    keys = [v for k, v in vars(schema).items() if k.startswith("ATTR_")]
    assert len(keys) >= 15
    for key in keys:
        assert f"`{key}`" in DOC, key
    assert f"`{schema.STAGING_PREFIX}`" in DOC and f"`{schema.STAGING_STATE_KEY}`" in DOC
    assert f"`format_version` | int | `{schema.FORMAT_VERSION}`" in DOC
    for key in Float16Report(1).to_dict():
        assert f"| `{key}` |" in DOC, key


def test_rows_per_shard() -> None:
    row = 32 * 4096 * 2
    assert layout.rows_per_shard(row) == config.SHARD_BYTES // row
    assert layout.rows_per_shard(row, 128 * 2**20) == 512
    assert layout.rows_per_shard(row, 1) == 1  # at least one trace per shard
    assert layout.rows_per_shard(2, 2**30) == config.MAX_CHUNKS_PER_SHARD  # the shard index stays small
    with pytest.raises(ValueError, match=r"row size must be positive, got 0 bytes"):
        layout.rows_per_shard(0)


def test_edge_chunks() -> None:
    assert layout.edge_chunk_rows(1, 256 * 2**10) == 32768  # edge_index's 8 bytes per edge dominate
    assert layout.edge_chunk_rows(16, 256 * 2**10) == 8192  # 32 bytes of edge_attr per edge
    assert layout.edge_chunk_rows(1, 10) == 256
    assert layout.edge_chunks_per_shard(32768, 1, 128 * 2**20) == 512
    assert layout.edge_chunks_per_shard(32768, 1, 1) == 1


def test_report_block_figures() -> None:
    x = np.array([[[1.0, 2.0 + 2**-12, 1e-6]], [[-3.0, 0.1, np.nan]]], np.float32)  # [B=2, L=1, 3]
    x16 = x.astype(np.float16)
    r = Float16Report(1)
    r.update_block(x, x16)
    assert r.values == 6 and r.nan.tolist() == [1]
    assert r.max_abs[0] == 3.0
    finite = np.isfinite(x)
    err = np.abs(x16.astype(np.float32) - x)[finite]
    assert r.max_abs_error[0] == pytest.approx(float(err.max()))
    normal = finite & (np.abs(x) >= FLOAT16_TINY)
    rel = (np.abs(x16.astype(np.float32) - x) / np.abs(x))[normal]
    assert r.max_rel_error[0] == pytest.approx(float(rel.max()))  # 1e-6 (subnormal) is left out
    assert r.max_rel_error[0] <= 2**-11


def test_report_merge_and_dict_roundtrip() -> None:
    a, b = Float16Report(2), Float16Report(2)
    a.update_block(np.ones((1, 2, 3), np.float32), np.ones((1, 2, 3), np.float16), overflow=np.array([1, 0]),
                   clipped=np.array([1, 0]))
    b.update_float16_block(np.full((2, 2, 3), 5, np.float16))
    a.merge(b)
    assert a.values == 18 and a.max_abs.tolist() == [5.0, 5.0] and a.clipped.tolist() == [1, 0]
    back = Float16Report.from_dict(a.to_dict())
    assert back.to_dict() == a.to_dict()
    assert "clipped 1" in a.summary()
    with pytest.raises(ValueError, match=r"cannot merge a float16 report of 3 layers into one of 2"):
        a.merge(Float16Report(3))


def test_float16_magnitudes_match_the_float_path() -> None:
    x = (np.random.default_rng(0).standard_normal((3, 4, 5)) * 300).astype(np.float16)
    x[1, 2, 3] = -np.float16(65504)
    a, b = Float16Report(4), Float16Report(4)
    a.update_float16_block(x)
    b.update_float16_magnitudes(x.view(np.uint16) & np.uint16(0x7FFF))
    assert a.to_dict() == b.to_dict() and b.max_abs[2] == 65504.0
