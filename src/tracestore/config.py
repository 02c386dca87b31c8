"""Process-wide defaults. Each can be overridden by a TRACESTORE_* environment variable.

Arguments passed to functions win over these; these win over the built-in values. The built-in values
cite the benchmark that chose them.
"""

from __future__ import annotations

import os


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer; unset it or give a number of bytes") from None


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
