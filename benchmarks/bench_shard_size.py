"""Choose the default shard size (config.SHARD_BYTES) by measurement.

For each shard size: write throughput (float16 traces in, committed store out, through tracestore's writer
and zarr), sequential read of every trace into a reused buffer, and 64 random traces into a reused buffer,
each with a warm page cache and with the store's files evicted from the page cache first (posix_fadvise
DONTNEED on the store's own files only), plus the writer's peak extra memory (it buffers one shard) and the
number of objects. The reference in the same run is np.memmap of the same float16 bytes (.npy).

    .venv/bin/python benchmarks/bench_shard_size.py                 # [4096, 32, 4096] = 1 GiB per size
    .venv/bin/python benchmarks/bench_shard_size.py --smoke
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    base_parser,
    fast_float16_blocks,
    markdown_table,
    scratch_dir,
    time_calls,
    write_result,
)


def _evict(path: Path) -> None:
    """Drop one store's (or file's) pages from the page cache, to time reads that go to the disk."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def run(n: int, num_layers: int, hidden_size: int, sizes_mib: list[float], *, reps: int) -> str:
    import tracestore

    L, D = num_layers, hidden_size
    f16 = n * L * D * 2
    rows = []
    rng = np.random.default_rng(0)
    batches = [rng.choice(n, min(64, n), replace=False) for _ in range(reps + 3)]
    with scratch_dir() as tmp:
        # the reference: the same bytes in one .npy, read through np.memmap
        npy = tmp / "ref.npy"
        mm = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float16, shape=(n, L, D))
        for a, blk in fast_float16_blocks(n, L, D):
            mm[a:a + len(blk)] = blk
        mm.flush()
        mm = np.load(npy, mmap_mode="r")
        buf = np.empty((n, L, D), np.float16)
        block = next(iter(fast_float16_blocks(min(n, 256), L, D)))[1]
        many = np.empty((min(64, n), L, D), np.float16)

        def seq_mm() -> float:
            t0 = time.perf_counter()
            np.copyto(buf, mm)
            return time.perf_counter() - t0

        _evict(npy)
        cold_mm = seq_mm()
        warm_mm = min(seq_mm() for _ in range(2))
        rnd_mm = time_calls(lambda k: np.take(mm, batches[k], axis=0, out=many), reps).p50
        _evict(npy)
        rnd_mm_cold = time_calls(lambda k: np.take(mm, batches[k], axis=0, out=many), 1, warmup=0).p50
        rows.append(["np.memmap (.npy, reference)", "1", "-", "-", f"{f16 / cold_mm / 1e9:.2f}",
                     f"{f16 / warm_mm / 1e9:.2f}", f"{rnd_mm * 1e3:.2f}", f"{rnd_mm_cold * 1e3:.1f}"])

        for mib in sizes_mib:
            shard_bytes = int(mib * 2**20)
            url = tmp / f"s{mib}.zarr"
            rss0 = _rss()
            peak = rss0
            t0 = time.perf_counter()
            with tracestore.create(str(url), num_layers=L, hidden_size=D, shard_bytes=shard_bytes) as w:
                # one block appended again and again: making random values must not be timed as writing
                for a in range(0, n, len(block)):
                    b = min(n, a + len(block))
                    w.append([f"t{i}" for i in range(a, b)], block[:b - a], None)
                    peak = max(peak, _rss())
            t_write = time.perf_counter() - t0
            store = tracestore.open(str(url))
            rps = store._seq.direct.meta.rows_per_shard
            nobj = store._seq.direct.meta.num_shards
            all_rows = np.arange(n)

            def seq_ts(store: tracestore.TraceStore = store, all_rows: np.ndarray = all_rows) -> float:
                t0 = time.perf_counter()
                store.read_sequences(all_rows, out=buf)
                return time.perf_counter() - t0

            _evict(url)
            cold = seq_ts()
            warm = min(seq_ts() for _ in range(2))
            np.testing.assert_array_equal(buf[-1], block[(n - 1) % len(block)])
            rnd = time_calls(lambda k, s=store: s.read_sequences(batches[k], out=many), reps).p50
            # a fresh store object: its memory maps are new, so evicted pages really come from the disk
            store = tracestore.open(str(url))
            _evict(url)
            rnd_cold = time_calls(lambda k, s=store: s.read_sequences(batches[k], out=many), 1, warmup=0).p50
            rows.append([f"{mib:g} MiB ({rps} traces)", str(nobj), f"{f16 / t_write / 1e9:.2f}",
                         f"{(peak - rss0) / 2**20:.0f}", f"{f16 / cold / 1e9:.2f}", f"{f16 / warm / 1e9:.2f}",
                         f"{rnd * 1e3:.2f}", f"{rnd_cold * 1e3:.1f}"])
            import shutil

            shutil.rmtree(url)
    head = (f"[{n}, {L}, {D}] float16 = {f16 / 2**30:.2f} GiB per store. write = float16 batches of 256 traces "
            f"into tracestore.create() until close(); read = read_sequences(out=) into a reused buffer; "
            f"'cold' = the store's files evicted from the page cache first (posix_fadvise DONTNEED), one pass; "
            f"random = 64 random traces, p50 of {reps} (warm) and one call (cold).")
    return head + "\n\n" + markdown_table(
        ["shard size", "shard objects", "write GB/s", "writer extra RSS MiB", "seq read cold GB/s",
         "seq read warm GB/s", "64 random warm ms (p50)", "64 random cold ms"], rows)


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--sizes", default="16,64,128,256", help="shard sizes in MiB, comma separated")
    p.add_argument("--reps", type=int, default=50)
    a = p.parse_args(argv)
    if a.smoke:
        a.n, a.layers, a.hidden, a.reps, a.sizes = 40, 4, 64, 5, "0.0078125,0.015625"
    text = run(a.n, a.layers, a.hidden, [float(s) for s in a.sizes.split(",")], reps=a.reps)
    print(text)
    write_result(a.out, "Shard size: write, sequential and random read by shard size", text, script=__file__, argv=argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
