"""Process-wide defaults. Each can be overridden by a TRACESTORE_* environment variable.

Arguments passed to functions win over these; these win over the built-in values. The built-in values
cite the benchmark that chose them.
"""

from __future__ import annotations

import os

_UNITS = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(value: int | str | None, *, what: str = "size") -> int | None:
    """A byte count: 123, '4.5G', '512M', '64KiB', '10GB' (K/M/G/T are powers of 10, Ki/Mi/Gi/Ti of 2).
    Raises ValueError naming `what` for anything else."""
    if value is None or isinstance(value, int):
        return value
    t = str(value).strip().upper().replace(" ", "").removesuffix("B")
    try:
        for u in sorted(_UNITS, key=len, reverse=True):
            if t.endswith(u):
                return int(float(t[: -len(u)]) * _UNITS[u])
        return int(float(t))
    except ValueError:
        raise ValueError(f"{what}={value!r} is not a size; give bytes or a number with a unit, e.g. 512MiB or "
                         f"10GB") from None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return parse_size(raw, what=f"environment variable {name}") or default


#: Target bytes of one shard of `sequences` / `graphs/x` (uncompressed). 128 MiB holds 512 traces of
#: [32, 4096] float16: a few large objects for object stores, one shard buffered in the writer's RAM.
#: Chosen with benchmarks/bench_shard_size.py (benchmarks/results/shard_size.md): local reads are flat from
#: 16 to 256 MiB, cold reads improve up to 128-256 MiB, and the writer's memory triples from 128 to 256 MiB.
SHARD_BYTES: int = _env_int("TRACESTORE_SHARD_BYTES", 128 * 2**20)

#: Upper bound on inner chunks per shard: the shard index costs 16 bytes per inner chunk and is read whole.
MAX_CHUNKS_PER_SHARD: int = _env_int("TRACESTORE_MAX_CHUNKS_PER_SHARD", 16384)

#: Target bytes of one inner chunk of the flat edge arrays (graphs/edge_index, graphs/edge_attr).
EDGE_CHUNK_BYTES: int = _env_int("TRACESTORE_EDGE_CHUNK_BYTES", 256 * 2**10)

#: Verify the crc32c of every inner chunk on local reads. Off by default: the OS page cache holds what was
#: written and `tracestore verify` checks everything; remote reads always verify what arrives.
VERIFY_LOCAL_READS: bool = os.environ.get("TRACESTORE_VERIFY_LOCAL_READS", "0") not in ("", "0", "false", "False")

#: Shards a TraceStore keeps memory-mapped at once, over all its arrays (least recently used dropped first).
#: Each map holds one file descriptor: 64 stays far below the usual `ulimit -n` of 1024 even with a store
#: open in every loader worker, and 64 shards of 128 MiB (8 GiB of mapped address space) cover a batch's
#: random reads many times over, so the re-mapping that a smaller bound causes (one mmap plus one read of
#: the root zarr.json for the generation check) stays rare. A bound, not a tuning: no benchmark chose it.
MAX_MAPPED_SHARDS: int = _env_int("TRACESTORE_MAX_MAPPED_SHARDS", 64)

#: Object stores, TraceLoader: shuffle chunks fetched at once (one ranged GET each, one thread each). A chunk is
#: ~16 MiB, so 8 GETs in flight keep 128 MiB on the way: at 30 ms to the first byte and ~100 MB/s per connection
#: (one S3 connection's usual rate) that is 8 x ~80 MB/s, about 0.6 GB/s; 1 GB/s needs about 13
#: (benchmarks/results/remote.md). Raise it for a faster network; memory does not grow with it (see below).
def _env_count(name: str, default: int, *, minimum: int) -> int:
    """A count from the environment (not a size: no units), at least `minimum`; a clear error otherwise."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: not a whole number; set it to a count such as "
                         f"{default}, or unset it") from None
    if value < minimum:
        raise ValueError(f"environment variable {name}={raw!r}: must be at least {minimum}")
    return value


REMOTE_FETCH_CONCURRENCY: int = _env_count("TRACESTORE_REMOTE_FETCH_CONCURRENCY", 8, minimum=1)

#: Object stores, TraceLoader: shuffle windows fetched ahead of the one being served. The loader holds at most
#: (1 + this) x shuffle_window chunks, fetched or in flight: 2 x 16 x 16 MiB = 512 MiB by default. 1 lets the
#: next window arrive while the current one is served, so the first batch of a window waits for nothing; 0
#: fetches a window only when its first batch is read (a stall per window, half the memory).
REMOTE_PREFETCH_WINDOWS: int = _env_count("TRACESTORE_REMOTE_PREFETCH_WINDOWS", 1, minimum=0)


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"environment variable {name}={raw!r}: give a positive number of seconds")
    return value


#: A writer's lock (a store's, each part's) is a lease: the writer renews it every LOCK_RENEW_SECONDS in the
#: background, and a lock not renewed for LOCK_LEASE_SECONDS has expired: a writer on any host may then take
#: it over (a dead writer on the same host is taken over at once, as its pid tells). So a writer killed on one
#: host blocks a retry on another for at most a minute; a writer paused longer than that (SIGSTOP, a swapped
#: out VM) loses its lock and stops before its commit (fencing). The lease must exceed the clock skew between
#: hosts (expiries are wall-clock times) by far.
LOCK_LEASE_SECONDS: float = _env_seconds("TRACESTORE_LOCK_LEASE_SECONDS", 60.0)
LOCK_RENEW_SECONDS: float = _env_seconds("TRACESTORE_LOCK_RENEW_SECONDS", 10.0)
