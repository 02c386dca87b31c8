"""A store made of parts against the same data in one part: every read path, parts / one in the same run.

The same N traces of [L, D] float16 are written twice: (a) as one store, (b) as a store of 4 parts of unequal
sizes (30/21/26/23 %, so that the part boundaries fall inside the one store's shards and each part ends in a
partial shard), each part a plain store at `part_url(dest, k)` committed with `commit_parts(dest)`. Both are
checked to read bit-identical values (and the .npy the streaming reference reads), then each case is timed on
both stores interleaved call by call (`time_interleaved`): the ratio is time on 4 parts / time on one part.

Cases (warm page cache; each call picks new random traces from a fixed seed, the same on both stores):
`store[i].sequence`; `store.sequences[idx]` of 64 random traces, sorted and unsorted; `read_sequences(rows,
out=buf)` into a reused buffer, sorted and unsorted; `store.layer(l)`; `store.select(1000 random ids)
.sequences[:]`; `to_xarray().sequences.isel(trace=64 random).values`; `tracestore.open`; and one TraceLoader
epoch (shuffle=True, float32 on the CPU, 0 workers and 2 worker processes) in traces/s, beside the np.memmap
gather + cast of bench_stream.py (ref A) in GiB/s.

Goal (issue 15): parts / one <= 1.10x for every case but open (reported: it opens every part, so it grows with
their number).

    .venv/bin/python benchmarks/bench_parts.py --out benchmarks/results/parts.md   # 4096 x [32, 4096] = 1 GiB x 2
    .venv/bin/python benchmarks/bench_parts.py --smoke                             # seconds
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    base_parser,
    fast_float16_blocks,
    fmt_time,
    markdown_table,
    scratch_dir,
    time_interleaved,
    write_result,
)

TARGET = 1.10
FRACTIONS = (0.30, 0.21, 0.26, 0.23)
BLOCK = 256  # traces per append and per block of the bit-identity check


def part_bounds(n: int, fractions: tuple[float, ...] = FRACTIONS) -> list[int]:
    """Row offsets [P + 1] of the parts: part k holds traces bounds[k]:bounds[k + 1]."""
    cuts = np.round(np.cumsum(fractions)[:-1] * n).astype(np.int64).tolist()
    return [0, *cuts, n]


# -- the data ---------------------------------------------------------------------------------------------
def _ids(a: int, b: int) -> list[str]:
    return [f"t{i}" for i in range(a, b)]


def _scores(a: int, b: int) -> np.ndarray:
    return (np.arange(a, b, dtype=np.float32) % 97) / 97


def _ready(one: Path, parted: Path, npy: Path, n: int, L: int, D: int, bounds: list[int]) -> bool:
    """Whether a kept data folder already holds this run's data (same shape, same parts)."""
    import tracestore

    if not all((p / "zarr.json").exists() for p in (one, parted)) or not npy.exists():
        return False
    try:
        with tracestore.open(str(one)) as a, tracestore.open(str(parted)) as b:
            same = all((len(s), s.num_layers, s.hidden_size) == (n, L, D) for s in (a, b))
            sizes = [len(p) for p in (b._parts or [])]
        return (same and a.num_parts == 1 and sizes == np.diff(bounds).tolist()
                and np.load(npy, mmap_mode="r").shape == (n, L, D))
    except Exception:  # noqa: BLE001 - anything unreadable: build it again
        return False


def build(tmp: Path, n: int, L: int, D: int, bounds: list[int], shard_bytes: int | None) -> tuple[str, str, str]:
    """(one store, store of parts, .npy) holding the same traces; reused when a kept folder has them."""
    import tracestore
    from tracestore.store.parts import commit_parts, part_url

    one, parted, npy = tmp / "one.zarr", tmp / "parts.zarr", tmp / "source.npy"
    if _ready(one, parted, npy, n, L, D, bounds):
        return str(one), str(parted), str(npy)
    shutil.rmtree(parted, ignore_errors=True)
    mm = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float16, shape=(n, L, D))
    with tracestore.create(str(one), num_layers=L, hidden_size=D, shard_bytes=shard_bytes, overwrite=True) as w:
        for a, blk in fast_float16_blocks(n, L, D, block=BLOCK):
            b = a + len(blk)
            w.append(_ids(a, b), blk, _scores(a, b))
            mm[a:b] = blk
    mm.flush()
    for k in range(len(bounds) - 1):
        lo, hi = bounds[k], bounds[k + 1]
        with tracestore.create(part_url(str(parted), k), num_layers=L, hidden_size=D, shard_bytes=shard_bytes) as w:
            for a in range(lo, hi, BLOCK):
                b = min(hi, a + BLOCK)
                w.append(_ids(a, b), np.asarray(mm[a:b]), _scores(a, b))
    del mm
    commit_parts(str(parted))
    return str(one), str(parted), str(npy)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint16)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype == np.float16 and np.array_equal(_bits(a), _bits(b))


