"""Per-layer attention graphs of a trace: the in-memory form (TraceGraph), conversion from and to PyTorch
Geometric `Data`, and the CSR pointer arithmetic of the graph arrays (graphs/edge_ptr over tokens/ptr)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DTypeError, ShapeMismatchError

if TYPE_CHECKING:  # torch_geometric is imported only when a graph is converted
    from torch_geometric.data import Data


@dataclass
class TraceGraph:
    """The attention graphs of one trace: its T tokens are the nodes, with a hidden state per layer as node
    features, and per layer a set of attention-weighted edges between them (node ids local to the trace).

    x: [T, L, D] node features (the trace's `tokens.hidden`), or None where the store keeps no hidden states
    (then `num_tokens` gives T); edge_index: L arrays [2, E_l]; edge_attr: L arrays [E_l, H].
    """

    x: np.ndarray | None
    edge_index: list[np.ndarray]
    edge_attr: list[np.ndarray]
    num_tokens: int | None = None

    @property
    def num_nodes(self) -> int:
        if self.x is not None:
            return int(self.x.shape[0])
        return int(self.num_tokens or 0)

    @property
    def num_layers(self) -> int:
        return len(self.edge_index)

    def num_edges(self, layer: int) -> int:
        return int(self.edge_index[layer].shape[1])

    def to_pyg(self, layer: int) -> Data:
        """The graph of one layer as a `torch_geometric.data.Data` with float32 `x` [T, D], int64
        `edge_index` [2, E] and float32 `edge_attr` ([E] when the store keeps one weight per edge,
        else [E, H])."""
        import torch
        from torch_geometric.data import Data

        if not -self.num_layers <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range for a graph of {self.num_layers} layers")
        if self.x is None:
            raise ValueError("this graph has no node features: its store keeps no token hidden states (converted "
                             "with --tokens ids or none); convert again with --tokens all to train a graph model")
        ea = np.asarray(self.edge_attr[layer], dtype=np.float32)
        if ea.ndim == 2 and ea.shape[1] == 1:
            ea = ea[:, 0]
        return Data(
            x=torch.from_numpy(np.ascontiguousarray(self.x[:, layer], dtype=np.float32)),
            edge_index=torch.from_numpy(np.asarray(self.edge_index[layer], dtype=np.int64)),
            edge_attr=torch.from_numpy(ea),
            num_nodes=self.num_nodes,
        )

    @classmethod
    def from_pyg(cls, layers: Sequence[Any], *, trace: str = "?") -> TraceGraph:
        """From a list of L PyG `Data` (one per layer) with `x` [T, D], `edge_index` [2, E] and `edge_attr`
        [E] or [E, H]. Every layer must have the same nodes (T)."""
        if len(layers) == 0:
            raise ShapeMismatchError(f"trace {trace!r}: graphs is an empty list; expected one graph per layer")
        xs, eis, eas = [], [], []
        for layer, g in enumerate(layers):
            x = _to_numpy(getattr(g, "x", None), f"trace {trace!r}: layer {layer} graph has no x (node features, the "
                                                 f"tokens' states at that layer); give every layer's Data an x [T, D]")
            ei = _to_numpy(getattr(g, "edge_index", None), f"trace {trace!r}: layer {layer} graph has no edge_index; "
                                                           f"give every layer's Data an edge_index [2, E]")
            ea = getattr(g, "edge_attr", None)
            ea = np.ones(ei.shape[1] if ei.ndim == 2 else 0, np.float32) if ea is None else _to_numpy(ea, "")
            xs.append(x)
            eis.append(ei)
            eas.append(ea)
        t = xs[0].shape[0]
        for layer, x in enumerate(xs):
            if x.ndim != 2 or x.shape[0] != t:
                raise ShapeMismatchError(f"trace {trace!r}: layer {layer} graph has x of shape {tuple(x.shape)}; "
                                         f"expected ({t}, D) like layer 0 (every layer has the same token nodes)")
        return cls(x=np.stack(xs, axis=1), edge_index=eis, edge_attr=eas)


def as_numpy(v: Any) -> np.ndarray:
    """A numpy view of an array or a torch tensor (bfloat16 widened to float32); a list of per-layer arrays
    or tensors is stacked. The one conversion used by the writer, the graphs and the converter."""
    if hasattr(v, "detach"):
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        return v.numpy()
    if isinstance(v, list | tuple) and v and (hasattr(v[0], "detach") or isinstance(v[0], np.ndarray)):
        return np.stack([as_numpy(x) for x in v])
    return np.asarray(v)


def _to_numpy(v: Any, missing: str) -> np.ndarray:
    if v is None:
        raise ShapeMismatchError(missing)
    return as_numpy(v)


def as_trace_graph(obj: Any, *, num_layers: int, hidden_size: int, edge_attr_size: int, trace: str) -> TraceGraph:
    """Normalise what a user passes for one trace's graphs (a TraceGraph, or a list of L PyG Data) and check
    it against the store's shape. Edge attributes come out [E, H]; node ids are checked to be in range."""
    g = obj if isinstance(obj, TraceGraph) else TraceGraph.from_pyg(obj, trace=trace)
    if g.num_layers != num_layers:
        raise ShapeMismatchError(f"trace {trace!r}: graphs has {g.num_layers} layers; expected {num_layers} "
                                 f"(one graph per layer)")
    if g.x is not None:
        if g.x.ndim != 3 or g.x.shape[1:] != (num_layers, hidden_size):
            raise ShapeMismatchError(f"trace {trace!r}: graph node features have shape {tuple(g.x.shape)}; expected "
                                     f"(T, {num_layers}, {hidden_size})")
        if not np.issubdtype(g.x.dtype, np.floating):
            raise DTypeError(f"trace {trace!r}: graph node features have dtype {g.x.dtype}; expected a float dtype")
    eis, eas = [], []
    for layer in range(num_layers):
        ei = np.asarray(g.edge_index[layer])
        if ei.ndim != 2 or ei.shape[0] != 2:
            raise ShapeMismatchError(f"trace {trace!r}: layer {layer} edge_index has shape {tuple(ei.shape)}; "
                                     f"expected (2, E)")
        if not np.issubdtype(ei.dtype, np.integer):
            raise DTypeError(f"trace {trace!r}: layer {layer} edge_index has dtype {ei.dtype}; expected integers")
        if ei.size and (ei.min() < 0 or ei.max() >= g.num_nodes):
            bad = int(ei.min()) if ei.min() < 0 else int(ei.max())
            raise ShapeMismatchError(f"trace {trace!r}: layer {layer} edge_index refers to node {bad} but the trace "
                                     f"has {g.num_nodes} nodes (0..{g.num_nodes - 1}); node ids are local to the "
                                     f"trace: fix the graph's export")
        ea = np.asarray(g.edge_attr[layer])
        if ea.ndim == 1:
            ea = ea[:, None]
        if ea.ndim != 2 or ea.shape != (ei.shape[1], edge_attr_size):
            raise ShapeMismatchError(f"trace {trace!r}: layer {layer} edge_attr has shape "
                                     f"{tuple(np.asarray(g.edge_attr[layer]).shape)}; expected ({ei.shape[1]},) or "
                                     f"({ei.shape[1]}, {edge_attr_size})")
        if not np.issubdtype(ea.dtype, np.floating):
            raise DTypeError(f"trace {trace!r}: layer {layer} edge_attr has dtype {ea.dtype}; expected a float dtype")
        eis.append(ei)
        eas.append(ea)
    return TraceGraph(x=g.x, edge_index=eis, edge_attr=eas, num_tokens=g.num_nodes)


def ranges_to_indices(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised CSR gather: for ranges [starts[i], starts[i]+lengths[i]) return all indices concatenated
    and the output pointer (len+1)."""
    starts = np.asarray(starts, np.int64)
    lengths = np.asarray(lengths, np.int64)
    optr = np.zeros(lengths.size + 1, np.int64)
    np.cumsum(lengths, out=optr[1:])
    idx = np.arange(optr[-1], dtype=np.int64) - np.repeat(optr[:-1] - starts, lengths)
    return idx, optr


def pointer_problem(name: str, ptr: np.ndarray, entries: int, total: int, what: str) -> str | None:
    """What is wrong with a CSR pointer (tokens/ptr, graphs/edge_ptr) that must have `entries` entries, start at
    0, never decrease and end at `total` (the rows of `what`); None when nothing is."""
    if ptr.shape != (entries,):
        return f"{name} has {ptr.shape[0] if ptr.ndim == 1 else ptr.shape} entries; expected {entries}"
    if entries and (ptr[0] != 0 or ptr[-1] != total or (np.diff(ptr) < 0).any()):
        return f"{name} does not fit {what} ({total})"
    return None

