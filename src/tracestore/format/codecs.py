"""zarr codec chains of format v1.

Inner chunks are stored uncompressed: float16 activations compress at most ~1.15x and decode at ~1 GB/s
per core (../shared/notes/zarr-and-torch.md 1.5), so compression costs more read speed than it saves
bytes. Every inner chunk and every shard index carries a crc32c.
"""

from __future__ import annotations

from typing import Any

from zarr.codecs import BytesCodec, Crc32cCodec, VLenUTF8Codec, ZstdCodec


def chunk_serializer() -> BytesCodec:
    return BytesCodec(endian="little")


def chunk_checksum() -> list[Any]:
    return [Crc32cCodec()]


def sharded_array_kwargs(inner_chunks: tuple[int, ...], shard_shape: tuple[int, ...]) -> dict[str, Any]:
    """Keyword arguments for zarr.create_array: sharded, inner chunk = `inner_chunks`, crc32c on every
    inner chunk and on the shard index (zarr's default index codecs), index at the end."""
    return {
        "chunks": inner_chunks,
        "shards": shard_shape,
        "serializer": chunk_serializer(),
        "compressors": chunk_checksum(),
        "filters": None,
        # a dense index: a zero trace is stored, not left out as 'equal to the fill value'
        "config": {"write_empty_chunks": True},
    }


def plain_array_kwargs(chunks: tuple[int, ...]) -> dict[str, Any]:
    """Small arrays read whole at open (scores, pointers): one or few chunks, crc32c, no sharding."""
    return {
        "chunks": chunks,
        "serializer": chunk_serializer(),
        "compressors": chunk_checksum(),
        "filters": None,
    }


def ids_array_kwargs(chunks: tuple[int, ...]) -> dict[str, Any]:
    """The `ids` array: variable-length UTF-8 strings, zstd, crc32c. Spelled out rather than left to zarr's
    defaults so that a zarr upgrade cannot change the format (the golden test pins it)."""
    return {
        "chunks": chunks,
        "serializer": VLenUTF8Codec(),
        "compressors": [ZstdCodec(level=3, checksum=False), Crc32cCodec()],
        "filters": None,
    }
