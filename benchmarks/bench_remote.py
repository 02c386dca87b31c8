"""Object storage: one TraceLoader epoch against the limit, in one run, on a moto S3 server on 127.0.0.1.

  bytes:     what one shuffled epoch fetches (counted by a recording proxy): bytes / trace bytes, GETs, bytes
             per GET -- the loader (whole shuffle chunks, once each) and, for comparison, the batch-by-batch
             coalesced ranged reads that the loader used before issue 12 (store.read_sequences per batch)
  limit:     every shuffle chunk of the epoch fetched once, raw, with obstore.get_range, at the loader's
             concurrency (config.REMOTE_FETCH_CONCURRENCY threads), no tracestore code in between; the loader's
             epoch (crc32c checks and the float32 cast included) against it, at 0 ms and through a proxy (its
             own process) that delays each answer's first byte (--latency-ms, 30: S3 in the same region) and
             caps each connection's bandwidth (--bandwidth-mbs)
  random:    one random trace, p50/p99, once shard indexes are cached, vs one raw ranged GET of its bytes
  1 GB/s:    the GETs in flight needed for 1 GB/s, on paper, from the chunk size, the latency and the
             per-connection bandwidth (moto serves far less than 1 GB/s on this machine)

Targets: bytes <= 1.05x the traces; loader >= 0.8x the whole-chunk limit; random p50 <= 1.5x raw.

    python benchmarks/bench_remote.py            # 512 x [32, 1024] float16 = 32 MiB, 16 MiB shards
    python benchmarks/bench_remote.py --smoke    # tiny, seconds
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--traces", type=int, default=512)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--random", type=int, default=100, help="random single-trace reads")
    ap.add_argument("--shard-mib", type=int, default=16, help="shard size of the benchmark store")
    ap.add_argument("--chunk-rows", type=int, default=None, help="shuffle chunk (traces); default: the loader's")
    ap.add_argument("--window", type=int, default=None, help="shuffle window (chunks); default: the loader's")
    ap.add_argument("--latency-ms", type=float, default=30.0)
    ap.add_argument("--bandwidth-mbs", type=float, default=25.0, help="per-connection cap of the latency proxy")
    ap.add_argument("--paper-bandwidth-mbs", type=float, default=90.0,
                    help="per-connection bandwidth of a real object store, for the 1 GB/s estimate")
    args = ap.parse_args(argv)
    if args.smoke:
        args.traces, args.layers, args.hidden, args.repeats, args.random, args.batch = 48, 4, 64, 1, 10, 8
        args.latency_ms, args.chunk_rows, args.window = 2.0, 4, 2

    import obstore

    import tracestore
    from tracestore import config
    from tracestore.loader import sampler
    from tracestore.store.urls import resolve
    from tracestore.testing import write_synthetic_store
    from tracestore.testing.s3 import FaultProxy, moto_s3, proxy_process

    N, L, D = args.traces, args.layers, args.hidden
    row = L * D * 2
    nbytes = N * row
    conc = config.REMOTE_FETCH_CONCURRENCY
    # moto copies a whole object for every ranged GET, so its latency grows with the object: 16 MiB shards keep
    # the run short. Both sides read the same objects, so the ratios hold; real S3 has no such cost.
    shard_bytes = args.shard_mib * 2**20 if not args.smoke else row * 16
    window = args.window or sampler.WINDOW_CHUNKS
    with moto_s3(process=True) as ep:
        url = ep.url("bench/store.zarr")
        t0 = time.perf_counter()
        write_synthetic_store(resolve(url, ep.storage_options()), N, L, D, shard_bytes=shard_bytes, batch=64)
        print(f"wrote {N} x [{L}, {D}] float16 ({nbytes / 2**20:.1f} MiB) to moto in {time.perf_counter() - t0:.1f} s")

        def open_at(endpoint: str) -> tracestore.TraceStore:
            return tracestore.open(url, storage_options=ep.storage_options(endpoint=endpoint))

        def loader_for(store: tracestore.TraceStore) -> tracestore.TraceLoader:
            return tracestore.TraceLoader(store, batch_size=args.batch, shuffle=True, seed=0, device="cpu",
                                          chunk_rows=args.chunk_rows, shuffle_window=window)

        probe = loader_for(open_at(ep.endpoint))
        chunk_rows = probe.chunk_rows
        bounds = probe._store_bounds
        n_chunks = bounds.size - 1
        print(f"shuffle chunks: {n_chunks} of {chunk_rows} traces ({chunk_rows * row / 2**20:.1f} MiB), window "
              f"{window} chunks, loader memory <= {(1 + config.REMOTE_PREFETCH_WINDOWS) * min(window, n_chunks)} "
              f"chunks; {conc} GETs in flight")

        # -- bytes and GETs of one epoch, counted by the recording proxy -----------------------------------
        counts = {}
        with FaultProxy(ep.endpoint) as proxy:
            store = open_at(proxy.endpoint)
            loader = loader_for(store)
            for name in ("loader", "before"):
                for s in range(store._seq.direct.meta.num_shards):
                    store._seq.direct.index(s)  # indexes are fetched once per store, not per epoch
                proxy.faults.sent.clear()
                if name == "loader":
                    for _b in loader:
                        pass
                else:  # the read path before issue 12: each batch's ranges, coalesced, batch by batch
                    for pos in loader._plan():
                        store.read_sequences(pos)
                got = proxy.faults.bytes_sent("GET", "/sequences/c/")
                gets = proxy.faults.requests("GET", "/sequences/c/")
                counts[name] = (got, gets)

        # -- throughput against the whole-chunk limit, at 0 ms and through the latency proxy --------------
        def measure(endpoint: str) -> tuple[float, float, float]:
            store = open_at(endpoint)
            arr = store._seq.direct
            m = arr.meta
            raw = arr.location._store  # the same obstore S3Store, no tracestore code in between
            spans = []
            for c in range(n_chunks):
                a, b = int(bounds[c]), int(bounds[c + 1])
                s, j = divmod(a, m.rows_per_shard)
                idx = arr.index(s)
                off = int(idx[j, 0])
                end = int(idx[j + b - a - 1, 0] + idx[j + b - a - 1, 1])
                spans.append((m.shard_key(s), off, end))
            pool = ThreadPoolExecutor(conc)
            loader = loader_for(store)

            def raw_epoch() -> None:
                list(pool.map(lambda sp: obstore.get_range(raw, sp[0], start=sp[1], end=sp[2]), spans))

            def ts_epoch() -> None:
                for _b in loader:
                    pass

            t_raw, t_ts = math.inf, math.inf
            for _ in range(args.repeats):  # interleaved, so both see the same server state
                t = time.perf_counter()
                raw_epoch()
                t_raw = min(t_raw, time.perf_counter() - t)
                t = time.perf_counter()
                ts_epoch()
                t_ts = min(t_ts, time.perf_counter() - t)
            pool.shutdown()
            one = []
            for sp in spans[: min(len(spans), 4)]:  # one GET alone: latency + bytes / bandwidth
                t = time.perf_counter()
                obstore.get_range(raw, sp[0], start=sp[1], end=sp[2])
                one.append(time.perf_counter() - t)
            return t_raw, t_ts, float(np.median(one))

        t_raw0, t_ts0, one0 = measure(ep.endpoint)
        with proxy_process(ep.endpoint, latency=args.latency_ms / 1e3, bandwidth=args.bandwidth_mbs * 1e6) as pe:
            t_raw30, t_ts30, one30 = measure(pe)

        # -- one random trace ----------------------------------------------------------------------------
        store = open_at(ep.endpoint)
        arr = store._seq.direct
        m = arr.meta
        raw = arr.location._store
        for s in range(m.num_shards):
            arr.index(s)
        rng = np.random.default_rng(0)
        lat_raw, lat_ts = [], []
        for r in rng.integers(0, N, args.random).tolist():  # interleaved, so both see the same server state
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
    chunk_b = chunk_rows * (row + 4)
    lat = args.latency_ms / 1e3
    per_conn = chunk_b / (lat + chunk_b / (args.paper_bandwidth_mbs * 1e6))
    need = math.ceil(1e9 / per_conn)
    per_conn_cap = chunk_b / (lat + chunk_b / (args.bandwidth_mbs * 1e6))
    print()
    print(f"| one epoch, {N} traces ({nbytes / 2**20:.1f} MiB), batch {args.batch}, shuffled | before (batch-by-batch "
          f"coalesced ranges) | loader (whole chunks) | target |")
    print("|---|---|---|---|")
    (bb, gb), (bl, gl) = counts["before"], counts["loader"]
    print(f"| bytes fetched / trace bytes | {bb / nbytes:.2f}x ({bb / 2**20:.1f} MiB) | {bl / nbytes:.3f}x "
          f"({bl / 2**20:.1f} MiB) | <= 1.05x |")
    print(f"| GETs per epoch (sequences) | {gb} | {gl} ({n_chunks} chunks) | |")
    print(f"| bytes per GET | {bb / max(1, gb) / 2**20:.2f} MiB | {bl / max(1, gl) / 2**20:.2f} MiB | |")
    print()
    print(f"| read, {conc} GETs in flight | limit: every chunk once, raw obstore | tracestore | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| stream every trace, 0 ms (moto direct) | {mb / t_raw0:.0f} MB/s | {mb / t_ts0:.0f} MB/s (TraceLoader, "
          f"shuffled, cpu) | {t_raw0 / t_ts0:.2f}x | >= 0.8x |")
    print(f"| stream every trace, {args.latency_ms:g} ms first byte, {args.bandwidth_mbs:g} MB/s per connection | "
          f"{mb / t_raw30:.0f} MB/s | {mb / t_ts30:.0f} MB/s | {t_raw30 / t_ts30:.2f}x | >= 0.8x |")
    print(f"| one chunk GET alone, 0 ms / {args.latency_ms:g} ms | {one0 * 1e3:.0f} ms / {one30 * 1e3:.0f} ms "
          f"({chunk_b / 2**20:.1f} MiB; on paper at the cap: {chunk_b / per_conn_cap * 1e3:.0f} ms) | | | |")
    print(f"| one random trace, p50 | {p(lat_raw, 50):.2f} ms | {p(lat_ts, 50):.2f} ms | "
          f"{p(lat_ts, 50) / p(lat_raw, 50):.2f}x of raw | <= 1.5x |")
    print(f"| one random trace, p99 | {p(lat_raw, 99):.2f} ms | {p(lat_ts, 99):.2f} ms | "
          f"{p(lat_ts, 99) / p(lat_raw, 99):.2f}x of raw | |")
    print()
    print(f"1 GB/s on paper: a {chunk_b / 2**20:.1f} MiB chunk GET at {args.latency_ms:g} ms first byte and "
          f"{args.paper_bandwidth_mbs:g} MB/s per connection takes {chunk_b / per_conn * 1e3:.0f} ms, "
          f"{per_conn / 1e6:.0f} MB/s per GET in flight: {need} in flight for 1 GB/s "
          f"(TRACESTORE_REMOTE_FETCH_CONCURRENCY={need}; default {conc}). moto on this machine serves "
          f"{mb / t_raw0:.0f} MB/s at most, so this is not measured.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
