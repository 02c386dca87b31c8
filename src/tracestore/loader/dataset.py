"""The loader's read path: batches of traces from a store into host tensors, and graph batches from the CSR
arrays. No zarr in the hot path (fork-safe): local stores are read through the direct shard reader's memory maps.

Sequences are copied with torch from a tensor view of each memory-mapped shard, one `copy_` per run of
consecutive traces (and per run of consecutive selected layers), straight into the destination: a float16
pinned buffer for the GPU, or a float32 buffer on the CPU, where the cast happens inside that same copy, so the
bytes are read from the page cache once and written once. Measured here on [64, 32, 4096] batches: 3-5 GB/s
against 1.3-2 GB/s for `np.take` into a float16 buffer and a cast after it (benchmarks/bench_stream.py). torch
copies release the GIL, so reader threads run them in parallel.

Compressed stores (no direct reader) and shards that are not laid out regularly go through
`ShardedArray.take` / zarr instead: correct, slower. Object stores: the TraceLoader reads sequences from whole
chunks it fetched once per epoch (window.py, through `RowGatherer.copy_rows`); `read_sequences` here is the
batch-by-batch ranged read, for views and direct use.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..store.graphs import ranges_to_indices
from ..store.shards import _UNSET

if TYPE_CHECKING:
    from ..store.reader import TraceStore, _Array
    from ..store.shards import ShardedArray


def layer_index(num_layers: int, layers: Sequence[int] | slice | None) -> np.ndarray:
    """`layers` (None = all, a slice, or a sequence of ints, negatives counted from the end) as int64 indices."""
    all_layers = np.arange(num_layers, dtype=np.int64)
    if layers is None:
        return all_layers
    if isinstance(layers, slice):
        idx = all_layers[layers]
    else:
        idx = np.asarray(list(layers), dtype=np.int64).reshape(-1)
        bad = idx[(idx < -num_layers) | (idx >= num_layers)]
        if bad.size:
            raise IndexError(f"layers={list(layers)}: layer {int(bad[0])} is out of range for a store of {num_layers} "
                             f"layers; pick layers in 0..{num_layers - 1}")
        idx = idx % num_layers
    if idx.size == 0:
        raise ValueError(f"layers={layers!r} selects no layer of the {num_layers}; select at least one")
    return idx


def _runs(values: np.ndarray, group: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split `values` into runs of consecutive integers (value[i+1] == value[i] + 1, same group): (starts, lengths)
    as positions in `values`."""
    if values.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    brk = np.diff(values) != 1
    if group is not None:
        brk |= np.diff(group) != 0
    starts = np.concatenate(([0], np.flatnonzero(brk) + 1)).astype(np.int64)
    lengths = np.diff(np.append(starts, values.size))
    return starts, lengths


_WARNINGS_LOCK = threading.Lock()


def readonly_tensor(view: np.ndarray) -> torch.Tensor:
    """A torch tensor over read-only bytes (a memory map, a fetched buffer), used only as a copy source: torch
    has no read-only tensors and warns. warnings.catch_warnings() swaps process-wide state, so the loader's
    threads take turns (microseconds)."""
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(view)


