"""Object storage: tracestore against raw ranged GETs of the same objects, in one run, against a moto S3
server on 127.0.0.1 (moto itself is the bottleneck here, so only the ratios mean anything).

  streaming: every trace once, in shuffled batches of 64, through TraceLoader (or store.read_sequences when
             the loader is unavailable) vs obstore.get_ranges of the same byte ranges, shard by shard
  random:    one random trace, p50/p99, once shard indexes are cached, vs one raw ranged GET of its bytes

Targets: streaming >= 0.8x raw; random p50 <= 1.5x raw.

    python benchmarks/bench_remote.py            # [1024, 32, 4096] float16, 256 MiB
    python benchmarks/bench_remote.py --smoke    # tiny, seconds
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--traces", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--random", type=int, default=200, help="random single-trace reads")
    ap.add_argument("--shard-mib", type=int, default=16, help="shard size of the benchmark store")
    args = ap.parse_args(argv)
    if args.smoke:
        args.traces, args.layers, args.hidden, args.repeats, args.random = 48, 4, 64, 1, 20

    import obstore

    import tracestore
    from tracestore.store.urls import resolve
    from tracestore.testing import write_synthetic_store
    from tracestore.testing.s3 import moto_s3

    N, L, D = args.traces, args.layers, args.hidden
    # moto copies a whole object for every ranged GET, so its latency grows with the object: 16 MiB shards keep
    # the run short. Both sides read the same objects, so the ratios hold; real S3 has no such cost.
    shard_bytes = args.shard_mib * 2**20 if not args.smoke else L * D * 2 * 16
    with moto_s3(process=True) as ep:
        url, so = ep.url("bench/store.zarr"), ep.storage_options()
        t0 = time.perf_counter()
        write_synthetic_store(resolve(url, so), N, L, D, shard_bytes=shard_bytes, batch=64)
        print(f"wrote {N} x [{L}, {D}] float16 ({N * L * D * 2 / 1e6:.0f} MB) to moto in {time.perf_counter() - t0:.1f} s")
        store = tracestore.open(url, storage_options=so)
        arr = store._seq.direct
        m = arr.meta
        raw = arr.location._store  # the same obstore S3Store, no tracestore code in between
        nbytes = N * L * D * 2

        def ranges(rows: np.ndarray) -> dict[int, tuple[list[int], list[int]]]:
            by: dict[int, tuple[list[int], list[int]]] = {}
            for r in rows.tolist():
                s, j = divmod(r, m.rows_per_shard)
                off, n = arr.index(s)[j]
                by.setdefault(s, ([], []))
                by[s][0].append(int(off))
                by[s][1].append(int(off) + int(n))
            return by

        for s in range(m.num_shards):  # cache every index for both sides
            arr.index(s)
        rng = np.random.default_rng(0)
        batch = 64

        def raw_stream() -> None:
            order = rng.permutation(N)
            for a in range(0, N, batch):
                rows = order[a:a + batch]
                jobs = list(ranges(rows).items())
                arr.location.map_parallel(
                    lambda job: obstore.get_ranges(raw, m.shard_key(job[0]), starts=job[1][0], ends=job[1][1]), jobs)

        try:
            from tracestore import TraceLoader

            loader = TraceLoader(store, batch_size=batch, shuffle=True, seed=0, device="cpu")
            loader2 = TraceLoader(store, batch_size=batch, shuffle=True, seed=0, device="cpu", num_workers=2)

            def ts_stream() -> None:
                for _b in loader:
                    pass

            def ts_stream2() -> None:
                for _b in loader2:
                    pass
            ts_name = "TraceLoader (shuffled, cpu)"
        except Exception as e:  # the loader is optional here; say which path ran
            print(f"TraceLoader unavailable ({type(e).__name__}: {e}); measuring store.read_sequences")
            buf = np.empty((batch, L, D), np.float16)

            def ts_stream() -> None:
                order = rng.permutation(N)
                for a in range(0, N, batch):
                    rows = order[a:a + batch]
                    store.read_sequences(rows, out=buf[: len(rows)])
            ts_name = "store.read_sequences (shuffled)"
            ts_stream2 = None

        def best(fn) -> float:
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return min(times)

        t_raw_stream = best(raw_stream)
        t_ts_stream = best(ts_stream)
        t_ts_stream2 = best(ts_stream2) if ts_stream2 is not None else None

        rows = rng.integers(0, N, args.random)
        lat_raw, lat_ts = [], []
        for r in rows.tolist():  # interleaved, so both see the same server state
            s, j = divmod(r, m.rows_per_shard)
            off, n = arr.index(s)[j]
            t = time.perf_counter()
            obstore.get_range(raw, m.shard_key(s), start=int(off), end=int(off) + int(n))
            lat_raw.append(time.perf_counter() - t)
            t = time.perf_counter()
            store[r].sequence  # noqa: B018
            lat_ts.append(time.perf_counter() - t)

    p = lambda xs, q: float(np.percentile(np.asarray(xs) * 1e3, q))  # noqa: E731
    mb = nbytes / 1e6
    print()
    print("| read | reference (raw obstore) | tracestore | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| stream every trace, shuffled batches of {batch} | {mb / t_raw_stream:.0f} MB/s | {mb / t_ts_stream:.0f} MB/s "
          f"({ts_name}) | {t_raw_stream / t_ts_stream:.2f}x | >= 0.8x |")
    if t_ts_stream2 is not None:
        print(f"| the same, 2 reader threads (prefetch) | {mb / t_raw_stream:.0f} MB/s | {mb / t_ts_stream2:.0f} MB/s | "
              f"{t_raw_stream / t_ts_stream2:.2f}x | |")
    print(f"| one random trace, p50 | {p(lat_raw, 50):.2f} ms | {p(lat_ts, 50):.2f} ms | "
          f"{p(lat_ts, 50) / p(lat_raw, 50):.2f}x of raw | <= 1.5x |")
    print(f"| one random trace, p99 | {p(lat_raw, 99):.2f} ms | {p(lat_ts, 99):.2f} ms | "
          f"{p(lat_ts, 99) / p(lat_raw, 99):.2f}x of raw | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
