"""Graphs: PyG Data in, the same PyG Data out; TraceGraph input; CSR pointers; every graph shape error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch_geometric.data import Data

import tracestore
from conftest import SHARD_BYTES, D, L, synthetic_batch
from tracestore.errors import DTypeError, Float16OverflowError, NonFiniteValueError, ShapeMismatchError
from tracestore.store.graphs import TraceGraph, ranges_to_indices
from tracestore.testing import synthetic_graphs


def _pyg_trace(rng: np.random.Generator, T: int, H: int = 1) -> list[Data]:
    """L Data of one trace, with float16-exact values so that equality after the round trip is exact."""
    x = torch.from_numpy(rng.standard_normal((T, L, D)).astype(np.float16).astype(np.float32))
    layers = []
    for _ in range(L):
        E = int(rng.integers(0, 3 * T + 1))
        ei = torch.from_numpy(rng.integers(0, T, (2, E)))
        ea = rng.random((E, H) if H > 1 else E).astype(np.float16).astype(np.float32)
        layers.append(Data(x=x[:, len(layers)].clone(), edge_index=ei, edge_attr=torch.from_numpy(ea)))
    return layers


@pytest.mark.parametrize("H", [1, 3])
def test_pyg_roundtrip(store_url: str, H: int) -> None:
    rng = np.random.default_rng(1)
    graphs = [_pyg_trace(rng, int(T), H) for T in (5, 1, 9, 3, 7, 2)]
    with tracestore.create(store_url, num_layers=L, hidden_size=D, graphs=True, edge_attr_size=H,
                           shard_bytes=SHARD_BYTES) as w:
        w.append([f"t{i}" for i in range(4)], np.zeros((4, L, D), np.float32), None, graphs=graphs[:4])
        w.append(["t4", "t5"], np.zeros((2, L, D), np.float32), None, graphs=graphs[4:])
    s = tracestore.open(store_url)
    assert s.has_graphs
    for i, layers in enumerate(graphs):
        g = s[i].graph
        assert g is not None and g.num_nodes == layers[0].num_nodes and g.num_layers == L
        for layer, want in enumerate(layers):
            got = g.to_pyg(layer)
            assert isinstance(got, Data) and got.num_nodes == want.num_nodes
            assert got.x.dtype == torch.float32 and got.edge_index.dtype == torch.int64
            assert torch.equal(got.x, want.x)
            assert torch.equal(got.edge_index, want.edge_index)
            assert torch.equal(got.edge_attr, want.edge_attr)
    assert s.info()["num_edges"] == sum(int(d.edge_index.shape[1]) for t in graphs for d in t)
    np.testing.assert_array_equal(np.diff(s.token_ptr), [5, 1, 9, 3, 7, 2])
    with pytest.raises(IndexError, match=r"layer 3 out of range for a graph of 3 layers"):
        s[0].graph.to_pyg(3)  # type: ignore[union-attr]


def test_tracegraph_input_and_pointers(make_store: Any) -> None:
    s = make_store(10, graphs=True)
    want = synthetic_graphs(10, L, D)
    for i in (0, 3, 9):
        g = s.graph(i)
        np.testing.assert_array_equal(g.x, want[i].x.astype(np.float16))
        for layer in range(L):
            np.testing.assert_array_equal(g.edge_index[layer], want[i].edge_index[layer])
            np.testing.assert_array_equal(g.edge_attr[layer][:, 0], want[i].edge_attr[layer].astype(np.float16))
            e0, e1 = s.edge_ptr[i * L + layer], s.edge_ptr[i * L + layer + 1]
            assert e1 - e0 == want[i].num_edges(layer)
    assert s.token_ptr[0] == 0 and s.token_ptr[-1] == sum(g.num_nodes for g in want)
    assert s.edge_ptr.shape == (10 * L + 1,)
    assert set(s.report) == {"sequences", "tokens/hidden", "graphs/edge_attr"}
    assert s.report["graphs/edge_attr"].max_abs.max() <= 1.01


def test_graph_of_store_without_graphs(make_store: Any) -> None:
    s = make_store(2)
    with pytest.raises(ValueError, match=r"this store has no graphs \(it was written with graphs=False\)"):
        s.graph(0)


def test_edge_index_exactly_one_chunk(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # total edges == edge chunk == edge shard: graphs/edge_index [2, 256] is one chunk in every direction
    monkeypatch.setattr(tracestore.config, "EDGE_CHUNK_BYTES", 2048)
    rng = np.random.default_rng(0)
    graphs = []
    for counts in ((40, 50, 38), (42, 44, 42)):
        eis = [rng.integers(0, 6, (2, c)) for c in counts]
        graphs.append(TraceGraph(x=rng.random((6, L, D)).astype(np.float32), edge_index=eis,
                                 edge_attr=[rng.random(c).astype(np.float32) for c in counts]))
    with tracestore.create(store_url, num_layers=L, hidden_size=D, graphs=True, shard_bytes=SHARD_BYTES) as w:
        w.append(["a", "b"], np.zeros((2, L, D), np.float32), None, graphs=graphs)
    s = tracestore.open(store_url)
    assert s._ei.shape == (2, 256)
    for i in range(2):
        for layer in range(L):
            np.testing.assert_array_equal(s[i].graph.edge_index[layer], graphs[i].edge_index[layer])


def _w(url: str, **kw: Any) -> tracestore.StoreWriter:
    return tracestore.create(url, num_layers=L, hidden_size=D, graphs=True, shard_bytes=SHARD_BYTES, **kw)


def _one(g: Any) -> dict[str, Any]:
    b = synthetic_batch(1)
    b["graphs"] = [g]
    return b


def test_graph_shape_errors(store_url: str) -> None:
    w = _w(store_url)
    good = synthetic_graphs(1, L, D)[0]

    def tg(**kw: Any) -> TraceGraph:
        return TraceGraph(**{"x": good.x, "edge_index": list(good.edge_index), "edge_attr": list(good.edge_attr), **kw})

    b = synthetic_batch(2, graphs=True)
    b["graphs"] = b["graphs"][:1]
    with pytest.raises(ShapeMismatchError, match=r"got 1 graphs for 2 ids"):
        w.append(**b)
    with pytest.raises(ShapeMismatchError, match=r"trace 'q000000': graphs has 2 layers; expected 3"):
        w.append(**_one(tg(edge_index=good.edge_index[:2], edge_attr=good.edge_attr[:2])))
    with pytest.raises(ShapeMismatchError, match=r"graph node features have shape \(\d+, 3, 5\); expected \(T, 3, 8\)"):
        w.append(**_one(tg(x=good.x[:, :, :5])))
    with pytest.raises(ShapeMismatchError, match=r"layer 1 edge_index has shape \(3, \d+\); expected \(2, E\)"):
        w.append(**_one(tg(edge_index=[good.edge_index[0], np.zeros((3, 4), np.int64), good.edge_index[2]])))
    with pytest.raises(DTypeError, match=r"layer 0 edge_index has dtype float32; expected integers"):
        w.append(**_one(tg(edge_index=[good.edge_index[0].astype(np.float32), *good.edge_index[1:]])))
    T = good.num_nodes
    with pytest.raises(ShapeMismatchError, match=rf"layer 2 edge_index refers to node {T} but the trace has {T} nodes"):
        w.append(**_one(tg(edge_index=[*good.edge_index[:2], np.array([[0], [T]])])))
    with pytest.raises(ShapeMismatchError, match=r"layer 0 edge_attr has shape \(2,\); expected \(\d+,\) or \(\d+, 1\)"):
        w.append(**_one(tg(edge_attr=[np.ones(2, np.float32), *good.edge_attr[1:]])))
    with pytest.raises(DTypeError, match=r"layer 0 edge_attr has dtype int64; expected a float dtype"):
        w.append(**_one(tg(edge_attr=[good.edge_attr[0].astype(np.int64), *good.edge_attr[1:]])))
    with pytest.raises(DTypeError, match=r"graph node features have dtype int64"):
        w.append(**_one(tg(x=good.x.astype(np.int64))))
    with pytest.raises(ShapeMismatchError, match=r"trace 'q000000': graphs is an empty list"):
        w.append(**_one([]))
    pyg = [Data(x=torch.zeros(4, D), edge_index=torch.zeros(2, 0, dtype=torch.long)) for _ in range(L)]
    pyg[1] = Data(x=torch.zeros(5, D), edge_index=torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ShapeMismatchError, match=r"layer 1 graph has x of shape \(5, 8\); expected \(4, D\) like layer 0"):
        w.append(**_one(pyg))
    with pytest.raises(ShapeMismatchError, match=r"layer 0 graph has no x"):
        w.append(**_one([Data(edge_index=torch.zeros(2, 0, dtype=torch.long))] * L))
    assert w.num_traces == 0


def test_graph_value_errors(store_url: str) -> None:
    w = _w(store_url)
    g = synthetic_graphs(1, L, D)[0]
    g.x = g.x.copy()
    g.x[2, 1, 4] = np.nan
    with pytest.raises(NonFiniteValueError, match=r"trace 'q000000', token 2, layer 1, hidden 4: value is NaN"):
        w.append(**_one(g))
    g = synthetic_graphs(1, L, D)[0]
    g.edge_attr[2] = g.edge_attr[2].copy()
    g.edge_attr[2][3] = 1e5
    with pytest.raises(Float16OverflowError, match=r"trace 'q000000', layer 2 edge 3 attribute 0: value 100000"):
        w.append(**_one(g))


def test_pyg_without_edge_attr_gets_weight_one(store_url: str) -> None:
    with _w(store_url) as w:
        pyg = [Data(x=torch.ones(3, D), edge_index=torch.tensor([[0, 1], [1, 2]])) for _ in range(L)]
        w.append(**_one(pyg))
    g = tracestore.open(store_url)[0].graph
    assert torch.equal(g.to_pyg(1).edge_attr, torch.ones(2))  # type: ignore[union-attr]


def test_ranges_to_indices() -> None:
    idx, ptr = ranges_to_indices(np.array([5, 0, 9]), np.array([2, 0, 3]))
    assert idx.tolist() == [5, 6, 9, 10, 11] and ptr.tolist() == [0, 2, 2, 5]
    idx, ptr = ranges_to_indices(np.array([], np.int64), np.array([], np.int64))
    assert idx.size == 0 and ptr.tolist() == [0]


def test_graphs_through_resume(tmp_path: Path) -> None:
    url = str(tmp_path / "g.zarr")
    w = _w(url)
    w.append(**synthetic_batch(3, graphs=True))
    w.checkpoint({})
    w.abort()
    w = _w(url, resume=True)
    w.append(**synthetic_batch(2, 3, graphs=True))
    w.close()
    s = tracestore.open(url)
    want = synthetic_graphs(5, L, D)
    for i in range(5):
        np.testing.assert_array_equal(s[i].graph.x, want[i].x.astype(np.float16))  # type: ignore[union-attr]