def check_stores(one: Any, parts: Any, mm: np.ndarray) -> None:
    """Every trace, id and score of both stores equal, bit for bit, to the source."""
    n = mm.shape[0]
    if not (np.array_equal(one.ids, parts.ids) and np.array_equal(one.scores.view(np.uint32),
                                                                  parts.scores.view(np.uint32))):
        raise AssertionError("the two stores' ids or scores differ")
    for a in range(0, n, BLOCK):
        src = np.asarray(mm[a:a + BLOCK])
        for name, s in (("one part", one), ("4 parts", parts)):
            if not _same(s.sequences[a:a + BLOCK], src):
                raise AssertionError(f"{name}: traces {a}..{min(n, a + BLOCK) - 1} differ from the source")


# -- the cases --------------------------------------------------------------------------------------------
Case = tuple[str, Callable[[Any], Callable[[int], np.ndarray]], Callable[[int], np.ndarray], int]


def cases(n: int, L: int, D: int, mm: np.ndarray, *, reps: int, n_select: int) -> list[Case]:
    """(name, store -> fn(k), expected(k), calls): each fn returns what it read, checked against expected(k)
    (the source through np.memmap) before it is timed."""
    rng = np.random.default_rng(0)
    calls = reps + 10  # time_interleaved's warm-up calls come first
    batch = min(64, n)
    singles = rng.integers(0, n, calls)
    unsorted = [rng.choice(n, batch, replace=False) for _ in range(calls)]
    sorted_ = [np.sort(r) for r in unsorted]
    layers = rng.integers(0, L, calls)
    heavy = max(5, reps // 10)
    sel = [rng.choice(n, min(n_select, n), replace=False) for _ in range(heavy + 10)]

    def buffered(rows: list[np.ndarray]) -> Callable[[Any], Callable[[int], np.ndarray]]:
        def make(store: Any) -> Callable[[int], np.ndarray]:
            buf = np.empty((batch, L, D), np.float16)  # one per store, reused across calls
            return lambda k: store.read_sequences(rows[k], out=buf)
        return make

    def xarray_isel(store: Any) -> Callable[[int], np.ndarray]:
        return lambda k: store.to_xarray().sequences.isel(trace=unsorted[k]).values

    def select_read(store: Any) -> Callable[[int], np.ndarray]:
        ids = store.ids
        return lambda k: store.select(ids[sel[k]].tolist()).sequences[:]

    out: list[Case] = [
        ("store[i].sequence (one random trace, view)", lambda s: lambda k: s[int(singles[k])].sequence,
         lambda k: mm[singles[k]], reps),
        (f"sequences[idx], {batch} random, sorted", lambda s: lambda k: s.sequences[sorted_[k]],
         lambda k: mm[sorted_[k]], reps),
        (f"sequences[idx], {batch} random, unsorted", lambda s: lambda k: s.sequences[unsorted[k]],
         lambda k: mm[unsorted[k]], reps),
        (f"read_sequences({batch} sorted, out=buf)", buffered(sorted_), lambda k: mm[sorted_[k]], reps),
        (f"read_sequences({batch} unsorted, out=buf)", buffered(unsorted), lambda k: mm[unsorted[k]], reps),
        ("layer(l), all traces [N, D]", lambda s: lambda k: s.layer(int(layers[k])),
         lambda k: mm[:, layers[k]], heavy),
        (f"select({min(n_select, n)} random ids).sequences[:]", select_read, lambda k: mm[sel[k]], heavy),
    ]
    try:
        import xarray  # noqa: F401

        out.append((f"to_xarray().sequences.isel({batch} random).values", xarray_isel,
                    lambda k: mm[unsorted[k]], reps))
    except ImportError:
        pass
    return out


def time_cases(one: Any, parts: Any, mm: np.ndarray, *, reps: int, n_select: int) -> list[dict[str, Any]]:
    n, L, D = mm.shape
    results = []
    for name, make, expected, calls in cases(n, L, D, mm, reps=reps, n_select=n_select):
        f_one, f_parts = make(one), make(parts)
        for k in range(2):  # bit-identical through this very path, on both stores
            want = np.asarray(expected(k))
            for who, f in (("one part", f_one), ("4 parts", f_parts)):
                if not _same(np.asarray(f(k)), want):
                    raise AssertionError(f"{name}, {who}: call {k} read other values than the source")
        t_one, t_parts = time_interleaved([f_one, f_parts], calls)
        results.append({"case": name, "one": t_one, "parts": t_parts, "goal": True})
    return results


def time_open(one_url: str, parts_url: str, reps: int) -> dict[str, Any]:
    import tracestore

    def opener(url: str) -> Callable[[int], None]:
        return lambda k: tracestore.open(url).close()

    t_one, t_parts = time_interleaved([opener(one_url), opener(parts_url)], reps, warmup=2)
    return {"case": "tracestore.open(url)", "one": t_one, "parts": t_parts, "goal": False}


# -- streaming --------------------------------------------------------------------------------------------
def time_streaming(one: Any, parts: Any, npy: str, mm: np.ndarray, *, batch: int, rounds: int,
                   smoke: bool) -> tuple[list[dict[str, Any]], float]:
    """One shuffled TraceLoader epoch per round and configuration on each store, the stores (and the memmap
    reference) interleaved round by round; each configuration's first epoch checked (every trace once, the
    source's float32 values). Returns rows (epoch seconds per store) and ref A's GiB/s (median)."""
    import bench_stream

    n = mm.shape[0]
    nbytes = mm.size * 2
    configs = [("TraceLoader epoch, shuffled, 0 workers", 0), ("TraceLoader epoch, shuffled, 2 worker processes", 2)]
    rows = []
    ref_epoch = bench_stream.one_thread(bench_stream.memmap_epochs(npy, batch))
    ref_times: list[float] = []
    for name, workers in configs:
        mode = "process" if workers else None
        eps = [bench_stream.loader_epochs(s, batch, shuffle=True, workers=workers, mode=mode) for s in (one, parts)]
        for who, ep in zip(("one part", "4 parts"), eps, strict=True):
            bench_stream._check(f"{name}, {who}", ep, mm, n)
        fns: list[Callable[[int], Any]] = [lambda k, ep=ep: bench_stream._drain(ep, k + 1) for ep in eps]
        if not ref_times:  # ref A once, interleaved with the first configuration
            fns.append(lambda k: bench_stream._drain(ref_epoch, k + 1))
        got = time_interleaved(fns, rounds, warmup=0 if smoke else 1)
        if len(got) == 3:
            ref_times = got[2].samples.tolist()
        rows.append({"case": name, "one": got[0], "parts": got[1], "goal": True, "stream": True})
    return rows, nbytes / statistics.median(ref_times) / 2**30


# -- the report -------------------------------------------------------------------------------------------
def run(n: int, num_layers: int, hidden_size: int, *, reps: int, rounds: int, batch: int, n_select: int,
        keep: str | None = None, shard_bytes: int | None = None, smoke: bool = False) -> tuple[str, bool]:
    import tracestore

    L, D = num_layers, hidden_size
    bounds = part_bounds(n)
    t_start = time.perf_counter()
    with scratch_dir(keep) as tmp:
        one_url, parts_url, npy = build(tmp, n, L, D, bounds, shard_bytes)
        t_built = time.perf_counter()
        mm = np.load(npy, mmap_mode="r")
        one, parts = tracestore.open(one_url), tracestore.open(parts_url)
        assert one.num_parts == 1 and parts.num_parts == len(bounds) - 1, (one.num_parts, parts.num_parts)
        check_stores(one, parts, mm)  # also warms the page cache for both stores and the .npy
        t_checked = time.perf_counter()
        rps = one._seq.direct.meta.rows_per_shard if one._seq.direct is not None else None
        results = time_cases(one, parts, mm, reps=reps, n_select=n_select)
        results.append(time_open(one_url, parts_url, max(5, reps // 15)))
        stream, ref_gib_s = time_streaming(one, parts, npy, mm, batch=batch, rounds=rounds, smoke=smoke)
        results += stream
        one.close()
        parts.close()
    wall = time.perf_counter() - t_start

    gib = n * L * D * 2 / 2**30
    rows = []
    met = True
    for r in results:
        t1, tp = r["one"], r["parts"]
        paired = tp.samples / t1.samples  # epoch k on both stores ran back to back: robust to the load drifting
        ratio = float(np.median(paired)) if r.get("stream") else tp.p50 / t1.p50
        if not r["goal"]:
            verdict = "(reported, no goal)"
        elif ratio <= TARGET:
            verdict = "yes"
        else:
            verdict, met = f"NO ({ratio:.2f}x)", False
        if r.get("stream"):
            rate = [n / t.p50 for t in (t1, tp)]
            cells = [f"{rate[0]:,.0f} traces/s ({gib / t1.p50:.2f} GiB/s)",
                     f"{rate[1]:,.0f} traces/s ({gib / tp.p50:.2f} GiB/s)"]
        else:
            cells = [f"{fmt_time(t1.p50)} / {fmt_time(t1.p99)}", f"{fmt_time(tp.p50)} / {fmt_time(tp.p99)}"]
        spread = f" (rounds {paired.min():.2f}-{paired.max():.2f})" if r.get("stream") and paired.size > 1 else ""
        rows.append([r["case"], *cells, f"{ratio:.2f}x{spread}", verdict])
    table = markdown_table(["case", "one part: p50 / p99 (loader: median epoch)", "4 parts: the same",
                            "parts / one (p50 time)",
                            f"<= {TARGET:.2f}x"], rows)
    sizes = np.diff(bounds).tolist()
    head = (f"[{n}, {L}, {D}] float16 = {gib:.2f} GiB, written twice: one store, and 4 parts of {sizes} traces "
            f"(boundaries at {bounds[1:-1]}{f'; {rps} traces per shard' if rps else ''}), each part a plain store "
            f"at part_url(dest, k), then commit_parts(dest). Both stores (and the .npy) read bit-identical values, "
            f"checked for every trace and through every case before it is timed. Warm page cache; the two stores "
            f"timed call by call in turn (time_interleaved): {reps} calls per light case, {max(5, reps // 10)} for "
            f"layer and select, {max(5, reps // 15)} opens; the loader rows are one epoch each, {rounds} "
            f"round(s) after a checked epoch, batches of {batch}, float32 on the CPU, given as traces/s (and "
            f"GiB/s) of the median epoch. Ratio = time on 4 parts / time on one part (p50 / p50; for the loader, "
            f"the median of the per-round ratios, each round's two epochs run back to back): 1.00x is the same "
            f"speed, higher is slower.")
    foot = (f"\n\nStreaming reference (bench_stream.py ref A, np.memmap gather + cast into reused buffers, 1 "
            f"intra-op thread), interleaved with the 0-worker rounds: {ref_gib_s:.2f} GiB/s.\n\n"
            f"Goal: parts / one <= {TARGET:.2f}x for every case (open time excepted): "
            f"**{'met' if met else 'NOT met'}**.\n\nWall time: {wall:.0f} s ({t_built - t_start:.0f} s building the "
            f"data, {t_checked - t_built:.0f} s checking it).")
    return head + "\n\n" + table + foot, met


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=7, help="loader epochs timed per store and configuration")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--select", type=int, default=1000, help="ids per select()")
    p.add_argument("--shard-bytes", type=int, default=None)
    a = p.parse_args(argv)
    if a.smoke:
        a.n, a.layers, a.hidden, a.reps, a.rounds, a.batch, a.select = 80, 4, 64, 20, 1, 16, 30
        a.shard_bytes = a.shard_bytes or 16 * 4 * 64 * 2
    text, _ = run(a.n, a.layers, a.hidden, reps=a.reps, rounds=a.rounds, batch=a.batch, n_select=a.select,
                  keep=a.keep, shard_bytes=a.shard_bytes, smoke=a.smoke)
    print(text)
    write_result(a.out, "A store of 4 parts vs the same data in one part (bench_parts.py)", text, script=__file__,
                 argv=argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
