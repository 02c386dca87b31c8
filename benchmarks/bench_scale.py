"""The read side at scale (issue 15, section 3): the epoch plan at 1,000,000 traces (244 GiB of [32, 4096]
float16) x 1,024 ranks x 8 workers, and the object-storage requests one rank makes for it.

  plan:      time and tracemalloc peak of one rank's plan (sampler.plan_epoch: the chunk order and only the
             shuffle windows that hold the rank's traces) against the plan cut from the whole epoch order
             (sampler.epoch_order, what plan_epoch did before issue 15), on the same ranks in the same run;
             both give the same batches (checked here on every rank timed)
  sweep:     every rank's plan, split over its workers (sampler.worker_batches): equal batch counts and sizes
             on every rank, and every trace exactly once per epoch plus the padding repeats (a bincount)
  GETs:      one rank's epoch read through the loader's object-store path (loader/window.py's ChunkWindow over
             a ShardedArray) from a counting fake store: shard index GETs (read_suffix, per shard), ranged
             GETs (read_span / read_range / read_ranges) and their bytes. The fake serves regular shard indexes
             and zero bytes that are never touched, so a 244 GiB store costs nothing; its arrays have no inner
             crc32c (the real ones add 4 bytes per trace to each GET). For comparison, the batch-by-batch ranged
             reads (store.ranged.take_ranged, the path of views and the loader before issue 12), counting one
             GET per run of ranges less than 1 MiB apart (obstore's coalescing).

Goals: plan < 1 s per rank, plan memory O(traces per rank); shard indexes once per shard per process; reads
>= 8 MiB where the shuffle allows.

    python benchmarks/bench_scale.py            # the full size above, about a minute
    python benchmarks/bench_scale.py --smoke    # tiny, seconds
"""

from __future__ import annotations

import collections
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _sampler_v02 as sampler_v02  # noqa: E402
from _common import base_parser, markdown_table, write_result  # noqa: E402
from tracestore import config  # noqa: E402
from tracestore.loader import sampler  # noqa: E402
from tracestore.store.shards import ShardedArray, ShardedArrayMeta  # noqa: E402
from tracestore.store.urls import Location  # noqa: E402

COALESCE = 2**20  # obstore (object_store) merges ranges less than 1 MiB apart into one GET


def whole_order_plan(n: int, *, batch_size: int, rank: int, world_size: int, drop_last: bool = False,
                     start: int = 0, **kw: Any) -> list[np.ndarray]:
    """The plan as plan_epoch cut it before issue 15: the whole epoch order, padded, sliced step by step (the
    "before" of this benchmark, and the reference tests/test_sampler_scale.py checks plan_epoch against)."""
    order = sampler_v02.epoch_order(n, **kw)
    rest = sampler_v02.padded_remainder(order, start, world_size, batch_size, drop_last)
    step = world_size * batch_size
    out = []
    for s0 in range(0, rest.size, step):
        g = rest[s0:s0 + step]
        b = g.size // world_size
        out.append(np.sort(g[rank * b:(rank + 1) * b]))
    return out


def measure(fn: Any) -> tuple[Any, float, int]:
    """(result, seconds, tracemalloc peak bytes); timed in a second, untraced call."""
    tracemalloc.start()
    try:
        fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    t = time.perf_counter()
    got = fn()
    return got, time.perf_counter() - t, peak


