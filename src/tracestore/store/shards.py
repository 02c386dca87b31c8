"""A direct reader of zarr v3 sharded arrays, for the hot paths.

zarr-python 3.1.6 spends ~1 ms of per-call machinery on one trace and 160-300 ms on 64 random traces, where
np.memmap takes microseconds (../shared/notes/zarr-and-torch.md 1.9; benchmarks/bench_random_access.py).
This reader follows the sharding spec (zarr-specs sharding-indexed) for what format v1 writes: inner codecs
`bytes` (+ optional `crc32c`), index codecs `bytes` + `crc32c`, chunked along one axis. It reads and
crc-checks each shard index once, memory-maps shard files, and serves rows as views, slices or gathers into a
caller's buffer. Anything else (a compressed store) raises UnsupportedLayout and the caller uses zarr.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np

from .. import config
from ..errors import CorruptStoreError, StaleStoreError
from ..format import schema
from .urls import Location

MISSING = np.uint64(schema.SHARD_INDEX_MISSING)

#: ShardCache's generation when nothing is to be checked (an array opened on its own, by `tracestore verify`)
UNCHECKED: Any = object()
_UNSET: Any = object()


def read_only(a: np.ndarray) -> np.ndarray:
    """`a`, flagged read-only: the arrays a store hands out are its own state (editing ids would change what
    select() finds, editing a pointer what every later read returns)."""
    a.flags.writeable = False
    return a


def store_generation(location: Location) -> str | None:
    """The generation of the store now at `location` (root attribute tracestore.generation; None for stores
    written before it existed). Raises StaleStoreError when the root zarr.json is gone or unreadable: the store
    was removed, or is being replaced."""
    raw = location.read_bytes("zarr.json")
    try:
        attrs = json.loads(raw)["attributes"][schema.ATTRS_KEY] if raw is not None else None
    except (ValueError, KeyError, TypeError):
        attrs = None
    if not isinstance(attrs, dict) or not attrs.get(schema.ATTR_COMMITTED):
        raise StaleStoreError(f"{location.url}: the store was removed or is being replaced since it was opened (its "
                              f"root zarr.json is {'missing' if raw is None else 'not a committed store'}); reopen "
                              f"it with tracestore.open() once its writer has finished")
    gen = attrs.get(schema.ATTR_GENERATION)
    return None if gen is None else str(gen)


class _Mapped:
    """One shard as mapped: its bytes (None where the object does not exist), and the views made from them."""

    __slots__ = ("buf", "view", "row_view", "derived")

    def __init__(self, buf: memoryview | None) -> None:
        self.buf = buf
        self.view: Any = _UNSET
        self.row_view: Any = _UNSET
        # what a consumer made from row_view (the loader's torch view): dropped with the map, so that it
        # cannot keep a dropped shard's file open
        self.derived: Any = _UNSET


class ShardBudget:
    """One bound on the pieces held by several shard caches: the parts of a store made of parts, so that a
    store of many parts maps (and holds file descriptors for) no more shards than a single store. Each cache
    still checks its own part's generation; the budget only drops the least recently used piece of any of
    them. Lock order: a cache's lock, then the budget's (the budget never takes a cache's lock: it drops a
    piece with one dict pop, as ShardCache.get reads without one)."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = max(1, config.MAX_MAPPED_SHARDS if capacity is None else int(capacity))
        self._order: OrderedDict[tuple[int, tuple[str, int]], ShardCache] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._order)

    def added(self, cache: ShardCache, key: tuple[str, int]) -> None:
        with self._lock:
            self._order[(id(cache), key)] = cache
            while len(self._order) > self.capacity:
                (_, k), c = self._order.popitem(last=False)
                c._entries.pop(k, None)  # drop the reference only: live views keep their map

    def touched(self, cache: ShardCache, key: tuple[str, int]) -> None:
        try:
            self._order.move_to_end((id(cache), key))
        except KeyError:  # dropped meanwhile
            pass

    def dropped(self, cache: ShardCache, keys: list[tuple[str, int]]) -> None:
        with self._lock:
            for k in keys:
                self._order.pop((id(cache), k), None)


