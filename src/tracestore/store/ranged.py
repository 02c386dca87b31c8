"""Batched reads of a sharded array from an object store (no memory map): each shard index is fetched once
and cached; the byte ranges of a batch are grouped by shard, fetched with one `read_ranges` call per shard
(obstore coalesces nearby ranges and fetches them concurrently), shards in parallel; every chunk's crc32c is
checked on arrival, and a chunk that fails is fetched once more before CorruptStoreError. The loader's epochs
fetch whole shuffle chunks instead (fetch_rows: one GET per chunk, loader/window.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import google_crc32c
import numpy as np

from ..errors import CorruptStoreError
from ..format import schema

if TYPE_CHECKING:
    from .shards import ShardedArray  # noqa: F401  (the type only: shards imports this module)

MISSING = schema.SHARD_INDEX_MISSING
_MISSING = np.uint64(MISSING)


def _decode(arr: ShardedArray, shard: int, j: int, raw: bytes | memoryview) -> np.ndarray | None:
    m = arr.meta
    if m.inner_crc:
        if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            return None
        raw = raw[:-4]
    if len(raw) != m.chunk_nbytes:
        return None
    return np.frombuffer(raw, dtype=m.dtype).reshape(m.inner_shape)


def fetch_chunks(arr: ShardedArray, chunks: np.ndarray) -> dict[int, np.ndarray]:
    """Inner chunks (global numbers along the chunked axis) -> arrays of the inner shape."""
    m = arr.meta
    loc = arr.location
    uniq = np.unique(np.asarray(chunks, np.int64))
    if uniq.size == 0:
        return {}
    shard_of = uniq // m.chunks_per_shard
    shards = np.unique(shard_of).tolist()
    loc.map_parallel(arr.index, [s for s in shards if s not in arr._indexes])  # indexes once, concurrently
    out: dict[int, np.ndarray] = {}
    jobs: list[tuple[int, list[int], list[int], list[int]]] = []
    for s in shards:
        idx = arr.index(s)
        cs, starts, lengths = [], [], []
        for c in uniq[shard_of == s].tolist():
            off, n = idx[c - s * m.chunks_per_shard]
            if int(off) == MISSING:
                out[c] = np.full(m.inner_shape, m.fill_value, dtype=m.dtype)
                continue
            cs.append(c)
            starts.append(int(off))
            lengths.append(int(n))
        if cs:
            jobs.append((s, cs, starts, lengths))

    def run(job: tuple[int, list[int], list[int], list[int]]) -> list[tuple[int, np.ndarray]]:
        s, cs, starts, lengths = job
        key = m.shard_key(s)
        got = loc.read_ranges(key, starts, lengths)
        res = []
        for c, raw, st, n in zip(cs, got, starts, lengths, strict=True):
            j = c - s * m.chunks_per_shard
            a = _decode(arr, s, j, raw)
            if a is None:  # damaged in transit or at rest: one more fetch tells which
                a = _decode(arr, s, j, loc.refetch(key, st, n))  # past the cache, which it repairs
                if a is None:
                    raise CorruptStoreError(
                        f"{loc.url}: array '{m.path}' chunk {j} of {key} (bytes {st}-{st + n - 1}) fails its crc32c "
                        f"check twice; the stored object is corrupt: rebuild the store from its sources")
            res.append((c, a))
        return res

    for part in loc.map_parallel(run, jobs):
        out.update(part)
    return out


def take_ranged(arr: ShardedArray, rows: np.ndarray, out: np.ndarray, sub: tuple[Any, ...]) -> np.ndarray:
    """ShardedArray.take for a location without memory maps (one row per inner chunk, axis 0)."""
    got = fetch_chunks(arr, rows)
    for k, r in enumerate(rows.tolist()):
        row = got[r][0]
        out[k] = row[sub] if sub else row
    return out


def read_ranged(arr: ShardedArray, start: int, stop: int, out: np.ndarray) -> np.ndarray:
    """ShardedArray.read for a location without memory maps: rows [start, stop) along the chunked axis."""
    m = arr.meta
    rpc = m.rows_per_chunk
    got = fetch_chunks(arr, np.arange(start // rpc, -(-stop // rpc)))
    pos = start
    while pos < stop:
        c = pos // rpc
        lo, hi = pos - c * rpc, min(rpc, stop - c * rpc)
        src = [slice(None)] * len(m.shape)
        src[m.axis] = slice(lo, hi)
        dst = [slice(None)] * len(m.shape)
        dst[m.axis] = slice(pos - start, pos - start + hi - lo)
        out[tuple(dst)] = got[c][tuple(src)]
        pos += hi - lo
    return out


def _verified_span(arr: ShardedArray, shard: int, j0: int, j1: int) -> tuple[memoryview, int] | None:
    """Inner chunks j0..j1-1 of one shard in one ranged GET, every chunk's crc32c checked (one that fails is
    fetched once more on its own before CorruptStoreError): (the bytes, the stride of one stored chunk). None
    where the chunks are not laid out back to back (not what the writer produces) or one is missing."""
    m = arr.meta
    idx = arr.index(shard)  # the store's own index access: the generation check happens here
    offs, sizes = idx[j0:j1, 0], idx[j0:j1, 1]
    stride = arr._stored_nbytes()
    n = j1 - j0
    off0 = int(offs[0])
    regular = (not (offs == _MISSING).any() and (sizes == stride).all()
               and (offs == off0 + stride * np.arange(n, dtype=np.uint64)).all() and stride % m.dtype.itemsize == 0)
    if not regular:
        return None
    loc = arr.location
    key = m.shard_key(shard)
    read_span = getattr(loc, "read_span", None)  # a buffer, not copied (S3Location); else bytes
    raw: Any = read_span(key, off0, stride * n) if read_span is not None else loc.read_range(key, off0, stride * n)
    mv = memoryview(raw)
    patches: dict[int, bytes] = {}
    if m.inner_crc:
        u8 = np.frombuffer(mv, np.uint8)
        u8.flags.writeable = False  # google_crc32c reads a read-only buffer without a copy
        stored = u8[:stride * n].reshape(n, stride)[:, stride - 4:].copy().view("<u4")[:, 0]
        for j in range(n):
            a = j * stride
            if google_crc32c.value(u8[a:a + stride - 4]) == int(stored[j]):
                continue
            # damaged in transit or at rest: one more fetch of this chunk alone tells which
            again = loc.refetch(key, off0 + a, stride)  # past the disk cache (it may hold the damaged span)
            if google_crc32c.value(again[:-4]) != int.from_bytes(again[-4:], "little"):
                raise CorruptStoreError(
                    f"{loc.url}: array '{m.path}' chunk {j0 + j} of {key} (bytes {off0 + a}-{off0 + a + stride - 1}) "
                    f"fails its crc32c check twice; the stored object is corrupt: rebuild the store from its sources")
            patches[a] = again
    if patches:
        fixed = bytearray(mv)
        for a, again in patches.items():
            fixed[a:a + stride] = again
        raw = bytes(fixed)
        mv = memoryview(raw)  # the arrays made from these bytes are views of the repaired ones
        loc.recache(key, off0, raw)  # the span's cache entry was written from the damaged answer
    return mv, stride


def fetch_chunk_run(arr: ShardedArray, c0: int, c1: int) -> list[np.ndarray]:
    """Inner chunks c0..c1-1 (numbers along the chunked axis, all in one shard) from an object store in one
    ranged GET, each crc-checked as in fetch_rows: read-only arrays of the inner shape over the fetched bytes
    (the last chunk of the array as stored: whole, past the array's end). Used for the flat edge arrays of the
    loader's graph epochs."""
    m = arr.meta
    cps = m.chunks_per_shard
    shard = c0 // cps
    if not 0 <= c0 < c1 <= -(-m.shape[m.axis] // m.rows_per_chunk) or (c1 - 1) // cps != shard:
        raise ValueError(f"chunks {c0}-{c1 - 1} of '{m.path}': a run lies inside one shard of {cps} chunks")
    got = _verified_span(arr, shard, c0 - shard * cps, c1 - shard * cps)
    if got is None:
        chunks = fetch_chunks(arr, np.arange(c0, c1))
        return [chunks[c] for c in range(c0, c1)]
    mv, stride = got
    return [np.frombuffer(mv[k * stride:k * stride + m.chunk_nbytes], dtype=m.dtype).reshape(m.inner_shape)
            for k in range(c1 - c0)]


def fetch_rows(arr: ShardedArray, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of an array with one row per inner chunk along axis 0, all inside one shard, from an
    object store in one ranged GET: the whole contiguous span of their inner chunks (what the loader's shuffle
    chunks are; the disk cache keeps the span as one entry). Every inner chunk's crc32c is checked; one that
    fails is fetched once more on its own before CorruptStoreError. Returns a read-only view
    [stop - start, *inner_shape[1:]] over the fetched bytes (strided past the crc32c of each chunk).

    Chunks that are not laid out back to back (not what the writer produces), or missing, go through
    fetch_chunks: still one fetch per call, coalesced by obstore."""
    m = arr.meta
    if m.axis != 0 or m.rows_per_chunk != 1:
        raise ValueError(f"fetch_rows() needs one row per inner chunk along axis 0; '{m.path}' has {m.inner_shape}")
    rps = m.rows_per_shard
    shard = start // rps
    if not 0 <= start < stop <= m.shape[0] or (stop - 1) // rps != shard:
        raise ValueError(f"rows {start}-{stop - 1} of '{m.path}': a span lies inside one shard of {rps} rows and "
                         f"inside the array's {m.shape[0]} rows")
    got = _verified_span(arr, shard, start - shard * rps, stop - shard * rps)
    if got is None:
        chunks = fetch_chunks(arr, np.arange(start, stop))
        return np.stack([chunks[r][0] for r in range(start, stop)])
    mv, stride = got
    n = stop - start
    item = m.dtype.itemsize
    base = np.frombuffer(mv, dtype=m.dtype, count=(stride * (n - 1) + m.chunk_nbytes) // item)
    inner_strides = np.empty(m.inner_shape[1:], m.dtype).strides
    return np.lib.stride_tricks.as_strided(base, shape=(n, *m.inner_shape[1:]), strides=(stride, *inner_strides),
                                           writeable=False)