class CountingLocation(Location):
    """A fake object store holding one sharded array: regular shard indexes, zero bytes; counts requests."""

    is_remote = True

    def __init__(self, meta: ShardedArrayMeta) -> None:
        import google_crc32c

        self.url = "counting://scale"
        self.meta = meta
        stride = meta.chunk_nbytes
        self.index_gets: collections.Counter[str] = collections.Counter()
        self.gets = 0
        self.bytes = 0
        self._lock = threading.Lock()
        self._zeros = np.zeros(0, np.uint8)  # what every ranged GET returns a view of
        self._index: dict[int, bytes] = {}
        for rows in {meta.rows_per_shard, meta.shape[0] % meta.rows_per_shard or meta.rows_per_shard}:
            idx = np.full((meta.chunks_per_shard, 2), np.iinfo(np.uint64).max, dtype="<u8")
            idx[:rows, 0] = np.arange(rows, dtype=np.uint64) * np.uint64(stride)
            idx[:rows, 1] = stride
            raw = idx.tobytes()
            self._index[rows] = raw + google_crc32c.value(raw).to_bytes(4, "little")

    def _count(self, nbytes: int, gets: int = 1) -> None:
        with self._lock:
            self.gets += gets
            self.bytes += nbytes

    def read_suffix(self, key: str, length: int) -> bytes | None:
        shard = int(key.rsplit("/", 3)[-3])
        m = self.meta
        rows = min(m.rows_per_shard, m.shape[0] - shard * m.rows_per_shard)
        with self._lock:
            self.index_gets[key] += 1
        return self._index[rows][-length:]

    def read_span(self, key: str, start: int, length: int) -> np.ndarray:
        self._count(length)
        with self._lock:
            if self._zeros.size < length:  # calloc: its pages are never touched, so never really allocated
                self._zeros = np.zeros(length, np.uint8)
            return self._zeros[:length]

    def read_range(self, key: str, start: int, length: int) -> bytes:
        self._count(length)
        return bytes(length)

    def read_ranges(self, key: str, starts: list[int], lengths: list[int]) -> list[bytes]:
        s = np.asarray(starts, np.int64)
        e = s + np.asarray(lengths, np.int64)
        o = np.argsort(s)
        runs = 1 + int(np.count_nonzero(s[o][1:] - np.maximum.accumulate(e[o])[:-1] > COALESCE)) if s.size else 0
        self._count(int(e.sum() - s.sum()), runs)
        return [bytes(int(n)) for n in lengths]

    def map_parallel(self, fn: Any, items: list[Any]) -> list[Any]:
        return [fn(i) for i in items]


class _FakeSource:
    """Stands in for the loader's TraceSource over one sharded array (a store of sequences only)."""

    def __init__(self, arr: ShardedArray, gather: Any) -> None:
        import types

        self.store = types.SimpleNamespace(_seq=types.SimpleNamespace(direct=arr, parts=None))
        self.seq = gather
        self.graph_layers = None

    def store_rows(self, positions: np.ndarray) -> np.ndarray:
        return positions


class _NoCopy:
    """Stands in for the loader's RowGatherer: counts the rows it would copy."""

    def __init__(self) -> None:
        self.rows = 0

    def copy_rows(self, src: Any, local: np.ndarray, pos: np.ndarray, out: Any) -> None:
        self.rows += int(len(local))


