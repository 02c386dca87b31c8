"""The loader's read path for object stores: every shuffle chunk's rows fetched once per epoch, held while its
traces are served, then dropped -- sequences, and for graph epochs the tokens' hidden states and the edges.

A shuffled batch takes a few traces from each chunk of its shuffle window (sampler.py). Reading each batch's
traces with ranged GETs, coalesced across the gaps between them, fetched the same spans again for the next
batch: 5.2x the trace bytes per epoch on the benchmark store (issue 12). Here the plan of the epoch is known up
front, so each chunk (a contiguous run of store rows inside one shard) is fetched once, verified (the crc32c of
every inner chunk), and kept in memory until the last batch that uses it is read. The chunks are fetched in the
order batches first need them, `concurrency` at once, ahead of the batch being read as far as the memory bound
allows, so that the next window is on its way while the current one is served.

What is fetched of a chunk is the rows of it that this rank's batches read (a *use*), not more: the whole
chunk where the rank owns it (sampler.py, step 3), its own rows of a chunk it shares with a neighbouring rank,
one row for a padding repeat, the selected rows of a `select()`ed view. Rows close together are fetched as one
span while the rows filled in between stay within `waste` (3 %) of the rows needed: an epoch fetches at most
1.03x the bytes it reads. For graph epochs each span also brings the tokens' hidden states of its traces (one
contiguous run of tokens/hidden, cut only at its shards) and their edges (one contiguous run of edge_index and
edge_attr, through the crc-checked chunk reads of store/ranged.py).

Memory: at most `max_chunks` uses are held or in flight (the TraceLoader sets it to (1 + REMOTE_PREFETCH_WINDOWS)
shuffle windows: the window being served and the next one); more only while the batches being read need more
at once (a batch larger than a window, or many batches read ahead), because the uses a batch needs are always
fetched.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..store.graphs import ranges_to_indices
from .dataset import GraphParts, readonly_tensor

if TYPE_CHECKING:
    from ..store.shards import ShardedArray
    from .dataset import TraceSource

#: Rows that may be fetched beside those needed, to join neighbouring runs of needed rows into one GET, as a
#: share of the rows needed (a view's rows of a chunk, a rank's rows of a shared chunk): the byte bound of an
#: epoch is 1 + SPAN_WASTE of what it reads.
SPAN_WASTE = 0.03


def coalesce_rows(rows: np.ndarray, waste: float = SPAN_WASTE) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops) of the spans that cover the sorted, distinct `rows`: runs of consecutive rows, joined
    across the smallest gaps first while the rows filled in stay within `waste` x len(rows)."""
    rows = np.asarray(rows, np.int64)
    if rows.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    brk = np.flatnonzero(np.diff(rows) > 1)
    starts = rows[np.concatenate(([0], brk + 1))]
    stops = rows[np.concatenate((brk, [rows.size - 1]))] + 1
    gaps = starts[1:] - stops[:-1]
    filled = np.zeros(gaps.size, bool)
    if gaps.size:
        by_size = np.argsort(gaps, kind="stable")
        filled[by_size[np.cumsum(gaps[by_size]) <= int(waste * rows.size)]] = True
    return starts[np.concatenate(([True], ~filled))], stops[np.concatenate((~filled, [True]))]


@dataclass
class _Span:
    """The fetched data of store rows [r0, r1): sequences, and for graphs the tokens of those traces (from
    token row t0 on, store-global numbering)."""

    r0: int
    r1: int
    seq: torch.Tensor  # [r1 - r0, L, D] float16, read-only bytes
    t0: int = 0
    hidden: torch.Tensor | None = None  # [tokens, L, D] float16


