"""Training off object storage with many ranks (issues 15 and 21): what the whole job fetches per epoch, how
well the order shuffles, and what the plan costs, at 1,000,000 traces (244 GiB of [32, 4096] float16) x up to
1,024 ranks x 8 workers. "Before" is tracestore 0.2's order (benchmarks/_sampler_v02.py, frozen), "after" the
order of today's loader.sampler, measured in the same run.

  job:       the bytes and GETs of ALL ranks together for one epoch, over the store's trace bytes, for
             R = 1, 2, 8, 64, 1,024. After: every rank's plan read through the loader's object-store path
             (loader/window.py's ChunkWindow over a ShardedArray, built as TraceLoader builds it) from a
             counting fake store -- shard index GETs, ranged GETs and their bytes; the fake serves regular
             shard indexes and zero bytes that are never touched, so a 244 GiB store costs nothing (its arrays
             have no inner crc32c: the real ones add 4 bytes per trace). Before: the 0.2 window fetched every
             chunk that a rank's batches touched, whole, once (one GET each; the table this benchmark printed
             then, through the 0.2 ChunkWindow: 8 ranks 8.00x, 64 ranks 28.13x, 1,024 ranks 28.95x), so it is
             counted here from the 0.2 plan of every rank: distinct chunks touched x their bytes.
  shuffle:   for R = 1, 8, 64, before and after (and a uniform permutation for reference), over a few ranks'
             streams: distinct chunks and shards per batch, Spearman |rho| between a trace's place in its
             rank's stream and its place in the store, the longest run of traces of one chunk in one stream.
  plan:      time and tracemalloc peak of one rank's plan at R = 1,024, after and before; a resume at
             R' = 999 from a state saved at 1,024 ranks (the cursor replays over all traces once).
  sweep:     every rank's plan, split over its workers (sampler.worker_batches): equal batch counts and sizes
             on every rank, and every trace exactly once per epoch plus the padding repeats (a bincount), for
             a whole epoch and for the resumed one.

Goals (issue 21): all ranks together <= 1.05x the store's trace bytes, in GETs of whole chunks (>= 8 MiB),
for R = 1 ... 1,024; batches that still mix many chunks; plan < 1 s per rank at 1M traces x 1,024 ranks.

    python benchmarks/bench_scale.py            # the full size above, ~7 minutes (5 of them the resumed sweep)
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

WHOLE_CHUNK = 8 * 2**20  # the "GETs of whole chunks (>= 8 MiB by default)"


def v02_stream(n: int, *, rank: int, world_size: int, batch_size: int, drop_last: bool = False,
               **kw: Any) -> np.ndarray:
    """One rank's traces in 0.2's order (before the sort within each batch): each step of world_size x
    batch_size traces of the one global order, padded, cut into one slice per rank."""
    order = sampler_v02.epoch_order(n, **kw)
    rest = sampler_v02.padded_remainder(order, 0, world_size, batch_size, drop_last)
    step = world_size * batch_size
    out = []
    for s0 in range(0, rest.size, step):
        g = rest[s0:s0 + step]
        b = g.size // world_size
        out.append(g[rank * b:(rank + 1) * b])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


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
        self.big_bytes = 0  # bytes in GETs of >= WHOLE_CHUNK
        self.smallest = 2**63
        self._lock = threading.Lock()
        self._zeros = np.zeros(0, np.uint8)  # what every ranged GET returns a view of
        self._index: dict[int, bytes] = {}
        for rows in {meta.rows_per_shard, meta.shape[0] % meta.rows_per_shard or meta.rows_per_shard}:
            idx = np.full((meta.chunks_per_shard, 2), np.iinfo(np.uint64).max, dtype="<u8")
            idx[:rows, 0] = np.arange(rows, dtype=np.uint64) * np.uint64(stride)
            idx[:rows, 1] = stride
            raw = idx.tobytes()
            self._index[rows] = raw + google_crc32c.value(raw).to_bytes(4, "little")

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.gets += 1
            self.bytes += nbytes
            self.big_bytes += nbytes if nbytes >= WHOLE_CHUNK else 0
            self.smallest = min(self.smallest, nbytes)

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


def rank_fetches(n: int, plan: list[np.ndarray], *, layers: int, hidden: int, rows_per_shard: int,
                 chunk_rows: int, batch_size: int, window: int) -> dict[str, int]:
    """One rank's epoch read through the loader's object-store window, from a fresh counting fake store (a
    rank is its own process: its own shard index cache)."""
    import torch

    from tracestore.loader.window import ChunkWindow

    meta = ShardedArrayMeta(path="sequences", shape=(n, layers, hidden), dtype=np.dtype("<f2"), fill_value=0,
                            shard_shape=(rows_per_shard, layers, hidden), inner_shape=(1, layers, hidden), axis=0,
                            inner_crc=False, index_at_end=True, separator="/")
    loc = CountingLocation(meta)
    arr = ShardedArray(loc, meta)
    # as TraceLoader._chunk_window builds it
    chunks = (1 + max(0, config.REMOTE_PREFETCH_WINDOWS)) * max(1, window)
    gap = -(-chunks * chunk_rows // batch_size) + 1
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
    used = sum(int(b.size) for b in plan)
    assert gather.rows == used, (gather.rows, used)
    return {"gets": loc.gets, "bytes": loc.bytes, "big": loc.big_bytes, "smallest": loc.smallest,
            "index": sum(loc.index_gets.values()), "index_max": max(loc.index_gets.values(), default=0)}


def job_row(n: int, world: int, kw: dict[str, Any], *, layers: int, hidden: int, sample: int) -> tuple[list[Any], bool]:
    """The whole job's fetches for one epoch at `world` ranks, after and before. Every rank is counted unless
    `sample` is smaller than world: then `sample` ranks spread evenly, scaled to all ranks."""
    row_bytes = layers * hidden * 2
    store = n * row_bytes
    rps, chunk_rows = kw["rows_per_shard"], kw["chunk_rows"]
    ranks = np.unique(np.linspace(0, world - 1, min(world, sample)).astype(int)).tolist()
    scale = world / len(ranks)
    t = time.perf_counter()
    after = collections.Counter()
    smallest, index_max = 2**63, 0
    for r in ranks:
        plan = sampler.plan_epoch(n, rank=r, world_size=world, **kw)
        c = rank_fetches(n, plan, layers=layers, hidden=hidden, rows_per_shard=rps, chunk_rows=chunk_rows,
                         batch_size=kw["batch_size"], window=kw["window"])
        after.update({k: c[k] for k in ("gets", "bytes", "big", "index")})
        smallest, index_max = min(smallest, c["smallest"]), max(index_max, c["index_max"])
    secs = time.perf_counter() - t
    # before: every chunk a rank's batches touched, whole, once per rank
    bounds = sampler_v02.chunk_starts(n, chunk_rows, rps)
    sizes = np.diff(bounds)
    before = collections.Counter()
    for r in ranks:
        plan = sampler_v02.plan_epoch(n, rank=r, world_size=world, **kw)
        touched = np.unique(np.searchsorted(bounds, np.concatenate(plan), side="right") - 1)
        before.update(gets=int(touched.size), bytes=int(sizes[touched].sum()) * row_bytes,
                      index=int(np.unique(bounds[touched] // rps).size))
    a_ratio, b_ratio = after["bytes"] * scale / store, before["bytes"] * scale / store
    counted = "all" if len(ranks) == world else f"{len(ranks)} (scaled x{scale:g})"
    row = [f"{world:,}", counted, f"{b_ratio:.2f}x", f"{a_ratio:.3f}x",
           f"{(before['gets'] + before['index']) * scale / n:.3f}", f"{(after['gets'] + after['index']) * scale / n:.4f}",
           f"{before['bytes'] / max(1, before['gets']) / 2**20:.2f} MiB",
           f"{after['bytes'] / max(1, after['gets']) / 2**20:.2f} MiB",
           f"{after['big'] / max(1, after['bytes']):.4f}", f"{smallest / 2**10:.0f} KiB",
           f"{after['index'] * scale:,.0f} (max {index_max} per shard and rank)", f"{secs:.1f} s"]
    return row, a_ratio <= 1.05


def _spearman(x: np.ndarray) -> float:
    """Spearman's rho between a stream's order (0, 1, 2, ...) and the store positions in it (no ties)."""
    if x.size < 2:
        return 0.0
    ranks = np.empty(x.size, np.float64)
    ranks[np.argsort(x, kind="stable")] = np.arange(x.size)
    return float(np.corrcoef(np.arange(x.size, dtype=np.float64), ranks)[0, 1])


def _longest_run(labels: np.ndarray) -> int:
    if labels.size == 0:
        return 0
    brk = np.flatnonzero(np.diff(labels)) + 1
    return int(np.diff(np.concatenate(([0], brk, [labels.size]))).max())


def stream_quality(stream: np.ndarray, batch_size: int, bounds: np.ndarray, rps: int) -> dict[str, float]:
    """Shuffle measures of one rank's stream (its traces in the order it reads them)."""
    chunk = np.searchsorted(bounds, stream, side="right") - 1
    shard = stream // rps
    full = stream.size // batch_size * batch_size
    cb = np.sort(chunk[:full].reshape(-1, batch_size), axis=1)
    sb = np.sort(shard[:full].reshape(-1, batch_size), axis=1)
    distinct = 1 + np.count_nonzero(np.diff(cb, axis=1), axis=1)
    shards = 1 + np.count_nonzero(np.diff(sb, axis=1), axis=1)
    return {"chunks": float(distinct.mean()), "chunks_min": float(distinct.min()), "shards": float(shards.mean()),
            "rho": abs(_spearman(stream)), "run": float(_longest_run(chunk))}


