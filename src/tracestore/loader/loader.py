"""TraceLoader: stream a store into training, batch by batch, on the device.

    loader = TraceLoader(store, batch_size=64, shuffle=True, seed=0)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:          # batch.sequences float32 [B, L, D] on the device
            ...
        ckpt = {"loader": loader.state_dict(), ...}

Pipeline per batch: the epoch plan (sampler.py) names the traces; the reader (dataset.py) copies them from the
memory-mapped shards into a reused host buffer (pinned float16 with CUDA, float32 without, pinned.py); on CUDA the
float16 bytes go to the device on a side stream and are cast there (device.py).

Parallelism was chosen by measurement (benchmarks/results/stream.md). `num_workers=0` reads in the caller's
thread and is already the fastest single reader. With `num_workers > 0` on the CPU, worker processes write into
a ring of shared-memory buffers allocated once (workers.py): only batch numbers cross processes, unlike PyTorch
DataLoader workers, which hand every batch over in a fresh shared-memory segment (3.1 GB/s in-process vs
0.7 GB/s through 2 DataLoader workers, ../shared/notes/peers.md). Reader threads doing GIL-free torch copies
into the ring measured slower than those processes here (the readers' and the consumer's Python share one
GIL), so threads are used only where the ring must be pinned by this process: CUDA.
"""

from __future__ import annotations

import collections
import os
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np
import torch

from .. import config
from ..errors import LoaderError, TracestoreError
from ..store.reader import TraceStore
from ..store.reader import open as open_store
from ..threads import one_intraop_thread
from . import sampler
from .batch import Batch
from .dataset import TraceSource, layer_index, to_pyg_batch
from .device import DeviceMover, resolve_device
from .pinned import BufferRing
from .window import ChunkWindow
from .workers import ProcessPool

_STATE_FORMAT = "tracestore.TraceLoader/2"
#: the state of tracestore 0.2 (one global order): `consumed` traces of it
_STATE_FORMAT_1 = "tracestore.TraceLoader/1"


def _distributed() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when a process group is initialised, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return 0, 1


def _trace_nbytes(store: TraceStore, graphs: bool) -> int:
    """Bytes an epoch reads per trace, on average: its sequence, and for graph epochs its tokens' hidden
    states and its edges (what sizes a shuffle chunk: about sampler.CHUNK_BYTES of it)."""
    row = store.num_layers * store.hidden_size * 2
    if not graphs or store.token_ptr is None or not store.has_graphs:
        return row
    n = max(1, int(store.token_ptr.size) - 1)
    tokens = int(store.token_ptr[-1]) / n
    edges = int(store.edge_ptr[-1]) / n
    edge_bytes = 2 * store._ei.dtype.itemsize + int(store._ea.shape[1]) * store._ea.dtype.itemsize
    return int(row + tokens * row + edges * edge_bytes)


#: On object stores a graph epoch's use of a chunk fetches the inner chunks its traces' edges lie in, whole: the
#: inner chunk at each end is shared with the neighbouring shuffle chunk (usually another use, often another
#: rank's), so each use fetches about one inner chunk of each edge array twice. Chunks are made large enough
#: that this costs at most EDGE_WASTE of what a use reads (it never binds at realistic shapes: a trace of
#: [32, 4096] with ~100 tokens reads ~25 MiB, far more than two 256 KiB inner chunks).
EDGE_WASTE = 0.02


