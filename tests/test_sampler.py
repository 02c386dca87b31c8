"""The epoch plan (tracestore.loader.sampler): a pure function, checked by sweeping ranks x workers x batch sizes
x seeds x layouts for the exactly-once rule, equal batch counts per rank, chunks owned by one rank each,
determinism, and resume on any other geometry."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from tracestore.loader import sampler
from tracestore.loader.sampler import (
    Segment,
    advance_cursor,
    chunk_starts,
    epoch_order,
    num_batches,
    plan_epoch,
    rank_order,
    store_layout,
    traces_consumed,
    view_layout,
    worker_batches,
)


def _plans(n: int, world: int, **kw: Any) -> list[list[np.ndarray]]:
    return [plan_epoch(n, rank=r, world_size=world, **kw) for r in range(world)]


def _flat(batches: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([*batches, np.zeros(0, np.int64)])


def _old_epoch_order(n: int, *, seed: int, epoch: int, chunk_rows: int, rows_per_shard: int | None,
                     window: int) -> np.ndarray:
    """The one global order of tracestore 0.2 (before issue 21), written out again: the order one rank reads
    now must still be this, draw for draw."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, epoch])
    bounds = chunk_starts(n, chunk_rows, rows_per_shard)
    starts, lengths = bounds[:-1], np.diff(bounds)
    perm = rng.permutation(starts.size)
    starts, lengths = starts[perm], lengths[perm]
    order = np.concatenate([np.arange(s, s + c) for s, c in zip(starts, lengths, strict=True)] + [np.zeros(0, int)])
    win = np.repeat(np.arange(lengths.size) // window, lengths)
    return order[np.lexsort((rng.random(n), win))].astype(np.int64)


LAYOUTS = ["store", "view", "sparse view"]


def _layout(kind: str, n_store: int, seed: int) -> tuple[int, sampler.ChunkLayout | None, dict[str, Any]]:
    """(n, layout, chunk kwargs) of a store of n_store rows, or of a shuffled view of it."""
    kw: dict[str, Any] = dict(chunk_rows=4, rows_per_shard=10)
    if kind == "store":
        return n_store, None, kw
    rng = np.random.default_rng(seed)
    keep = n_store if kind == "view" else max(0, n_store // 3)
    rows = rng.permutation(n_store)[:keep]  # a view in an order of its own, as select(sorted ids) gives
    return rows.size, view_layout(rows, chunk_starts(n_store, 4, 10)), {}


@pytest.mark.parametrize("n", [0, 1, 7, 53])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_sweep_every_trace_once_per_epoch(n: int, drop_last: bool, kind: str) -> None:
    for world, workers, bs, seed in itertools.product([1, 2, 3, 4, 7], [0, 1, 3], [1, 3, 8], [0, 1]):
        nv, layout, ckw = _layout(kind, n, seed)
        kw = dict(batch_size=bs, seed=seed, epoch=seed, drop_last=drop_last, window=3, layout=layout, **ckw)
        plans = _plans(nv, world, **kw)
        # every rank gets the same number of batches, and batch k has the same size on every rank (DDP)
        assert {len(p) for p in plans} == {num_batches(nv, batch_size=bs, world_size=world, drop_last=drop_last)}
        for k in range(len(plans[0])):
            assert len({len(p[k]) for p in plans}) == 1
            assert all((np.diff(p[k]) >= 0).all() for p in plans)  # sorted within a batch
        # the workers of a rank partition its batches, whatever their number
        for p in plans:
            nw = max(1, workers)
            parts = [worker_batches(p, w, workers) for w in range(nw)]
            assert sum(len(x) for x in parts) == len(p)
            assert sorted(_flat([b for part in parts for b in part]).tolist()) == sorted(_flat(p).tolist())
        c = np.bincount(_flat([b for p in plans for b in p]), minlength=nv)
        if drop_last:
            assert c.max(initial=0) <= 1
            assert c.sum() == (nv // world) // bs * bs * world
            assert all(len(b) == bs for p in plans for b in p)
        else:
            pad = (-nv) % world if nv else 0
            assert c.min(initial=1) >= 1, "a trace was skipped"
            assert int((c - 1).sum()) == pad, "more repeats than the padding rule allows"
            # each short rank repeats its own first trace in chunk order, at the end of its stream
            for r in range(world):
                stream = rank_order(nv, rank=r, world_size=world, seed=seed, epoch=seed, window=3, layout=layout,
                                    **ckw)
                if stream.size > len(set(stream.tolist())):
                    assert stream[-1] in stream[:-1] or stream.size == 1


@pytest.mark.parametrize("kind", LAYOUTS)
def test_each_chunk_belongs_to_one_rank_but_at_the_cuts(kind: str) -> None:
    """What makes every byte once for the whole job: a rank's traces come from its own chunks; only the chunk a
    cut between two portions falls in is shared (each rank reading its own rows of it)."""
    for n_store, world, seed in itertools.product([40, 200, 1000], [1, 2, 3, 8, 64], [0, 3]):
        n, layout, ckw = _layout(kind, n_store, seed)
        lay = layout or store_layout(n, **ckw)
        chunk_of = np.empty(n, np.int64)
        for c in range(lay.num_chunks):
            members = np.arange(lay.bounds[c], lay.bounds[c + 1])
            chunk_of[members if lay.members is None else lay.members[members]] = c
        owners: dict[int, set[int]] = {}
        for r in range(world):
            stream = rank_order(n, rank=r, world_size=world, seed=seed, window=4, layout=layout, **ckw)
            real = stream[:n // world + (r < n % world)]  # without the padding repeat
            for c in set(chunk_of[real].tolist()):
                owners.setdefault(c, set()).add(r)
        assert sum(len(o) for o in owners.values()) <= lay.num_chunks + world - 1


def test_one_rank_reads_the_order_of_before() -> None:
    for n, cr, rps, win, seed in itertools.product([0, 1, 13, 600], [1, 5, 64], [None, 24], [1, 3, 16],
                                                   [0, 2**40 + 3]):
        want = _old_epoch_order(n, seed=seed, epoch=2, chunk_rows=cr, rows_per_shard=rps, window=win)
        got = epoch_order(n, seed=seed, epoch=2, chunk_rows=cr, rows_per_shard=rps, window=win)
        assert np.array_equal(got, want), (n, cr, rps, win, seed)
        # and its batches are consecutive slices of it, as before (resumed from a 0.2 cursor as well)
        batches = plan_epoch(n, batch_size=7, seed=seed, epoch=2, chunk_rows=cr, rows_per_shard=rps, window=win,
                             cursor=[Segment(1, False, min(n, 11))])
        cut = want[min(n, 11):]
        assert [b.tolist() for b in batches] == [sorted(cut[i:i + 7].tolist()) for i in range(0, cut.size, 7)]


def test_deterministic_in_seed_and_epoch() -> None:
    kw: dict[str, Any] = dict(chunk_rows=8, rows_per_shard=64)
    a = rank_order(500, rank=1, world_size=3, seed=1, epoch=2, **kw)
    assert np.array_equal(a, rank_order(500, rank=1, world_size=3, seed=1, epoch=2, **kw))
    assert not np.array_equal(a, rank_order(500, rank=1, world_size=3, seed=1, epoch=3, **kw))
    assert not np.array_equal(a, rank_order(500, rank=1, world_size=3, seed=2, epoch=2, **kw))
    assert sorted(epoch_order(500, seed=1, epoch=2, **kw).tolist()) == list(range(500))


def test_no_shuffle_reads_each_portion_in_store_order() -> None:
    assert np.array_equal(epoch_order(10, shuffle=False), np.arange(10))
    batches = plan_epoch(10, batch_size=4, shuffle=False)
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # two ranks: each reads its half of the store, front to back
    assert [b.tolist() for b in plan_epoch(10, batch_size=2, shuffle=False, rank=1, world_size=2)] == [
        [5, 6], [7, 8], [9]]
    # a view: its rows in store order (view position 2 holds store row 0, ...)
    layout = view_layout(np.array([7, 3, 0, 5]), chunk_starts(8, 2))
    assert epoch_order(4, shuffle=False, layout=layout).tolist() == [2, 1, 3, 0]


def test_chunks_never_cross_shards() -> None:
    s = chunk_starts(23, 4, rows_per_shard=10)
    assert s.tolist() == [0, 4, 8, 10, 14, 18, 20, 23]
    assert chunk_starts(9, 4).tolist() == [0, 4, 8, 9]
    with pytest.raises(ValueError, match="chunk_rows=0"):
        chunk_starts(5, 0)


def test_a_view_is_chunked_by_the_store_chunks_of_its_rows() -> None:
    rows = np.array([9, 0, 4, 5, 1, 8, 23, 12])
    lay = view_layout(rows, chunk_starts(24, 4, rows_per_shard=10))  # store chunks 0-3 4-7 8-9 10-13 ... 20-23
    groups = [sorted(rows[lay.members[a:b]].tolist()) for a, b in zip(lay.bounds[:-1], lay.bounds[1:], strict=True)]
    assert groups == [[0, 1], [4, 5], [8, 9], [12], [23]]
    assert view_layout(np.zeros(0, np.int64), chunk_starts(24, 4)).n == 0


def test_a_window_mixes_its_chunks_within_each_rank() -> None:
    n, cr, win = 960, 6, 4
    for world in (1, 2, 5):
        for r in range(world):
            stream = rank_order(n, rank=r, world_size=world, seed=5, chunk_rows=cr, window=win)
            chunk_of = stream // cr
            # a window of the stream holds `win` chunks (the first and last may be shared with a neighbour)
            size = cr * win
            for w0 in range(size, stream.size - 2 * size, size):
                assert len(set(chunk_of[w0:w0 + size].tolist())) <= win + 1
            # and they are mixed: neighbours come from the same chunk about 1/win of the time, not always
            same = float(np.mean(chunk_of[1:] == chunk_of[:-1]))
            assert 0.1 < same < 0.45, (world, r, same)
    # with one chunk per window, each chunk's traces stay together
    order1 = epoch_order(n, seed=5, chunk_rows=cr, window=1)
    assert all(len(set((order1[i:i + cr] // cr).tolist())) == 1 for i in range(0, n, cr))


def test_chunk_order_spans_shards() -> None:
    # a rank's first window draws chunks from several shards, not one shard's chunks in a row
    for world in (1, 4):
        stream = rank_order(4096, rank=world - 1, world_size=world, seed=0, chunk_rows=64, rows_per_shard=512,
                            window=16)
        assert len(set((stream[:1024] // 512).tolist())) > 2


def _resume(n: int, bs: int, world_a: int, done: int, world_b: int, bs_b: int, drop_last: bool,
            **kw: Any) -> tuple[list[int], list[np.ndarray], tuple[Segment, ...]]:
    """Every rank of world_a takes `done` batches, the state is saved, world_b resumes: (the head, the rest's
    plans, the cursor)."""
    plans = _plans(n, world_a, batch_size=bs, drop_last=drop_last, **kw)
    done = min(done, len(plans[0]))
    head = _flat([b for p in plans for b in p[:done]]).tolist()
    cursor = advance_cursor((), world_a, drop_last, sum(len(b) for b in plans[0][:done]))
    rest = [_flat(plan_epoch(n, batch_size=bs_b, rank=r, world_size=world_b, drop_last=drop_last, cursor=cursor,
                             **kw)) for r in range(world_b)]
    return head, rest, cursor


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_resume_on_any_other_geometry_yields_exactly_the_rest(drop_last: bool, kind: str) -> None:
    for n_store, world_a, world_b, done, seed in itertools.product([1, 13, 61], [1, 2, 3], [1, 2, 4, 7], [0, 1, 3],
                                                                    [0, 9]):
        n, layout, ckw = _layout(kind, n_store, seed)
        kw = dict(seed=seed, epoch=1, window=2, layout=layout, **ckw)
        head, rest, cursor = _resume(n, 4, world_a, done, world_b, 3, drop_last, **kw)
        assert len({r.size for r in rest}) <= 1  # equal streams on every rank
        c_head = np.bincount(np.array(head, np.int64), minlength=n)
        c_rest = np.bincount(_flat(rest), minlength=n)
        # the head repeats a trace only where it took every rank's whole stream (the padding of world_a)
        assert int((c_head - 1).clip(0).sum()) <= (0 if len(head) < n else (-n) % world_a)
        assert traces_consumed(n, cursor) == int((c_head > 0).sum())
        if drop_last:
            assert c_rest.max(initial=0) <= 1 and not (c_rest[c_head > 0]).any()
        else:
            assert ((c_head + c_rest) >= 1).all(), "a remaining trace was skipped"
            left = n - int((c_head > 0).sum())
            if world_b != world_a or not head:  # a new segment: its repeats are its own traces
                assert not (c_rest[c_head > 0]).any(), "a consumed trace came back"
                assert int(c_rest.sum()) - left == ((-left) % world_b if left else 0)  # repeats: only the padding
            else:  # the same segment, continued: its padding repeats, as the run would have had them
                assert int(c_rest.sum()) - left == int((c_rest[c_head > 0]).sum()) <= (-n) % world_a


def test_resume_with_the_same_world_size_continues_the_same_batches() -> None:
    n, kw = 203, dict(seed=3, epoch=2, chunk_rows=5, rows_per_shard=20, window=3)
    for world, done in itertools.product([1, 2, 5], [1, 4, 9]):
        plans = _plans(n, world, batch_size=4, **kw)
        cursor = advance_cursor((), world, False, 4 * done)
        for r in range(world):
            again = plan_epoch(n, batch_size=4, rank=r, world_size=world, cursor=cursor, **kw)
            assert [b.tolist() for b in again] == [b.tolist() for b in plans[r][done:]]
            # another batch size: the same stream, cut again
            other = _flat(plan_epoch(n, batch_size=7, rank=r, world_size=world, cursor=cursor, **kw))
            assert sorted(other.tolist()) == sorted(_flat(plans[r][done:]).tolist())


def test_a_chain_of_resumes_still_yields_each_trace_once() -> None:
    n, kw = 257, dict(seed=1, epoch=0, chunk_rows=8, rows_per_shard=32, window=2)
    seen: list[int] = []
    cursor: tuple[Segment, ...] = ()
    for world, steps in [(4, 3), (3, 2), (7, 1), (4, 2), (2, 10**6)]:
        plans = _plans(n, world, batch_size=5, cursor=cursor, **kw)
        take = min(steps, len(plans[0]))
        seen += _flat([b for p in plans for b in p[:take]]).tolist()
        cursor = advance_cursor(cursor, world, False, sum(len(b) for b in plans[0][:take]))
    c = np.bincount(np.array(seen), minlength=n)
    assert c.min() >= 1  # every trace, the repeats only the padding of each geometry
    assert num_batches(n, batch_size=5, world_size=2, cursor=cursor) == 0
    assert len(cursor) == 5 and traces_consumed(n, cursor) == n


def test_a_cursor_that_does_not_fit_is_refused() -> None:
    with pytest.raises(ValueError, match=r"segment 0 .* consumed 40 traces, but a rank's share of the 61 traces left"):
        plan_epoch(61, batch_size=4, world_size=2, cursor=[Segment(2, False, 40)])
    with pytest.raises(ValueError, match="world_size < 1 or consumed < 0"):
        num_batches(61, batch_size=4, cursor=[Segment(0, False, 3)])
    assert advance_cursor([Segment(2, False, 0)], 3, False, 4) == (Segment(3, False, 4),)


def test_bad_arguments_name_the_fix() -> None:
    with pytest.raises(ValueError, match="rank=2 is out of range for world_size=2"):
        plan_epoch(10, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size=0"):
        plan_epoch(10, batch_size=0)
    with pytest.raises(ValueError, match="window=0"):
        plan_epoch(10, batch_size=2, window=0)
    with pytest.raises(ValueError, match="layout holds 4 traces, the epoch 10"):
        plan_epoch(10, batch_size=2, layout=view_layout(np.arange(4), chunk_starts(10, 2)))


def test_default_chunk_rows() -> None:
    assert sampler.default_chunk_rows(32 * 4096 * 2, 512) == 64
    assert sampler.default_chunk_rows(48, 4) == 4
    # an epoch has at least MIN_CHUNKS chunks, so that every rank's share mixes chunks from all over the store
    assert sampler.default_chunk_rows(32 * 4096 * 2, 512, n=1_000_000) == 64
    assert sampler.default_chunk_rows(32 * 4096 * 2, 512, n=5000) == 5000 // sampler.MIN_CHUNKS
    assert sampler.default_chunk_rows(48, None, n=100) == 1
    # the loader's floor for graph epochs on object stores wins over MIN_CHUNKS, never over a shard or CHUNK_BYTES
    assert sampler.default_chunk_rows(48, None, n=100, min_rows=12) == 12
    assert sampler.default_chunk_rows(48, 8, n=100, min_rows=12) == 8
    assert sampler.default_chunk_rows(sampler.CHUNK_BYTES // 2, None, n=100, min_rows=12) == 2
