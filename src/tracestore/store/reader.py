"""TraceStore: a committed store, read-only, for notebooks and the loader.

Metadata, ids, scores and graph pointers are read once at open (through zarr); trace data goes through the
direct shard reader (shards.py), which memory-maps shard files through one ShardCache per store: at most
config.MAX_MAPPED_SHARDS maps at once, each checked against the store's generation when it is made, so that a
store replaced under an open reader raises StaleStoreError instead of mixing two stores. A TraceStore pickles
(the maps reopen in the new process, still checked against the generation opened in the first), so loader
workers can take it.

A store made of parts opens as the concatenation of its parts (parted.py); the reads below do not tell the two
apart, except where a trace's row is looked up in its part (`_locate`).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from .. import config
from ..errors import (
    CorruptStoreError,
    FormatVersionError,
    IncompleteStoreError,
    StaleStoreError,
    StoreNotFoundError,
)
from ..format import schema
from ..format.report import Float16Report
from ..format.versions import StoreLayout, resolve_layout
from .destination import NEW_SUFFIX
from .graphs import TraceGraph, pointer_problem
from .parted import open_parts
from .shards import ShardCache, ShardedArray, UnsupportedLayout, read_only, store_generation
from .tokens import TraceTokens
from .urls import Location, resolve

if TYPE_CHECKING:
    import xarray




class Trace:
    """One trace: id, score (NaN if unknown), sequence [L, D] float16 (its per-layer vector), its graphs (or
    None), its tokens (TraceTokens: hidden [T, L, D] float16, ids [T], text; None for a store without
    per-token data) and its fields (name -> value).

    From a store, `tokens` and `graph` are read when first asked for (a trace's token states are T x L x D,
    ~20 MiB at Llama-2-7B shape, where its sequence is 256 KiB) and then kept; `graph.x` is `tokens.hidden`."""

    def __init__(self, id: str, score: float, sequence: np.ndarray, graph: TraceGraph | None = None,  # noqa: A002
                 tokens: TraceTokens | None = None, fields: dict[str, Any] | None = None) -> None:
        self.id, self.score, self.sequence = id, score, sequence
        self.fields: dict[str, Any] = dict(fields or {})
        self._graph, self._tokens = graph, tokens
        self._read_graph: Callable[[Trace], TraceGraph | None] | None = None
        self._read_tokens: Callable[[], TraceTokens | None] | None = None

    @property
    def tokens(self) -> TraceTokens | None:
        if self._read_tokens is not None:
            self._tokens, self._read_tokens = self._read_tokens(), None
        return self._tokens

    @property
    def graph(self) -> TraceGraph | None:
        if self._read_graph is not None:
            self._graph, self._read_graph = self._read_graph(self), None
        return self._graph

    def __repr__(self) -> str:
        return (f"Trace(id={self.id!r}, score={self.score!r}, sequence {tuple(self.sequence.shape)}, "
                f"fields={self.fields!r})")


def read_root_attrs(location: Location) -> dict[str, Any]:
    """The tracestore attributes of a committed store; raises if missing, unfinished or of another version."""
    raw = location.read_bytes("zarr.json")
    staging = location.exists(schema.STAGING_STATE_KEY)
    if raw is None:
        if staging:
            raise IncompleteStoreError(_incomplete_msg(location.url))
        if _being_swapped_in(location):
            raise IncompleteStoreError(_swapping_msg(location.url))
        if location.list_dir(schema.PARTS_DIR):
            raise IncompleteStoreError(f"{location.url}: parts of a store, not committed yet (no manifest): when "
                                       f"every part is written, run `tracestore commit {location.url}` (or rerun the "
                                       f"same `tools/convert --dask` command)")
        raise StoreNotFoundError(f"{location.url}: no store here (no zarr.json); check the path, or create one with "
                                 f"tracestore.create() or tools/convert")
    try:
        root = json.loads(raw)
        attrs = root.get("attributes", {}).get(schema.ATTRS_KEY)
        if attrs is not None and not isinstance(attrs, dict):
            raise TypeError(f"'{schema.ATTRS_KEY}' is a {type(attrs).__name__}, not an object")
    except (ValueError, AttributeError, TypeError) as e:
        raise CorruptStoreError(f"{location.url}: the root zarr.json is not valid group metadata ({str(e)[:160]}); "
                                f"the store is damaged: rebuild it from its sources (run `tracestore verify "
                                f"{location.url}` for the rest)") from None
    if attrs is None:
        raise FormatVersionError(f"{location.url}: a zarr group, but not a tracestore store (no '{schema.ATTRS_KEY}' "
                                 f"attributes); open it with zarr.open_group instead")
    version = attrs.get(schema.ATTR_FORMAT_VERSION)
    if version not in schema.READABLE_VERSIONS:
        raise FormatVersionError(f"{location.url}: store format version {version!r}; this tracestore reads versions "
                                 f"{', '.join(map(str, schema.READABLE_VERSIONS))}. Upgrade tracestore, or rewrite "
                                 f"the store")
    if not attrs.get(schema.ATTR_COMMITTED):  # the commit marker decides; staging litter after it is harmless
        if not staging and _being_swapped_in(location):
            raise IncompleteStoreError(_swapping_msg(location.url))
        raise IncompleteStoreError(_incomplete_msg(location.url))
    return attrs


def dtype_problems(lay: Any, dtypes: dict[str, Any]) -> list[str]:
    """What differs from the format's dtypes among `dtypes` ({array path: its dtype, or None where absent}):
    a hand-edited data_type would make every read reinterpret the bytes."""
    want: dict[str, np.dtype] = {schema.SEQUENCES: schema.SEQUENCE_DTYPE, str(lay.token_hidden): schema.TOKEN_HIDDEN_DTYPE,
            str(lay.token_ids): schema.TOKEN_ID_DTYPE, schema.EDGE_INDEX: schema.EDGE_INDEX_DTYPE,
            schema.EDGE_ATTR: schema.EDGE_ATTR_DTYPE, schema.SCORES: schema.SCORE_DTYPE,
            str(lay.token_ptr): schema.PTR_DTYPE}
    return [f"{path} is {np.dtype(got).name}; the format stores it as {want[path].name}"
            for path, got in dtypes.items() if got is not None and path in want and np.dtype(got) != want[path]]


def _being_swapped_in(location: Location) -> bool:
    """Whether a committed store waits beside `location` to replace it (an --overwrite swapping it in now,
    or one a crash interrupted): DEST.tracestore-new (store/destination.py) has the commit marker."""
    try:
        raw = location.sibling(NEW_SUFFIX).read_bytes("zarr.json")
        return raw is not None and bool(json.loads(raw)["attributes"][schema.ATTRS_KEY][schema.ATTR_COMMITTED])
    except Exception:  # noqa: BLE001 - no sibling, unreadable: not being swapped
        return False


def _swapping_msg(url: str) -> str:
    return (f"{url}: the store is being replaced (an overwrite is swapping a new store in, beside it in "
            f"{url}.tracestore-new); open it again in a moment. If no writer runs, rerun the converter (or any "
            f"tracestore.create on it), which finishes the swap")


def _zarray(root: zarr.Group, path: str, url: str) -> zarr.Array:
    try:
        arr = root[path]
    except Exception as e:  # KeyError (no such node), or zarr's errors on a damaged zarr.json
        why = "is missing" if isinstance(e, KeyError) else f"cannot be opened ({type(e).__name__}: {str(e)[:120]})"
        raise CorruptStoreError(f"{url}: array '{path}' {why}; the store is damaged: run `tracestore verify {url}`, "
                                f"rebuild it from its sources") from None
    if not isinstance(arr, zarr.Array):
        raise CorruptStoreError(f"{url}: '{path}' is a group, not an array; the store is damaged: rebuild it from its "
                                f"sources")
    return arr


def missing_chunks(location: Location, arr: zarr.Array, path: str, chunks: list[int] | None = None) -> list[int]:
    """The chunks (of `chunks`, default all) of a 1-d plain array whose objects do not exist. zarr reads such a
    chunk as the fill value ("" ids, NaN scores), so a deleted one would pass for data."""
    enc = arr.metadata.chunk_key_encoding  # type: ignore[union-attr]
    todo = range(int(arr.cdata_shape[0])) if chunks is None else chunks
    return [c for c in todo if not location.exists(f"{path}/{enc.encode_chunk_key((c,))}")]


def _require_chunks(location: Location, arr: zarr.Array, chunks: list[int] | None = None) -> None:
    path = arr.path
    gone = missing_chunks(location, arr, path, chunks)
    if gone:
        step = int(arr.chunks[0])
        c = gone[0]
        raise CorruptStoreError(f"{location.url}: array '{path}' chunk {c} (rows {c * step}..{min(arr.shape[0], (c + 1) * step) - 1}) "
                                f"is missing{f' (and {len(gone) - 1} more)' if len(gone) > 1 else ''}; the store is "
                                f"damaged: run `tracestore verify {location.url}`, rebuild it from its sources")


def _read_whole(root: zarr.Group, path: str, location: Location, dense: bool = True) -> Any:
    """A small array read whole at open (ids, scores, pointers, fields), through zarr (which checks each chunk's
    crc32c): a chunk that fails, or (`dense`: the store stores every chunk) is missing, is a CorruptStoreError
    naming the store and the array, not zarr's own exception or a column of fill values."""
    url = location.url
    arr = _zarray(root, path, url)
    if dense or path == schema.IDS:  # ids are never empty, so their chunks are always stored
        _require_chunks(location, arr)
    try:
        return arr[:]
    except Exception as e:
        raise CorruptStoreError(f"{url}: array '{path}' cannot be read ({type(e).__name__}: {str(e)[:160]}); the "
                                f"store is damaged: run `tracestore verify {url}`, rebuild it from its sources") from None