class _FlatChunks:
    """Inner chunks of a flat edge array (edge_index [2, E] along axis 1, edge_attr [E, H] along axis 0) that
    one use fetched, by chunk number; `take(a, b)` assembles the store-global elements [a, b) from them."""

    def __init__(self, arrays: _Arrays, part: int, chunks: dict[int, np.ndarray]) -> None:
        meta = arrays.arrays[part].meta
        self.axis, self.per, self.inner_shape, self.dtype = meta.axis, meta.rows_per_chunk, meta.inner_shape, meta.dtype
        self.offset = int(arrays.offsets[part])
        self.chunks = chunks

    def take(self, a: int, b: int) -> np.ndarray:
        a, b = a - self.offset, b - self.offset
        if b <= a:  # a trace with no edges at this layer: nothing fetched for it, nothing to take
            shape = list(self.inner_shape)
            shape[self.axis] = 0
            return np.zeros(shape, self.dtype)
        pieces = []
        for c in range(a // self.per, -(-b // self.per)):
            lo, hi = max(a, c * self.per) - c * self.per, min(b, (c + 1) * self.per) - c * self.per
            pieces.append(self.chunks[c][(slice(None),) * self.axis + (slice(lo, hi),)])
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:
            shape = list(self.inner_shape)
            shape[self.axis] = 0
            return np.zeros(shape, self.dtype)
        return np.concatenate(pieces, axis=self.axis)


class _Held:
    """The spans of one use, sorted, with a lookup from store row to span; for graphs, the edges of its traces."""

    def __init__(self, spans: list[_Span], edge_index: _FlatChunks | None = None,
                 edge_attr: _FlatChunks | None = None) -> None:
        self.spans = spans
        self.starts = np.array([s.r0 for s in spans], np.int64)
        self.edge_index, self.edge_attr = edge_index, edge_attr

    def span_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, rows, side="right") - 1


class _Arrays:
    """One array of a store (or of each of its parts), with the rows where each part starts."""

    def __init__(self, array: Any, total: int) -> None:
        parts = array.parts
        self.arrays: list[ShardedArray] = [a.direct for a in (parts or [array])]
        self.offsets = np.asarray(array.offsets if parts is not None else [0, total], np.int64)

    def part(self, row: int) -> int:
        return int(np.searchsorted(self.offsets, row, side="right") - 1)