class RowGatherer:
    """Gathers rows of one array chunked one row per inner chunk along axis 0 (`sequences`, `tokens/hidden`),
    selecting layers on axis 1, into a caller's tensor (float16, or float32 with the cast done in the copy)."""

    def __init__(self, array: _Array, layers: np.ndarray, num_layers: int) -> None:
        self.array = array
        self.direct: ShardedArray | None = array.direct
        # a store made of parts: one gatherer per part, rows looked up in the parts' row offsets
        self.parts: list[RowGatherer] | None = None
        self.offsets: np.ndarray | None = None
        if array.parts is not None:
            self.parts = [RowGatherer(a, layers, num_layers) for a in array.parts]
            self.offsets = np.asarray(array.offsets, np.int64)  # type: ignore[attr-defined]
        self.layers = layers
        self._all_layers = bool(layers.size == num_layers and (layers == np.arange(num_layers)).all())
        ls, ll = _runs(layers)
        # runs of consecutive selected layers: (source layer, destination position, count)
        self._layer_runs = [(int(layers[s]), int(s), int(c)) for s, c in zip(ls.tolist(), ll.tolist(), strict=True)]
        self._sub: tuple[Any, ...] = () if self._all_layers else (layers,)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _shard_tensor(self, shard: int) -> torch.Tensor | None:
        """A torch view [rows, L, D] of one memory-mapped shard, or None where the shard has no regular view.
        Kept on the store's shard cache entry, not here: the cache bounds the maps (and files) held open."""
        assert self.direct is not None
        e = self.direct.mapped_entry(shard)
        if e is None:
            return None
        t = e.derived
        if t is _UNSET:
            with self._lock:
                t = e.derived
                if t is _UNSET:
                    view = self.direct.shard_rows_view(shard)
                    t = None
                    if view is not None:
                        t = readonly_tensor(view)
                    e.derived = t
        return t  # type: ignore[no-any-return]

    def gather(self, rows: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        """Copy rows `rows` (store rows, any order) into `out` [len(rows), L', D] (float16 or float32, on the
        CPU), casting in the copy. Runs of consecutive rows in one shard are one copy each."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return out
        if self.parts is not None:
            # runs of rows in one part (a batch is sorted: one run per part it touches), each gathered by
            # its part straight into its slice of `out`
            assert self.offsets is not None
            part = np.searchsorted(self.offsets, rows, side="right") - 1
            brk = np.flatnonzero(np.diff(part)) + 1
            for a, b in zip(np.concatenate(([0], brk)).tolist(), np.concatenate((brk, [rows.size])).tolist(),
                            strict=True):
                p = int(part[a])
                self.parts[p].gather(rows[a:b] - self.offsets[p], out[a:b])
            return out
        if self.direct is None:
            self._gather_slow(rows, np.arange(rows.size), out)
            return out
        rps = self.direct.meta.rows_per_shard
        shards = rows // rps
        starts, lengths = _runs(rows, shards)
        slow: list[np.ndarray] = []
        for s, c in zip(starts.tolist(), lengths.tolist(), strict=True):
            shard = int(shards[s])
            src = self._shard_tensor(shard)
            if src is None:
                slow.append(np.arange(s, s + c))
                continue
            self._copy_run(src, int(rows[s]) - shard * rps, s, c, out)
        if slow:
            pos = np.concatenate(slow)
            self._gather_slow(rows[pos], pos, out)
        return out

    def _copy_run(self, src: torch.Tensor, l0: int, s: int, c: int, out: torch.Tensor) -> None:
        """src rows [l0, l0 + c) -> out rows [s, s + c), selecting layers, casting in the copy."""
        if self._all_layers:
            out[s:s + c].copy_(src[l0:l0 + c])
        else:
            for sl, dl, lc in self._layer_runs:
                out[s:s + c, dl:dl + lc].copy_(src[l0:l0 + c, sl:sl + lc])

    def copy_rows(self, src: torch.Tensor, local: np.ndarray, pos: np.ndarray, out: torch.Tensor) -> None:
        """Rows `local` of `src` [rows, L, D] (a chunk held by the loader's window) into rows `pos` of `out`:
        one copy per run that is consecutive on both sides."""
        local = np.asarray(local, np.int64)
        pos = np.asarray(pos, np.int64)
        if local.size == 0:
            return
        brk = (np.diff(local) != 1) | (np.diff(pos) != 1)
        starts = np.concatenate(([0], np.flatnonzero(brk) + 1))
        lengths = np.diff(np.append(starts, local.size))
        for a, c in zip(starts.tolist(), lengths.tolist(), strict=True):
            self._copy_run(src, int(local[a]), int(pos[a]), c, out)

    def _gather_slow(self, rows: np.ndarray, pos: np.ndarray, out: torch.Tensor) -> None:
        # through ShardedArray.take (crc-verified reads, irregular shards) or zarr (compressed stores)
        got = self.array.take(rows, sub=self._sub)
        src = torch.from_numpy(np.ascontiguousarray(got))
        if pos.size == out.shape[0] and (pos == np.arange(pos.size)).all():
            out.copy_(src)
        else:
            out[torch.from_numpy(pos)] = src.to(out.dtype)


@dataclass
class GraphParts:
    """A graph batch on the host, before it becomes a PyG Batch: float16 features, int64 indices.

    Graph g = i * len(layers) + j is trace i of the batch at layer layers[j]."""

    x: np.ndarray  # [num_nodes, D] float16
    edge_index: np.ndarray  # [2, num_edges] int64, batch-global node ids
    edge_attr: np.ndarray  # [num_edges, H] float16
    batch: np.ndarray  # [num_nodes] int64 graph of each node
    ptr: np.ndarray  # [num_graphs + 1] int64 node pointer
    edge_ptr: np.ndarray  # [num_graphs + 1] int64 edge pointer
    num_graphs: int


class TraceSource:
    """Reads what a batch needs from a TraceStore: sequences into caller buffers, scores, ids, graphs.

    Thread-safe; picklable (memory maps reopen lazily in the new process)."""

    def __init__(self, store: TraceStore, layers: Sequence[int] | slice | None = None,
                 graph_layers: Sequence[int] | None = None) -> None:
        self.store = store
        self.layers = layer_index(store.num_layers, layers)
        self._rows = None if store._rows is None else np.asarray(store._rows, np.int64)
        self._scores = np.ascontiguousarray(store.scores, dtype=np.float32)
        self._ids = store.ids
        self.seq = RowGatherer(store._seq, self.layers, store.num_layers)
        self.graph_layers = None if graph_layers is None else layer_index(store.num_layers, graph_layers)
        if self.graph_layers is not None:
            if store._hidden is None or store.token_ptr is None:
                raise ValueError(f"{store.url}: graphs need node features, the tokens' hidden states, and this store "
                                 f"keeps none (converted with --tokens ids or none); convert again with --tokens all")
            self.token_ptr = store.token_ptr
            self.xg = RowGatherer(store._hidden, self.graph_layers, store.num_layers)

    def __len__(self) -> int:
        return len(self._scores)

    @property
    def row_shape(self) -> tuple[int, int]:
        return (int(self.layers.size), self.store.hidden_size)

    def store_rows(self, positions: np.ndarray) -> np.ndarray:
        return positions if self._rows is None else self._rows[positions]

    def read_sequences(self, positions: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        """Traces at `positions` (in this store or view) into `out` [B, L', D] float16 or float32."""
        return self.seq.gather(self.store_rows(positions), out)

    def scores(self, positions: np.ndarray) -> np.ndarray:
        return self._scores[positions]

    def ids(self, positions: np.ndarray) -> list[str]:
        return [str(i) for i in self._ids[positions]]

    def read_graphs(self, positions: np.ndarray) -> GraphParts:
        """The attention graphs of traces `positions` at `graph_layers`, gathered from the CSR arrays with
        vectorised pointer arithmetic: one run copy per trace for the nodes, one range read per trace for the
        edges."""
        return self.graph_parts_of_rows(self.store_rows(np.asarray(positions, np.int64)))

    def graph_parts_of_rows(self, rows: np.ndarray, *, nodes: Any = None, edges: Any = None) -> GraphParts:
        """The graphs of store rows `rows` (see read_graphs). `nodes(n0, nn, dst, out)` and `edges(span0, span1)`
        replace the reads from the store where given (the object-store window serves them from the spans it
        holds): `nodes` copies each trace's `nn[i]` token rows from store token row `n0[i]` into rows
        `dst[i]:dst[i] + nn[i]` of `out` (selected layers); `edges` returns, per trace, edge_index and
        edge_attr of the store's edges [span0[i], span1[i])."""
        assert self.graph_layers is not None
        st = self.store
        L = st.num_layers
        lay = self.graph_layers
        nl_ = int(lay.size)
        rows = np.asarray(rows, np.int64)
        B = int(rows.size)
        n0 = self.token_ptr[rows]
        nn = self.token_ptr[rows + 1] - n0
        # nodes: gather [sum nn, L', D] with the layer selection, then lay out graph (i, j) = trace i at layer j
        node_rows, tptr = ranges_to_indices(n0, nn)
        xs = np.empty((node_rows.size, nl_, st.hidden_size), np.float16)
        if nodes is None:
            self.xg.gather(node_rows, torch.from_numpy(xs))
        else:
            nodes(n0, nn, tptr[:-1], torch.from_numpy(xs))
        g_nodes = np.repeat(nn, nl_)  # nodes per graph
        if nl_ == 1:
            x = xs.reshape(-1, st.hidden_size)
        else:
            src, _ = ranges_to_indices(np.repeat(tptr[:-1], nl_), g_nodes)
            layer_of = np.repeat(np.tile(np.arange(nl_, dtype=np.int64), B), g_nodes)
            x = xs.reshape(-1, st.hidden_size)[src * nl_ + layer_of]
        gptr = np.zeros(B * nl_ + 1, np.int64)
        np.cumsum(g_nodes, out=gptr[1:])
        # edges: read each trace's span covering the selected layers once, then pick the (trace, layer) ranges
        lo, hi = int(lay.min()), int(lay.max())
        span0 = st.edge_ptr[rows * L + lo]
        span1 = st.edge_ptr[rows * L + hi + 1]
        if edges is None:
            eis, eas = [], []
            for a, b in zip(span0.tolist(), span1.tolist(), strict=True):
                eis.append(st._ei.read(a, b))
                eas.append(st._ea.read(a, b))
        else:
            eis, eas = edges(span0, span1)
        H = int(st._ea.shape[1])
        ei_cat = np.concatenate(eis, axis=1) if eis else np.zeros((2, 0), np.int32)
        ea_cat = np.concatenate(eas, axis=0) if eas else np.zeros((0, H), np.float16)
        sptr = np.zeros(B + 1, np.int64)
        np.cumsum(span1 - span0, out=sptr[1:])
        key = (rows[:, None] * L + lay[None, :]).reshape(-1)  # edge_ptr slot of graph (i, j)
        e_start = st.edge_ptr[key] - np.repeat(span0, nl_) + np.repeat(sptr[:-1], nl_)
        e_len = st.edge_ptr[key + 1] - st.edge_ptr[key]
        eidx, eptr = ranges_to_indices(e_start, e_len)
        edge_index = ei_cat[:, eidx].astype(np.int64)
        edge_index += np.repeat(gptr[:-1], e_len)[None, :]
        return GraphParts(x=x, edge_index=edge_index, edge_attr=ea_cat[eidx],
                          batch=np.repeat(np.arange(B * nl_, dtype=np.int64), g_nodes), ptr=gptr, edge_ptr=eptr,
                          num_graphs=B * nl_)


def to_pyg_batch(parts: GraphParts, device: torch.device, *, non_blocking: bool = False) -> Any:
    """A torch_geometric Batch from GraphParts, on `device`, with float32 x / edge_attr cast on the device.

    Equal to `Batch.from_data_list` of the same graphs made with `TraceGraph.to_pyg(layer)` (edge_attr [E] when
    the store keeps one weight per edge, else [E, H]); `to_data_list()` works (the slice and increment
    dictionaries are set)."""
    from torch_geometric.data import Batch

    def dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=non_blocking)

    x = dev(parts.x).float()
    ea = parts.edge_attr[:, 0] if parts.edge_attr.ndim == 2 and parts.edge_attr.shape[1] == 1 else parts.edge_attr
    edge_attr = dev(ea).float()
    ptr = torch.from_numpy(parts.ptr)
    eptr = torch.from_numpy(parts.edge_ptr)
    b = Batch(x=x, edge_index=dev(parts.edge_index), edge_attr=edge_attr, batch=dev(parts.batch),
              ptr=dev(parts.ptr))
    # what from_data_list records, so that to_data_list() / get_example() work
    b._num_graphs = parts.num_graphs
    b._slice_dict = {"x": ptr, "edge_index": eptr, "edge_attr": eptr}
    b._inc_dict = {"x": torch.zeros(parts.num_graphs, dtype=torch.long), "edge_index": ptr[:-1],
                   "edge_attr": torch.zeros(parts.num_graphs, dtype=torch.long)}
    return b