def _incomplete_msg(url: str) -> str:
    return (f"{url}: the store is unfinished (no commit marker): its writer stopped before close(). Rerun the same "
            f"`tools/convert` command to resume it, or tracestore.create(..., resume=True) from your own writer; "
            f"pass --overwrite / overwrite=True to start over")


class _Array:
    """A sharded array read directly when its layout allows, else through zarr (compressed stores: no maps,
    so the store's generation is checked after each read instead)."""

    def __init__(self, location: Location, path: str, verify: bool, cache: ShardCache) -> None:
        self.location, self.path, self.cache = location, path, cache
        try:
            axis = 1 if path == schema.EDGE_INDEX else 0
            self.direct: ShardedArray | None = ShardedArray.open(location, path, verify=verify, axis=axis, cache=cache)
            self.zarr = None
        except UnsupportedLayout:
            self.direct = None
            try:
                self.zarr = zarr.open_array(location.zarr_store(read_only=True), path=path, mode="r")
            except Exception as e:
                raise CorruptStoreError(f"{location.url}: array '{path}' cannot be opened ({type(e).__name__}: "
                                        f"{str(e)[:160]}); the store is damaged: rebuild it from its sources") from None

    def _zarr_read(self, sel: Any, oindex: bool = False) -> np.ndarray:
        self.cache._check_open()
        z: Any = self.zarr
        res = np.asarray(z.oindex[sel] if oindex else z[sel])
        self.cache.check(f"array '{self.path}'")  # after the read, as after a map
        return res

    @property
    def shape(self) -> tuple[int, ...]:
        return self.direct.shape if self.direct is not None else tuple(self.zarr.shape)  # type: ignore[union-attr]

    @property
    def dtype(self) -> np.dtype:
        return self.direct.dtype if self.direct is not None else np.dtype(self.zarr.dtype)  # type: ignore[union-attr]

    def take(self, rows: np.ndarray, out: np.ndarray | None = None, sub: tuple[Any, ...] = (),
             positions: np.ndarray | None = None) -> np.ndarray:
        """Rows `rows` into `out` (row k into out[positions[k]] where positions are given)."""
        if self.direct is not None:
            if positions is None:
                return self.direct.take(rows, out=out, sub=sub)
            return self.direct.take(rows, out=out, sub=sub, positions=positions)
        res = self._zarr_read(np.asarray(rows, np.int64), oindex=True)
        res = res[(slice(None), *sub)] if sub else res
        if positions is not None:
            assert out is not None
            out[np.asarray(positions, np.int64)] = res
            return out
        if out is None:
            return res
        out[...] = res
        return out

    #: the arrays this one concatenates (a store made of parts: parted.PartedArray); None for one array
    parts: list[_Array] | None = None

    def row(self, r: int) -> np.ndarray:
        """Row r (axis 0, one row per inner chunk): a read-only view where the shard is mapped."""
        return self.direct.row(r) if self.direct is not None else self.take(np.array([r]))[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.direct is not None:
            return self.direct.read(start, stop)
        ax = 1 if self.path == schema.EDGE_INDEX else 0
        sel = [slice(None)] * len(self.shape)
        sel[ax] = slice(start, stop)
        return self._zarr_read(tuple(sel))


class SequenceView:
    """`store.sequences`: lazy [N, L, D] float16 indexed as numpy indexes an array: ints, slices, `...`,
    integer and boolean arrays on any axis. Several index arrays (`sequences[:, [0, 1], [2, 3]]`) broadcast
    together as in numpy (pairs, not an outer product). Only the traces selected are read; where only one axis
    takes an array (or only the first does), only the bytes selected are copied."""

    def __init__(self, store: TraceStore) -> None:
        self._store = store

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self._store), self._store.num_layers, self._store.hidden_size)

    @property
    def dtype(self) -> np.dtype:
        return schema.SEQUENCE_DTYPE

    @property
    def ndim(self) -> int:
        return 3

    def __len__(self) -> int:
        return len(self._store)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[:]
        return a if dtype is None else a.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (3 - len(key) + 1) + key[i + 1:]
        if len(key) > 3:
            raise IndexError(f"too many indices for sequences of shape {self.shape}")
        first, sub = key[0], tuple(key[1:])
        n = len(self._store)
        if isinstance(first, int | np.integer):
            i = int(first)
            if not -n <= i < n:
                raise IndexError(f"trace {i} out of range for a store of {n} traces")
            rows = np.array([i % n])
            first_ix: Any = 0
        elif isinstance(first, slice):
            rows = np.arange(n)[first]
            first_ix = slice(None)
        else:
            rows = np.asarray(first)
            if rows.dtype == bool:
                if rows.shape != (n,):
                    raise IndexError(f"boolean index of shape {rows.shape} for {n} traces")
                rows = np.flatnonzero(rows)
            elif not np.issubdtype(rows.dtype, np.integer):
                raise IndexError(f"sequences can be indexed by ints, slices and integer arrays, not {rows.dtype}")
            if rows.size and (rows.min() < -n or rows.max() >= n):
                raise IndexError(f"trace index out of range for a store of {n} traces")
            rows = rows % n if rows.size else rows.astype(np.int64)
            first_ix = None
        arrays_in_sub = sum(not isinstance(k, int | np.integer | slice) for k in sub)
        if arrays_in_sub == 0 or (arrays_in_sub == 1 and isinstance(first, slice)):
            # one index array at most, or ints that sit with the first axis's array: outer indexing per row is
            # what numpy does, and only the selected bytes are copied
            got = self._store._take(rows.reshape(-1), sub)
            if first_ix == 0:
                return got[0]
            return got.reshape(rows.shape + got.shape[1:]) if rows.ndim != 1 else got
        # several index arrays broadcast together (numpy's rule, result axes placed as numpy places them):
        # read each trace needed once, then index that block with the first axis renumbered into it
        if first_ix is None:
            need, inverse = np.unique(rows, return_inverse=True)
            first_ix = inverse.reshape(rows.shape)
        else:
            need = rows
        block = self._store._take(need)
        try:
            return block[(first_ix, *sub)]
        except IndexError as e:
            raise IndexError(f"sequences[{', '.join(_describe_index(k) for k in key)}]: {e}") from None


