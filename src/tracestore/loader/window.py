"""The loader's read path for object stores: every shuffle chunk fetched once per epoch, held while its traces
are served, then dropped.

A shuffled batch takes a few traces from each chunk of its shuffle window (sampler.py). Reading each batch's
traces with ranged GETs, coalesced across the gaps between them, fetched the same spans again for the next
batch: 5.2x the trace bytes per epoch on the benchmark store (issue 12). Here the plan of the epoch is known up
front, so each chunk (a contiguous run of `chunk_rows` traces inside one shard) is fetched whole, in one ranged
GET, verified (the crc32c of every inner chunk), and kept in memory until the last batch that uses it is
read. The chunks are fetched in the order batches first need them, `concurrency` at once, ahead of the batch
being read as far as the memory bound allows, so that the next window is on its way while the current one is
served.

Memory: at most `max_chunks` chunks are held or in flight (the TraceLoader sets it to (1 + REMOTE_PREFETCH_WINDOWS)
shuffle windows: the window being served and the next one), each `chunk_rows` traces; more only while the batches
being read need more at once (a batch larger than a window, or many batches read ahead), because the chunks a
batch needs are always fetched. The bytes of one epoch are the bytes of the chunks this rank reads from (all of
them with one rank: with several, each rank's traces are spread over every chunk), plus the shard indexes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING

import numpy as np
import torch

from .dataset import readonly_tensor

if TYPE_CHECKING:
    from ..store.shards import ShardedArray
    from .dataset import RowGatherer


class ChunkWindow:
    """Serves the sequences of one epoch's plan (`plan[k]` = the positions of batch k) from whole chunks.

    `bounds` are the chunk starts followed by n (sampler.chunk_starts); `gatherer` selects layers and casts.
    Thread-safe: reader threads may read batches in any order. `close()` cancels what is in flight."""

    def __init__(self, arrays: Sequence[ShardedArray], offsets: np.ndarray, gatherer: RowGatherer,
                 plan: Sequence[np.ndarray], bounds: np.ndarray, *, max_chunks: int, concurrency: int,
                 gap: int = 1) -> None:
        from ..store.ranged import fetch_rows

        self._fetch_rows = fetch_rows
        # one array per part of the store (one for a single store); part p holds rows offsets[p]:offsets[p+1],
        # and no chunk crosses a part (sampler.chunk_starts cuts at the parts' shard starts)
        self.arrays = list(arrays)
        self.offsets = np.asarray(offsets, np.int64)
        self.gatherer = gatherer
        self.bounds = np.asarray(bounds, np.int64)
        self.max_chunks = max(1, int(max_chunks))
        # A use is a chunk and the batches that read it, no two more than `gap` batches apart (a chunk's
        # traces lie in one shuffle window, so those batches follow each other; only the few padding repeats
        # at the end of a multi-rank epoch come back to a chunk read long before: fetched again, not held).
        self._units_of: list[list[int]] = []  # the uses each batch reads
        self._chunk: list[int] = []  # chunk of each use
        self._first: list[int] = []  # first batch of each use
        self._refs: list[int] = []  # batches of each use not yet read
        current: dict[int, tuple[int, int]] = {}  # chunk -> (its open use, last batch that read it)
        for k, pos in enumerate(plan):
            cs = np.unique(np.searchsorted(self.bounds, np.asarray(pos, np.int64), side="right") - 1)
            units = []
            for c in cs.tolist():
                u, last = current.get(c, (-1, -1))
                if u < 0 or k - last > gap:
                    u = len(self._chunk)
                    self._chunk.append(c)
                    self._first.append(k)
                    self._refs.append(0)
                self._refs[u] += 1
                current[c] = (u, k)
                units.append(u)
            self._units_of.append(units)
        self._next = 0  # uses submitted so far, in the order batches first need them (their numbering)
        self._live: dict[int, Future[torch.Tensor]] = {}  # uses fetched or in flight, not yet done with
        self._lock = threading.Lock()
        self._index_locks: dict[tuple[int, int], threading.Lock] = {}
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(max(1, int(concurrency)),
                                                                   thread_name_prefix="tracestore-chunks")
        self.fetched = 0  # chunks fetched (each once per epoch)
        self.peak = 0  # most chunks held or in flight at once

    def _fetch(self, c: int) -> torch.Tensor:
        a, b = int(self.bounds[c]), int(self.bounds[c + 1])
        p = int(np.searchsorted(self.offsets, a, side="right") - 1)
        array = self.arrays[p]
        a, b = a - int(self.offsets[p]), b - int(self.offsets[p])
        # the shard's index (and the store's generation check) once, not once per chunk fetched at the same time
        shard = a // array.meta.rows_per_shard
        with self._lock:
            lock = self._index_locks.setdefault((p, shard), threading.Lock())
        with lock:
            array.index(shard)
        return readonly_tensor(self._fetch_rows(array, a, b))

    def _submit_upto(self, k: int) -> None:
        """Submit every chunk batch k needs (and those before it in first-need order), then read ahead while
        the memory bound allows. Called with the lock held."""
        pool = self._pool
        if pool is None:
            raise RuntimeError("the chunk window is closed")
        while self._next < len(self._chunk):
            u = self._next
            if self._first[u] > k and len(self._live) >= self.max_chunks:
                break
            self._live[u] = pool.submit(self._fetch, self._chunk[u])
            self.fetched += 1
            self._next += 1
        self.peak = max(self.peak, len(self._live))

    def read(self, k: int, rows: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        """Batch k of the plan (store rows `rows`, sorted or not) into `out` [len(rows), L', D]."""
        rows = np.asarray(rows, np.int64)
        units = self._units_of[k]
        with self._lock:
            self._submit_upto(k)
            futs = [self._live[u] for u in units]
        try:
            chunk = np.searchsorted(self.bounds, rows, side="right") - 1
            use = dict(zip(futs, units, strict=True))
            for f in as_completed(futs):  # copy from each chunk as it arrives
                c = self._chunk[use[f]]
                sel = np.flatnonzero(chunk == c)
                self.gatherer.copy_rows(f.result(), rows[sel] - int(self.bounds[c]), sel, out)
        finally:
            with self._lock:
                for u in units:
                    self._refs[u] -= 1
                    if self._refs[u] == 0:
                        self._live.pop(u, None)
                if self._pool is not None:
                    self._submit_upto(-1)  # the freed room goes to the next chunks
        return out

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            live, self._live = self._live, {}
        for f in live.values():
            f.cancel()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