def shuffle_rows(n: int, worlds: list[int], kw: dict[str, Any], ranks_per_world: int) -> list[list[Any]]:
    bounds = sampler.chunk_starts(n, kw["chunk_rows"], kw["rows_per_shard"])
    order_kw = {k: kw[k] for k in ("seed", "epoch", "chunk_rows", "rows_per_shard", "window")}
    bs, rps = kw["batch_size"], kw["rows_per_shard"]
    rows = []
    for world in worlds:
        ranks = np.unique(np.linspace(0, world - 1, min(world, ranks_per_world)).astype(int)).tolist()
        streams = {
            "0.2: one global order, each rank a slice of every step (before)":
                [v02_stream(n, rank=r, world_size=world, batch_size=bs, **order_kw) for r in ranks],
            "now: each rank its portion of the chunk order, shuffled in windows":
                [sampler.rank_order(n, rank=r, world_size=world, **order_kw) for r in ranks],
        }
        perm = np.random.default_rng(7).permutation(n)
        streams["uniform permutation, each rank a slice (reference)"] = [
            perm[r * (n // world):(r + 1) * (n // world)] for r in ranks]
        for name, ss in streams.items():
            q = [stream_quality(s, bs, bounds, rps) for s in ss]
            rows.append([world, name, f"{np.mean([x['chunks'] for x in q]):.1f} (min {min(x['chunks_min'] for x in q):.0f})",
                         f"{np.mean([x['shards'] for x in q]):.1f}", f"{max(x['rho'] for x in q):.4f}",
                         f"{max(x['run'] for x in q):.0f}"])
    return rows


def sweep(n: int, world: int, workers: int, kw: dict[str, Any], cursor: tuple[sampler.Segment, ...] = ()) -> tuple[str, float]:
    t = time.perf_counter()
    seen: list[np.ndarray] = []  # every batch of every (rank, worker): one bincount at the end
    nb, sizes = None, None
    ok = True
    for r in range(world):
        plan = sampler.plan_epoch(n, rank=r, world_size=world, cursor=cursor, **kw)
        s = np.array([b.size for b in plan])
        if nb is None:
            nb, sizes = len(plan), s
        ok &= len(plan) == nb and np.array_equal(s, sizes)
        parts = [sampler.worker_batches(plan, w, workers) for w in range(max(1, workers))]
        ok &= sum(len(p) for p in parts) == len(plan)
        seen += [b for p in parts for b in p]
    counts = np.bincount(np.concatenate([*seen, np.zeros(0, np.int64)]), minlength=n)
    left = n - sampler.traces_consumed(n, cursor)
    pad = (-left) % world
    if cursor:  # the traces the state's ranks consumed (a cursor of one segment here)
        order = sampler.EpochOrder(sampler.store_layout(n, kw["chunk_rows"], kw["rows_per_shard"]), seed=kw["seed"],
                                   epoch=kw["epoch"], window=kw["window"])
        consumed = order.traces(order.consumed(None, 0, cursor[0]))
        ok &= not counts[consumed].any()  # nothing consumed is read again
        counts[consumed] = 1
    ok &= bool(counts.min(initial=1) >= 1) and int((counts - 1).sum()) == pad
    ok &= nb == sampler.num_batches(n, batch_size=kw["batch_size"], world_size=world, cursor=cursor)
    what = "the rest of the epoch, each trace not consumed once" if cursor else "every trace once"
    verdict = (f"{'yes' if ok else 'FAILED'}: {world} ranks x {workers} workers, {nb} batches on every rank, "
               f"{what} plus {pad} padding repeats")
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
    p.add_argument("--timed-ranks", type=int, default=8, help="ranks whose plan is timed")
    p.add_argument("--job-ranks", type=int, default=1024, help="ranks counted per job row (more: sampled, scaled)")
    args = p.parse_args(argv)
    if args.smoke:
        args.traces, args.ranks, args.workers, args.batch_size, args.timed_ranks = 20_000, 16, 2, 8, 3
    n, world = args.traces, args.ranks
    row = args.layers * args.hidden * 2
    chunk_rows = sampler.default_chunk_rows(row, args.rows_per_shard, n)
    window = sampler.WINDOW_CHUNKS
    kw: dict[str, Any] = dict(batch_size=args.batch_size, seed=1234, epoch=3, chunk_rows=chunk_rows,
                              rows_per_shard=args.rows_per_shard, window=window)
    lines = [f"{n:,} traces of [{args.layers}, {args.hidden}] float16 ({n * row / 2**30:.0f} GiB), "
             f"{args.rows_per_shard} per shard ({args.rows_per_shard * row / 2**20:.0f} MiB), shuffle chunks of "
             f"{chunk_rows} traces ({chunk_rows * row / 2**20:.0f} MiB), windows of {window} chunks, batch size "
             f"{args.batch_size}, up to {world} ranks x {args.workers} workers.", ""]
    ok = True

    # -- the whole job's fetches -----------------------------------------------------------------------
    worlds = sorted({1, 2, 8, 64, world}) if not args.smoke else sorted({1, 2, world})
    job = []
    for w in worlds:
        r, good = job_row(n, w, kw, layers=args.layers, hidden=args.hidden, sample=args.job_ranks)
        job.append(r)
        ok &= good
    lines += ["## What all ranks together fetch in one epoch (counting fake store)", "", markdown_table(
        ["ranks", "ranks counted", "bytes / store: before", "after (goal <= 1.05x)", "GETs per trace: before",
         "after", "bytes per GET: before", "after", "share of bytes in GETs >= 8 MiB", "smallest GET",
         "shard index GETs (after)", "time (after)"], job), ""]

    # -- shuffle quality -------------------------------------------------------------------------------
    qworlds = [w for w in (1, 8, 64) if w <= world] if not args.smoke else [1, 4]
    lines += ["## Shuffle quality", "", markdown_table(
        ["ranks", "order", "distinct chunks per batch (of a batch's "
         f"{args.batch_size})", "distinct shards per batch", "Spearman |rho|, stream vs store (max over ranks)",
         "longest run of one chunk's traces in a stream"],
        shuffle_rows(n, qworlds, kw, ranks_per_world=3)), ""]

    # -- plan time and memory per rank -----------------------------------------------------------------
    ranks = sorted({0, world - 1, *np.linspace(0, world - 1, args.timed_ranks).astype(int).tolist()})
    sampler.plan_epoch(1000, world_size=4, **kw)  # warm numpy's lazy imports outside the measurements
    sampler_v02.plan_epoch(1000, world_size=4, **kw)
    new_t, old_t, new_m, old_m = [], [], [], []
    for r in ranks:
        _, ta, ma = measure(lambda r=r: sampler.plan_epoch(n, rank=r, world_size=world, **kw))
        _, tb, mb = measure(lambda r=r: sampler_v02.plan_epoch(n, rank=r, world_size=world, **kw))
        new_t.append(ta)
        old_t.append(tb)
        new_m.append(ma)
        old_m.append(mb)
    # a state saved at `world` ranks after 10 batches, resumed on world - world // 40 ranks (1,024 -> 1,000)
    resumed_world = max(1, world - max(1, world // 40))
    cursor = (sampler.Segment(world, False, min(-(-n // world), 10 * args.batch_size)),)
    res_t, res_m = [], []
    for r in ranks[:3]:
        r = min(r, resumed_world - 1)
        _, tr, mr = measure(lambda r=r: sampler.plan_epoch(n, rank=r, world_size=resumed_world, cursor=cursor, **kw))
        res_t.append(tr)
        res_m.append(mr)
    small = min(n, 20_000)
    same = all(np.array_equal(a, b) for a, b in zip(sampler.plan_epoch(small, **kw), sampler_v02.plan_epoch(small, **kw),
                                                     strict=True))
    per_rank = -(-n // world)
    nt, ot = float(np.median(new_t)), float(np.median(old_t))
    rows = [
        [f"plan time per rank at {world:,} ranks (p50 / max)", f"{nt * 1e3:.1f} / {max(new_t) * 1e3:.1f} ms",
         f"{ot * 1e3:.1f} / {max(old_t) * 1e3:.1f} ms", "< 1 s"],
        ["peak memory per rank (tracemalloc, max)", f"{max(new_m) / 2**20:.2f} MiB", f"{max(old_m) / 2**20:.2f} MiB",
         f"O(traces per rank + chunks): {per_rank:,} traces"],
        [f"resumed plan: a state saved at {world:,} ranks after {cursor[0].consumed} traces each, planned at "
         f"{resumed_world:,} ranks (max)", f"{max(res_t) * 1e3:.0f} ms, {max(res_m) / 2**20:.1f} MiB",
         "(0.2: the same world size only)", "< 1 s"],
        ["one rank: the same batches as 0.2", "yes" if same else "NO", "", "identical"],
    ]
    ok &= same and max(new_t) < 1 and max(res_t) < 1
    lines += ["## The plan of one rank", "", markdown_table(["", "after", "before (0.2)", "goal"], rows), ""]

    # -- the sweep -------------------------------------------------------------------------------------
    sweeps = []
    for label, w, cur in (("a whole epoch", world, ()), (f"resumed at {resumed_world:,} ranks", resumed_world, cursor)):
        verdict, secs = sweep(n, w, args.workers, kw, cur)
        ok &= not verdict.startswith("FAILED")
        sweeps.append([label, verdict, f"{secs:.1f} s for all ranks"])
    lines += ["## The sweep", "", markdown_table(["equal batches per rank", "result", "time"], sweeps), ""]

    body = "\n".join(lines)
    print(body)
    write_result(args.out, "Training off object storage with many ranks (issues 15 and 21)", body, script=__file__,
                 argv=argv)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
