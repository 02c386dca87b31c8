"""The epoch plan: which traces each data-parallel rank and each loader worker reads, batch by batch.

A pure function of (the chunk layout, seed, epoch, batch size, world size, cursor): no I/O, no torch, so it is
tested by sweeping (tests/test_sampler.py), and a resumed or resized run recomputes it exactly.

How an epoch is laid out
------------------------
1. **Chunks.** The positions 0..n-1 (of a store, or of a `select()`ed view) are grouped into chunks that are
   each one contiguous run of rows inside one shard of the store (:class:`ChunkLayout`): `chunk_rows`
   consecutive store rows that never cross a shard (or part) boundary; for a view, the view's positions whose
   rows lie in one such run, in store-row order. A chunk is what the object-store path fetches in one GET.
   The loader's default `chunk_rows` is about 16 MiB of what an epoch reads per trace, and small enough that
   an epoch has at least MIN_CHUNKS (256) chunks.
2. **Chunk order.** With `shuffle`, the chunks are put in a uniform random order; laid end to end they give
   the epoch's *chunk-ordered positions* 0..n-1. Neighbouring chunks in that order usually come from different
   shards and from all over the store.
3. **Ranks own chunks.** The chunk-ordered positions are cut into `world_size` contiguous *portions* of equal
   size (to one trace): rank r reads only its portion, so each chunk belongs to one rank, except the at most
   ``world_size - 1`` chunks that a cut falls inside, which two ranks share (each reading only its own rows of
   it). The whole job therefore reads every byte once per epoch, whatever the number of ranks (before issue 21
   every rank drew its batch from the same window of one global order, so every rank fetched every chunk its
   batch touched: 8 ranks fetched 8x the store, 1,024 ranks ~29x; benchmarks/results/scale.md).
4. **Shuffle window, per rank.** Each rank takes the chunks of its portion `window` at a time and permutes the
   traces of each window uniformly (a random key per trace). A batch therefore mixes traces of up to `window`
   chunks drawn from all over the store, as before, while the reader holds only `window` chunks at a time. With
   one rank this is exactly the order of earlier versions (the same draws).
5. **Equal batches on every rank.** DDP hangs when ranks yield different numbers of batches, so every rank's
   stream has the same length:

   * ``drop_last=False`` (default): the portions differ by at most one trace; each shorter one is padded by
     one repeat, of its own first trace in chunk order (so at most ``world_size - 1`` repeats in all, only
     when ``world_size`` does not divide the count). Every trace appears exactly once, plus those repeats; the
     last batch has the same (possibly smaller) size on every rank.
   * ``drop_last=True``: every portion has ``n // world_size`` traces (the last ``n % world_size`` in chunk
     order are left out) and each rank yields only full batches, leaving out the tail of its own stream (a
     different one each epoch when shuffled). Every trace appears at most once.

6. **Workers.** Within a rank, batch k belongs to worker ``k % num_workers`` (:func:`worker_batches`); the loader
   hands batches to the consumer in plan order whatever the number of workers, so worker count never changes
   what is read.

Within a batch the positions are sorted ascending (a batch is a set for training; sorted positions turn
neighbouring traces into runs that the reader copies in one call). Without `shuffle` the chunks keep the
store's row order and no window is permuted: rank r reads its portion of the store (for a view: of the view's
rows, in store order) front to back.

Resume, on any geometry
-----------------------
Ranks step in lockstep, so after k batches every rank has consumed the same number c of traces of its own
stream. The position in an epoch (the *cursor*) is a list of :class:`Segment` (world_size, drop_last, c): the
first segment is the epoch as planned above; when a run resumes with another world size (or drop_last), the
traces not consumed by the earlier segments -- exactly those, whatever the geometry that consumed the others --
are taken in chunk order and laid out again by steps 3-5 for the new geometry, with a fresh key per trace
(segment j draws from its own random stream), and so on. A resume with the geometry of the last segment
continues that segment's streams where they stopped (any batch size or worker count), so an interrupted run
that resumes as it was sees the same batches as one that was not interrupted. The remaining traces are
recomputed from the segments (O(n log n), once per resume); an epoch that is not resumed costs only its
rank's portion and the chunk order: ~5 ms at 1,000,000 traces over 1,024 ranks (benchmarks/results/scale.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..store.graphs import ranges_to_indices  # pure numpy, no I/O

#: Target bytes of one shuffle chunk: 16 MiB is 64 traces of [32, 4096] float16, small against a 128 MiB shard
#: (8 chunks per shard to reorder) and large enough that a window of 16 chunks mixes 1024 traces.
CHUNK_BYTES = 16 * 2**20

#: Chunks per shuffle window (see the module docstring, step 4).
WINDOW_CHUNKS = 16


#: An epoch of n traces has at least this many chunks (chunks of at most n // MIN_CHUNKS traces, never fewer
#: than one): each rank owns a contiguous share of the chunk order (step 3), so with only a few chunks a rank
#: would read the same few every epoch -- on a store of one chunk, rank 0 the first half of it each time --
#: and its batches (its BatchNorm statistics, under DDP) would not be drawn from the whole store. 256 chunks
#: leave every one of 16 ranks a full window of 16; stores of 16,384 traces of 256 KiB or more are not
#: affected (their chunks are ~16 MiB anyway), smaller ones get smaller chunks (and GETs).
MIN_CHUNKS = 256


def default_chunk_rows(row_nbytes: int, rows_per_shard: int | None = None, n: int | None = None,
                       min_rows: int = 1) -> int:
    """Traces per shuffle chunk for traces of `row_nbytes` bytes: about CHUNK_BYTES, at most one shard, and
    for an epoch of n traces at most n // MIN_CHUNKS -- but at least `min_rows` (the loader's floor for graph
    epochs on object stores, where a use's edges cost about one extra inner chunk), which wins over MIN_CHUNKS."""
    rows = max(1, CHUNK_BYTES // max(1, row_nbytes))
    if n is not None:
        rows = max(1, min(rows, n // MIN_CHUNKS), min(rows, int(min_rows)))
    return min(rows, rows_per_shard) if rows_per_shard else rows


def chunk_starts(n: int, chunk_rows: int, rows_per_shard: int | None = None,
                 shard_starts: np.ndarray | None = None) -> np.ndarray:
    """Start positions of the chunks of [0, n), followed by n: chunks hold `chunk_rows` consecutive traces and
    never cross a multiple of `rows_per_shard`, or, where `shard_starts` is given (a store made of parts,
    whose shards start again at each part), any of those starts."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows}: a chunk holds at least one trace; pass chunk_rows >= 1")
    if shard_starts is not None:
        segs = np.unique(np.append(np.asarray(shard_starts, np.int64), np.int64(0)))
        segs = segs[segs < n]
        lengths = np.diff(np.append(segs, np.int64(n))).astype(np.int64)
        per: np.ndarray = (lengths + chunk_rows - 1) // chunk_rows
        starts, _ = ranges_to_indices(np.zeros_like(per), per)
        starts = starts * chunk_rows + np.repeat(segs, per)
        return np.append(starts.astype(np.int64), np.int64(n))
    if rows_per_shard is None or rows_per_shard <= 0:
        return np.append(np.arange(0, n, chunk_rows, dtype=np.int64), np.int64(n))
    per_shard = np.arange(0, rows_per_shard, chunk_rows, dtype=np.int64)
    first_rows = np.arange(0, n, rows_per_shard, dtype=np.int64)
    starts = (first_rows[:, None] + per_shard[None, :]).reshape(-1)
    return np.append(starts[starts < n], np.int64(n))


@dataclass(frozen=True)
class ChunkLayout:
    """How the positions of an epoch group into chunks: chunk c holds the positions
    ``members[bounds[c]:bounds[c + 1]]`` (with `members` None, the positions ``bounds[c]..bounds[c + 1] - 1``).

    :func:`store_layout` makes the layout of a whole store, :func:`view_layout` that of a view."""

    bounds: np.ndarray
    members: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.bounds[-1]) if self.bounds.size else 0

    @property
    def num_chunks(self) -> int:
        return max(0, int(self.bounds.size) - 1)


def store_layout(n: int, chunk_rows: int, rows_per_shard: int | None = None,
                 shard_starts: np.ndarray | None = None) -> ChunkLayout:
    """The chunks of a whole store of n traces (see :func:`chunk_starts`)."""
    return ChunkLayout(chunk_starts(n, chunk_rows, rows_per_shard, shard_starts))


def view_layout(rows: np.ndarray, store_bounds: np.ndarray) -> ChunkLayout:
    """The chunks of a view whose position i is store row ``rows[i]``, over a store whose chunks start at
    `store_bounds` (:func:`chunk_starts`): one chunk per store chunk that holds any of the view's rows, its
    positions in store-row order. The object-store path then fetches each store chunk's selected rows once."""
    rows = np.asarray(rows, np.int64)
    if rows.size == 0:
        return ChunkLayout(np.zeros(1, np.int64), np.zeros(0, np.int64))
    members = np.argsort(rows, kind="stable")
    cid = np.searchsorted(np.asarray(store_bounds, np.int64), rows[members], side="right") - 1
    brk = np.flatnonzero(np.diff(cid)) + 1
    bounds = np.concatenate(([0], brk, [rows.size])).astype(np.int64)
    return ChunkLayout(bounds, members.astype(np.int64))


@dataclass(frozen=True)
class Segment:
    """Part of an epoch read with one geometry: `world_size` ranks (with `drop_last`), each of which consumed
    `consumed` traces of its own stream (the same number on every rank: they step together)."""

    world_size: int
    drop_last: bool
    consumed: int

    def to_list(self) -> list[Any]:
        return [self.world_size, self.drop_last, self.consumed]

    @classmethod
    def from_list(cls, value: Any) -> Segment:
        world_size, drop_last, consumed = value
        if isinstance(world_size, bool) or isinstance(consumed, bool) or not isinstance(drop_last, bool):
            raise TypeError(value)
        return cls(int(world_size), drop_last, int(consumed))


Cursor = Sequence[Segment]


def normalize_cursor(cursor: Cursor) -> tuple[Segment, ...]:
    """The segments that consumed anything (an empty one changes nothing)."""
    return tuple(s for s in cursor if s.consumed > 0)


def advance_cursor(cursor: Cursor, world_size: int, drop_last: bool, traces: int) -> tuple[Segment, ...]:
    """The cursor after every rank of this geometry consumed `traces` more of its stream."""
    segs = list(normalize_cursor(cursor))
    if traces <= 0:
        return tuple(segs)
    if segs and (segs[-1].world_size, segs[-1].drop_last) == (world_size, drop_last):
        segs[-1] = Segment(world_size, drop_last, segs[-1].consumed + traces)
    else:
        segs.append(Segment(world_size, drop_last, traces))
    return tuple(segs)


def _split_cursor(cursor: Cursor, world_size: int, drop_last: bool) -> tuple[tuple[Segment, ...], int]:
    """(the segments before the one this geometry reads, traces each rank of it has consumed already)."""
    segs = normalize_cursor(cursor)
    if segs and (segs[-1].world_size, segs[-1].drop_last) == (world_size, drop_last):
        return segs[:-1], segs[-1].consumed
    return segs, 0


def _portion(m: int, world_size: int, rank: int, drop_last: bool) -> tuple[int, int, int]:
    """(first index, length) of rank's portion of m traces, and the length of every rank's stream."""
    q, rem = divmod(m, world_size)
    if drop_last:
        return rank * q, q, q
    return rank * q + min(rank, rem), q + (rank < rem), q + (rem > 0)


def _consumed_count(m: int, seg: Segment) -> int:
    """Distinct traces a segment over m traces consumed (the padding repeats are not counted)."""
    q, rem = divmod(m, seg.world_size)
    c = seg.consumed
    if seg.drop_last:
        return seg.world_size * min(c, q)
    return rem * min(c, q + 1) + (seg.world_size - rem) * min(c, q)


def _stream_length(m: int, world_size: int, drop_last: bool) -> int:
    return _portion(m, world_size, 0, drop_last)[2]


def check_cursor(n: int, cursor: Cursor) -> int:
    """Check that every segment of `cursor` fits an epoch of n traces; return the traces it left to read.
    Raises ValueError saying which segment does not."""
    m = n
    for j, seg in enumerate(normalize_cursor(cursor)):
        if seg.world_size < 1 or seg.consumed < 0:
            raise ValueError(f"segment {j} of the resume cursor ({seg.to_list()}) has world_size < 1 or consumed < 0; "
                             f"the state was edited or damaged")
        length = _stream_length(m, seg.world_size, seg.drop_last)
        if seg.consumed > length:
            raise ValueError(f"segment {j} of the resume cursor says each of its {seg.world_size} ranks consumed "
                             f"{seg.consumed} traces, but a rank's share of the {m} traces left is {length}: the "
                             f"state comes from a store of a different size, or was edited")
        m -= _consumed_count(m, seg)
    return m


class EpochOrder:
    """The chunk order of one epoch, and from it each rank's stream of any segment (module docstring)."""

    def __init__(self, layout: ChunkLayout, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                 window: int = WINDOW_CHUNKS) -> None:
        if window < 1:
            raise ValueError(f"window={window}: a shuffle window holds at least one chunk; pass window >= 1")
        self.layout = layout
        self.n = layout.n
        self.seed, self.epoch, self.shuffle, self.window = int(seed), int(epoch), bool(shuffle), int(window)
        starts = np.asarray(layout.bounds[:-1], np.int64)
        lengths = np.diff(np.asarray(layout.bounds, np.int64))
        self._after_perm: Any = None
        if self.shuffle:
            rng = np.random.default_rng(self._seed_words())
            perm = rng.permutation(starts.size)
            starts, lengths = starts[perm], lengths[perm]
            self._after_perm = rng.bit_generator.state  # segment 0's keys follow the permutation's draws
        self.starts = starts
        self.lengths = lengths
        self.cum = np.zeros(lengths.size + 1, np.int64)  # chunk-ordered position of each chunk's first trace
        np.cumsum(lengths, out=self.cum[1:])

    def _seed_words(self, *extra: int) -> list[int]:
        s = self.seed
        return [s & 0xFFFFFFFF, s >> 32 & 0xFFFFFFFF, self.epoch, *extra]

    def traces(self, positions: np.ndarray) -> np.ndarray:
        """The trace (store or view position) at each chunk-ordered position."""
        p = np.asarray(positions, np.int64)
        c = np.searchsorted(self.cum, p, side="right") - 1
        m = self.starts[c] + (p - self.cum[c])
        members = self.layout.members
        return m if members is None else members[m]

    def chunk_of(self, positions: np.ndarray) -> np.ndarray:
        """The chunk (index in the chunk order) of each chunk-ordered position."""
        return np.searchsorted(self.cum, np.asarray(positions, np.int64), side="right") - 1

    def keys(self, segment: int, first: int, count: int) -> np.ndarray:
        """Keys `first`..`first + count - 1` of segment `segment`'s random stream: segment 0 draws one float64
        per trace right after the chunk permutation (as every version before issue 21 did, so one rank's order
        is unchanged), segment j > 0 from its own generator. PCG64.advance skips the keys before `first`."""
        if segment == 0:
            bits = np.random.PCG64(0)  # its state is replaced at once
            bits.state = self._after_perm
        else:
            bits = np.random.PCG64(np.random.SeedSequence(self._seed_words(segment)))
        bits.advance(int(first))
        return np.random.Generator(bits).random(int(count))

    def rank_stream(self, base: np.ndarray | None, segment: int, rank: int, world_size: int,
                    drop_last: bool) -> np.ndarray:
        """Rank `rank`'s stream (traces, in the order it reads them, with its padding repeat) of a segment
        over the chunk-ordered positions `base` (sorted; None = all n)."""
        m = self.n if base is None else int(base.size)
        a, length, stream_len = _portion(m, world_size, rank, drop_last)
        pos = np.arange(a, a + length, dtype=np.int64) if base is None else base[a:a + length]
        if self.shuffle and length:
            c = self.chunk_of(pos)
            piece = c - c[0] if base is None else np.concatenate(([0], np.cumsum(np.diff(c) != 0)))
            pos = pos[np.lexsort((self.keys(segment, a, length), piece // self.window))]
        if length < stream_len:  # the padding repeat: this portion's first trace in chunk order
            first = (a if length else 0) if base is None else int(base[a if length else 0])
            pos = np.append(pos, np.int64(first))
        return self.traces(pos)

    def consumed(self, base: np.ndarray | None, segment: int, seg: Segment) -> np.ndarray:
        """The chunk-ordered positions that the ranks of `seg` consumed (all ranks at once, vectorised)."""
        m = self.n if base is None else int(base.size)
        R, c = seg.world_size, seg.consumed
        q, rem = divmod(m, R)
        idx = np.arange(m, dtype=np.int64)
        if seg.drop_last:
            keep = idx < R * q
            idx = idx[keep]
            rank = idx // max(q, 1)
            first = rank * q
        else:
            big = rem * (q + 1)
            rank = np.where(idx < big, idx // (q + 1), rem + (idx - big) // max(q, 1))
            first = rank * q + np.minimum(rank, rem)
        pos = idx if base is None else base[idx]
        if not self.shuffle:
            return pos[idx - first < c]
        chunk = self.chunk_of(pos)
        new_piece = np.ones(idx.size, bool)
        new_piece[1:] = (np.diff(chunk) != 0) | (np.diff(rank) != 0)
        piece = np.cumsum(new_piece) - 1
        piece -= piece[np.searchsorted(idx, first)] if idx.size else 0  # piece number within the rank's portion
        keys = self.keys(segment, 0, m)[idx]
        order = np.lexsort((keys, piece // self.window, rank))
        in_stream = np.empty(idx.size, np.int64)
        in_stream[order] = np.arange(idx.size, dtype=np.int64)
        in_stream -= first  # portions are contiguous in idx, and so in the sorted order
        return pos[in_stream < c]

    def remaining(self, closed: Sequence[Segment]) -> np.ndarray | None:
        """The chunk-ordered positions not consumed by the segments `closed` (sorted; None = all)."""
        base: np.ndarray | None = None
        for j, seg in enumerate(closed):
            full = np.arange(self.n, dtype=np.int64) if base is None else base
            used = self.consumed(base, j, seg)
            keep = np.ones(full.size, bool)
            keep[np.searchsorted(full, used)] = False
            base = full[keep]
        return base


def epoch_order(n: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True, chunk_rows: int = 1,
                rows_per_shard: int | None = None, window: int = WINDOW_CHUNKS,
                shard_starts: np.ndarray | None = None, layout: ChunkLayout | None = None) -> np.ndarray:
    """The order in which one rank (world_size 1) visits the traces 0..n-1: a permutation, int64 [n].

    Deterministic in (seed, epoch); the store order when `shuffle` is False (for a view: its rows in store
    order). See the module docstring for the chunk order and the shuffle window."""
    if n < 0:
        raise ValueError(f"n={n}: the number of traces cannot be negative")
    return rank_order(n, rank=0, world_size=1, seed=seed, epoch=epoch, shuffle=shuffle, chunk_rows=chunk_rows,
                      rows_per_shard=rows_per_shard, window=window, shard_starts=shard_starts, layout=layout)


def rank_order(n: int, *, rank: int = 0, world_size: int = 1, drop_last: bool = False, cursor: Cursor = (),
               seed: int = 0, epoch: int = 0, shuffle: bool = True, chunk_rows: int = 1,
               rows_per_shard: int | None = None, window: int = WINDOW_CHUNKS,
               shard_starts: np.ndarray | None = None, layout: ChunkLayout | None = None) -> np.ndarray:
    """Every trace one rank reads in the segment of `cursor` its geometry reads (the epoch, with no cursor),
    in order, padding repeat included, before any of it is consumed: int64 [stream length]."""
    order = _order(n, seed, epoch, shuffle, chunk_rows, rows_per_shard, window, shard_starts, layout)
    closed, _ = _split_cursor(cursor, world_size, drop_last)
    return order.rank_stream(order.remaining(closed), len(closed), rank, world_size, drop_last)


def _order(n: int, seed: int, epoch: int, shuffle: bool, chunk_rows: int, rows_per_shard: int | None, window: int,
           shard_starts: np.ndarray | None, layout: ChunkLayout | None) -> EpochOrder:
    if layout is None:
        layout = store_layout(n, chunk_rows, rows_per_shard, shard_starts)
    elif layout.n != n:
        raise ValueError(f"the chunk layout holds {layout.n} traces, the epoch {n}")
    return EpochOrder(layout, seed=seed, epoch=epoch, shuffle=shuffle, window=window)


def plan_epoch(n: int, *, batch_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = True, rank: int = 0,
               world_size: int = 1, drop_last: bool = False, cursor: Cursor = (), chunk_rows: int = 1,
               rows_per_shard: int | None = None, window: int = WINDOW_CHUNKS,
               shard_starts: np.ndarray | None = None, layout: ChunkLayout | None = None) -> list[np.ndarray]:
    """The batches of one rank for one epoch (or for what is left of it after `cursor`): a list of int64
    arrays of positions in [0, n), each sorted ascending.

    Every rank gets the same number of batches, and batch k has the same size on every rank. The union over
    ranks is every trace not consumed by `cursor`, once, with the padding or dropping rule of the module
    docstring.

    Cost: without a cursor, the chunk order (one permutation of the chunks) and this rank's portion: time and
    memory grow with the traces of this rank and the number of chunks, not with n (about 5 ms at n =
    1,000,000 over 1,024 ranks, benchmarks/results/scale.md). A cursor whose geometry changed replays its
    segments over all traces once (O(n log n))."""
    _check(batch_size=batch_size, rank=rank, world_size=world_size)
    order = _order(n, seed, epoch, shuffle, chunk_rows, rows_per_shard, window, shard_starts, layout)
    check_cursor(n, cursor)
    closed, done = _split_cursor(cursor, world_size, drop_last)
    stream = order.rank_stream(order.remaining(closed), len(closed), rank, world_size, drop_last)
    rest = stream[done:]
    full, tail = divmod(rest.size, batch_size)
    batches = list(np.sort(rest[:full * batch_size].reshape(full, batch_size), axis=1))
    if tail and not drop_last:
        batches.append(np.sort(rest[full * batch_size:]))
    return batches


def num_batches(n: int, *, batch_size: int, world_size: int = 1, drop_last: bool = False,
                cursor: Cursor = ()) -> int:
    """How many batches every rank gets for an epoch of n traces, or for what is left of it after `cursor`
    (no plan built: counts only)."""
    _check(batch_size=batch_size, rank=0, world_size=world_size)
    closed, done = _split_cursor(cursor, world_size, drop_last)
    m = check_cursor(n, closed)
    left = max(0, _stream_length(m, world_size, drop_last) - done)
    return left // batch_size if drop_last else -(-left // batch_size)


def traces_consumed(n: int, cursor: Cursor) -> int:
    """Distinct traces of the epoch consumed by all ranks together at `cursor` (padding repeats not counted)."""
    return n - check_cursor(n, cursor)


def worker_batches(batches: Sequence[np.ndarray], worker: int, num_workers: int) -> list[np.ndarray]:
    """The batches a loader worker reads: batch k goes to worker k % num_workers (0 workers == 1)."""
    nw = max(1, num_workers)
    if not 0 <= worker < nw:
        raise ValueError(f"worker={worker} out of range for {num_workers} workers")
    return list(batches[worker::nw])


def _check(*, batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: a batch holds at least one trace; pass batch_size >= 1")
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: there is at least one rank; pass world_size >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is out of range for world_size={world_size}; ranks run 0..{world_size - 1}")
