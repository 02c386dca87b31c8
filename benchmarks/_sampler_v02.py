"""tracestore 0.2's epoch plan, kept as it was (before issue 21) so that benchmarks/bench_scale.py measures
the old order against the new one in the same run. Not used by the package.

The epoch plan: which traces each data-parallel rank and each loader worker reads, batch by batch.

A pure function of (number of traces, seed, epoch, batch size, world size, cursor): no I/O, no torch, so it is
tested by sweeping (tests/test_sampler.py), and a resumed or resized run recomputes it exactly.

How an epoch is laid out
------------------------
1. **Chunks.** The traces 0..n-1 are cut into chunks of `chunk_rows` consecutive traces that never cross a shard
   boundary (`rows_per_shard`), so a chunk is one contiguous byte range of one shard.
2. **Chunk order.** With `shuffle`, the chunks are put in a uniform random order. This shuffles the shard order
   and the order of chunks inside each shard at once, and neighbouring chunks in the new order usually come
   from different shards.
3. **Shuffle window.** The reordered chunks are taken `window` at a time, and the traces of each window are
   permuted uniformly. A batch therefore mixes traces of up to `window` chunks from all over the store (not only
   one chunk, which is what LitData and SAELens users complain about), while the reader only touches `window`
   chunks at a time.
4. **Global steps.** The resulting epoch order is consumed in global steps of `world_size * batch_size` traces:
   in step s, rank r takes the r-th slice of `batch_size`. Everything consumed so far is therefore a prefix of
   the epoch order, and the resume cursor is one integer (`start`, traces consumed), valid for any world size,
   worker count or batch size.
5. **Equal batches on every rank.** DDP hangs when ranks yield different numbers of batches, so:

   * ``drop_last=False`` (default): the traces left after `start` are padded to a multiple of `world_size` by
     repeating traces from the beginning of the epoch order (at most ``world_size - 1`` of them, only when
     ``world_size`` does not divide the count). Every trace appears exactly once, plus those few repeats; the
     last step is split evenly, so every rank's last batch has the same (possibly smaller) size.
   * ``drop_last=True``: each rank gets ``(remaining // world_size) // batch_size`` full batches and the tail of
     the epoch order is dropped (a different tail each epoch when shuffled). Every trace appears at most once.

6. **Workers.** Within a rank, batch k belongs to worker ``k % num_workers`` (:func:`worker_batches`); the loader
   hands batches to the consumer in plan order whatever the number of workers, so worker count never changes
   what is read.

Within a batch the positions are sorted ascending (a batch is a set for training; sorted positions turn
neighbouring traces into runs that the reader copies in one call).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tracestore.store.graphs import ranges_to_indices  # pure numpy, no I/O

#: Target bytes of one shuffle chunk: 16 MiB is 64 traces of [32, 4096] float16, small against a 128 MiB shard
#: (8 chunks per shard to reorder) and large enough that a window of 16 chunks mixes 1024 traces.
CHUNK_BYTES = 16 * 2**20

#: Chunks per shuffle window (see the module docstring, step 3).
WINDOW_CHUNKS = 16


def default_chunk_rows(row_nbytes: int, rows_per_shard: int | None = None) -> int:
    """Traces per shuffle chunk for traces of `row_nbytes` bytes: about CHUNK_BYTES, at most one shard."""
    rows = max(1, CHUNK_BYTES // max(1, row_nbytes))
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


def _chunk_order(n: int, seed: int, epoch: int, chunk_rows: int, rows_per_shard: int | None,
                 shard_starts: np.ndarray | None = None) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
    """The epoch's generator after its first draw, and the chunks (starts, lengths) in the order that draw
    gave them. epoch_order and order_at both start here: the rest of their draws (one key per trace) must
    follow this one exactly for order_at to reproduce epoch_order."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF, int(epoch)])
    bounds = chunk_starts(n, chunk_rows, rows_per_shard, shard_starts)
    starts, lengths = bounds[:-1], np.diff(bounds)
    perm = rng.permutation(starts.size)
    return rng, starts[perm], lengths[perm]