class ShardCache:
    """The shards of one store that are mapped now, shared by all its arrays, and the store's identity.

    At most `capacity` pieces are held (least recently used dropped first: default config.MAX_MAPPED_SHARDS,
    `TRACESTORE_MAX_MAPPED_SHARDS`): each mapped shard holds a file descriptor, so a store of more shards than
    `ulimit -n` reads through. A dropped shard's bytes stay valid for every array view already handed out
    (the view keeps its map alive); dropping is not closing.

    Every piece is checked when it is loaded: after the shard is mapped (or an object store's shard index
    fetched), the root zarr.json is read and its generation compared with the one the store was opened with.
    A store replaced in between raises StaleStoreError; when the generation still matches after the map, the
    bytes mapped are the opened store's, even if its files are deleted later (the map keeps them). Pickles
    as its location, generation and capacity (maps reopen lazily in the new process, checked the same way)."""

    def __init__(self, location: Location, generation: Any = UNCHECKED, capacity: int | None = None) -> None:
        self.location = location
        self.generation = generation
        self.capacity = max(1, config.MAX_MAPPED_SHARDS if capacity is None else int(capacity))
        #: shared with the other parts of a store made of parts (set by the reader; not pickled: rebuilt)
        self.budget: ShardBudget | None = None
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self.closed = False

    def __getstate__(self) -> dict[str, Any]:
        return {"location": self.location, "generation": self.generation, "capacity": self.capacity}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.budget = None
        self._reset()

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, what: str) -> None:
        """Raise StaleStoreError if the store at the location is no longer the one opened (`what`: the piece
        just loaded, for the message). Call it after loading the piece, never before."""
        if self.generation is UNCHECKED:
            return
        now = store_generation(self.location)
        if now != self.generation:
            raise StaleStoreError(f"{self.location.url}: the store was replaced since it was opened (generation "
                                  f"{self.generation} when opened, {now} now; found reading {what}); its traces "
                                  f"would mix two stores: reopen it with tracestore.open()")

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"{self.location.url}: the store is closed; reopen it with tracestore.open() to read "
                             f"more (arrays read before close() stay valid)")

    def get(self, key: tuple[str, int]) -> Any:
        """The piece under `key` if held now (marked as just used), else None. No lock: one dict lookup."""
        e = self._entries.get(key)
        if e is not None:
            try:
                self._entries.move_to_end(key)
            except KeyError:  # dropped by another thread meanwhile: still valid for this use
                pass
            if self.budget is not None:
                self.budget.touched(self, key)
        return e

    def load(self, key: tuple[str, int], what: str, fn: Callable[[], Any]) -> Any:
        """The piece under `key`, loading it with `fn()` (then checking the generation) if not held; the least
        recently used piece is dropped past the capacity."""
        e = self.get(key)
        if e is not None:
            return e
        with self._lock:
            e = self._entries.get(key)
            if e is not None:
                return e
            self._check_open()
            e = fn()
            self.check(what)  # after the load: the race-free order
            self._entries[key] = e
            dropped = []
            while len(self._entries) > self.capacity:
                dropped.append(self._entries.popitem(last=False)[0])  # the reference only: views keep their map
            if self.budget is not None:
                self.budget.dropped(self, dropped)
                self.budget.added(self, key)
            return e

    def map_shard(self, path: str, shard: int, key: str) -> _Mapped:
        """Shard `shard` of array `path` (object `key`) mapped, as a _Mapped."""
        return self.load((path, shard), key, lambda: _Mapped(self.location.map(key)))  # type: ignore[no-any-return]

    def clear(self) -> None:
        """Drop every piece held (views handed out stay valid)."""
        with self._lock:
            self._forget()

    def _forget(self) -> None:
        if self.budget is not None:
            self.budget.dropped(self, list(self._entries))
        self._entries.clear()

    def close(self) -> None:
        """Drop every piece and refuse loading more (ValueError naming the store)."""
        with self._lock:
            self._forget()
            self.closed = True


class UnsupportedLayout(Exception):
    """The array uses codecs or a grid this reader does not handle; read it through zarr instead."""


