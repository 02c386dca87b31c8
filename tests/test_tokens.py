"""The writer's and reader's per-token data and per-trace fields (format v2): append(tokens=, fields=), pooling
by the writer, validation before anything is buffered, resume through checkpoints, the read API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tracestore
import tracestore.convert
from conftest import SHARD_BYTES, D, L
from tracestore import TraceTokens
from tracestore.errors import DTypeError, IncompleteStoreError, ShapeMismatchError
from tracestore.store.graphs import TraceGraph
from tracestore.testing import synthetic_ids


def _traces(n: int, start: int = 0, seed: int = 0) -> list[dict[str, Any]]:
    """n traces of 1..6 tokens: hidden [T, L, D] float32, ids [T], text, a graph over the tokens."""
    out = []
    for k in range(start, start + n):
        rng = np.random.default_rng([seed, k])
        T = int(rng.integers(1, 7))
        hidden = rng.standard_normal((T, L, D)).astype(np.float32)
        ei = [np.stack([rng.integers(0, T, 2 * T), rng.integers(0, T, 2 * T)]) for _ in range(L)]
        ea = [rng.random(2 * T).astype(np.float32) for _ in range(L)]
        out.append({"hidden": hidden, "ids": rng.integers(0, 32000, T), "text": [f"▁t{k}é{t}" for t in range(T)],
                    "graph": TraceGraph(x=None, edge_index=ei, edge_attr=ea, num_tokens=T),
                    "answer": f"answer {k}", "rank": k, "p": float(k) / 8})
    return out


def _append(w: tracestore.StoreWriter, tr: list[dict[str, Any]], start: int, **kw: Any) -> None:
    w.append(synthetic_ids(len(tr), start), None, np.arange(start, start + len(tr), dtype=np.float32),
             graphs=[t["graph"] for t in tr] if w.has_graphs else None,
             tokens=[TraceTokens(hidden=t["hidden"], ids=t["ids"], text=t["text"]) for t in tr],
             fields={"answer": [t["answer"] for t in tr], "rank": [t["rank"] for t in tr],
                     "p": [t["p"] for t in tr]}, **kw)


def _writer(url: str, **kw: Any) -> tracestore.StoreWriter:
    kw.setdefault("graphs", True)
    kw.setdefault("tokens", "all")
    kw.setdefault("pool", "last")
    return tracestore.create(url, num_layers=L, hidden_size=D, shard_bytes=SHARD_BYTES, **kw)


def test_tokens_fields_and_pooling_round_trip(store_url: str) -> None:
    tr = _traces(11)
    with _writer(store_url) as w:
        _append(w, tr[:4], 0)
        _append(w, tr[4:], 4)
    s = tracestore.open(store_url)
    assert s.has_tokens and s.has_token_hidden and s.pool == "last"
    assert s.info()["num_tokens"] == sum(len(t["ids"]) for t in tr)
    for i, t in enumerate(tr):
        got = s[i]
        np.testing.assert_array_equal(got.tokens.hidden, t["hidden"].astype(np.float16))
        np.testing.assert_array_equal(got.sequence, t["hidden"][-1].astype(np.float16))
        np.testing.assert_array_equal(got.tokens.ids, t["ids"])
        assert got.tokens.text == t["text"] and len(got.tokens) == len(t["ids"])
        assert got.fields == {"answer": t["answer"], "rank": t["rank"], "p": t["p"]}
        assert got.graph.x is got.tokens.hidden
        for layer in range(L):
            np.testing.assert_array_equal(got.graph.edge_index[layer], t["graph"].edge_index[layer])
    assert s.fields["rank"].dtype == np.int64 and s.fields["p"].dtype == np.float64
    view = s.select(["q000007", "q000002"])
    assert view.fields["answer"].tolist() == ["answer 7", "answer 2"] and view[0].tokens.text == tr[7]["text"]
    rep = s.report["tokens/hidden"]
    assert rep.values == sum(t["hidden"].size for t in tr) and 0 < rep.max_rel_error.max() <= 2.0**-11
    assert tracestore.convert.verify_store(store_url)["num_traces"] == 11


def test_mean_pool_and_stores_without_some_parts(tmp_path: Path) -> None:
    tr = _traces(5)
    url = str(tmp_path / "mean.zarr")
    with _writer(url, pool="mean", tokens=["ids"], graphs=False) as w:
        _append(w, tr, 0)
    s = tracestore.open(url)
    np.testing.assert_array_equal(s[2].sequence, tr[2]["hidden"].mean(axis=0, dtype=np.float64).astype(np.float16))
    assert s[2].tokens.hidden is None and s[2].tokens.text is None and not s.has_token_hidden
    np.testing.assert_array_equal(s[2].tokens.ids, tr[2]["ids"])
    url = str(tmp_path / "edges_only.zarr")
    with _writer(url, tokens="none") as w:
        _append(w, tr, 0)
    s = tracestore.open(url)
    assert s[1].tokens is None and s[1].graph.x is None and s[1].graph.num_nodes == len(tr[1]["ids"])
    with pytest.raises(ValueError, match="no node features"):
        s[1].graph.to_pyg(0)
    with pytest.raises(ValueError, match="keeps no per-token data"):
        s.tokens(0)


def test_bad_tokens_and_fields_are_refused_before_anything_is_kept(store_url: str) -> None:
    tr = _traces(3)
    w = _writer(store_url)
    _append(w, tr[:1], 0)
    h = np.zeros((4, L, D), np.float32)
    good = {"hidden": h, "ids": np.arange(4), "text": list("abcd")}
    g4 = TraceGraph(x=None, edge_index=[np.zeros((2, 0), np.int64)] * L, edge_attr=[np.zeros(0, np.float32)] * L,
                    num_tokens=4)
    g5 = TraceGraph(x=None, edge_index=g4.edge_index, edge_attr=g4.edge_attr, num_tokens=5)

    def one(tokens: dict[str, Any], graph: TraceGraph = g4, fields: dict[str, Any] | None = None) -> None:
        w.append(["q000001"], None, graphs=[graph], tokens=[tokens], fields=fields)

    with pytest.raises(ShapeMismatchError, match=r"trace 'q000001': token hidden states have shape \(4, 3, 2\)"):
        one({**good, "hidden": h[:, :, :2]})
    with pytest.raises(ShapeMismatchError, match=r"trace 'q000001': its tokens disagree on their number"):
        one({**good, "ids": np.arange(3)})
    with pytest.raises(ShapeMismatchError, match=r"its graph has 5 nodes but its token hidden covers 4 tokens"):
        one(good, g5)
    with pytest.raises(ShapeMismatchError, match=r"keeps per-token text but the trace gives none"):
        one({"hidden": h, "ids": np.arange(4)})
    with pytest.raises(DTypeError, match=r"trace 'q000001': field 'rank' is str \('x'\) but earlier traces have int"):
        one(good, fields={"rank": ["x"]})
    with pytest.raises(ValueError, match=r"field name 'a/b' is not allowed"):
        one(good, fields={"a/b": [1]})
    with pytest.raises(DTypeError, match=r"token ids have dtype float64"):
        one({**good, "ids": np.arange(4.0)})
    assert w.num_traces == 1
    _append(w, tr[1:], 1)  # the writer is as it was: the good batch goes in
    w.close()
    s = tracestore.open(store_url)
    assert len(s) == 3 and s.fields["rank"].tolist() == [0, 1, 2]
    with pytest.raises(ShapeMismatchError, match=r"pool='last' or 'mean'"):
        tracestore.create(str(Path(store_url).with_name("nopool.zarr")), num_layers=L, hidden_size=D,
                          tokens=["hidden"]).append(["a"], None, tokens=[{"hidden": h}])


def test_missing_field_values(store_url: str) -> None:
    with tracestore.create(store_url, num_layers=L, hidden_size=D) as w:
        seq = np.zeros((2, L, D), np.float32)
        w.append(["a", "b"], seq, fields={"n": [1, None], "s": ["x", None], "ok": [True, False]})
        w.append(["c", "d"], seq, fields={"late": [0.5, 2.0]})
    s = tracestore.open(store_url)
    f = s.fields
    assert np.isnan(f["n"][1]) and f["n"][0] == 1.0 and f["n"].dtype == np.float64  # an int with a hole: float
    assert f["s"].tolist() == ["x", "", "", ""] and f["ok"].dtype == np.float64  # missing in c, d
    assert np.isnan(f["late"][:2]).all() and f["late"][2:].tolist() == [0.5, 2.0]
    assert s.info()["fields"] == {"n": "float", "s": "str", "ok": "float", "late": "float"}


def test_resume_with_tokens_text_and_fields_equals_an_uninterrupted_write(tmp_path: Path) -> None:
    tr = _traces(23)
    batches = [(0, 3), (3, 5), (8, 6), (14, 2), (16, 7)]
    ref = str(tmp_path / "ref.zarr")
    with _writer(ref) as w:
        for a, n in batches:
            _append(w, tr[a:a + n], a)
    url = str(tmp_path / "crashed.zarr")
    w = _writer(url)
    for a, n in batches[:2]:
        _append(w, tr[a:a + n], a)
    w.checkpoint({"done": 2})
    _append(w, tr[8:14], 8)  # flushes shards past the checkpoint
    w.abort()
    with pytest.raises(IncompleteStoreError):
        tracestore.open(url)
    w = _writer(url, resume=True)
    assert w.num_traces == 8 and w.resume_state == {"done": 2}
    for a, n in batches[2:]:
        _append(w, tr[a:a + n], a)
    w.close()
    files = sorted(p.relative_to(ref).as_posix() for p in Path(ref).rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(url).as_posix() for p in Path(url).rglob("*") if p.is_file())
    for f in files:
        if f.startswith(("tokens/text/c", "fields/answer/c", "ids/c")):  # zstd: compared by value below
            continue
        if f == "zarr.json":  # its `generation` is a fresh id per store
            a, b = (json.loads((Path(d) / f).read_bytes()) for d in (ref, url))
            assert a["attributes"]["tracestore"].pop("generation") != b["attributes"]["tracestore"].pop("generation")
            assert a == b
            continue
        assert (Path(ref) / f).read_bytes() == (Path(url) / f).read_bytes(), f
    a, b = tracestore.open(ref), tracestore.open(url)
    assert [a[i].tokens.text for i in range(23)] == [b[i].tokens.text for i in range(23)]
    assert a.fields["answer"].tolist() == b.fields["answer"].tolist() and a.ids.tolist() == b.ids.tolist()


def test_text_spanning_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tracestore.format import layout

    monkeypatch.setattr(layout, "TEXT_CHUNK_ROWS", 4)
    tr = _traces(9)
    url = str(tmp_path / "s.zarr")
    with _writer(url) as w:
        for a in range(0, 9, 2):
            _append(w, tr[a:a + 2], a)
    s = tracestore.open(url)
    assert s._text is not None and s._text.chunks == (4,)
    assert [s[i].tokens.text for i in range(9)] == [t["text"] for t in tr]


def test_field_values_that_cannot_be_stored_are_refused_at_append(store_url: str) -> None:
    import torch

    w = tracestore.create(store_url, num_layers=L, hidden_size=D)
    seq = np.zeros((1, L, D), np.float32)
    for value, match in ((2**70, "beyond the int64 range"), (float("inf"), "is infinite"),
                         ("a\udcffb", "not valid Unicode")):
        with pytest.raises(DTypeError, match=match):
            w.append(["a"], seq, fields={"f": [value]})
    with pytest.raises(ValueError, match="not valid Unicode"):
        w.append(["a\udcff"], seq)
    with pytest.raises(ShapeMismatchError, match=r"field 'f' has 1 value\(s\) for 1 traces; give a list"):
        w.append(["a"], seq, fields={"f": 5})  # type: ignore[dict-item]
    w.append(["a"], seq, fields={"f": [torch.tensor(2.5)], "g": [np.int32(3)]})  # scalars of any library
    w.close()
    s = tracestore.open(store_url)
    assert s.fields["f"].tolist() == [2.5] and s.fields["g"].tolist() == [3]


def test_a_trace_reads_its_tokens_and_graph_only_when_asked(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tr = _traces(3)
    with _writer(store_url) as w:
        _append(w, tr, 0)
    s = tracestore.open(store_url)
    reads = []
    orig = type(s._hidden).read
    monkeypatch.setattr(type(s._hidden), "read", lambda self, a, b: reads.append(self.path) or orig(self, a, b))
    t = s[1]
    np.testing.assert_array_equal(t.sequence, tr[1]["hidden"][-1].astype(np.float16))
    assert reads == [] and t.fields["rank"] == 1
    assert t.graph is not None and t.graph.x is t.tokens.hidden  # read once, shared
    assert sorted(reads) == ["graphs/edge_attr", "graphs/edge_index", "tokens/hidden", "tokens/ids"]


def test_xarray_fields_never_shadow_the_stores_names(store_url: str) -> None:
    with tracestore.create(store_url, num_layers=L, hidden_size=D) as w:
        w.append(["a", "b"], np.zeros((2, L, D), np.float32),
                 fields={"id": ["X", "Y"], "field_id": ["P", "Q"], "sequences": [1.0, 2.0]})
    ds = tracestore.open(store_url).to_xarray()
    assert ds["id"].values.tolist() == ["a", "b"] and ds["field_id"].values.tolist() == ["X", "Y"]
    assert ds["field_field_id"].values.tolist() == ["P", "Q"] and ds["field_sequences"].values.tolist() == [1.0, 2.0]


def test_pointers_are_checked_when_a_store_opens(store_url: str) -> None:
    import zarr

    with _writer(store_url) as w:
        _append(w, _traces(4), 0)
    root = zarr.open_group(store_url, mode="r+")
    ptr = root["tokens/ptr"][:]
    ptr[2], ptr[1] = ptr[1], ptr[2]  # no longer monotonic
    root["tokens/ptr"][:] = ptr
    with pytest.raises(tracestore.CorruptStoreError, match=r"tokens/ptr does not fit tokens/hidden's rows"):
        tracestore.open(store_url)
    with pytest.raises(tracestore.CorruptStoreError, match=r"tokens/ptr does not fit"):
        tracestore.convert.verify_store(store_url)