def epoch_order(n: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True, chunk_rows: int = 1,
                rows_per_shard: int | None = None, window: int = WINDOW_CHUNKS,
                shard_starts: np.ndarray | None = None) -> np.ndarray:
    """The order in which an epoch visits traces 0..n-1: a permutation, int64 [n], the same on every rank.

    Deterministic in (seed, epoch); the identity when `shuffle` is False. See the module docstring for the
    chunk order and the shuffle window."""
    if n < 0:
        raise ValueError(f"n={n}: the number of traces cannot be negative")
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    if window < 1:
        raise ValueError(f"window={window}: a shuffle window holds at least one chunk; pass window >= 1")
    rng, starts, lengths = _chunk_order(n, seed, epoch, chunk_rows, rows_per_shard, shard_starts)
    # all traces of the chunks in their new order: a vectorised CSR gather
    order, _ = ranges_to_indices(starts, lengths)
    # permute within each window of `window` chunks: sort by (window id, random key)
    win = np.repeat(np.arange(lengths.size, dtype=np.int64) // window, lengths)
    keys = rng.random(n)
    return order[np.lexsort((keys, win))]


def padded_remainder(order: np.ndarray, start: int, world_size: int, batch_size: int, drop_last: bool) -> np.ndarray:
    """What is left of an epoch order after `start` traces, cut or padded so that every rank gets the same
    number of batches (module docstring, step 5)."""
    n = order.size
    if not 0 <= start <= n:
        raise ValueError(f"start={start}: the resume cursor must lie in [0, {n}] for an epoch of {n} traces; the "
                         f"state comes from a store of a different size, or was edited")
    rest = order[start:]
    if drop_last:
        per_rank = (rest.size // world_size) // batch_size * batch_size
        return rest[: per_rank * world_size]
    pad = (-rest.size) % world_size
    if pad == 0 or n == 0:
        return rest
    return np.concatenate([rest, order[np.arange(pad) % n]])


def plan_epoch(n: int, *, batch_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = True, rank: int = 0,
               world_size: int = 1, drop_last: bool = False, start: int = 0, chunk_rows: int = 1,
               rows_per_shard: int | None = None, window: int = WINDOW_CHUNKS,
               shard_starts: np.ndarray | None = None) -> list[np.ndarray]:
    """The batches of one rank for one epoch (or its remainder after `start` traces were consumed by all
    ranks together): a list of int64 arrays of positions in [0, n), each sorted ascending.

    Every rank gets the same number of batches, and batch k has the same size on every rank. The union over
    ranks is the epoch order after `start`, with the padding or dropping rule of the module docstring.

    Cost: the rank's slots of the epoch order are computed from the chunk order and only the shuffle windows
    that hold them (:func:`order_at`), not from the whole order, so time and memory grow with the traces of
    this rank (and the windows they fall in) and the number of chunks, not with n: about 5 ms and 1 MiB at
    n = 1,000,000 over 1,024 ranks (benchmarks/results/scale.md). The batches are the same, bit for bit, as
    those cut from :func:`epoch_order` (tests/test_sampler_scale.py)."""
    _check(batch_size=batch_size, rank=rank, world_size=world_size)
    slots, sizes = _rank_slots(n, start=start, rank=rank, world_size=world_size, batch_size=batch_size,
                               drop_last=drop_last)
    traces = order_at(slots, n, seed=seed, epoch=epoch, shuffle=shuffle, chunk_rows=chunk_rows,
                      rows_per_shard=rows_per_shard, window=window, shard_starts=shard_starts)
    full = int(np.count_nonzero(sizes == batch_size)) if sizes.size else 0  # all batches but maybe the last
    head = np.sort(traces[:full * batch_size].reshape(full, batch_size), axis=1)
    batches = list(head)
    if full < sizes.size:
        batches.append(np.sort(traces[full * batch_size:]))
    return batches


def _rank_slots(n: int, *, start: int, rank: int, world_size: int, batch_size: int,
                drop_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """Which slots of the epoch order (indices into :func:`epoch_order`) one rank's batches take, concatenated,
    and the size of each batch: the arithmetic of :func:`padded_remainder` and the global steps, without the
    order itself."""
    if not 0 <= start <= n:
        raise ValueError(f"start={start}: the resume cursor must lie in [0, {n}] for an epoch of {n} traces; the "
                         f"state comes from a store of a different size, or was edited")
    left = n - start
    if drop_last:
        total = (left // world_size) // batch_size * batch_size * world_size
    else:
        total = left + ((-left) % world_size if n else 0)
    step = world_size * batch_size
    full, tail = divmod(total, step)
    slots = ((np.arange(full, dtype=np.int64) * step + rank * batch_size)[:, None]
             + np.arange(batch_size, dtype=np.int64)[None, :]).reshape(-1)
    sizes = np.full(full, batch_size, dtype=np.int64)
    if tail:  # the last step is a multiple of world_size, split evenly
        b = tail // world_size
        slots = np.concatenate([slots, full * step + rank * b + np.arange(b, dtype=np.int64)])
        sizes = np.append(sizes, np.int64(b))
    # slots past the traces left are the padding: repeats from the beginning of the epoch order
    return np.where(slots < left, start + slots, (slots - left) % max(n, 1)), sizes


#: Windows closer than this many traces are computed as one run by order_at (one generator, one sort): a
#: fresh generator costs about as much as drawing and sorting this many keys.
_RUN_GAP = 4096


def order_at(slots: np.ndarray, n: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True, chunk_rows: int = 1,
             rows_per_shard: int | None = None, window: int = WINDOW_CHUNKS,
             shard_starts: np.ndarray | None = None) -> np.ndarray:
    """``epoch_order(n, ...)[slots]``, computed without the whole order: the chunk order (one permutation of
    the chunks, as epoch_order draws it), then only the shuffle windows that hold `slots`, each from its own
    part of the random stream (the generator is advanced past the keys of the windows before it).

    Memory and time grow with the traces of the windows touched and the number of chunks, not with n."""
    slots = np.asarray(slots, dtype=np.int64)
    if slots.size and (slots.min() < 0 or slots.max() >= n):
        raise ValueError(f"order_at: slots must lie in [0, {n}) for an epoch of {n} traces")
    if not shuffle:
        return slots.copy()
    if window < 1:
        raise ValueError(f"window={window}: a shuffle window holds at least one chunk; pass window >= 1")
    # exactly the draws of epoch_order: the permutation first, then one float64 key per trace (one 64-bit
    # output of PCG64 each), trace i of the reordered chunks drawing key i
    rng, starts, lengths = _chunk_order(n, seed, epoch, chunk_rows, rows_per_shard, shard_starts)
    after_perm: Any = rng.bit_generator.state
    out = np.empty(slots.size, dtype=np.int64)
    if slots.size == 0:
        return out
    nchunks = starts.size
    wbounds = np.zeros(-(-nchunks // window) + 1, dtype=np.int64)  # first slot of each window, then n
    np.cumsum(np.add.reduceat(lengths, np.arange(0, nchunks, window)), out=wbounds[1:])
    by_slot = np.argsort(slots, kind="stable")
    sorted_slots = slots[by_slot]
    wins = np.unique(np.searchsorted(wbounds, sorted_slots, side="right") - 1)
    # runs of windows: neighbours in the needed list whose gap is small are computed together
    gaps = wbounds[wins[1:]] - wbounds[wins[:-1] + 1]
    cut = np.flatnonzero(gaps > _RUN_GAP) + 1
    for w0, w1 in zip(np.r_[wins[:1], wins[cut]].tolist(), np.r_[wins[cut - 1], wins[-1:]].tolist(), strict=True):
        c0, c1 = w0 * window, min((w1 + 1) * window, nchunks)
        a, b = int(wbounds[w0]), int(wbounds[w1 + 1])
        seg, _ = ranges_to_indices(starts[c0:c1], lengths[c0:c1])
        win = np.repeat(np.arange(c0, c1, dtype=np.int64) // window, lengths[c0:c1])
        bits = np.random.PCG64(0)  # its state is replaced at once
        bits.state = after_perm
        bits.advance(a)
        keys = np.random.Generator(bits).random(b - a)
        seg = seg[np.lexsort((keys, win))]
        lo, hi = np.searchsorted(sorted_slots, [a, b])
        out[by_slot[lo:hi]] = seg[sorted_slots[lo:hi] - a]
    return out


def num_batches(n: int, *, batch_size: int, world_size: int = 1, drop_last: bool = False, start: int = 0) -> int:
    """How many batches every rank gets for an epoch of n traces after `start` were consumed (no plan built)."""
    _check(batch_size=batch_size, rank=0, world_size=world_size)
    rest = max(0, n - start)
    if drop_last:
        return (rest // world_size) // batch_size
    per_rank = -(-rest // world_size)
    return -(-per_rank // batch_size)


def cursor_after(n: int, *, start: int, batches_done: int, batch_size: int, world_size: int) -> int:
    """The resume cursor (traces of the epoch order consumed by all ranks together) after every rank has taken
    `batches_done` batches of a plan that began at `start`. Capped at n: padding repeats are not counted."""
    return min(n, start + batches_done * batch_size * world_size)


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