@dataclass(frozen=True)
class ShardedArrayMeta:
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any
    shard_shape: tuple[int, ...]
    inner_shape: tuple[int, ...]
    axis: int  # the one axis along which the array is chunked
    inner_crc: bool
    index_at_end: bool
    separator: str

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_shape[self.axis] // self.inner_shape[self.axis]

    @property
    def rows_per_chunk(self) -> int:
        return self.inner_shape[self.axis]

    @property
    def rows_per_shard(self) -> int:
        return self.shard_shape[self.axis]

    @property
    def chunk_nbytes(self) -> int:
        return int(np.prod(self.inner_shape)) * self.dtype.itemsize

    @property
    def index_nbytes(self) -> int:
        return 16 * self.chunks_per_shard + 4

    @property
    def num_shards(self) -> int:
        n = self.shape[self.axis]
        return -(-n // self.rows_per_shard)

    def shard_key(self, shard: int) -> str:
        coords = ["0"] * len(self.shape)
        coords[self.axis] = str(shard)
        return f"{self.path}/c{self.separator}" + self.separator.join(coords)

    @classmethod
    def from_json(cls, path: str, meta: dict[str, Any], axis: int | None = None) -> ShardedArrayMeta:
        """Parse an array's zarr.json. `axis` names the chunked axis where the metadata alone cannot tell
        (an array that fits one inner chunk is 'chunked' along every axis: graphs/edge_index [2, E] with E
        equal to its chunk length would otherwise be read along the wrong axis)."""
        codecs = meta.get("codecs", [])
        if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
            raise UnsupportedLayout(f"{path}: not a sharded array")
        conf = codecs[0]["configuration"]
        inner_codecs = [c["name"] for c in conf["codecs"]]
        if inner_codecs not in (["bytes"], ["bytes", "crc32c"]):
            raise UnsupportedLayout(f"{path}: inner codecs {inner_codecs}")
        if conf["codecs"][0].get("configuration", {}).get("endian", "little") != "little":
            raise UnsupportedLayout(f"{path}: big-endian")
        if [c["name"] for c in conf.get("index_codecs", [])] != ["bytes", "crc32c"]:
            raise UnsupportedLayout(f"{path}: index codecs")
        if meta.get("chunk_key_encoding", {}).get("name") != "default":
            raise UnsupportedLayout(f"{path}: chunk key encoding")
        shape = tuple(meta["shape"])
        shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        inner_shape = tuple(conf["chunk_shape"])
        # chunked along exactly one axis: every other dim is whole in both the shard and the inner chunk
        candidates = [i for i in range(len(shape)) if all(
            shard_shape[j] == inner_shape[j] == shape[j] for j in range(len(shape)) if j != i)]
        if not candidates:
            raise UnsupportedLayout(f"{path}: chunked along more than one axis")
        # several candidates only when the array fits one inner chunk; prefer an axis that is really split
        split = [i for i in candidates if inner_shape[i] != shape[i]]
        if axis is None or axis not in candidates:
            axis = (split or candidates)[0]
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        return cls(path=path, shape=shape, dtype=dtype, fill_value=_parse_fill_value(meta.get("fill_value", 0), dtype),
                   shard_shape=shard_shape, inner_shape=inner_shape, axis=axis,
                   inner_crc=inner_codecs == ["bytes", "crc32c"],
                   index_at_end=conf.get("index_location", "end") == "end", separator=sep)


def _parse_fill_value(v: Any, dtype: np.dtype) -> Any:
    """A zarr v3 JSON fill value -> a numpy scalar of `dtype` (spec: numbers, "NaN", "Infinity",
    "-Infinity", or "0x..." giving the raw bytes of a float, big-endian as written)."""
    if isinstance(v, str) and v.startswith("0x"):
        raw = int(v, 16).to_bytes(dtype.itemsize, "big")
        return np.frombuffer(raw, dtype=dtype.newbyteorder(">"))[0].astype(dtype)
    if isinstance(v, str):
        v = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.get(v, v)
    if v is None:
        v = 0
    return np.asarray(v).astype(dtype)[()]


def _simplify_sub(sub: tuple[Any, ...]) -> tuple[Any, ...]:
    """Turn integer arrays that are ranges (layers=[3] or [2, 3, 4]) into slices: a slice is a view, an
    integer array makes numpy copy into a temporary first."""
    if not sub:
        return ()
    res = []
    for k in sub:
        if isinstance(k, list | np.ndarray):
            a = np.asarray(k)
            if a.ndim == 1 and a.size and a.dtype.kind in "iu" and a.min() >= 0 and (a.size == 1 or (np.diff(a) == 1).all()):
                k = slice(int(a[0]), int(a[0]) + a.size)
        res.append(k)
    return tuple(res)


class ShardedArray:
    """Read-only access to one sharded array of a store. Thread-safe; picklable (maps reopen lazily).

    Shards are mapped through `cache` (a ShardCache, shared by the arrays of one TraceStore; a private one
    that checks no generation by default): at most its capacity are mapped at once, each checked against the
    store's generation when mapped. Shard indexes (16 bytes per inner chunk) are kept for the array's life."""

    def __init__(self, location: Location, meta: ShardedArrayMeta, *, verify: bool = False,
                 cache: ShardCache | None = None) -> None:
        self.location = location
        self.meta = meta
        self.verify = verify
        self.cache = ShardCache(location) if cache is None else cache
        self._reset()

    @classmethod
    def open(cls, location: Location, path: str, *, verify: bool = False, axis: int | None = None,
             cache: ShardCache | None = None) -> ShardedArray:
        """Open array `path` of the store at `location`; `axis` names the chunked axis where the metadata is
        ambiguous (see ShardedArrayMeta.from_json). A missing or unreadable zarr.json is a CorruptStoreError
        naming the store and the array."""
        raw = location.read_bytes(f"{path}/zarr.json")
        if raw is None:
            raise CorruptStoreError(f"{location.url}: array '{path}' has no zarr.json; the store is damaged "
                                    f"(the array is missing): run `tracestore verify {location.url}`, rebuild it from its sources")
        try:
            meta = json.loads(raw)
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise CorruptStoreError(f"{location.url}: {path}/zarr.json is not valid metadata ({str(e)[:120]}); the "
                                    f"store is damaged: rebuild it from its sources") from None
        return cls(location, ShardedArrayMeta.from_json(path, meta, axis), verify=verify, cache=cache)

    def _reset(self) -> None:
        self._indexes: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"location": self.location, "meta": self.meta, "verify": self.verify, "cache": self.cache}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.budget = None
        self._reset()

    # -- shape ---------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.meta.shape

    @property
    def dtype(self) -> np.dtype:
        return self.meta.dtype

    def __len__(self) -> int:
        return self.meta.shape[0]

    # -- shard plumbing ------------------------------------------------------------------------------
    def _mapped(self, shard: int) -> _Mapped:
        e = self.cache.get((self.meta.path, shard))
        if e is None:
            key = self.meta.shard_key(shard)
            try:
                e = self.cache.map_shard(self.meta.path, shard, key)
            except (IsADirectoryError, NotADirectoryError, PermissionError) as err:
                raise CorruptStoreError(f"{self.location.url}: array '{self.meta.path}': shard {key} cannot be "
                                        f"read ({type(err).__name__}: {err.strerror}); the store is damaged: run "
                                        f"`tracestore verify {self.location.url}`, rebuild it from its "
                                        f"sources") from None
        return e  # type: ignore[no-any-return]

    def _complete(self) -> bool:
        """Whether every shard and inner chunk of this array must exist: stores with a generation are written
        whole (a missing shard or chunk is damage, not fill values); older stores may skip empty ones."""
        return isinstance(self.cache.generation, str)

    def _missing(self, what: str) -> CorruptStoreError:
        return CorruptStoreError(f"{self.location.url}: array '{self.meta.path}': {what} is missing; the store "
                                 f"is damaged (its writer writes every shard): run `tracestore verify "
                                 f"{self.location.url}`, rebuild it from its sources")

    def _buffer(self, shard: int) -> memoryview | None:
        """The shard's bytes, memory-mapped (None on an object store, or where the object does not exist)."""
        if self.location.is_remote:
            return None
        return self._mapped(shard).buf

    def index(self, shard: int) -> np.ndarray:
        """The shard's index as uint64 [chunks_per_shard, 2] (offset, nbytes); all MISSING if the shard
        object does not exist. Read and crc-checked once."""
        idx = self._indexes.get(shard)
        if idx is not None:
            return idx
        m = self.meta
        key = m.shard_key(shard)
        n = m.index_nbytes
        buf = self._buffer(shard)
        if buf is not None:
            if len(buf) < n:
                raise CorruptStoreError(f"{self.location.url}: {key} is {len(buf)} bytes, shorter than its "
                                        f"{n}-byte shard index; the shard is truncated")
            raw = buf[len(buf) - n:] if m.index_at_end else buf[:n]
        else:
            got = self.location.read_suffix(key, n) if m.index_at_end else self._read_prefix(key, n)
            if self.location.is_remote:
                self.cache.check(key)  # after the fetch: an object store's index is its "map"
            if got is None:
                if self._complete():
                    raise self._missing(f"shard {key}")
                idx = np.full((m.chunks_per_shard, 2), MISSING, dtype=np.uint64)
                self._indexes[shard] = idx
                return idx
            if len(got) < n:
                raise CorruptStoreError(f"{self.location.url}: {key} is shorter than its {n}-byte shard index; "
                                        f"the shard is truncated")
            raw = memoryview(got)
        if buf is None and google_crc32c.value(bytes(raw[:-4])) != int.from_bytes(bytes(raw[-4:]), "little"):
            # an object store: damaged in transit, or a disk-cache entry written from a damaged answer; once
            # more from the store itself (which repairs the cache entry) before calling the shard corrupt
            size = self.location.size(key)
            if size is not None and size >= n:
                start = size - n if m.index_at_end else 0
                raw = memoryview(self.location.refetch(key, start, n))
        if google_crc32c.value(bytes(raw[:-4])) != int.from_bytes(bytes(raw[-4:]), "little"):
            raise CorruptStoreError(f"{self.location.url}: shard index of {key} fails its crc32c check; the shard "
                                    f"is corrupt (run `tracestore verify {self.location.url}`)")
        idx = np.frombuffer(bytes(raw[:-4]), dtype="<u8").reshape(m.chunks_per_shard, 2)
        self._indexes[shard] = idx
        return idx

    def _read_prefix(self, key: str, n: int) -> bytes | None:
        if self.location.size(key) is None:
            return None
        return self.location.read_range(key, 0, n)

    def _stored_nbytes(self) -> int:
        return self.meta.chunk_nbytes + (4 if self.meta.inner_crc else 0)

    def _chunk_bytes(self, shard: int, j: int) -> memoryview | bytes | None:
        """The decoded bytes of inner chunk j of a shard (crc stripped, checked if verify), or None if missing."""
        off, nbytes = self.index(shard)[j]
        if off == MISSING:
            if self._complete():
                raise self._missing(f"inner chunk {j} of shard {self.meta.shard_key(shard)}")
            return None
        off, nbytes = int(off), int(nbytes)
        if nbytes != self._stored_nbytes():
            raise CorruptStoreError(f"{self.location.url}: {self.meta.shard_key(shard)} chunk {j} holds {nbytes} "
                                    f"bytes; expected {self._stored_nbytes()}")
        buf = self._buffer(shard)
        if buf is not None:
            if off + nbytes > len(buf):
                raise CorruptStoreError(f"{self.location.url}: {self.meta.shard_key(shard)} chunk {j} runs past "
                                        f"the end of the shard; the shard is truncated")
            raw = buf[off:off + nbytes]
        else:
            raw = memoryview(self.location.read_range(self.meta.shard_key(shard), off, nbytes))
        if self.meta.inner_crc:
            if self.verify:
                self._check_chunk_crc(shard, j, raw)
            raw = raw[:-4]
        return raw

    def _check_chunk_crc(self, shard: int, j: int, raw: memoryview | bytes) -> None:
        if google_crc32c.value(bytes(raw[:-4])) != int.from_bytes(bytes(raw[-4:]), "little"):
            row = shard * self.meta.rows_per_shard + j * self.meta.rows_per_chunk
            raise CorruptStoreError(f"{self.location.url}: array '{self.meta.path}' chunk {j} of "
                                    f"{self.meta.shard_key(shard)} (rows from {row}) fails its crc32c check; "
                                    f"the store is corrupt: rebuild it from its sources")

    def chunk(self, c: int) -> np.ndarray:
        """Inner chunk number c (along the chunked axis) as an array of the inner shape (a read-only view
        where possible; filled with the fill value if missing)."""
        shard, j = divmod(c, self.meta.chunks_per_shard)
        raw = self._chunk_bytes(shard, j)
        if raw is None:
            return np.full(self.meta.inner_shape, self.meta.fill_value, dtype=self.meta.dtype)
        return np.frombuffer(raw, dtype=self.meta.dtype).reshape(self.meta.inner_shape)

    def shard_view(self, shard: int) -> np.ndarray | None:
        """All present chunks of a shard as one strided view [chunks, *inner_shape] over the memory map, when
        they are laid out at a regular stride (what our writer produces); None otherwise (use chunk()). The
        view stays valid after the shard is dropped from the cache (it keeps its map alive)."""
        if self.location.is_remote:
            return None
        e = self._mapped(shard)
        view = e.view
        if view is _UNSET:
            view = e.view = self._make_shard_view(shard, e.buf)
        return view  # type: ignore[no-any-return]

    def mapped_entry(self, shard: int) -> _Mapped | None:
        """The cache entry of a local shard (its map and views; `derived` is the caller's), None on an object
        store. Valid while used: the cache may drop it later, and a new call maps the shard again."""
        if self.location.is_remote:
            return None
        return self._mapped(shard)

    def shard_rows_view(self, shard: int) -> np.ndarray | None:
        """shard_view() with the inner chunk axis dropped: [rows, *inner_shape[1:]] (one row per chunk)."""
        if self.location.is_remote:
            return None
        e = self._mapped(shard)
        rv = e.row_view
        if rv is _UNSET:
            view = self.shard_view(shard)
            rv = e.row_view = None if view is None else view[:, 0]
        return rv  # type: ignore[no-any-return]

    def _make_shard_view(self, shard: int, buf: memoryview | None) -> np.ndarray | None:
        m = self.meta
        if self.verify and m.inner_crc:
            return None  # every read goes through chunk() so that its crc is checked
        if buf is None:
            return None
        idx = self.index(shard)
        rows_here = min(m.rows_per_shard, m.shape[m.axis] - shard * m.rows_per_shard)
        n = -(-rows_here // m.rows_per_chunk)
        offs = idx[:n, 0]
        if n == 0 or (offs == MISSING).any():
            return None
        stride = self._stored_nbytes()
        if not (idx[:n, 1] == stride).all():
            return None
        off0 = int(offs[0])
        if not (offs == off0 + stride * np.arange(n, dtype=np.uint64)).all():
            return None
        item = m.dtype.itemsize
        if off0 % item or stride % item or off0 + stride * (n - 1) + m.chunk_nbytes > len(buf):
            return None
        base = np.frombuffer(buf, dtype=m.dtype, count=(stride * (n - 1) + m.chunk_nbytes) // item, offset=off0)
        inner_strides = np.empty(m.inner_shape, m.dtype).strides
        return np.lib.stride_tricks.as_strided(base, shape=(n, *m.inner_shape), strides=(stride, *inner_strides),
                                               writeable=False)

    # -- reads along axis 0 with one row per inner chunk (sequences, graphs/x) --------------------------
    def _row_view(self, row: int) -> np.ndarray:
        """Row `row` (inner chunk == one row along axis 0) as a view, shape inner_shape[1:]."""
        m = self.meta
        shard, local = divmod(row, m.rows_per_shard)
        view = self.shard_rows_view(shard)
        if view is not None:
            return view[local]
        return self.chunk(row)[0]

    def row(self, row: int) -> np.ndarray:
        """One row along axis 0 (rows_per_chunk == 1), as a read-only view."""
        n = self.meta.shape[0]
        if not -n <= row < n:
            raise IndexError(f"row {row} out of range for '{self.meta.path}' with {n} rows")
        if self.location.is_remote:
            return self.take(np.array([row % n]))[0]
        return self._row_view(row % n)

    def take(self, rows: Any, out: np.ndarray | None = None, sub: tuple[Any, ...] = (),
             positions: np.ndarray | None = None) -> np.ndarray:
        """Gather rows (axis 0, one row per inner chunk) into `out` [len(rows), ...] (allocated if None),
        applying the index `sub` (ints, slices, integer arrays) to each row's trailing dims. With `positions`,
        row k goes to out[positions[k]] instead (a store of parts gathers each part's rows of an unsorted
        batch in one call; `out` must then be given).

        The hot path of the loader and of random access, so its per-call cost is kept to a few microseconds:
        one row goes straight to its shard view; several rows are split into runs of consecutive rows within
        one shard (one strided copy each) and single rows (one copy each), with no temporaries."""
        m = self.meta
        if m.axis != 0 or m.rows_per_chunk != 1:
            raise ValueError(f"take() needs one row per inner chunk along axis 0; '{m.path}' has {m.inner_shape}")
        n, rps = m.shape[0], m.rows_per_shard
        sub = _simplify_sub(sub)
        if type(rows) is list and len(rows) == 1 and type(rows[0]) is int:
            r = np.array(rows, dtype=np.int64)
        else:
            r = np.asarray(rows, dtype=np.int64).reshape(-1)
        if positions is not None:
            if out is None:
                raise ValueError("take(positions=...) writes into a given out")
            return self._take_at(r, out, sub, np.asarray(positions, np.int64).reshape(-1))
        if out is None:
            probe = np.empty(m.inner_shape[1:], dtype=m.dtype)[sub] if sub else None
            out = np.empty((r.size, *(probe.shape if probe is not None else m.inner_shape[1:])), dtype=m.dtype)
        if r.size == 0:
            return out
        if self.location.is_remote:  # no memory map: batched, coalesced, concurrent ranged reads
            from .ranged import take_ranged

            if r.size and (int(r.min()) < 0 or int(r.max()) >= n):
                raise IndexError(f"row {int(r.min()) if r.min() < 0 else int(r.max())} out of range for '{m.path}' "
                                 f"with {n} rows")
            return take_ranged(self, r, out, sub)
        if r.size == 1:
            row = int(r[0])
            if not 0 <= row < n:
                raise IndexError(f"row {row} out of range for '{m.path}' with {n} rows")
            src = self._row_view(row)
            out[0] = src[sub] if sub else src
            return out
        lo, hi = int(r.min()), int(r.max())
        if lo < 0 or hi >= n:
            raise IndexError(f"row {lo if lo < 0 else hi} out of range for '{m.path}' with {n} rows")
        # segments of neighbouring positions that fall in one shard; within a segment, consecutive rows are
        # one strided slice copy, others one copy per row (no temporaries either way)
        sh = r // rps
        brk = sh[1:] != sh[:-1]
        if brk.any():
            starts = [0, *(np.flatnonzero(brk) + 1).tolist()]
            stops = [*starts[1:], r.size]
        else:
            starts, stops = [0], [r.size]
        step1 = np.diff(r) == 1
        rl = r.tolist()
        for a, b in zip(starts, stops, strict=True):
            first = rl[a]
            shard, local = divmod(first, rps)
            view = self.shard_rows_view(shard)
            if view is None:  # irregular or verified shard: chunk by chunk
                for k in range(a, b):
                    src = self.chunk(rl[k])[0]
                    out[k] = src[sub] if sub else src
            elif b - a == 1:
                src = view[local]
                out[a] = src[sub] if sub else src
            elif step1[a:b - 1].all():
                blk = view[local:local + b - a]
                out[a:b] = blk[(slice(None), *sub)] if sub else blk
            else:
                # row by row: np.take would first copy the whole (non-contiguous: a crc32c sits between
                # rows) shard view into a contiguous temporary
                base = shard * rps
                if sub:
                    for k in range(a, b):
                        out[k] = view[rl[k] - base][sub]
                else:
                    for k in range(a, b):
                        out[k] = view[rl[k] - base]
        return out

    def _take_at(self, r: np.ndarray, out: np.ndarray, sub: tuple[Any, ...], pos: np.ndarray) -> np.ndarray:
        """take() with row k into out[pos[k]]: runs consecutive in both the rows and the positions are one
        copy, other rows one copy each, from the shard views; remote or irregular shards through take()."""
        m = self.meta
        n, rps = m.shape[0], m.rows_per_shard
        if r.size == 0:
            return out
        lo, hi = int(r.min()), int(r.max())
        if lo < 0 or hi >= n:
            raise IndexError(f"row {lo if lo < 0 else hi} out of range for '{m.path}' with {n} rows")
        if self.location.is_remote:
            out[pos] = self.take(r, sub=sub)
            return out
        sh = r // rps
        brk = (np.diff(r) != 1) | (np.diff(pos) != 1) | (sh[1:] != sh[:-1])
        starts = [0, *(np.flatnonzero(brk) + 1).tolist()]
        stops = [*starts[1:], r.size]
        rl, pl = r.tolist(), pos.tolist()
        for a, b in zip(starts, stops, strict=True):
            shard, local = divmod(rl[a], rps)
            view = self.shard_rows_view(shard)
            if view is None:
                got = self.take(r[a:b], sub=sub)
                out[pl[a]:pl[a] + b - a] = got
                continue
            if b - a == 1:
                src = view[local]
                out[pl[a]] = src[sub] if sub else src
            else:
                blk = view[local:local + b - a]
                out[pl[a]:pl[a] + b - a] = blk[(slice(None), *sub)] if sub else blk
        return out

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) along the chunked axis, for any rows-per-chunk (used for the flat edge arrays
        and for slices)."""
        m = self.meta
        ax = m.axis
        total = m.shape[ax]
        start, stop = max(0, start), min(total, stop)
        length = max(0, stop - start)
        shape = list(m.shape)
        shape[ax] = length
        if out is None:
            out = np.empty(shape, dtype=m.dtype)
        if length == 0:
            return out
        if self.location.is_remote:
            from .ranged import read_ranged

            return read_ranged(self, start, stop, out)
        rpc = m.rows_per_chunk
        pos = start
        while pos < stop:
            c = pos // rpc
            lo = pos - c * rpc
            hi = min(rpc, stop - c * rpc)
            src = self._chunk_rows(c, lo, hi)
            dst = [slice(None)] * len(shape)
            dst[ax] = slice(pos - start, pos - start + (hi - lo))
            out[tuple(dst)] = src
            pos += hi - lo
        return out

    def _chunk_rows(self, c: int, lo: int, hi: int) -> np.ndarray:
        m = self.meta
        shard, j = divmod(c, m.chunks_per_shard)
        view = self.shard_view(shard)
        sel = [slice(None)] * len(m.shape)
        sel[m.axis] = slice(lo, hi)
        if view is not None:
            return view[j][tuple(sel)]
        return self.chunk(c)[tuple(sel)]

    # -- integrity ------------------------------------------------------------------------------------
    def verify_all(self) -> int:
        """Check every shard index and every inner chunk's crc32c; return the number of chunks checked.
        Raises CorruptStoreError naming the array, shard and chunk of the first fault."""
        m = self.meta
        checked = 0
        total_chunks = -(-m.shape[m.axis] // m.rows_per_chunk)
        for shard in range(m.num_shards):
            idx = self.index(shard)
            first = shard * m.chunks_per_shard
            for j in range(min(m.chunks_per_shard, total_chunks - first)):
                off, nbytes = idx[j]
                if off == MISSING:
                    raise CorruptStoreError(f"{self.location.url}: array '{m.path}' chunk {j} of {m.shard_key(shard)} "
                                            f"is missing; the store is incomplete or damaged")
                if m.inner_crc:
                    buf = self._buffer(shard)
                    raw = (buf[int(off):int(off) + int(nbytes)] if buf is not None
                           else self.location.read_range(m.shard_key(shard), int(off), int(nbytes)))
                    if len(raw) != int(nbytes):
                        raise CorruptStoreError(f"{self.location.url}: {m.shard_key(shard)} chunk {j} runs past "
                                                f"the end of the shard; the shard is truncated")
                    self._check_chunk_crc(shard, j, raw)
                checked += 1
        return checked


def encode_shard(block: np.ndarray | list[np.ndarray], *, axis: int, inner_shape: tuple[int, ...],
                 chunks_per_shard: int, crc: bool = True, out: bytearray | None = None) -> memoryview:
    """The bytes of one shard object as zarr-python writes it for format v1 (sharding_indexed, inner codecs
    bytes(little) [+ crc32c], index bytes(little) + crc32c at the end, write_empty_chunks=True):
    `block` holds the shard's rows along `axis` (at most chunks_per_shard inner chunks), as one array or as
    consecutive parts; chunks are laid out in order from offset 0, the last one padded with zeros (the fill
    value) to the full inner shape; index slots past the last chunk are empty. The golden test checks these
    bytes against zarr's.

    Encoding here rather than through zarr's array setter: zarr 3.1.6 spends ~1 ms of pipeline per inner chunk
    (seconds per 512-trace shard); this is one strided copy per part plus one crc32c pass. `out`, when large
    enough, is reused for the result (a fresh 128 MiB buffer per shard costs page faults that dominated the
    writer's time, benchmarks/results/convert.md); the returned view is valid until `out` is reused."""
    parts = list(block) if isinstance(block, list) else [block]
    rpc = inner_shape[axis]
    if len(parts) > 1 and not (axis == 0 and rpc == 1):
        parts = [np.concatenate(parts, axis=axis)]  # the flat edge arrays: small, chunks span parts
    n = sum(int(p.shape[axis]) for p in parts)
    nchunks = -(-n // rpc)
    if nchunks > chunks_per_shard:
        raise ValueError(f"{n} rows make {nchunks} chunks; a shard holds {chunks_per_shard}")
    dtype = parts[0].dtype.newbyteorder("<") if parts else np.dtype("<u1")
    chunk_nbytes = int(np.prod(inner_shape)) * dtype.itemsize
    stored = chunk_nbytes + (4 if crc else 0)
    data_nbytes = nchunks * stored
    total = data_nbytes + 16 * chunks_per_shard + 4
    buf = out if out is not None and len(out) >= total else bytearray(total)
    mv = memoryview(buf)[:total]
    if nchunks:
        base = np.frombuffer(mv, dtype=dtype, count=data_nbytes // dtype.itemsize)
        inner_strides = np.empty(inner_shape, dtype).strides
        dst = np.lib.stride_tricks.as_strided(base, shape=(nchunks, *inner_shape), strides=(stored, *inner_strides))
        if len(parts) > 1:  # one row per chunk along axis 0: each part is one strided copy
            k = 0
            for part in parts:
                dst[k:k + part.shape[0], 0] = part
                k += part.shape[0]
        else:
            one = parts[0]
            if n < nchunks * rpc:  # a partial last chunk: pad with the fill value (0)
                pad = [(0, 0)] * one.ndim
                pad[axis] = (0, nchunks * rpc - n)
                one = np.pad(one, pad)
            # [rows, ...] -> [nchunks, *inner_shape]
            src = np.moveaxis(one, axis, 0).reshape(nchunks, rpc, *[d for i, d in enumerate(one.shape) if i != axis])
            dst[...] = np.moveaxis(src, 1, axis + 1)
        if crc:
            u8 = np.frombuffer(mv, dtype=np.uint8, count=data_nbytes).reshape(nchunks, stored)
            for k in range(nchunks):
                chunk = u8[k, :chunk_nbytes].view()
                chunk.flags.writeable = False  # google_crc32c reads read-only buffers without a copy
                u8[k, chunk_nbytes:] = np.frombuffer(google_crc32c.value(chunk).to_bytes(4, "little"), np.uint8)
    idx = np.full((chunks_per_shard, 2), MISSING, dtype="<u8")
    idx[:nchunks, 0] = np.arange(nchunks, dtype=np.uint64) * np.uint64(stored)
    idx[:nchunks, 1] = stored
    raw = idx.tobytes()
    mv[data_nbytes:data_nbytes + len(raw)] = raw
    mv[data_nbytes + len(raw):] = google_crc32c.value(raw).to_bytes(4, "little")
    return mv