def _describe_index(k: Any) -> str:
    if isinstance(k, slice):
        return ":" if k == slice(None) else f"{'' if k.start is None else k.start}:{'' if k.stop is None else k.stop}"
    if isinstance(k, int | np.integer):
        return str(int(k))
    return f"array of shape {np.shape(k)}"


class TraceStore:
    """A committed tracestore store, read-only. Open with `tracestore.open(url)`.

    Every format version opens through one description (`self.layout`, format/versions.py): version 1 stores
    (graph node features in graphs/x) read like version 2 stores whose tokens keep only hidden states."""

    #: a store made of parts (parted.open_parts sets them): the parts it was opened with, as the manifest
    #: listed them (what a pickled copy reopens), and the store row each part starts at ([P + 1])
    _view: list[dict[str, Any]]
    _part_starts: np.ndarray

    def __init__(self, location: Location, *, verify: bool | None = None, _rows: np.ndarray | None = None,
                 _as_part: bool = False, _view: list[dict[str, Any]] | None = None) -> None:
        self.location = location
        self.verify = config.VERIFY_LOCAL_READS if verify is None else verify
        self.attrs = read_root_attrs(location)
        #: a store made of parts (store/parts.py): the parts, each a TraceStore; None for a single store
        self._parts: list[TraceStore] | None = None
        manifest = None if _as_part else self.attrs.get(schema.ATTR_MANIFEST)
        if manifest is not None or _view is not None:
            open_parts(self, manifest, _rows, _view, TraceStore)
            return
        self.layout: StoreLayout = resolve_layout(self.attrs)
        gen = self.attrs.get(schema.ATTR_GENERATION)
        #: the store's generation (a uuid4 hex written at commit; None for stores written before it existed):
        #: every shard mapped later is checked against it (StaleStoreError where the store was replaced)
        self.generation: str | None = None if gen is None else str(gen)
        self._cache = ShardCache(location, self.generation)
        cache = self._cache
        lay = self.layout
        url = location.url
        try:
            root = zarr.open_group(location.zarr_store(read_only=True), mode="r")
        except Exception as e:
            raise CorruptStoreError(f"{url}: the root group cannot be opened ({type(e).__name__}: {str(e)[:160]}); "
                                    f"the store is damaged: run `tracestore verify {url}`") from None
        # a deleted chunk of a small array reads as its fill value through zarr ("" ids, NaN scores): refuse it
        # where the store promises every chunk (ids always: they are never empty)
        dense = self.generation is not None
        self._dense_chunks = dense
        self._all_ids = read_only(np.asarray(_read_whole(root, schema.IDS, location), dtype=object).astype(str))
        self._all_scores = read_only(np.array(_read_whole(root, schema.SCORES, location, dense), dtype=np.float32))
        self._seq = _Array(location, schema.SEQUENCES, self.verify, cache)
        self.has_graphs = lay.has_graphs
        n_all = len(self._all_ids)
        #: [N + 1] (read-only): trace i owns tokens (graph nodes) token_ptr[i]:token_ptr[i+1]; None without tokens
        self.token_ptr: np.ndarray | None = None
        self._hidden: _Array | None = None
        self._token_ids: _Array | None = None
        self._text: zarr.Array | None = None
        if lay.token_ptr is not None:
            self.token_ptr = read_only(np.array(_read_whole(root, lay.token_ptr, location, dense), np.int64))
            if lay.token_hidden is not None:
                self._hidden = _Array(location, lay.token_hidden, self.verify, cache)
            if lay.token_ids is not None:
                self._token_ids = _Array(location, lay.token_ids, self.verify, cache)
            if lay.token_text is not None:
                self._text = _zarray(root, lay.token_text, url)
        if self.has_graphs:
            self.edge_ptr = read_only(np.array(_read_whole(root, schema.EDGE_PTR, location, dense), np.int64))
            self._ei = _Array(location, schema.EDGE_INDEX, self.verify, cache)
            self._ea = _Array(location, schema.EDGE_ATTR, self.verify, cache)
        self._all_fields: dict[str, np.ndarray] = {}
        for name, (path, kind) in lay.fields.items():
            vals: Any = _read_whole(root, path, location, dense)
            # zarr gives strings as numpy's StringDType; object -> str gives the plain '<U' arrays ids are
            self._all_fields[name] = read_only(np.asarray(vals, dtype=object).astype(str) if kind == "str"
                                                else np.array(vals))
        problems = []
        if self._seq.shape[0] != n_all or self._all_scores.shape[0] != n_all:
            problems.append(f"{n_all} ids but sequences has {self._seq.shape[0]} rows and scores "
                            f"{self._all_scores.shape[0]}")
        # the pointers are trusted by every read after this: check them once (O(N)) against the arrays' rows
        if self.token_ptr is not None:
            rows = [(str(p), a.shape[0]) for p, a in ((lay.token_hidden, self._hidden),
                                                       (lay.token_ids, self._token_ids), (lay.token_text, self._text))
                    if a is not None]
            for path, n_rows in rows or [("the graphs' tokens", int(self.token_ptr[-1]) if self.token_ptr.size else 0)]:
                p = pointer_problem(str(lay.token_ptr), self.token_ptr, n_all + 1, n_rows, f"{path}'s rows")
                if p:
                    problems.append(p)
        if self.has_graphs:
            for path, n_edges in ((schema.EDGE_INDEX, self._ei.shape[1]), (schema.EDGE_ATTR, self._ea.shape[0])):
                p = pointer_problem(schema.EDGE_PTR, self.edge_ptr, n_all * self.num_layers + 1, n_edges,
                                    f"{path}'s edges")
                if p:
                    problems.append(p)
        for name, vals in self._all_fields.items():
            if vals.shape != (n_all,):
                problems.append(f"field {name!r} has {vals.shape[0]} values for {n_all} traces")
        if int(self.attrs.get(schema.ATTR_NUM_TRACES, n_all)) != n_all:
            problems.append(f"the commit marker says {self.attrs.get(schema.ATTR_NUM_TRACES)} traces but there are "
                            f"{n_all} ids")
        problems += dtype_problems(lay, {schema.SEQUENCES: self._seq.dtype, str(lay.token_hidden): getattr(
            self._hidden, "dtype", None), str(lay.token_ids): getattr(self._token_ids, "dtype", None),
            schema.EDGE_INDEX: getattr(self._ei, "dtype", None) if self.has_graphs else None,
            schema.EDGE_ATTR: getattr(self._ea, "dtype", None) if self.has_graphs else None})
        if problems:
            raise CorruptStoreError(f"{location.url}: {'; '.join(dict.fromkeys(problems))}; the store is damaged: "
                                    f"run `tracestore verify {location.url}`, rebuild it from its sources")
        self._rows = None if _rows is None else read_only(np.array(_rows, np.int64))  # select(); None = all
        self._id_index: dict[str, int] | None = None
        # everything above was read after the attributes: if the generation still matches, it is one store's
        cache.check("its ids, scores and pointers at open")

    def _locate(self, r: int) -> tuple[TraceStore, int]:
        """The part that holds store row r, and r's row in it."""
        assert self._parts is not None
        p = int(np.searchsorted(self._part_starts, r, side="right") - 1)
        return self._parts[p], r - int(self._part_starts[p])

    @property
    def num_parts(self) -> int:
        """How many parts the store is made of (1 for a single store)."""
        return 1 if self._parts is None else len(self._parts)

    # -- pickling: drop maps and caches; they reopen lazily in the new process --------------------------
    def __reduce__(self) -> tuple[Any, ...]:
        if self._parts is not None:  # the parts this store was opened with: an append since is not seen
            return (_reopen_parts, (self.location, self.verify, self._rows, self._view))
        return (_reopen, (self.location, self.verify, self._rows, self.generation))

    # -- closing --------------------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap every shard this store (and its select() views, which share them) holds; reading trace data
        afterwards raises ValueError. Arrays read before stay valid (a view keeps its own map alive). Metadata
        (ids, scores, fields, info()) stays readable. Idempotent; `with tracestore.open(url) as store:` calls it."""
        self._cache.close()

    @property
    def closed(self) -> bool:
        return self._cache.closed

    def __enter__(self) -> TraceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- shape and metadata ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._all_ids) if self._rows is None else len(self._rows)

    @property
    def url(self) -> str:
        return self.location.url

    @property
    def num_layers(self) -> int:
        return int(self.attrs[schema.ATTR_NUM_LAYERS])

    @property
    def hidden_size(self) -> int:
        return int(self.attrs[schema.ATTR_HIDDEN_SIZE])

    @property
    def model_name(self) -> str | None:
        return self.attrs.get(schema.ATTR_MODEL_NAME)

    @property
    def format_version(self) -> int:
        # a store made of parts is version 3 (its parts, and their layout, version 2)
        return self.layout.version if self._parts is None else schema.PARTS_FORMAT_VERSION

    @property
    def ids(self) -> np.ndarray:
        """[N] str: the trace ids, in this store's (or view's) order. Read-only (the store's own array, or for
        a select() view a copy): `.copy()` it to edit."""
        return self._all_ids if self._rows is None else read_only(self._all_ids[self._rows])

    @property
    def scores(self) -> np.ndarray:
        """[N] float32: the scores, NaN where unknown. Read-only, like `ids`."""
        return self._all_scores if self._rows is None else read_only(self._all_scores[self._rows])

    @property
    def fields(self) -> dict[str, np.ndarray]:
        """Per-trace fields: name -> [N] array (str, int64, float64 or bool), in this store's (or view's) order.
        The arrays are read-only, like `ids`; the dict is a new one each time."""
        if self._rows is None:
            return dict(self._all_fields)
        return {k: read_only(v[self._rows]) for k, v in self._all_fields.items()}

    @property
    def has_tokens(self) -> bool:
        """Whether the store keeps per-token data (hidden states, token ids or text)."""
        return self.layout.has_tokens

    @property
    def has_token_hidden(self) -> bool:
        """Whether the store keeps per-token hidden states (the node features graph models read)."""
        return self._hidden is not None

    @property
    def pool(self) -> str | None:
        """How `sequences` were made from the tokens: 'last', 'mean', or None (given as per-layer vectors)."""
        return self.layout.pool

    @property
    def graph_recipe(self) -> dict[str, Any] | None:
        """How the graphs were built (convert/attention.py), {'name': 'given'} for graphs taken as given."""
        return self.layout.graph_recipe

    @property
    def rows(self) -> np.ndarray:
        """Positions of this view's traces in the underlying store (read-only)."""
        return read_only(np.arange(len(self._all_ids))) if self._rows is None else self._rows

    @property
    def report(self) -> dict[str, Float16Report]:
        return {k: Float16Report.from_dict(v) for k, v in self.attrs.get(schema.ATTR_REPORT, {}).items()}

    @property
    def sequences(self) -> SequenceView:
        return SequenceView(self)

    def _store_rows(self, rows: np.ndarray) -> np.ndarray:
        return rows if self._rows is None else self._rows[rows]

    def _take(self, rows: np.ndarray, sub: tuple[Any, ...] = (), out: np.ndarray | None = None) -> np.ndarray:
        return self._seq.take(self._store_rows(np.asarray(rows, np.int64)), out=out, sub=sub)

    def read_sequences(self, rows: Sequence[int] | np.ndarray, out: np.ndarray | None = None,
                       layers: Sequence[int] | slice | None = None) -> np.ndarray:
        """Gather the sequences of traces `rows` (positions in this store/view) into `out` [B, L', D]
        float16 (allocated if None); `layers` selects layers. For notebooks and scripts; the loader reads
        through loader/dataset.py, which copies from the same shard views with the float32 cast in the copy."""
        sub: tuple[Any, ...] = () if layers is None else (layers if isinstance(layers, slice) else np.asarray(layers),)
        return self._take(np.asarray(rows, np.int64), sub, out)

    # -- per-trace access -----------------------------------------------------------------------------
    def __getitem__(self, i: int) -> Trace:
        n = len(self)
        if not isinstance(i, int | np.integer):
            raise TypeError("store[i] takes an int; use store.select(ids) or store.sequences[...] for more")
        if not -n <= i < n:
            raise IndexError(f"trace {i} out of range for a store of {n} traces")
        i = int(i) % n
        r = int(self._store_rows(np.array([i]))[0])
        seq = self._seq.row(r)
        t = Trace(id=str(self._all_ids[r]), score=float(self._all_scores[r]), sequence=seq,
                  fields={k: v[r].item() for k, v in self._all_fields.items()})
        if self.layout.has_tokens:
            t._read_tokens = lambda: self._tokens(r)
        if self.has_graphs:
            t._read_graph = lambda tr: self._graph(r, tr.tokens)
        return t

    def __iter__(self) -> Iterator[Trace]:
        for i in range(len(self)):
            yield self[i]

    def _token_range(self, r: int) -> tuple[int, int]:
        assert self.token_ptr is not None
        return int(self.token_ptr[r]), int(self.token_ptr[r + 1])

    def _tokens(self, r: int) -> TraceTokens:
        if self._parts is not None:
            part, lr = self._locate(r)
            return part._tokens(lr)
        t0, t1 = self._token_range(r)
        hidden = self._hidden.read(t0, t1) if self._hidden is not None else None
        ids = self._token_ids.read(t0, t1) if self._token_ids is not None else None
        text = self._text_range(t0, t1) if self._text is not None else None
        return TraceTokens(hidden=hidden, ids=ids, text=text)

    def _text_range(self, t0: int, t1: int) -> list[str]:
        """Token texts t0:t1, decoded a whole zarr chunk at a time and kept in the store's shard cache (so the
        generation is checked once per chunk, and a trace's neighbours decode nothing again)."""
        z: Any = self._text
        cs = int(z.chunks[0])
        out: list[str] = []
        for c in range(t0 // cs, -(-t1 // cs)):
            chunk = self._cache.load((z.path, c), f"{z.path} chunk {c}", functools.partial(self._load_text_chunk, z, c))
            out.extend(chunk[max(t0 - c * cs, 0):t1 - c * cs])
        return out

    def _load_text_chunk(self, z: Any, c: int) -> list[str]:
        cs = int(z.chunks[0])
        if self._dense_chunks:
            _require_chunks(self.location, z, [c])
        try:
            vals = z[c * cs:min(z.shape[0], (c + 1) * cs)]
        except Exception as e:
            raise CorruptStoreError(f"{self.url}: array '{z.path}' chunk {c} cannot be read ({type(e).__name__}: "
                                    f"{str(e)[:160]}); the store is damaged: run `tracestore verify {self.url}`, "
                                    f"rebuild it from its sources") from None
        return np.asarray(vals, dtype=object).astype(str).tolist()  # type: ignore[no-any-return]

    def _graph(self, r: int, tokens: TraceTokens | None) -> TraceGraph:
        if self._parts is not None:
            part, lr = self._locate(r)
            return part._graph(lr, tokens)
        L = self.num_layers
        e0, e1 = int(self.edge_ptr[r * L]), int(self.edge_ptr[(r + 1) * L])
        ei = self._ei.read(e0, e1)
        ea = self._ea.read(e0, e1)
        bounds = self.edge_ptr[r * L:(r + 1) * L + 1] - e0
        t0, t1 = self._token_range(r)
        return TraceGraph(x=tokens.hidden if tokens is not None else None,
                          edge_index=[ei[:, bounds[k]:bounds[k + 1]] for k in range(L)],
                          edge_attr=[ea[bounds[k]:bounds[k + 1]] for k in range(L)], num_tokens=t1 - t0)

    def graph(self, i: int) -> TraceGraph:
        """The graphs of trace i (same as store[i].graph); its `x` is the trace's tokens.hidden."""
        if not self.has_graphs:
            raise ValueError(f"{self.url}: this store has no graphs (it was written with graphs=False)")
        return self[i].graph  # type: ignore[return-value]

    def tokens(self, i: int) -> TraceTokens:
        """The tokens of trace i (same as store[i].tokens)."""
        if not self.layout.has_tokens:
            raise ValueError(f"{self.url}: this store keeps no per-token data (converted with --tokens none, or "
                             f"from per-layer vectors only)")
        return self[i].tokens  # type: ignore[return-value]

    def layer(self, layer: int) -> np.ndarray:
        """Layer `layer` of every trace: [N, D] float16."""
        L = self.num_layers
        if not -L <= layer < L:
            raise IndexError(f"layer {layer} out of range for a store of {L} layers")
        return self.sequences[:, layer % L]

    def select(self, ids: Sequence[str | int]) -> TraceStore:
        """A view of the traces with these ids, in this order. Unknown ids raise KeyError naming them."""
        if self._id_index is None:
            self._id_index = {str(k): i for i, k in enumerate(self.ids)}
        want = [str(i) for i in ids]
        missing = [i for i in want if i not in self._id_index]
        if missing:
            raise KeyError(f"{self.url}: {len(missing)} id(s) not in the store, e.g. {missing[:5]}")
        rows = np.fromiter((self._id_index[i] for i in want), np.int64, count=len(want))
        view = TraceStore.__new__(TraceStore)
        view.__dict__.update(self.__dict__)
        view._rows = read_only(self._store_rows(rows))
        view._id_index = None
        return view

    def to_xarray(self) -> xarray.Dataset:
        """An xarray.Dataset with `sequences` (trace, layer, hidden), lazily indexed, and coords `id`, `score`
        and every field on the trace dimension."""
        from .xarray_view import to_xarray

        return to_xarray(self)

    def info(self) -> dict[str, Any]:
        """A summary: shape, bytes on disk, float16 report, score statistics, what per-token data, graphs and
        fields the store holds and how they were made."""
        sc = self.scores
        known = sc[~np.isnan(sc)]
        lay = self.layout
        out: dict[str, Any] = {
            "url": self.url,
            "format_version": self.format_version,
            "num_traces": len(self),
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "has_graphs": self.has_graphs,
            "model_name": self.model_name,
            "bytes_on_disk": self.location.total_bytes(),
            "float16_bytes": len(self) * self.num_layers * self.hidden_size * 2,
            "scores": {"known": int(known.size), "missing": int(sc.size - known.size),
                       "min": float(known.min()) if known.size else None,
                       "max": float(known.max()) if known.size else None,
                       "mean": float(known.mean()) if known.size else None},
            "pool": lay.pool,
            "tokens": {"hidden": lay.token_hidden is not None, "ids": lay.token_ids is not None,
                       "text": lay.token_text is not None} if lay.token_ptr is not None else None,
            "fields": {k: kind for k, (_p, kind) in lay.fields.items()},
            "float16_report": self.attrs.get(schema.ATTR_REPORT, {}),
            "provenance": self.attrs.get(schema.ATTR_PROVENANCE, {}),
            "parts": self.num_parts,
        }
        if self.token_ptr is not None:
            out["num_tokens"] = int(self.token_ptr[-1])
            if self._hidden is not None:
                out["token_float16_bytes"] = out["num_tokens"] * self.num_layers * self.hidden_size * 2
        if self.has_graphs:
            out["num_edges"] = int(self.edge_ptr[-1])
            out["edge_attr_size"] = int(self._ea.shape[1])
            out["graph_recipe"] = lay.graph_recipe
        return out

    def __repr__(self) -> str:
        extra = "".join([f", parts={self.num_parts}" if self._parts is not None else "",
                         ", tokens" if self.layout.has_tokens else "", ", graphs" if self.has_graphs else "",
                         f", fields={list(self._all_fields)}" if self._all_fields else ""])
        return (f"TraceStore({self.url!r}, traces={len(self)}, layers={self.num_layers}, hidden={self.hidden_size}"
                f"{extra})")


def _reopen(location: Location, verify: bool, rows: np.ndarray | None, generation: Any = None) -> TraceStore:
    """A pickled TraceStore in a new process: the same store, or StaleStoreError if it was replaced since the
    original was opened (a loader worker must not serve another store's rows under the parent's ids)."""
    # the root's own traces, as when it was opened: parts appended since (store/parts.py) stay out of the view
    store = TraceStore(location, verify=verify, _rows=rows, _as_part=True)
    if store.generation != generation:
        raise StaleStoreError(f"{location.url}: the store was replaced since it was opened (generation {generation} "
                              f"when opened, {store.generation} now), so this copy of it (pickled, e.g. for a loader "
                              f"worker) would read another store: reopen it with tracestore.open()")
    return store


def _reopen_parts(location: Location, verify: bool, rows: np.ndarray | None,
                  view: list[dict[str, Any]]) -> TraceStore:
    """A pickled store made of parts, in a new process: the same parts it was opened with (each checked
    against its generation: StaleStoreError where the store was replaced), whatever was appended since."""
    return TraceStore(location, verify=verify, _rows=rows, _view=view)


def open_part(location: Location, *, verify: bool | None = None) -> TraceStore:
    """One part of a store, or a store's own traces without its other parts (the root part ".")."""
    return TraceStore(location, verify=verify, _as_part=True)


def open(url: str | Location, storage_options: dict[str, Any] | None = None, *, verify: bool | None = None,  # noqa: A001
         cache_dir: str | os.PathLike[str] | None = None, cache_limit: int | str | None = None) -> TraceStore:
    """Open a committed store read-only: a local path, or an s3:// URL (credentials and endpoint from
    `storage_options` or the AWS_* environment variables).

    Raises StoreNotFoundError, IncompleteStoreError (a writer did not finish: the message says how to resume)
    or FormatVersionError. `verify=True` checks the crc32c of every chunk read locally (default:
    config.VERIFY_LOCAL_READS; object-store reads are always checked). `cache_dir`/`cache_limit` (bytes or
    '10GB') keep byte ranges read from an object store on local disk, least recently used evicted first."""
    if cache_dir is not None or cache_limit is not None:
        if isinstance(url, Location) or not os.fspath(url).startswith(("s3://", "s3a://")):
            raise ValueError(f"{os.fspath(url) if not isinstance(url, Location) else url.url}: cache_dir/cache_limit "
                             f"apply to object stores (s3://); a local store is read from disk directly")
        storage_options = {**(storage_options or {}), "cache_dir": os.fspath(cache_dir) if cache_dir else None,
                           "cache_limit": cache_limit}
    location = resolve(url, storage_options)
    for attempt in range(3):
        before = _generation_or_none(location)
        try:
            return TraceStore(location, verify=verify)
        except CorruptStoreError:
            # an --overwrite that swapped the store in while it was being opened reads as damage (an array of the
            # old store beside the new root): open again if the store changed meanwhile, else it is damage
            if attempt == 2 or _generation_or_none(location) == before:
                raise
    raise AssertionError("unreachable")


def _generation_or_none(location: Location) -> str | None:
    try:
        return store_generation(location)
    except StaleStoreError:
        return None
