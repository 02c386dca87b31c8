"""Chunk and shard shapes. One trace (resp. one token) per inner chunk, so a trace is one contiguous byte
range; shards of about config.SHARD_BYTES so an object store holds a few large objects."""

from __future__ import annotations

from .. import config


def rows_per_shard(row_nbytes: int, shard_bytes: int | None = None, max_chunks: int | None = None) -> int:
    """Inner chunks (rows of one trace / one node) per shard for rows of `row_nbytes` bytes."""
    target = config.SHARD_BYTES if shard_bytes is None else shard_bytes
    cap = config.MAX_CHUNKS_PER_SHARD if max_chunks is None else max_chunks
    if row_nbytes <= 0:
        raise ValueError(f"row size must be positive, got {row_nbytes} bytes")
    return max(1, min(cap, target // row_nbytes))


def edge_chunk_rows(edge_attr_size: int, chunk_bytes: int | None = None) -> int:
    """Edges per inner chunk of graphs/edge_index and graphs/edge_attr (the same for both, so one
    trace's edges touch the same chunk numbers in each)."""
    target = config.EDGE_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    # edge_index costs 8 bytes per edge (2 x int32), edge_attr 2*H: size by the larger of the two
    per_edge = max(8, 2 * edge_attr_size)
    return max(256, target // per_edge)


def edge_chunks_per_shard(edge_chunk: int, edge_attr_size: int, shard_bytes: int | None = None) -> int:
    target = config.SHARD_BYTES if shard_bytes is None else shard_bytes
    per_chunk = edge_chunk * max(8, 2 * edge_attr_size)
    return max(1, min(config.MAX_CHUNKS_PER_SHARD, target // per_chunk))


#: Strings per chunk of tokens/text (plain, zstd-compressed): a trace's text is one small chunk read.
TEXT_CHUNK_ROWS = 16384


def token_id_chunk_rows(chunk_bytes: int | None = None) -> int:
    """Token ids (int64) per inner chunk of tokens/ids: the edge arrays' chunk size in bytes."""
    target = config.EDGE_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return max(256, target // 8)


def token_id_chunks_per_shard(chunk_rows: int, shard_bytes: int | None = None) -> int:
    target = config.SHARD_BYTES if shard_bytes is None else shard_bytes
    return max(1, min(config.MAX_CHUNKS_PER_SHARD, target // (chunk_rows * 8)))