def _edge_floor_rows(store: TraceStore, trace_nbytes: int) -> int:
    """Fewest traces a graph epoch's shuffle chunk holds on an object store (see EDGE_WASTE)."""
    inner = 0
    for arr in (store._ei, store._ea):
        for d in [x.direct for x in (arr.parts or [arr])]:
            if d is not None:
                inner = max(inner, d.meta.chunk_nbytes)
    return max(1, -(-2 * inner // max(1, int(EDGE_WASTE * trace_nbytes)))) if inner else 1


class TraceLoader:
    """Streams a store as shuffled batches of float32 tensors on a device.

    Parameters
    ----------
    store_or_url : a TraceStore (or a `select()`ed view of one), or a path/URL to open.
    batch_size : traces per batch on each rank.
    shuffle : shuffle the epoch (chunk order, each rank's share of it, and a shuffle window of `shuffle_window`
        chunks, see sampler.py); False reads in store order (each rank its share of the store front to back; a
        select()ed view in the store order of its rows).
    seed : the order is a pure function of (seed, epoch).
    device : where batches land; None = CUDA when available, else CPU.
    num_workers : parallel readers (0 = read in the caller's thread, no threads or processes at all).
    worker_mode : "process" (worker processes writing into a shared-memory ring; the default on the CPU) or
        "thread" (reader threads; the default for object stores, and the only mode with CUDA, whose pinned ring is
        filled by this process).
    drop_last : False: every trace once per epoch, the last batch may be smaller, and with several ranks up to
        world_size - 1 traces are repeated so that every rank gets the same number of batches. True: only full
        batches, the tail of the shuffled order is skipped.
    layers : read only these layers (ints or a slice); `sequences` is then [B, len(layers), D].
    with_graphs : also deliver `batch.graph`, a torch_geometric Batch built from the store's CSR arrays.
    graph_layer : the layer whose attention graph to deliver; None delivers every layer of `layers` (for a
        hybrid model): graph i * L' + j is trace i at layer j (see Batch.graph).
    rank, world_size : this process's data-parallel rank; both None = from torch.distributed when initialised,
        else a single process.
    prefetch : batches read ahead of the consumer with num_workers > 0 (default 2 * num_workers).
    timeout : with num_workers > 0, seconds to wait for one batch before raising LoaderError (None = no limit).
    storage_options : for a URL: object-store credentials, endpoint, deadline, cache_dir/cache_limit (see
        tracestore.open); by default the standard AWS_* environment variables.
    chunk_rows, shuffle_window : the shuffle's chunk size (store rows; default about 16 MiB of what an epoch
        reads per trace, never across a shard) and window (chunks mixed together).

    Object stores
    -------------
    Each rank reads its own chunks (sampler.py), and fetches each chunk's rows that it reads once per epoch, in
    one ranged GET (window.py): with R ranks the whole job fetches the store's trace bytes once per epoch (1.00x
    for R = 1 ... 1,024, benchmarks/results/scale.md), in GETs of whole chunks (~16 MiB) except the at most
    R - 1 chunks that two ranks share and the padding repeats, plus one index GET per shard per process. Graph
    epochs (`with_graphs`) fetch, with each chunk, its traces' tokens' hidden states and edges the same way; a
    select()ed view fetches only its rows of each chunk (runs of them joined across small gaps, at most 3 %
    more). The crc32c of every inner chunk is checked on arrival (a damaged one is fetched again, then
    refused). Chunks are fetched in the order the batches need them, config.REMOTE_FETCH_CONCURRENCY (8) at a
    time, and held until the last batch using them is read: at most (1 + config.REMOTE_PREFETCH_WINDOWS) x
    shuffle_window chunks of chunk_rows traces, i.e. 2 x 16 x 16 MiB = 512 MiB by default (more only while
    batches read ahead need more at once). chunk_rows defaults to about 16 MiB of what an epoch reads per trace
    (for graph epochs its tokens and edges too). Local stores read from their memory maps: the page cache is
    the window. Stores read through zarr (compressed) are read batch by batch.

    Buffers and validity
    --------------------
    Every batch stays valid as long as you hold it (or a view, slice or `.numpy()` array of it): `list(loader)`
    is safe. On CUDA every batch's tensors are fresh device tensors; the pinned host staging buffers are reused,
    guarded by CUDA events. On the CPU, `batch.sequences` lives in a ring of reused float32 buffers (fresh
    buffers cost page faults that dominate the cast); before a buffer is refilled the loader checks whether
    anything besides itself still references it, and if so leaves it to you and takes a fresh one (pinned.py).
    So a loop that drops each batch runs at the speed of reuse, and one that keeps batches pays only for the
    buffers it keeps. Scores, ids and graphs are always fresh.

    Epochs and resume
    -----------------
    Each full pass advances the epoch by one; `set_epoch(e)` chooses it (a no-op when it is already e, so a
    resumed run may call it). As with torch's DataLoader, every `iter(loader)` starts the epoch over: peeking
    with `next(iter(loader))`, or breaking out of a loop, does not take those traces out of the next pass (a
    pass that delivered every batch counts as finished: the next one is the next epoch). The exception is
    resume: `state_dict()` is a few integers, the epoch and, per geometry that read part of it, the traces each
    rank consumed (ranks step in lockstep under DDP), and the first iteration after `load_state_dict()` -- in a
    new loader, with any num_workers, batch_size or world_size (any number of ranks, not only a divisor) --
    continues with exactly the traces not yet delivered, each once; with the world size of the run that saved
    it, exactly the batches that run would have read next. Later iterations start over again. A copy of a
    loader (pickled, or forked with an iteration running) behaves as if loaded from its state_dict(): its first
    iteration continues where the original was.
    """

    def __init__(self, store_or_url: TraceStore | str | os.PathLike[str], batch_size: int = 64, *,
                 shuffle: bool = True, seed: int = 0, device: str | torch.device | None = None, num_workers: int = 0,
                 drop_last: bool = False, layers: Sequence[int] | slice | None = None, with_graphs: bool = False,
                 graph_layer: int | None = None, rank: int | None = None, world_size: int | None = None,
                 prefetch: int | None = None, timeout: float | None = None, chunk_rows: int | None = None,
                 shuffle_window: int = sampler.WINDOW_CHUNKS, worker_mode: str | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        store = (store_or_url if isinstance(store_or_url, TraceStore)
                 else open_store(os.fspath(store_or_url), storage_options))
        self.store = store
        if not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise ValueError(f"{store.url}: batch_size={batch_size!r}; a batch holds at least one trace: pass an int "
                             f">= 1")
        if not isinstance(num_workers, int | np.integer) or num_workers < 0:
            raise ValueError(f"{store.url}: num_workers={num_workers!r}; pass 0 (read in this thread) or a number of "
                             f"reader threads")
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.device = resolve_device(device)
        self.num_workers = int(num_workers)
        self.drop_last = bool(drop_last)
        self.prefetch = (2 * self.num_workers if prefetch is None else int(prefetch)) if self.num_workers else 0
        if self.prefetch < 0:
            raise ValueError(f"{store.url}: prefetch={prefetch}; pass a number of batches >= 0")
        self.timeout = timeout
        cuda = self.device.type == "cuda"
        # object stores: reads wait on the network with the GIL released, so threads overlap them as well as
        # processes would, without a client per process
        remote = bool(getattr(store.location, "is_remote", False))
        # a compressed store reads through zarr, whose event-loop thread a forked worker would not have
        directs = [a.direct for a in (store._seq.parts or [store._seq])]
        via_zarr = any(d is None for d in directs)
        mode = worker_mode if worker_mode is not None else ("thread" if cuda or remote or via_zarr else "process")
        if mode not in ("process", "thread"):
            raise ValueError(f"{store.url}: worker_mode={worker_mode!r}; pass 'process' or 'thread'")
        if mode == "process" and cuda:
            raise ValueError(f"{store.url}: worker_mode='process' with device={str(self.device)!r}: the pinned ring "
                             f"must be filled by the process that pinned it; pass worker_mode='thread' (the default "
                             f"with CUDA)")
        if mode == "process" and via_zarr and self.num_workers:
            raise ValueError(f"{store.url}: worker_mode='process' with a store read through zarr (compressed "
                             f"chunks): zarr's I/O thread does not survive fork(); pass worker_mode='thread'")
        if mode == "process" and remote and self.num_workers:
            # obstore's runtime threads do not survive fork(): a forked worker would wait forever on its first read
            raise ValueError(f"{store.url}: worker_mode='process' with an object store: its client cannot be used "
                             f"from forked worker processes; pass worker_mode='thread' (the default for object "
                             f"stores)")
        self.worker_mode = mode
        if rank is None and world_size is None:
            rank, world_size = _distributed()
        elif rank is None or world_size is None:
            raise ValueError(f"{store.url}: rank={rank}, world_size={world_size}: give both, or neither (then they come "
                             f"from torch.distributed)")
        sampler._check(batch_size=self.batch_size, rank=int(rank), world_size=int(world_size))
        self.rank, self.world_size = int(rank), int(world_size)
        self.with_graphs = bool(with_graphs)
        graph_layers: np.ndarray | None = None
        self.layers = layer_index(store.num_layers, layers)
        if self.with_graphs:
            if not store.has_graphs:
                raise ValueError(f"{store.url}: with_graphs=True, but this store has no graphs (it was written with "
                                 f"graphs=False); convert the archives with their graphs, or pass with_graphs=False")
            if graph_layer is None:
                graph_layers = self.layers
            elif not -store.num_layers <= int(graph_layer) < store.num_layers:
                raise IndexError(f"{store.url}: graph_layer={graph_layer} is out of range for a store of "
                                 f"{store.num_layers} layers; pick a layer in 0..{store.num_layers - 1}")
            else:
                graph_layers = layer_index(store.num_layers, [graph_layer])
        elif graph_layer is not None:
            raise ValueError(f"{store.url}: graph_layer={graph_layer} without with_graphs=True; pass with_graphs=True "
                             f"to get graphs")
        self.graph_layers = graph_layers
        self._source = TraceSource(store, self.layers.tolist(), None if graph_layers is None else graph_layers.tolist())
        n_rows = int(store._seq.shape[0])  # the store's rows (a view reads some of them)
        rps = directs[0].meta.rows_per_shard if not via_zarr else None  # type: ignore[union-attr]
        # a store made of parts: shards start again at each part, so the chunks are cut at those starts
        shard_starts: np.ndarray | None = None
        if store._seq.parts is not None and not via_zarr:
            offsets = store._seq.offsets  # type: ignore[attr-defined]
            shard_starts = np.concatenate([
                int(o) + np.arange(0, int(e) - int(o), d.meta.rows_per_shard, dtype=np.int64)  # type: ignore[union-attr]
                for o, e, d in zip(offsets[:-1], offsets[1:], directs, strict=True)])
            rps = min(d.meta.rows_per_shard for d in directs)  # type: ignore[union-attr]
        trace_nbytes = _trace_nbytes(store, graph_layers is not None)
        self.chunk_rows = int(chunk_rows) if chunk_rows is not None else sampler.default_chunk_rows(
            trace_nbytes, rps, len(store),
            min_rows=_edge_floor_rows(store, trace_nbytes) if remote and graph_layers is not None else 1)
        if self.chunk_rows < 1:
            raise ValueError(f"{store.url}: chunk_rows={chunk_rows}; a chunk holds at least one trace: pass an int >= 1")
        self.shuffle_window = int(shuffle_window)
        if self.shuffle_window < 1:
            raise ValueError(f"{store.url}: shuffle_window={shuffle_window}; a window holds at least one chunk: pass "
                             f"an int >= 1")
        # the store's chunks (store rows, never across a shard or part), and the epoch's: a view's positions
        # grouped by the store chunk their rows lie in (sampler.view_layout)
        self._store_bounds = sampler.chunk_starts(n_rows, self.chunk_rows, None if shard_starts is not None else rps,
                                                  shard_starts)
        self._layout = (sampler.ChunkLayout(self._store_bounds) if store._rows is None
                        else sampler.view_layout(store._rows, self._store_bounds))
        # object stores: each chunk's rows once per epoch, held in a bounded window (window.py), for sequences
        # and graphs, whole stores and views; local stores read from their memory maps (the page cache is the
        # window). Stores read through zarr keep the batch-by-batch reads.
        arrays = [store._seq] + ([store._hidden, store._ei, store._ea] if graph_layers is not None else [])
        self._windowed = bool(remote and not via_zarr and all(
            d is not None for a in arrays for d in [x.direct for x in (a.parts or [a])]) and all(  # type: ignore[union-attr]
            d.meta.axis == 0 and d.meta.rows_per_chunk == 1 for d in directs))  # type: ignore[union-attr]
        # position in the epoch: the plan of the next (or current) iteration starts after _cursor0 (the
        # segments consumed before it, sampler.Segment); it has handed _done batches, _done_traces traces on
        # each rank, with the geometry _iter_geom (world_size, drop_last)
        self.epoch = 0
        self._cursor0: tuple[sampler.Segment, ...] = ()
        self._done = 0  # batches of the current iteration handed to the consumer
        self._done_traces = 0  # traces of those batches (the same on every rank)
        self._resume = False  # the next iteration continues at _cursor0 (after load_state_dict), not at 0
        self._iter_geom = (self.world_size, self.drop_last)
        self._active: _EpochIterator | None = None
        self._rings: dict[str, BufferRing] = {}
        self._mover: DeviceMover | None = None
        self._pool: ProcessPool | None = None

    # -- plan ------------------------------------------------------------------------------------------
    def _plan(self) -> list[np.ndarray]:
        return sampler.plan_epoch(len(self.store), batch_size=self.batch_size, seed=self.seed, epoch=self.epoch,
                                  shuffle=self.shuffle, rank=self.rank, world_size=self.world_size,
                                  drop_last=self.drop_last, cursor=self._cursor0, window=self.shuffle_window,
                                  layout=self._layout)

    def __len__(self) -> int:
        """Batches per full epoch on this rank (the same on every rank)."""
        return sampler.num_batches(len(self.store), batch_size=self.batch_size, world_size=self.world_size,
                                   drop_last=self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch `epoch` from the next iteration on, from its start -- unless the loader is already in that
        epoch, in which case nothing changes (after load_state_dict() the next iteration still resumes)."""
        if int(epoch) != self.epoch:
            self._close_active()
            self.epoch = int(epoch)
            self._cursor0 = ()
            self._done = self._done_traces = 0
            self._resume = False

    def _left(self, cursor: sampler.Cursor) -> int:
        """Batches of the current epoch on this rank after `cursor`."""
        return sampler.num_batches(len(self.store), batch_size=self.batch_size, world_size=self.world_size,
                                   drop_last=self.drop_last, cursor=cursor)

    def _cursor(self) -> tuple[sampler.Segment, ...]:
        ws, dl = self._iter_geom
        return sampler.advance_cursor(self._cursor0, ws, dl, self._done_traces)

    def state_dict(self) -> dict[str, Any]:
        """The position in the epoch, to resume from: {format, epoch, segments, consumed, seed, shuffle,
        num_traces, chunk_rows, shuffle_window}. `segments` lists [world_size, drop_last, traces each rank
        consumed] for each geometry that read part of the epoch (sampler.py, "Resume"); `consumed` counts the
        distinct traces of the epoch delivered by all ranks together. Every rank's state is the same (ranks
        step in lockstep under DDP), so any rank's resumes the whole job."""
        cursor = self._cursor()
        return {"format": _STATE_FORMAT, "epoch": self.epoch, "segments": [s.to_list() for s in cursor],
                "consumed": sampler.traces_consumed(len(self.store), cursor), "seed": self.seed,
                "shuffle": self.shuffle, "num_traces": len(self.store), "chunk_rows": self.chunk_rows,
                "shuffle_window": self.shuffle_window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state_dict(): the next iteration yields exactly the traces of that epoch not yet
        consumed (plus, with several ranks, the padding repeats of the drop_last rule); when none are left (a
        state saved right after the epoch's last batch), an empty pass, after which the loader is in the next
        epoch -- so the epoch a caller's loop calls it stays the loader's. Only that one iteration resumes;
        later ones start their epoch over. The number of workers, ranks (any number) and the batch size may
        differ from the run that saved it; what fixes the order may not. With the world size (and drop_last)
        of the run that saved it, the batches are those that run would have read next."""
        fmt = state.get("format") if isinstance(state, dict) else None
        if fmt not in (_STATE_FORMAT, _STATE_FORMAT_1):
            raise ValueError(f"{self.store.url}: not a TraceLoader state (format {fmt!r}; expected "
                             f"{_STATE_FORMAT!r}); pass what TraceLoader.state_dict() returned")
        mine = {"num_traces": len(self.store), "seed": self.seed, "shuffle": self.shuffle,
                "chunk_rows": self.chunk_rows, "shuffle_window": self.shuffle_window}
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(f"{self.store.url}: the loader state was saved with {key}={state.get(key)!r}, this "
                                 f"loader has {key}={value!r}; the epoch order would differ, so the resumed traces "
                                 f"would not be the remaining ones. Create the loader with {key}={state.get(key)!r}")
        cursor = self._cursor_of(state)
        self._close_active()
        self.epoch = int(state["epoch"])
        self._cursor0 = cursor
        self._done = self._done_traces = 0
        self._resume = True

    def _cursor_of(self, state: dict[str, Any]) -> tuple[sampler.Segment, ...]:
        """The cursor a state describes, checked against this store before any batch is read."""
        n = len(self.store)
        if state["format"] == _STATE_FORMAT_1:
            # tracestore 0.2: `consumed` traces of one global order, which is the order one rank reads now, for a
            # whole store; a view was laid out in chunks of its own positions then, so its order changed
            consumed = state.get("consumed")
            if not isinstance(consumed, int) or not 0 <= consumed <= n:
                raise ValueError(f"{self.store.url}: loader state has consumed={consumed!r}, outside 0..{n}; the "
                                 f"state is damaged")
            if self.store._rows is not None and 0 < consumed < n:
                raise ValueError(f"{self.store.url}: this loader state was saved by an older tracestore "
                                 f"({_STATE_FORMAT_1}) over a select()ed view, whose epoch order has changed since; "
                                 f"it cannot resume mid-epoch: resume at the start of epoch {state.get('epoch')} "
                                 f"(loader.set_epoch({state.get('epoch')})) instead")
            return sampler.normalize_cursor([sampler.Segment(1, False, consumed)])
        try:
            cursor = sampler.normalize_cursor([sampler.Segment.from_list(s) for s in state["segments"]])
            sampler.check_cursor(n, cursor)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{self.store.url}: the loader state's segments {state.get('segments')!r} do not fit "
                             f"this loader's {n} traces ({e}); the state is damaged or from another store") from None
        return cursor

    # -- iteration -------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        """A pass over the current epoch from its start (like DataLoader); right after load_state_dict(), or in
        a copy of a loader made mid-epoch, from where that left off."""
        self._close_active()
        if self._resume:
            # exactly what the state left of its epoch: when that is nothing, an empty pass that ends the epoch,
            # so that a loop `for e in range(saved_epoch, E): set_epoch(e); for b in loader` stays in step
            self._resume = False
        elif self._cursor0 and self._left(self._cursor0) == 0:
            self._advance_epoch()  # everything of this epoch was delivered: do not yield an empty epoch
        else:
            self._cursor0 = ()  # a new iterator starts the epoch over
        self._iter_geom = (self.world_size, self.drop_last)
        self._done = self._done_traces = 0
        it = _EpochIterator(self, self._plan())
        self._active = it
        return it

    def _advance_epoch(self) -> None:
        self.epoch += 1
        self._cursor0 = ()
        self._done = self._done_traces = 0

    def _close_active(self) -> None:
        it, self._active = self._active, None
        if it is not None:
            # fold what the closed iteration delivered into the start cursor
            forked = it.pid != os.getpid()
            if not forked:
                it.close()
            if not it.finished:
                self._cursor0 = self._cursor()
                self._done = self._done_traces = 0
                if forked and self._left(self._cursor0) > 0:
                    self._resume = True  # a forked copy takes over the iteration its parent had running

    def _ring(self, name: str, slots: int, dtype: torch.dtype, pin: bool, shared: bool = False) -> BufferRing:
        shape = (self.batch_size, int(self.layers.size), self.store.hidden_size)
        ring = self._rings.get(name)
        if ring is None or len(ring) < slots or ring.shape != shape:
            if shared:
                self._drop_pool()  # its workers hold the old ring
            ring = BufferRing(slots, shape, dtype, pin=pin, shared=shared)
            self._rings[name] = ring
        return ring

    def _process_pool(self, slots: int) -> tuple[ProcessPool, BufferRing]:
        ring = self._ring("shared32", slots, torch.float32, pin=False, shared=True)
        pool = self._pool
        if pool is None or not pool.alive() or len(pool.procs) != self.num_workers:
            self._drop_pool()
            pool = ProcessPool(self._source, ring.buffers, self.num_workers, graphs=self.graph_layers is not None,
                               url=self.store.url, generations=ring.generation)
            weakref.finalize(self, pool.shutdown)
            self._pool = pool
        return pool, ring

    def _drop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()  # a no-op in a forked child: those workers belong to the parent
            self._rings.pop("shared32", None)

    def _chunk_window(self, plan: list[np.ndarray]) -> ChunkWindow:
        """The object-store read path of one iteration (window.py): each chunk's rows fetched once."""
        chunks = (1 + max(0, config.REMOTE_PREFETCH_WINDOWS)) * max(1, self.shuffle_window)
        # a use of a chunk spans the batches of about one window of this rank's stream; a later read (a padding
        # repeat) fetches its row again
        gap = -(-chunks * self.chunk_rows // self.batch_size) + 1
        return ChunkWindow(self._source, plan, self._store_bounds, max_chunks=chunks,
                           concurrency=config.REMOTE_FETCH_CONCURRENCY, gap=gap,
                           graphs=self.graph_layers is not None)

    def _device_mover(self) -> DeviceMover:
        if self._mover is None:
            self._mover = DeviceMover(self.device)
        return self._mover

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_active"] = None
        state["_cursor0"], state["_done"], state["_done_traces"] = self._cursor(), 0, 0  # the copy continues here
        # as if loaded from this loader's state_dict(), unless that is an iteration that delivered its epoch
        state["_resume"] = self._resume if self._active is None else self._left(state["_cursor0"]) > 0
        state["_rings"] = {}
        state["_mover"] = None
        state["_pool"] = None
        return state

    def __repr__(self) -> str:
        return (f"TraceLoader({self.store.url!r}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
                f"device={str(self.device)!r}, num_workers={self.num_workers}, rank={self.rank}/{self.world_size}, "
                f"epoch={self.epoch})")


class _EpochIterator:
    """One pass over a plan. Batch k is produced (by the caller's thread, or a reader thread) into ring slot
    k % slots; at most `prefetch` batches are in flight beyond the one being handed over."""

    def __init__(self, loader: TraceLoader, plan: list[np.ndarray]) -> None:
        self.loader = loader
        self.plan = plan
        self.pid = os.getpid()
        self.k = 0
        self.finished = False
        self.failed = False  # a read failed: the iteration is over; state_dict() resumes at the failed batch
        self.cuda = loader.device.type == "cuda"
        prefetch = loader.prefetch
        # batch k's buffer is refilled by batch k + slots, which is scheduled when batch k + slots - prefetch is
        # asked for: slots = prefetch + 2 keeps a handed-out CPU batch valid through one more step
        slots = prefetch + 2
        self.pool: ThreadPoolExecutor | None = None
        self.procs: ProcessPool | None = None
        self.pending: collections.deque[Future[Any]] = collections.deque()
        self.next_submit = 0
        self.mover: DeviceMover | None = None
        if self.cuda:
            self.ring = loader._ring("pinned16", slots, torch.float16, pin=True)
            self.mover = loader._device_mover()
        elif loader.num_workers > 0 and loader.worker_mode == "process":
            self.procs, self.ring = loader._process_pool(slots)
        else:
            self.ring = loader._ring("cpu32", slots, torch.float32, pin=False)
        # batch k uses ring slot (off + k) % slots: an iteration goes on round the ring where the last one
        # stopped, so the batch a caller still holds from it (its loop variable) is not the first slot refilled
        self.off = self.ring.next
        self.window: ChunkWindow | None = None
        if loader._windowed:
            self.window = loader._chunk_window(plan)
        if loader.num_workers > 0 and self.procs is None:
            self.pool = ThreadPoolExecutor(max_workers=loader.num_workers, thread_name_prefix="tracestore-loader")

    def __iter__(self) -> _EpochIterator:
        return self

    def __len__(self) -> int:
        return len(self.plan) - self.k

    def _produce(self, k: int) -> tuple[Batch, Any]:
        """Read batch k into its ring slot and (with CUDA) queue its upload. Runs in any thread."""
        ld = self.loader
        src = ld._source
        pos = self.plan[k]
        b = int(pos.size)
        host = self.ring.acquire(self.off + k, b)
        if self.window is not None:
            parts = self.window.read(k, src.store_rows(pos), host)
        else:
            src.read_sequences(pos, host)
            parts = src.read_graphs(pos) if ld.graph_layers is not None else None
        scores = torch.from_numpy(src.scores(pos))
        if self.mover is None:
            graph = to_pyg_batch(parts, ld.device) if parts is not None else None
            return Batch(sequences=host, scores=scores, ids=src.ids(pos), graph=graph, positions=pos), None
        seq, moved, ev = self.mover.upload(host, {"scores": scores})
        self.ring.release(self.off + k, ev)
        graph = None
        if parts is not None:
            graph, ev = self.mover.run_on_side_stream(to_pyg_batch, parts, ld.device, True)
        return Batch(sequences=seq, scores=moved["scores"], ids=src.ids(pos), graph=graph, positions=pos), ev

    def _renew(self, k: int) -> bool:
        """Before batch k is written into its slot: on the CPU, where the slot's buffer was handed to the caller
        as an earlier batch, give it a fresh buffer if the caller still holds that batch (or a view of it)."""
        if self.cuda:
            return False
        self.ring.next = self.off + k + 1
        return self.ring.renew_if_held(self.off + k)

    def _fail(self, k: int, exc: BaseException) -> LoaderError | BaseException:
        self.failed = True
        self.close()
        if isinstance(exc, TracestoreError):
            return exc  # already names the store, the array and the fix
        ld = self.loader
        ids = ld._source.ids(self.plan[k][:3])
        return LoaderError(f"{ld.store.url}: reading batch {k} of epoch {ld.epoch} (rank {ld.rank}/{ld.world_size}, "
                           f"traces {ids}...) failed with {type(exc).__name__}: {exc}; the loader stopped. Check the "
                           f"store with `tracestore verify {ld.store.url}`, then resume from loader.state_dict()")

    def __next__(self) -> Batch:
        ld = self.loader
        if self.pid != os.getpid():
            raise LoaderError(f"{ld.store.url}: this loader iterator was created in process {self.pid} and is used in "
                              f"process {os.getpid()} (after a fork); its reader threads do not exist here. Call "
                              f"iter(loader) again in this process")
        if self.finished or self.failed or ld._active is not self:
            raise StopIteration
        k = self.k
        if k >= len(self.plan):
            self.close()
            self.finished = True
            ld._advance_epoch()
            raise StopIteration
        if self.procs is not None:
            batch, ev = self._from_process(k)
        elif self.pool is None:
            self._renew(k)
            try:
                with one_intraop_thread():
                    batch, ev = self._produce(k)
            except Exception as exc:
                raise self._fail(k, exc) from exc
        else:
            while self.next_submit < len(self.plan) and self.next_submit <= k + ld.prefetch:
                self._renew(self.next_submit)
                self.pending.append(self.pool.submit(self._produce, self.next_submit))
                self.next_submit += 1
            fut = self.pending.popleft()
            try:
                batch, ev = fut.result(timeout=ld.timeout)
            except FutureTimeout as exc:
                self.failed = True
                self.close(wait=False)
                ld._rings = {}  # the stalled read may still write into the old ring: never hand it out again
                raise LoaderError(f"{ld.store.url}: batch {k} of epoch {ld.epoch} was not read within timeout="
                                  f"{ld.timeout} s; the storage is stalled. Raise timeout=, or check the store's "
                                  f"location") from exc
            except Exception as exc:
                raise self._fail(k, exc) from exc
        if ev is not None and self.mover is not None:
            tensors = [batch.sequences, batch.scores]
            if batch.graph is not None:
                tensors += [v for v in batch.graph.to_dict().values() if isinstance(v, torch.Tensor)]
            self.mover.hand_over(ev, tensors)
        self.k = k + 1
        ld._done = self.k
        ld._done_traces += int(batch.positions.size)
        return batch

    def _from_process(self, k: int) -> tuple[Batch, Any]:
        ld = self.loader
        procs = self.procs
        assert procs is not None
        while self.next_submit < len(self.plan) and self.next_submit <= k + ld.prefetch:
            j = self.next_submit
            slot = (self.off + j) % len(self.ring)
            self._renew(j)
            # the buffer travels only to a worker that has an older one of this slot (ProcessPool.submit)
            procs.submit(j, slot, self.plan[j], self.ring.buffer(self.off + j), self.ring.generation[slot])
            self.next_submit += 1
        try:
            parts = procs.wait(k, ld.timeout)
        except TimeoutError as exc:
            self.failed = True
            self.procs = None
            ld._drop_pool()  # the stalled worker may still write into the ring: start over with a new one
            raise LoaderError(f"{ld.store.url}: batch {k} of epoch {ld.epoch} was not read within timeout="
                              f"{ld.timeout} s; the storage is stalled. Raise timeout=, or check the store's "
                              f"location") from exc
        except LoaderError:
            self.failed = True
            self.procs = None
            ld._drop_pool()
            raise
        except Exception as exc:
            raise self._fail(k, exc) from exc
        src = ld._source
        pos = self.plan[k]
        graph = to_pyg_batch(parts, ld.device) if parts is not None else None
        seq = self.ring.acquire(self.off + k, int(pos.size))
        return Batch(sequences=seq, scores=torch.from_numpy(src.scores(pos)), ids=src.ids(pos), graph=graph,
                     positions=pos), None

    def close(self, wait: bool = True) -> None:
        """Stop reading ahead. Waits for reads in flight (they write into the loader's ring) unless wait=False."""
        procs, self.procs = self.procs, None
        if procs is not None and procs.pid == os.getpid():
            if not (procs.drain() if wait else not procs.outstanding):
                self.loader._drop_pool()  # a worker may still write into the ring: never hand it out again
        pool, self.pool = self.pool, None
        for f in self.pending:
            f.cancel()
        self.pending.clear()
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)
        window, self.window = self.window, None
        if window is not None:
            window.close()

    def __del__(self) -> None:
        try:
            if self.pid == os.getpid():
                self.close(wait=False)
        except Exception:  # noqa: BLE001 - interpreter shutdown; nothing to report to
            pass