class ChunkWindow:
    """Serves the batches of one epoch's plan (`plan[k]` = the positions of batch k in `source`) from rows
    fetched once per use (module docstring).

    `bounds` are the store's chunk starts followed by its number of rows (sampler.chunk_starts over store
    rows); `graphs` also brings the graph data of each span. Thread-safe: reader threads may read batches in
    any order. `close()` cancels what is in flight."""

    def __init__(self, source: TraceSource, plan: Sequence[np.ndarray], bounds: np.ndarray, *, max_chunks: int,
                 concurrency: int, gap: int = 1, graphs: bool = False, waste: float = SPAN_WASTE) -> None:
        from ..store.ranged import fetch_rows

        self._fetch_rows = fetch_rows
        self.source = source
        store = source.store
        self.graphs = bool(graphs)
        self.waste = float(waste)
        self.bounds = np.asarray(bounds, np.int64)
        total = int(self.bounds[-1])
        self.seq = _Arrays(store._seq, total)
        if self.graphs:
            assert store._hidden is not None and source.graph_layers is not None
            self.hidden = _Arrays(store._hidden, int(store.token_ptr[-1]))  # type: ignore[index]
            n_edges = int(store.edge_ptr[-1])
            self.edge_index = _Arrays(store._ei, n_edges)
            self.edge_attr = _Arrays(store._ea, n_edges)
            self._lo, self._hi = int(source.graph_layers.min()), int(source.graph_layers.max())
        self.max_chunks = max(1, int(max_chunks))
        # A use is a chunk, the batches that read it (no two more than `gap` batches apart: a chunk's traces lie
        # in one shuffle window of this rank's stream, so those batches follow each other; only a padding
        # repeat at the end comes back to a chunk read long before: fetched again, one row, not held), and the
        # rows those batches read of it.
        self._units_of: list[list[int]] = []  # the uses each batch reads
        self._chunk: list[int] = []  # chunk of each use
        self._first: list[int] = []  # first batch of each use
        self._refs: list[int] = []  # batches of each use not yet read
        rows_of: list[list[np.ndarray]] = []  # store rows each use's batches read
        current: dict[int, tuple[int, int]] = {}  # chunk -> (its open use, last batch that read it)
        for k, pos in enumerate(plan):
            rows = np.sort(source.store_rows(np.asarray(pos, np.int64)))
            chunk = np.searchsorted(self.bounds, rows, side="right") - 1
            brk = np.flatnonzero(np.diff(chunk)) + 1
            units = []
            for a, b in zip(np.concatenate(([0], brk)).tolist(), np.concatenate((brk, [rows.size])).tolist(),
                            strict=True):
                if a == b:
                    continue
                c = int(chunk[a])
                u, last = current.get(c, (-1, -1))
                if u < 0 or k - last > gap:
                    u = len(self._chunk)
                    self._chunk.append(c)
                    self._first.append(k)
                    self._refs.append(0)
                    rows_of.append([])
                self._refs[u] += 1
                rows_of[u].append(rows[a:b])
                current[c] = (u, k)
                units.append(u)
            self._units_of.append(units)
        self._rows_of = [np.unique(np.concatenate(r)) for r in rows_of]
        self._next = 0  # uses submitted so far, in the order batches first need them (their numbering)
        self._live: dict[int, Future[_Held]] = {}  # uses fetched or in flight, not yet done with
        self._lock = threading.Lock()
        self._index_locks: dict[tuple[int, int], threading.Lock] = {}
        workers = max(1, int(concurrency))
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(workers, thread_name_prefix="tracestore-chunks")
        # the spans of a use with several (a view's, a shared chunk's): fetched side by side, on a pool of their
        # own (a use's task waits for them; on one pool that could wait on itself)
        self._span_pool: ThreadPoolExecutor | None = None
        self._span_workers = workers
        self.fetched = 0  # uses fetched (each chunk once per epoch, a padding repeat's again)
        self.spans = 0  # spans fetched: one GET each for sequences
        self.peak = 0  # most uses held or in flight at once

    # -- fetching ------------------------------------------------------------------------------------
    def _index(self, arrays: _Arrays, p: int, shard: int) -> None:
        """A shard's index (and the store's generation check) once, not once per span fetched at the same time."""
        with self._lock:
            lock = self._index_locks.setdefault((id(arrays), p * (1 << 40) + shard), threading.Lock())
        with lock:
            arrays.arrays[p].index(shard)

    def _rows(self, arrays: _Arrays, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) (store-global) of an array of one row per inner chunk, as one tensor: one GET per shard
        the rows lie in (a chunk of sequences lies in one; the tokens of a span may cross a shard of
        tokens/hidden)."""
        p = arrays.part(a)
        array = arrays.arrays[p]
        off = int(arrays.offsets[p])
        rps = array.meta.rows_per_shard
        pieces = []
        lo = a - off
        while lo < b - off:
            hi = min(b - off, (lo // rps + 1) * rps)
            self._index(arrays, p, lo // rps)
            pieces.append(self._fetch_rows(array, lo, hi))
            lo = hi
        if len(pieces) == 1:
            return readonly_tensor(pieces[0])
        return torch.from_numpy(np.concatenate(pieces))

    def _edges(self, arrays: _Arrays, rows: np.ndarray) -> list[tuple[int, int, int]]:
        """The runs (part, first chunk, end chunk) of inner chunks of a flat edge array that hold the edges of
        traces `rows` at the loader's graph layers: each inner chunk once, however many of the rows it serves,
        cut at the array's shards."""
        st = self.source.store
        ep, L = st.edge_ptr, st.num_layers
        a, b = ep[rows * L + self._lo], ep[rows * L + self._hi + 1]
        keep = b > a
        if not keep.any():
            return []
        p = arrays.part(int(a[keep][0]))  # a use's traces lie in one part: so do their edges
        off = int(arrays.offsets[p])
        meta = arrays.arrays[p].meta
        per, cps = meta.rows_per_chunk, meta.chunks_per_shard
        first, last = (a[keep] - off) // per, (b[keep] - off - 1) // per
        need = np.unique(ranges_to_indices(first, last - first + 1)[0])
        brk = np.flatnonzero((np.diff(need) != 1) | (np.diff(need // cps) != 0)) + 1
        return [(p, int(need[lo]), int(need[hi - 1]) + 1) for lo, hi in zip(
            np.concatenate(([0], brk)).tolist(), np.concatenate((brk, [need.size])).tolist(), strict=True)]

    def _fetch_flat(self, arrays: _Arrays, run: tuple[int, int, int]) -> dict[int, np.ndarray]:
        from ..store.ranged import fetch_chunk_run

        p, c0, c1 = run
        array = arrays.arrays[p]
        self._index(arrays, p, c0 // array.meta.chunks_per_shard)
        return dict(zip(range(c0, c1), fetch_chunk_run(array, c0, c1), strict=True))

    def _fetch_span(self, r0: int, r1: int) -> _Span:
        return _Span(r0, r1, self._rows(self.seq, r0, r1))

    def _fetch_tokens(self, r0: int, r1: int) -> tuple[int, torch.Tensor | None]:
        """The tokens' hidden states of traces [r0, r1): (first token, [tokens, L, D] or None for no tokens)."""
        tp = self.source.store.token_ptr
        t0, t1 = int(tp[r0]), int(tp[r1])  # type: ignore[index]
        return t0, (self._rows(self.hidden, t0, t1) if t1 > t0 else None)

    def _fetch(self, u: int) -> _Held:
        rows = self._rows_of[u]
        starts, stops = coalesce_rows(rows, self.waste)
        jobs: list[Any] = [(self._fetch_span, int(a), int(b)) for a, b in zip(starts.tolist(), stops.tolist(),
                                                                              strict=True)]
        edge_runs: dict[str, list[tuple[int, int, int]]] = {}
        if self.graphs:  # each span's tokens beside its sequences, not after them: a GET's latency once
            jobs += [(self._fetch_tokens, int(a), int(b)) for a, b in zip(starts.tolist(), stops.tolist(), strict=True)]
            for name, arrays in (("edge_index", self.edge_index), ("edge_attr", self.edge_attr)):
                edge_runs[name] = self._edges(arrays, rows)
                jobs += [(self._fetch_flat, arrays, run) for run in edge_runs[name]]
        with self._lock:
            self.spans += int(starts.size)
        if len(jobs) == 1:
            results = [jobs[0][0](*jobs[0][1:])]
        else:
            with self._lock:
                if self._span_pool is None:
                    self._span_pool = ThreadPoolExecutor(self._span_workers, thread_name_prefix="tracestore-spans")
                pool = self._span_pool
            results = [f.result() for f in [pool.submit(*job) for job in jobs]]
        spans = results[:starts.size]
        if not self.graphs:
            return _Held(spans)
        for span, (t0, hidden) in zip(spans, results[starts.size:2 * starts.size], strict=True):
            span.t0, span.hidden = t0, hidden
        flats = iter(results[2 * starts.size:])
        held: dict[str, _FlatChunks] = {}
        for name, arrays in (("edge_index", self.edge_index), ("edge_attr", self.edge_attr)):
            chunks: dict[int, np.ndarray] = {}
            for _run in edge_runs[name]:
                chunks.update(next(flats))
            part = edge_runs[name][0][0] if edge_runs[name] else arrays.part(0)
            held[name] = _FlatChunks(arrays, part, chunks)
        return _Held(spans, held["edge_index"], held["edge_attr"])

    def _submit_upto(self, k: int) -> None:
        """Submit every use batch k needs (and those before it in first-need order), then read ahead while the
        memory bound allows. Called with the lock held."""
        pool = self._pool
        if pool is None:
            raise RuntimeError("the chunk window is closed")
        while self._next < len(self._chunk):
            u = self._next
            if self._first[u] > k and len(self._live) >= self.max_chunks:
                break
            self._live[u] = pool.submit(self._fetch, u)
            self.fetched += 1
            self._next += 1
        self.peak = max(self.peak, len(self._live))

    # -- reading -------------------------------------------------------------------------------------
    def read(self, k: int, rows: np.ndarray, out: torch.Tensor) -> GraphParts | None:
        """Batch k of the plan (store rows `rows`, sorted or not) into `out` [len(rows), L', D]; with graphs,
        also its graph parts (TraceSource.graph_parts_of_rows, from the held spans)."""
        rows = np.asarray(rows, np.int64)
        units = self._units_of[k]
        with self._lock:
            self._submit_upto(k)
            futs = [self._live[u] for u in units]
        gather = self.source.seq
        try:
            chunk = np.searchsorted(self.bounds, rows, side="right") - 1
            use = dict(zip(futs, units, strict=True))
            held_of: dict[int, _Held] = {}
            for f in as_completed(futs):  # copy from each use as it arrives
                c = self._chunk[use[f]]
                held = f.result()
                held_of[c] = held
                sel = np.flatnonzero(chunk == c)
                at = held.span_of(rows[sel])
                for s in np.unique(at).tolist():
                    mine = sel[at == s]
                    span = held.spans[s]
                    gather.copy_rows(span.seq, rows[mine] - span.r0, mine, out)
            parts = None
            if self.graphs:
                helds = [held_of[c] for c in chunk.tolist()]
                spans = [h.spans[int(h.span_of(np.array([r]))[0])] for h, r in zip(helds, rows.tolist(), strict=True)]
                parts = self.source.graph_parts_of_rows(rows, nodes=_NodesFrom(spans, self.source),
                                                        edges=_EdgesFrom(helds))
        finally:
            with self._lock:
                for u in units:
                    self._refs[u] -= 1
                    if self._refs[u] == 0:
                        self._live.pop(u, None)
                if self._pool is not None:
                    self._submit_upto(-1)  # the freed room goes to the next uses
        return parts

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            span_pool, self._span_pool = self._span_pool, None
            live, self._live = self._live, {}
        for f in live.values():
            f.cancel()
        for p in (pool, span_pool):
            if p is not None:
                p.shutdown(wait=False, cancel_futures=True)


class _NodesFrom:
    """Node features of a batch's traces from their held spans (TraceSource.graph_parts_of_rows' `nodes`)."""

    def __init__(self, spans: list[_Span], source: TraceSource) -> None:
        self.spans = spans
        self.gather = source.xg

    def __call__(self, n0: np.ndarray, nn: np.ndarray, dst: np.ndarray, out: torch.Tensor) -> None:
        for i, (t, c, d) in enumerate(zip(n0.tolist(), nn.tolist(), dst.tolist(), strict=True)):
            if c:
                span = self.spans[i]
                assert span.hidden is not None
                self.gather._copy_run(span.hidden, t - span.t0, d, c, out)


class _EdgesFrom:
    """Edges of a batch's traces from the edge chunks their uses hold (TraceSource.graph_parts_of_rows'
    `edges`)."""

    def __init__(self, helds: list[_Held]) -> None:
        self.helds = helds

    def __call__(self, span0: np.ndarray, span1: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        eis, eas = [], []
        for i, (a, b) in enumerate(zip(span0.tolist(), span1.tolist(), strict=True)):
            h = self.helds[i]
            assert h.edge_index is not None and h.edge_attr is not None
            eis.append(h.edge_index.take(a, b))
            eas.append(h.edge_attr.take(a, b))
        return eis, eas
