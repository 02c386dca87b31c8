"""TraceLoader with graphs: PyG batches built from the CSR arrays equal Batch.from_data_list of the same graphs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch as PygBatch

import tracestore

DEVICES = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])


def _reference(store: tracestore.TraceStore, positions: np.ndarray, layers: list[int]) -> PygBatch:
    return PygBatch.from_data_list([store[int(i)].graph.to_pyg(layer) for i in positions for layer in layers])


def _assert_same(got: PygBatch, ref: PygBatch, device: str) -> None:
    for key in ("x", "edge_index", "edge_attr", "batch", "ptr"):
        a, b = getattr(got, key), getattr(ref, key)
        assert a.device.type == torch.device(device).type, key
        assert a.dtype == b.dtype, key
        assert torch.equal(a.cpu(), b), key
    assert got.num_graphs == ref.num_graphs
    assert got.x.dtype == torch.float32 and got.edge_attr.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_layer_graph_batch_equals_from_data_list(make_store: Callable[..., Any], device: str,
                                                     num_workers: int) -> None:
    store = make_store(13, graphs=True)
    loader = tracestore.TraceLoader(store, 4, with_graphs=True, graph_layer=1, device=device, num_workers=num_workers)
    seen = []
    for b in loader:
        _assert_same(b.graph, _reference(store, b.positions, [1]), device)
        seen += b.positions.tolist()
        assert b.graph.num_graphs == len(b)
    assert sorted(seen) == list(range(13))


@pytest.mark.parametrize("layers", [None, [2, 0]])
def test_all_layers_layout_for_hybrid_models(make_store: Callable[..., Any], layers: list[int] | None) -> None:
    store = make_store(9, graphs=True)
    want = [0, 1, 2] if layers is None else layers
    loader = tracestore.TraceLoader(store, 4, with_graphs=True, layers=layers, num_workers=1)
    for b in loader:
        # graph i * L' + j is trace i at layer want[j]
        _assert_same(b.graph, _reference(store, b.positions, want), "cpu")
        assert b.graph.num_graphs == len(b) * len(want)
        assert b.sequences.shape[1] == len(want)


def test_to_data_list_round_trips(make_store: Callable[..., Any]) -> None:
    store = make_store(6, graphs=True)
    b = next(iter(tracestore.TraceLoader(store, 3, with_graphs=True, graph_layer=2)))
    for got, i in zip(b.graph.to_data_list(), b.positions, strict=True):
        ref = store[int(i)].graph.to_pyg(2)
        assert torch.equal(got.x, ref.x) and torch.equal(got.edge_index, ref.edge_index)
        assert torch.equal(got.edge_attr, ref.edge_attr)


def test_multi_head_edge_attr_and_negative_layer(tmp_path: Any) -> None:
    from tracestore.testing import synthetic_graphs, synthetic_ids, synthetic_scores, synthetic_sequences

    url = str(tmp_path / "h.zarr")
    with tracestore.create(url, num_layers=3, hidden_size=8, graphs=True, edge_attr_size=2, shard_bytes=200) as w:
        w.append(synthetic_ids(7), synthetic_sequences(7, 3, 8), synthetic_scores(7),
                 graphs=synthetic_graphs(7, 3, 8, edge_attr_size=2))
    store = tracestore.open(url)
    for b in tracestore.TraceLoader(store, 3, with_graphs=True, graph_layer=-1):
        _assert_same(b.graph, _reference(store, b.positions, [2]), "cpu")
        assert b.graph.edge_attr.shape[1] == 2