def count_gets(n: int, plan: list[np.ndarray], *, layers: int, hidden: int, rows_per_shard: int, chunk_rows: int,
               batch_size: int, world_size: int, window: int, windowed: bool) -> dict[str, float]:
    import torch

    from tracestore.loader.window import ChunkWindow
    from tracestore.store.ranged import take_ranged

    meta = ShardedArrayMeta(path="tokens/hidden", shape=(n, layers, hidden), dtype=np.dtype("<f2"), fill_value=0,
                            shard_shape=(rows_per_shard, layers, hidden), inner_shape=(1, layers, hidden), axis=0,
                            inner_crc=False, index_at_end=True, separator="/")
    loc = CountingLocation(meta)
    arr = ShardedArray(loc, meta)
    used = sum(int(b.size) for b in plan)
    if windowed:  # as TraceLoader._chunk_window builds it
        chunks = (1 + max(0, config.REMOTE_PREFETCH_WINDOWS)) * max(1, window)
        gap = -(-chunks * chunk_rows // (batch_size * world_size)) + 1
        bounds = sampler.chunk_starts(n, chunk_rows, rows_per_shard)
        gather = _NoCopy()
        win = ChunkWindow(_FakeSource(arr, gather), plan, bounds, max_chunks=chunks,  # type: ignore[arg-type]
                          concurrency=config.REMOTE_FETCH_CONCURRENCY, gap=gap)
        out = torch.empty(0)
        try:
            for k, pos in enumerate(plan):
                win.read(k, pos, out)
        finally:
            win.close()
        assert gather.rows == used, (gather.rows, used)
    else:
        out16 = np.empty((batch_size, 1, 1), np.float16)
        for pos in plan:
            take_ranged(arr, pos, out16[:pos.size], (slice(0, 1), slice(0, 1)))
    idx = loc.index_gets
    shards = len(idx)
    trace_bytes = layers * hidden * 2
    return {"traces": used, "shards": shards, "index_gets": sum(idx.values()), "index_max": max(idx.values(), default=0),
            "gets": loc.gets, "bytes": loc.bytes, "per_trace": (loc.gets + sum(idx.values())) / max(1, used),
            "per_get": loc.bytes / max(1, loc.gets), "amplification": loc.bytes / max(1, used * trace_bytes)}


def sweep(n: int, world: int, workers: int, kw: dict[str, Any]) -> tuple[str, float]:
    t = time.perf_counter()
    seen: list[np.ndarray] = []  # every batch of every (rank, worker): one bincount at the end
    nb, sizes = None, None
    ok = True
    for r in range(world):
        plan = sampler.plan_epoch(n, rank=r, world_size=world, **kw)
        s = np.array([b.size for b in plan])
        if nb is None:
            nb, sizes = len(plan), s
        ok &= len(plan) == nb and np.array_equal(s, sizes)
        parts = [sampler.worker_batches(plan, w, workers) for w in range(max(1, workers))]
        ok &= sum(len(p) for p in parts) == len(plan)
        seen += [b for p in parts for b in p]
    counts = np.bincount(np.concatenate([*seen, np.zeros(0, np.int64)]), minlength=n)
    pad = (-n) % world
    ok &= bool(counts.min(initial=1) >= 1) and int((counts - 1).sum()) == pad
    ok &= nb == sampler.num_batches(n, batch_size=kw["batch_size"], world_size=world)
    verdict = (f"{'yes' if ok else 'FAILED'}: {world} ranks x {workers} workers, {nb} batches on every rank, "
               f"every trace once plus {pad} padding repeats")
    return verdict, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--traces", type=int, default=1_000_000)
    p.add_argument("--ranks", type=int, default=1024)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--rows-per-shard", type=int, default=512, help="traces per 128 MiB shard of [32, 4096] float16")
    p.add_argument("--timed-ranks", type=int, default=8, help="ranks timed against the whole-order plan")
    args = p.parse_args(argv)
    if args.smoke:
        args.traces, args.ranks, args.workers, args.batch_size, args.timed_ranks = 20_000, 16, 2, 8, 3
    n, world = args.traces, args.ranks
    row = args.layers * args.hidden * 2
    chunk_rows = sampler.default_chunk_rows(row, args.rows_per_shard)
    window = sampler.WINDOW_CHUNKS
    kw: dict[str, Any] = dict(batch_size=args.batch_size, seed=1234, epoch=3, chunk_rows=chunk_rows,
                              rows_per_shard=args.rows_per_shard, window=window)
    lines = [f"{n:,} traces of [{args.layers}, {args.hidden}] float16 ({n * row / 2**30:.0f} GiB), "
             f"{args.rows_per_shard} per shard ({args.rows_per_shard * row / 2**20:.0f} MiB), shuffle chunks of "
             f"{chunk_rows} traces ({chunk_rows * row / 2**20:.0f} MiB), windows of {window} chunks, batch size "
             f"{args.batch_size}, {world} ranks x {args.workers} workers.", ""]

    # -- plan time and memory per rank -----------------------------------------------------------------
    ranks = sorted({0, world - 1, *np.linspace(0, world - 1, args.timed_ranks).astype(int).tolist()})
    sampler.plan_epoch(1000, world_size=4, **kw)  # warm numpy's lazy imports outside the measurements
    whole_order_plan(1000, rank=0, world_size=4, **kw)
    new_t, old_t, new_m, old_m = [], [], [], []
    same = True
    for r in ranks:
        a, ta, ma = measure(lambda r=r: sampler.plan_epoch(n, rank=r, world_size=world, **kw))
        b, tb, mb = measure(lambda r=r: whole_order_plan(n, rank=r, world_size=world, **kw))
        same &= len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        new_t.append(ta)
        old_t.append(tb)
        new_m.append(ma)
        old_m.append(mb)
    per_rank = -(-n // world)
    nt, ot = float(np.median(new_t)), float(np.median(old_t))
    rows = [
        ["plan time per rank (p50 / max)", f"{nt * 1e3:.1f} / {max(new_t) * 1e3:.1f} ms",
         f"{ot * 1e3:.1f} / {max(old_t) * 1e3:.1f} ms", f"{ot / nt:.0f}x faster", "< 1 s"],
        ["peak memory per rank (tracemalloc, max)", f"{max(new_m) / 2**20:.2f} MiB", f"{max(old_m) / 2**20:.1f} MiB",
         f"{max(old_m) / max(new_m):.0f}x less",
         f"O(traces per rank): {per_rank:,} traces = {per_rank * 8 / 2**20:.3f} MiB of int64"],
        ["same batches as the 0.2 plan", "yes" if same else "no: ranks own chunks now (issue 21)", "", f"{len(ranks)} ranks", ""],
    ]
    lines += ["## The plan of one rank", "", markdown_table(
        ["", "plan_epoch (chunk order + the rank's windows)", "whole epoch order (before)", "ratio", "goal"], rows), ""]

    # -- the sweep -------------------------------------------------------------------------------------
    verdict, secs = sweep(n, world, args.workers, kw)
    lines += ["## The sweep", "", markdown_table(["check", "result", "time"],
                                                  [["equal batches per rank, every trace exactly once per epoch",
                                                    verdict, f"{secs:.1f} s for all ranks"]]), ""]

    # -- GETs of one rank ------------------------------------------------------------------------------
    get_rows = []
    worlds = sorted({1, 8, 64, world} if not args.smoke else {1, world})
    for w in worlds:
        for windowed in (True, False):
            if not windowed and -(-n // w) > 20_000:
                continue  # batch by batch, a rank of this many traces takes minutes here (and is not the path)
            plan = sampler.plan_epoch(n, rank=w // 2, world_size=w, **kw)
            c = count_gets(n, plan, layers=args.layers, hidden=args.hidden, rows_per_shard=args.rows_per_shard,
                           chunk_rows=chunk_rows, batch_size=args.batch_size, world_size=w, window=window,
                           windowed=windowed)
            get_rows.append([
                w, "whole chunks (loader)" if windowed else "batch by batch (ranged)", f"{c['traces']:,}",
                f"{c['index_gets']:,} for {c['shards']:,} shards (max {c['index_max']} per shard)", f"{c['gets']:,}",
                f"{c['per_trace']:.3f}", f"{c['per_get'] / 2**20:.2f} MiB", f"{c['amplification']:.2f}x"])
    lines += ["## Object-store requests of one rank per epoch (counting fake store)", "", markdown_table(
        ["ranks", "read path", "traces of the rank", "shard index GETs", "ranged GETs", "GETs per trace",
         "bytes per GET", "bytes read / bytes used"], get_rows), ""]

    body = "\n".join(lines)
    print(body)
    write_result(args.out, "The read side at scale (issue 15, section 3)", body, script=__file__, argv=argv)
    return 0 if not verdict.startswith("FAILED") else 1


if __name__ == "__main__":
    raise SystemExit(main())
