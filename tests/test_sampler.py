"""The epoch plan (tracestore.loader.sampler): a pure function, checked by sweeping ranks x workers x batch sizes
x seeds for the exactly-once rule, equal batch counts per rank, determinism and resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tracestore.loader import sampler
from tracestore.loader.sampler import (
    chunk_starts,
    cursor_after,
    epoch_order,
    num_batches,
    plan_epoch,
    worker_batches,
)


def _plans(n: int, world: int, **kw: object) -> list[list[np.ndarray]]:
    return [plan_epoch(n, rank=r, world_size=world, **kw) for r in range(world)]  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, 1, 7, 53])
@pytest.mark.parametrize("drop_last", [False, True])
def test_sweep_every_trace_once_per_epoch(n: int, drop_last: bool) -> None:
    for world, workers, bs, seed in itertools.product([1, 2, 3, 4], [0, 1, 3], [1, 3, 8], [0, 1]):
        kw = dict(batch_size=bs, seed=seed, epoch=seed, drop_last=drop_last, chunk_rows=4, rows_per_shard=10,
                  window=3)
        plans = _plans(n, world, **kw)
        # every rank gets the same number of batches, and batch k has the same size on every rank (DDP)
        counts = {len(p) for p in plans}
        assert counts == {num_batches(n, batch_size=bs, world_size=world, drop_last=drop_last)}, (world, bs)
        for k in range(len(plans[0])):
            assert len({len(p[k]) for p in plans}) == 1
        # the workers of a rank partition its batches, whatever their number
        for p in plans:
            nw = max(1, workers)
            parts = [worker_batches(p, w, workers) for w in range(nw)]
            assert sum(len(x) for x in parts) == len(p)
            got = sorted(int(i) for part in parts for b in part for i in b)
            assert got == sorted(int(i) for b in p for i in b)
        seen = np.concatenate([b for p in plans for b in p] + [np.zeros(0, np.int64)])
        c = np.bincount(seen, minlength=n)
        if drop_last:
            assert c.max(initial=0) <= 1
            assert seen.size == (n // world) // bs * bs * world
            assert all(len(b) == bs for p in plans for b in p)
        else:
            pad = (-n) % world
            assert c.min(initial=1) >= 1, "a trace was skipped"
            assert int((c - 1).sum()) == pad, "more repeats than the padding rule allows"
            order = epoch_order(n, seed=seed, epoch=seed, chunk_rows=4, rows_per_shard=10, window=3)
            repeated = np.repeat(np.arange(n), c - 1)
            assert sorted(repeated.tolist()) == sorted(order[np.arange(pad) % max(n, 1)].tolist())


def test_batches_are_sorted_and_in_range() -> None:
    for b in plan_epoch(100, batch_size=7, seed=3, chunk_rows=5, window=2):
        assert (np.diff(b) > 0).all()
        assert b.min() >= 0 and b.max() < 100


def test_deterministic_in_seed_and_epoch() -> None:
    a = epoch_order(500, seed=1, epoch=2, chunk_rows=8, rows_per_shard=64)
    assert np.array_equal(a, epoch_order(500, seed=1, epoch=2, chunk_rows=8, rows_per_shard=64))
    assert not np.array_equal(a, epoch_order(500, seed=1, epoch=3, chunk_rows=8, rows_per_shard=64))
    assert not np.array_equal(a, epoch_order(500, seed=2, epoch=2, chunk_rows=8, rows_per_shard=64))
    assert sorted(a.tolist()) == list(range(500))


def test_no_shuffle_is_the_store_order() -> None:
    assert np.array_equal(epoch_order(10, shuffle=False), np.arange(10))
    batches = plan_epoch(10, batch_size=4, shuffle=False)
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # two ranks, sequential: step s gives rank 0 the first half and rank 1 the second
    assert [b.tolist() for b in plan_epoch(10, batch_size=2, shuffle=False, rank=1, world_size=2)] == [
        [2, 3], [6, 7], [9]]


def test_chunks_never_cross_shards() -> None:
    s = chunk_starts(23, 4, rows_per_shard=10)
    assert s.tolist() == [0, 4, 8, 10, 14, 18, 20, 23]
    assert chunk_starts(9, 4).tolist() == [0, 4, 8, 9]
    with pytest.raises(ValueError, match="chunk_rows=0"):
        chunk_starts(5, 0)


def test_window_mixes_exactly_its_chunks() -> None:
    n, cr, win = 240, 6, 4
    order = epoch_order(n, seed=5, chunk_rows=cr, window=win)
    chunk_of = order // cr
    for w0 in range(0, n, cr * win):
        chunks = set(chunk_of[w0:w0 + cr * win].tolist())
        assert len(chunks) == win  # a window holds whole chunks, `win` of them
    # and they are mixed: neighbours come from the same chunk about 1/win of the time, not always
    same = float(np.mean(chunk_of[1:] == chunk_of[:-1]))
    assert 0.1 < same < 0.45
    # with one chunk per window, each chunk's traces stay together
    order1 = epoch_order(n, seed=5, chunk_rows=cr, window=1)
    assert all(len(set((order1[i:i + cr] // cr).tolist())) == 1 for i in range(0, n, cr))


def test_chunk_order_spans_shards() -> None:
    # the first window draws chunks from several shards, not one shard's chunks in a row
    order = epoch_order(4096, seed=0, chunk_rows=64, rows_per_shard=512, window=16)
    assert len(set((order[:1024] // 512).tolist())) > 2


@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_on_another_world_size_yields_exactly_the_rest(drop_last: bool) -> None:
    n, bs = 61, 4
    kw = dict(batch_size=bs, seed=9, epoch=1, chunk_rows=5, window=2, drop_last=drop_last)
    order = epoch_order(n, seed=9, epoch=1, chunk_rows=5, window=2)
    for world_a, world_b, done in itertools.product([1, 2, 3], [1, 2, 4], [0, 1, 3]):
        first = [b for p in _plans(n, world_a, **kw) for b in p[:done]]
        cur = cursor_after(n, start=0, batches_done=done, batch_size=bs, world_size=world_a)
        assert sorted(np.concatenate(first).tolist() if first else []) == sorted(order[:cur].tolist())
        rest = np.concatenate([b for p in _plans(n, world_b, start=cur, **kw) for b in p] + [np.zeros(0, np.int64)])
        c = np.bincount(rest, minlength=n)
        if drop_last:
            assert c.max() <= 1 and c[order[:cur]].sum() == 0
        else:
            assert (c[order[cur:]] >= 1).all(), "a remaining trace was skipped"
            assert int(c.sum()) - (n - cur) == (-(n - cur)) % world_b  # repeats: only the padding


def test_bad_arguments_name_the_fix() -> None:
    with pytest.raises(ValueError, match="rank=2 is out of range for world_size=2"):
        plan_epoch(10, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size=0"):
        plan_epoch(10, batch_size=0)
    with pytest.raises(ValueError, match="resume cursor"):
        plan_epoch(10, batch_size=2, start=11)


def test_default_chunk_rows() -> None:
    assert sampler.default_chunk_rows(32 * 4096 * 2, 512) == 64
    assert sampler.default_chunk_rows(48, 4) == 4
