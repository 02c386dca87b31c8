"""Object storage: one TraceLoader epoch against the limit, in one run, on a moto S3 server on 127.0.0.1, for
sequence epochs and graph epochs (tokens' hidden states + edges).

  bytes:     what one shuffled epoch fetches (counted by a recording proxy), per array, against the array's
             stored bytes: the loader's window (each chunk's rows once) and, for comparison, the batch-by-batch
             coalesced ranged reads the loader used before issue 12 (sequences) and before issue 21 (graphs):
             store.read_sequences / TraceSource.read_graphs per batch of the same plan
  limit:     exactly the GETs the loader's epoch made (recorded by the proxy, shard indexes already cached),
             replayed raw with obstore.get_range at the loader's concurrency (config.REMOTE_FETCH_CONCURRENCY
             threads), no tracestore code in between; the loader's epoch (crc32c checks, the float32 cast, the
             PyG batch for graphs) against it, interleaved, best of --repeats, at 0 ms and through a proxy in
             its own process that delays each answer's first byte (--latency-ms, 30: S3 in the same region) and
             caps each connection's bandwidth (--bandwidth-mbs)
  random:    one random trace, p50/p99, once shard indexes are cached, vs one raw ranged GET of its bytes
  1 GB/s:    the GETs in flight needed for 1 GB/s, on paper, from the chunk size, the latency and the
             per-connection bandwidth (moto serves far less than 1 GB/s on this machine)

Cases: `sequences` (4096 x [32, 1024] float16 = 256 MiB in 16 MiB shards, chunks of 16 MiB (what the loader
takes for a store of 16,384 such traces or more), windows of 4 chunks: 4 windows, the next one fetched while
one is served, up to 8 GETs in flight as in the replay), `sequences, 2 MiB chunks` (the same store, chunks of
32 traces, windows of 4), and `graphs` (256 traces of [8, 2048] with 24-40 tokens each and every causal pair an
edge, as the seed's v1 recipe builds them: 256 MiB of tokens; chunks of ~16 MiB of what a graph epoch reads,
windows of 4; every layer's graph). Each with num_workers 0 and 2.

Targets: bytes <= 1.05x the arrays read; loader >= 0.8x the limit at 0 ms and at 30 ms; random p50 <= 1.5x raw.

    python benchmarks/bench_remote.py            # the sizes above, about four minutes
    python benchmarks/bench_remote.py --smoke    # tiny, seconds
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

GRAPH_ARRAYS = ("sequences", "tokens/hidden", "graphs/edge_index", "graphs/edge_attr")


class Case(NamedTuple):
    name: str
    url: str
    graphs: bool
    chunk_rows: int | None
    window: int | None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--traces", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--graph-traces", type=int, default=256)
    ap.add_argument("--graph-layers", type=int, default=8)
    ap.add_argument("--graph-hidden", type=int, default=2048)
    ap.add_argument("--graph-tokens", default="24,40", help="tokens per graph trace: min,max")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", default="0,2", help="num_workers to measure, comma separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--random", type=int, default=100, help="random single-trace reads")
    ap.add_argument("--shard-mib", type=int, default=16, help="shard size of the benchmark stores")
    ap.add_argument("--latency-ms", type=float, default=30.0)
    ap.add_argument("--bandwidth-mbs", type=float, default=25.0, help="per-connection cap of the latency proxy")
    ap.add_argument("--paper-bandwidth-mbs", type=float, default=90.0,
                    help="per-connection bandwidth of a real object store, for the 1 GB/s estimate")
    ap.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = ap.parse_args(argv)
    if args.smoke:
        args.traces, args.layers, args.hidden, args.repeats, args.random, args.batch = 48, 4, 64, 1, 10, 8
        args.graph_traces, args.graph_layers, args.graph_hidden, args.latency_ms, args.workers = 24, 2, 32, 2.0, "0"

    import obstore

    import tracestore
    from tracestore import config
    from tracestore.store.urls import resolve
    from tracestore.testing import write_synthetic_store
    from tracestore.testing.s3 import FaultProxy, moto_s3, proxy_process

    workers = [int(w) for w in args.workers.split(",")]
    conc = config.REMOTE_FETCH_CONCURRENCY
    N, L, D = args.traces, args.layers, args.hidden
    row = L * D * 2
    # moto copies a whole object for every ranged GET, so its latency grows with the object: 16 MiB shards keep
    # the run short. Both sides read the same objects, so the ratios hold; real S3 has no such cost.
    shard_bytes = args.shard_mib * 2**20 if not args.smoke else row * 16
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text)
        lines.append(text)

    with moto_s3(process=True) as ep:
        seq_url, graph_url = ep.url("bench/seq.zarr"), ep.url("bench/graphs.zarr")
        t0 = time.perf_counter()
        write_synthetic_store(resolve(seq_url, ep.storage_options()), N, L, D, shard_bytes=shard_bytes, batch=64)
        GN, GL, GD = args.graph_traces, args.graph_layers, args.graph_hidden
        t_min, t_max = (int(v) for v in args.graph_tokens.split(","))
        write_graph_store(resolve(graph_url, ep.storage_options()), GN, GL, GD, t_min, t_max,
                          shard_bytes if not args.smoke else GL * GD * 2 * 16)
        # the same stores on local disk: what serving the epoch costs the loader's own CPU (crc32c aside), with
        # no network in between -- the ceiling of the loader at 0 ms on this machine
        local_dir = tempfile.mkdtemp(prefix="bench_remote_")
        local = {seq_url: os.path.join(local_dir, "seq.zarr"), graph_url: os.path.join(local_dir, "graphs.zarr")}
        write_synthetic_store(local[seq_url], N, L, D, shard_bytes=shard_bytes, batch=64)
        write_graph_store(resolve(local[graph_url]), GN, GL, GD, t_min, t_max,
                          shard_bytes if not args.smoke else GL * GD * 2 * 16)
        say(f"wrote {N} x [{L}, {D}] float16 ({N * row / 2**20:.1f} MiB) and a graph store of {GN} traces of "
            f"[{GL}, {GD}] to moto in {time.perf_counter() - t0:.1f} s; {conc} GETs in flight")
        # the chunks of a large store (~16 MiB of what an epoch reads per trace, sampler.CHUNK_BYTES): these
        # stores are small, and the loader's default would cut them into sampler.MIN_CHUNKS smaller chunks
        from tracestore.loader.loader import _trace_nbytes
        from tracestore.loader.sampler import default_chunk_rows

        seq_rows = 4 if args.smoke else default_chunk_rows(row)
        graph_rows = 4 if args.smoke else default_chunk_rows(_trace_nbytes(tracestore.open(
            graph_url, storage_options=ep.storage_options()), True))
        # windows of 4 chunks: the loader holds at most 2 windows (this one and the next), so it can keep the
        # replay's 8 GETs in flight (the default window, 16, holds 32); 4 windows or more of each store, so
        # that fetching the next window overlaps serving this one, as over a large store
        cases = [Case("sequences", seq_url, False, seq_rows, 4),
                 Case("sequences, 2 MiB chunks", seq_url, False, 4 if args.smoke else 32, 4),
                 Case("graphs (every layer)", graph_url, True, graph_rows, 4)]

        def open_at(url: str, endpoint: str) -> tracestore.TraceStore:
            return tracestore.open(url, storage_options=ep.storage_options(endpoint=endpoint))

        def loader_for(store: tracestore.TraceStore, case: Case, num_workers: int) -> tracestore.TraceLoader:
            return tracestore.TraceLoader(store, batch_size=args.batch, shuffle=True, seed=0, device="cpu",
                                          chunk_rows=case.chunk_rows, shuffle_window=case.window or 16,
                                          with_graphs=case.graphs, num_workers=num_workers,
                                          worker_mode="thread" if num_workers else None)

        def warm_indexes(store: tracestore.TraceStore) -> None:
            arrays = [store._seq] + ([store._hidden, store._ei, store._ea] if store.has_graphs else [])
            for a in arrays:
                for s in range(a.direct.meta.num_shards):  # type: ignore[union-attr]
                    a.direct.index(s)  # type: ignore[union-attr]

        # -- bytes and GETs of one epoch, counted by the recording proxy; the GETs to replay -------------
        say()
        say("## What one epoch fetches (one rank, shard indexes cached)")
        say()
        say("| case | array | stored | loader: fetched / stored | GETs | bytes per GET | before (batch by batch) | "
            "GETs before |")
        say("|---|---|---|---|---|---|---|---|")
        replay: dict[str, list[tuple[str, int, int]]] = {}
        chunk_bytes: dict[str, float] = {}
        with FaultProxy(ep.endpoint) as proxy:
            for case in cases:
                store = open_at(case.url, proxy.endpoint)
                loader = loader_for(store, case, 0)
                warm_indexes(store)
                arrays = GRAPH_ARRAYS if case.graphs else ("sequences",)
                stored = {a: _data_bytes(store, a) for a in arrays}
                got: dict[str, dict[str, tuple[int, int]]] = {}
                for name in ("loader", "before"):
                    proxy.faults.sent.clear()
                    proxy.faults.seen.clear()
                    if name == "loader":
                        for _b in loader:
                            pass
                        replay[case.name] = _gets(proxy.faults.seen, store.location)
                    else:
                        src = loader._source
                        for pos in loader._plan():
                            store.read_sequences(pos)
                            if case.graphs:
                                src.read_graphs(pos)
                    got[name] = {a: (proxy.faults.bytes_sent("GET", f"/{a}/c/"), proxy.faults.requests("GET", f"/{a}/c/"))
                                 for a in arrays}
                seq_gets = got["loader"]["sequences"][1]
                chunk_bytes[case.name] = got["loader"]["sequences"][0] / max(1, seq_gets)
                for a in arrays:
                    (bl, gl), (bb, gb) = got["loader"][a], got["before"][a]
                    say(f"| {case.name} | {a} | {stored[a] / 2**20:.2f} MiB | {bl / stored[a]:.3f}x | {gl} | "
                        f"{bl / max(1, gl) / 2**20:.2f} MiB | {bb / stored[a]:.2f}x | {gb} |")
                if case.graphs:
                    tl = sum(v[0] for v in got["loader"].values())
                    tb = sum(v[0] for v in got["before"].values())
                    ts = sum(stored.values())
                    say(f"| {case.name} | all four | {ts / 2**20:.2f} MiB | **{tl / ts:.3f}x** | "
                        f"{sum(v[1] for v in got['loader'].values())} | | {tb / ts:.2f}x | "
                        f"{sum(v[1] for v in got['before'].values())} |")

        # -- throughput against the limit (the same GETs, raw), at 0 ms and through the latency proxy ----
        def measure(endpoint: str, case: Case, num_workers: int) -> tuple[float, float, int]:
            store = open_at(case.url, endpoint)
            warm_indexes(store)
            raw = store.location._store  # type: ignore[attr-defined]  # the same obstore S3Store, nothing between
            gets = replay[case.name]
            pool = ThreadPoolExecutor(conc)
            loader = loader_for(store, case, num_workers)

            def raw_epoch() -> None:
                list(pool.map(lambda g: obstore.get_range(raw, g[0], start=g[1], end=g[2]), gets))

            def ts_epoch() -> None:
                for _b in loader:
                    pass

            t_raw, t_ts = math.inf, math.inf
            ts_epoch()  # warm: threads, buffers
            for _ in range(args.repeats):  # interleaved, so both see the same server state
                t = time.perf_counter()
                raw_epoch()
                t_raw = min(t_raw, time.perf_counter() - t)
                t = time.perf_counter()
                ts_epoch()
                t_ts = min(t_ts, time.perf_counter() - t)
            pool.shutdown()
            return t_raw, t_ts, sum(g[2] - g[1] for g in gets)

        def local_epoch(case: Case, num_workers: int) -> float:
            loader = loader_for(tracestore.open(local[case.url]), case, num_workers)
            best = math.inf
            for _ in range(1 + args.repeats):  # the first warms the page cache, threads and buffers
                t = time.perf_counter()
                for _b in loader:
                    pass
                best = min(best, time.perf_counter() - t)
            return best

        results: list[tuple[str, str, int, float, float, int]] = []
        local_t: dict[tuple[str, int], float] = {}
        for case in cases:
            for nw in workers:
                t_raw, t_ts, nbytes = measure(ep.endpoint, case, nw)
                results.append((case.name, "0 ms (moto direct)", nw, t_raw, t_ts, nbytes))
                local_t[case.name, nw] = local_epoch(case, nw)
        with proxy_process(ep.endpoint, latency=args.latency_ms / 1e3, bandwidth=args.bandwidth_mbs * 1e6) as pe:
            for case in cases:
                for nw in workers:
                    t_raw, t_ts, nbytes = measure(pe, case, nw)
                    results.append((case.name, f"{args.latency_ms:g} ms first byte, {args.bandwidth_mbs:g} MB/s per "
                                               f"connection", nw, t_raw, t_ts, nbytes))

        # -- one random trace ----------------------------------------------------------------------------
        store = open_at(seq_url, ep.endpoint)
        arr = store._seq.direct
        assert arr is not None
        m = arr.meta
        raw = arr.location._store  # type: ignore[attr-defined]
        warm_indexes(store)
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

    say()
    say("## Throughput against the limit (the loader's own GETs, replayed raw)")
    say()
    say(f"| case | network | num_workers | limit: the GETs, raw obstore, {conc} at once | TraceLoader | ratio | target "
        f"| the same epoch from local disk (no network) |")
    say("|---|---|---|---|---|---|---|---|")
    for name, net, nw, t_raw, t_ts, nbytes in results:
        mb = nbytes / 1e6
        lt = local_t[name, nw]
        ref = f"{mb / lt:.0f} MB/s ({t_raw / lt:.2f}x the limit)" if net.startswith("0 ms") else ""
        say(f"| stream every trace: {name} | {net} | {nw} | {mb / t_raw:.0f} MB/s | {mb / t_ts:.0f} MB/s | "
            f"{t_raw / t_ts:.2f}x | >= 0.8x | {ref} |")
    p = lambda xs, q: float(np.percentile(np.asarray(xs) * 1e3, q))  # noqa: E731
    say(f"| one random trace, p50 | | | {p(lat_raw, 50):.2f} ms | {p(lat_ts, 50):.2f} ms | "
        f"{p(lat_ts, 50) / p(lat_raw, 50):.2f}x of raw | <= 1.5x |")
    say(f"| one random trace, p99 | | | {p(lat_raw, 99):.2f} ms | {p(lat_ts, 99):.2f} ms | "
        f"{p(lat_ts, 99) / p(lat_raw, 99):.2f}x of raw | |")
    chunk_b = chunk_bytes["sequences"]
    lat = args.latency_ms / 1e3
    per_conn = chunk_b / (lat + chunk_b / (args.paper_bandwidth_mbs * 1e6))
    need = math.ceil(1e9 / per_conn)
    say()
    say(f"1 GB/s on paper: a {chunk_b / 2**20:.1f} MiB chunk GET at {args.latency_ms:g} ms first byte and "
        f"{args.paper_bandwidth_mbs:g} MB/s per connection takes {chunk_b / per_conn * 1e3:.0f} ms, "
        f"{per_conn / 1e6:.0f} MB/s per GET in flight: {need} in flight for 1 GB/s "
        f"(TRACESTORE_REMOTE_FETCH_CONCURRENCY={need}; default {conc}).")
    shutil.rmtree(local_dir, ignore_errors=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


def write_graph_store(location: Any, n: int, num_layers: int, hidden_size: int, t_min: int, t_max: int,
                      shard_bytes: int) -> None:
    """A graph store of realistic proportions: every causal pair an edge (the seed's v1 recipe: T(T+1)/2 edges
    per layer, a trace's edges ~1/20 of its tokens' bytes at D = 2048, as at Llama-2-7B shape)."""
    from tracestore.store.writer import create
    from tracestore.testing.synthetic import (
        synthetic_graphs,
        synthetic_ids,
        synthetic_scores,
        synthetic_sequences,
    )

    with create(location, num_layers=num_layers, hidden_size=hidden_size, graphs=True, shard_bytes=shard_bytes) as w:
        for a in range(0, n, 16):
            b = min(n, a + 16)
            w.append(synthetic_ids(b - a, a), synthetic_sequences(b - a, num_layers, hidden_size, start=a),
                     synthetic_scores(n)[a:b], graphs=synthetic_graphs(b - a, num_layers, hidden_size, start=a,
                                                                       min_tokens=t_min, max_tokens=t_max,
                                                                       top_k=t_max))


def _data_bytes(store: Any, array: str) -> int:
    """Bytes of an array's shard objects less their indexes: what reading all of its chunks once costs."""
    arr = {"sequences": lambda: store._seq, "tokens/hidden": lambda: store._hidden,
           "graphs/edge_index": lambda: store._ei, "graphs/edge_attr": lambda: store._ea}[array]().direct
    total = sum(store.location.size(k) or 0 for k in store.location.list(f"{array}/c/"))
    return int(total - arr.meta.num_shards * arr.meta.index_nbytes)


def _gets(seen: list[str], location: Any) -> list[tuple[str, int, int]]:
    """(key below the store's prefix, start, end) of every ranged GET the proxy saw for the store's objects."""
    prefix = f"/{location.bucket}/{location.prefix}/" if location.prefix else f"/{location.bucket}/"
    out = []
    for line in seen:
        method, path, *rng = line.split(" ", 2)
        m = re.match(r"bytes=(\d+)-(\d+)", rng[0] if rng else "")
        if method != "GET" or not m or not path.startswith(prefix):
            continue
        out.append((path[len(prefix):].split("?")[0], int(m.group(1)), int(m.group(2)) + 1))
    return out


if __name__ == "__main__":
    sys.exit(main())
