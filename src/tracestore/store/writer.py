"""StoreWriter: append traces, write whole shards, commit at close. Nothing is visible to readers until
close(): the root group's `committed` attribute is written last. A writer can checkpoint its position
(`checkpoint()`), and `create(..., resume=True)` continues from the last checkpoint after a crash.

The writer writes format v2 (docs/format.md): per-trace `sequences`, `scores`, `ids`; per-token `tokens/`
(hidden states, ids, text) when the store keeps them; attention graphs as edges over those tokens
(`graphs/`); per-trace `fields/`."""

from __future__ import annotations

import functools
import io
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from .._version import __version__ as _version
from ..errors import (
    ClosedWriterError,
    DTypeError,
    DuplicateIdError,
    IncompleteStoreError,
    NonFiniteValueError,
    ShapeMismatchError,
    StoreExistsError,
    describe_edge,
    describe_position,
    describe_token,
)
from ..format import codecs, layout, schema
from ..format.cast import OnOverflow, cast_block_fast, cast_edge_attr, cast_float16
from ..format.report import Float16Report
from .destination import (
    NEW_SUFFIX,
    DestinationLock,
    foreign_message,
    inspect_destination,
    settle_destination,
    swap_in,
    writable_location,
)
from .fields import FieldColumns, check_utf8
from .graphs import TraceGraph, as_numpy, as_trace_graph
from .shards import encode_shard
from .tokens import TOKEN_PARTS, TraceTokens, as_trace_tokens
from .urls import LocalLocation, Location, resolve

#: Traces cast per step inside append(): bounds the float32 temporaries to a few tens of MB.
_CAST_STEP_BYTES = 16 * 2**20

#: Pools a writer can apply to per-token states (append(sequences=None)).
POOLS = ("last", "mean")

def pool_tokens(hidden: np.ndarray, pool: str) -> np.ndarray:
    """One trace's per-layer vector [L, D] from its token states [T, L, D]: the last token ('last', the
    seed pipeline's LSTM input: the last token of prompt + answer), or the mean over tokens ('mean',
    accumulated in float64, returned as float64 for float64 states and float32 otherwise). The last token
    keeps its dtype (bit-equal)."""
    if hidden.shape[0] == 0:
        raise ValueError("no tokens to pool")
    if pool == "last":
        return hidden[-1]
    if pool == "mean":
        mean = hidden.mean(axis=0, dtype=np.float64)
        return mean if hidden.dtype == np.float64 else mean.astype(np.float32)
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


def token_parts(tokens: str | Sequence[str] | None, graphs: bool) -> tuple[str, ...]:
    """The per-token arrays a store keeps, from create(tokens=...): 'all', 'none', or parts of
    ('hidden', 'ids', 'text'); None keeps the hidden states when the store has graphs (its node features)."""
    if tokens is None:
        return ("hidden",) if graphs else ()
    if tokens == "all":
        return TOKEN_PARTS
    if tokens == "none":
        return ()
    if isinstance(tokens, str):
        tokens = [tokens]
    bad = [t for t in tokens if t not in TOKEN_PARTS]
    if bad:
        raise ValueError(f"tokens={tokens!r}: unknown part(s) {bad}; pass 'all', 'none' or parts of {TOKEN_PARTS}")
    return tuple(p for p in TOKEN_PARTS if p in tokens)


@dataclass
class _RowBuffer:
    """Rows waiting for a whole shard of one sharded array. Rows run along `axis` (1 for edge_index)."""

    name: str
    array: Any  # zarr.Array
    location: Location
    rows_per_shard: int
    axis: int = 0
    flushed: int = 0
    pending: list[np.ndarray] = field(default_factory=list)
    pending_rows: int = 0
    #: the shard-encoding buffer, one for every array of a writer (shards are written one at a time): a
    #: fresh buffer per shard cost page faults that dominated the writer's time, one per array cost memory
    scratch: list[bytearray | None] = field(default_factory=lambda: [None])
    #: shards written but not yet made durable (fsync), the writer's list: synced at each checkpoint and at
    #: commit, so that the OS writes them back while the conversion goes on instead of the writer waiting
    unsynced: list[str] = field(default_factory=list)

    def add(self, block: np.ndarray) -> None:
        if block.shape[self.axis]:
            self.pending.append(block)
            self.pending_rows += block.shape[self.axis]

    def tail(self) -> np.ndarray:
        if not self.pending:
            shape = list(self.array.shape)
            shape[self.axis] = 0
            return np.empty(shape, dtype=self.array.dtype)
        return np.concatenate(self.pending, axis=self.axis) if len(self.pending) > 1 else self.pending[0]

    def save_tail(self) -> bytes:
        return _npy_bytes(np.ascontiguousarray(self.tail()))

    def load_tail(self, raw: bytes) -> None:
        self.pending, self.pending_rows = [], 0
        self.add(np.load(io.BytesIO(raw), allow_pickle=False))

    def truncate(self) -> None:
        """Drop what was written after `flushed` (shards written after the last checkpoint are rewritten)."""
        shape = list(self.array.shape)
        shape[self.axis] = self.flushed
        self.array.resize(tuple(shape))

    def flush(self, *, final: bool = False) -> None:
        """Write every whole shard pending (and the partial last one if final)."""
        while self.pending_rows >= self.rows_per_shard or (final and self.pending_rows):
            n = min(self.rows_per_shard, self.pending_rows)
            # take n rows off the front of the pending blocks (views: no copy until the shard is encoded)
            parts, got = [], 0
            while got < n:
                blk = self.pending[0]
                k = blk.shape[self.axis]
                if got + k <= n:
                    parts.append(blk)
                    self.pending.pop(0)
                    got += k
                else:
                    cut = n - got
                    sel = [slice(None)] * blk.ndim
                    sel[self.axis] = slice(0, cut)
                    parts.append(blk[tuple(sel)])
                    sel[self.axis] = slice(cut, None)
                    self.pending[0] = blk[tuple(sel)]
                    got = n
            self.pending_rows -= n
            self._write(parts)

    def _write(self, parts: list[np.ndarray]) -> None:
        """Write one shard: the array's new shape through zarr (its zarr.json), the shard object directly,
        encoded into a scratch buffer reused from shard to shard."""
        a, n = self.flushed, sum(int(p.shape[self.axis]) for p in parts)
        if a % self.rows_per_shard:
            raise AssertionError(f"{self.name}: a shard write at row {a}, not on a shard boundary")
        shape = list(self.array.shape)
        shape[self.axis] = a + n
        self.array.resize(tuple(shape))
        meta = self.array.metadata
        sharding = meta.codecs[0]
        inner = tuple(sharding.chunk_shape)
        shard_shape = tuple(meta.chunk_grid.chunk_shape)
        cps = shard_shape[self.axis] // inner[self.axis]
        dtype = np.dtype(self.array.dtype)
        data = encode_shard([p if p.dtype == dtype else p.astype(dtype) for p in parts], axis=self.axis,
                            inner_shape=inner, chunks_per_shard=cps, out=self.scratch[0])
        self.scratch[0] = data.obj  # type: ignore[call-overload]
        coords = ["0"] * parts[0].ndim
        coords[self.axis] = str(a // self.rows_per_shard)
        key = f"{self.name}/c/" + "/".join(coords)
        self.location.write_bytes(key, data, sync=False)
        self.unsynced.append(key)
        self.flushed = a + n


@dataclass
class _TextBuffer:
    """Strings waiting for a whole chunk of a plain variable-length string array (tokens/text), written
    through zarr one whole chunk at a time (a chunk is one object: never rewritten in part)."""

    name: str
    array: Any  # zarr.Array
    chunk_rows: int
    flushed: int = 0
    pending: list[str] = field(default_factory=list)

    @property
    def pending_rows(self) -> int:
        return len(self.pending)

    def add(self, values: list[str]) -> None:
        self.pending.extend(values)

    def save_tail(self) -> bytes:
        return json.dumps(self.pending).encode()

    def load_tail(self, raw: bytes) -> None:
        self.pending = list(json.loads(raw))

    def truncate(self) -> None:
        self.array.resize((self.flushed,))

    def flush(self, *, final: bool = False) -> None:
        n = len(self.pending) if final else len(self.pending) // self.chunk_rows * self.chunk_rows
        if n == 0:
            return
        a = self.flushed
        self.array.resize((a + n,))
        self.array[a:a + n] = np.asarray(self.pending[:n], dtype=object)
        del self.pending[:n]
        self.flushed = a + n


def _npy_bytes(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, a, allow_pickle=False)
    return b.getvalue()


@dataclass
class _Prepared:
    """One batch validated and cast, ready to be buffered."""

    names: list[str]
    scores: np.ndarray
    seq16: np.ndarray
    seq_report: Float16Report
    hidden: list[np.ndarray] = field(default_factory=list)  # per trace [T, L, D] float16
    hidden_report: Float16Report | None = None
    token_ids: list[np.ndarray] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)
    edge_index: list[np.ndarray] = field(default_factory=list)
    edge_attr: list[np.ndarray] = field(default_factory=list)
    edge_counts: list[int] = field(default_factory=list)
    edge_report: Float16Report | None = None


class StoreWriter:
    """Writes a tracestore store. Use `tracestore.create(...)`; see its docstring."""

    def __init__(self, location: Location, *, num_layers: int, hidden_size: int, graphs: bool = False,
                 edge_attr_size: int = 1, tokens: str | Sequence[str] | None = None, overwrite: bool = False,
                 resume: bool = False, on_overflow: OnOverflow = "error", allow_nan: bool = False,
                 model_name: str | None = None, provenance: dict[str, Any] | None = None,
                 shard_bytes: int | None = None, pool: str | None = None,
                 graph_recipe: dict[str, Any] | None = None, lock: DestinationLock | None = None) -> None:
        for name, v in (("num_layers", num_layers), ("hidden_size", hidden_size), ("edge_attr_size", edge_attr_size)):
            if not isinstance(v, int | np.integer) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if on_overflow not in ("error", "clip"):
            raise ValueError(f"on_overflow must be 'error' or 'clip', got {on_overflow!r}")
        if pool is not None and pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS} or None, got {pool!r}")
        #: the store's destination; `location` is where this writer writes: the destination, or the new store
        #: beside it that an overwrite builds and swaps in at close()
        self.dest = location
        self.location = location
        #: the id of the store this writer commits (root attribute `generation`)
        self.generation = uuid.uuid4().hex
        self._swap = False
        self.num_layers = int(num_layers)
        self.hidden_size = int(hidden_size)
        self.has_graphs = bool(graphs)
        self.edge_attr_size = int(edge_attr_size)
        self.token_parts = token_parts(tokens, self.has_graphs)
        #: whether the store has a tokens/ group (token pointer): per-token data or graph nodes
        self.has_token_ptr = bool(self.token_parts) or self.has_graphs
        self.on_overflow: OnOverflow = on_overflow
        self.allow_nan = allow_nan
        self.model_name = model_name
        self.provenance = dict(provenance or {})
        self.pool = pool
        self.graph_recipe = dict(graph_recipe) if graph_recipe is not None else ({"name": "given"} if graphs else None)
        row_bytes = self.num_layers * self.hidden_size * 2
        self.rows_per_shard = layout.rows_per_shard(row_bytes, shard_bytes)
        self.edge_chunk = layout.edge_chunk_rows(self.edge_attr_size)
        self.edge_rows_per_shard = self.edge_chunk * layout.edge_chunks_per_shard(
            self.edge_chunk, self.edge_attr_size, shard_bytes)
        self.token_id_chunk = layout.token_id_chunk_rows()
        self.token_id_rows_per_shard = self.token_id_chunk * layout.token_id_chunks_per_shard(self.token_id_chunk,
                                                                                               shard_bytes)
        self.text_chunk = layout.TEXT_CHUNK_ROWS
        self._closed = False
        self._checkpoint_serial = 0
        #: what the caller saved with the last checkpoint (None on a fresh store)
        self.resume_state: dict[str, Any] | None = None

        self._ids: list[str] = []
        self._id_set: set[str] = set()
        self._scores: list[np.ndarray] = []
        self._token_counts: list[int] = []
        self._edge_counts: list[np.ndarray] = []
        self._fields = FieldColumns()
        self._reports = {schema.SEQUENCES: Float16Report(self.num_layers)}
        if "hidden" in self.token_parts:
            self._reports[schema.TOKEN_HIDDEN] = Float16Report(self.num_layers)
        if self.has_graphs:
            self._reports[schema.EDGE_ATTR] = Float16Report(self.num_layers)

        if lock is not None and lock.dest.url != location.url:
            raise ValueError(f"lock= is the lock of {lock.dest.url}, not of {location.url}")
        self._own_lock = False
        self._lock = DestinationLock.acquire(location) if lock is None else lock
        self._own_lock = lock is None
        try:
            settle_destination(location)
            state = self._prepare_location(overwrite=overwrite, resume=resume)
            self._zstore = self.location.zarr_store(read_only=False)
            if state is None:
                self._create_arrays()
                self._write_staging({})
            else:
                self._open_arrays()
                self._load_staging(state)
        except BaseException:
            self._release()
            raise

    # -- set-up ---------------------------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "hidden_size": self.hidden_size, "graphs": self.has_graphs,
                "edge_attr_size": self.edge_attr_size, "tokens": list(self.token_parts),
                "rows_per_shard": self.rows_per_shard, "edge_rows_per_shard": self.edge_rows_per_shard,
                "edge_chunk": self.edge_chunk, "token_id_chunk": self.token_id_chunk,
                "token_id_rows_per_shard": self.token_id_rows_per_shard, "text_chunk": self.text_chunk,
                "on_overflow": self.on_overflow, "allow_nan": self.allow_nan, "pool": self.pool,
                "graph_recipe": self.graph_recipe}

    def _prepare_location(self, *, overwrite: bool, resume: bool) -> dict[str, Any] | None:
        """Decide where to write and whether to resume. An overwrite of anything tracestore wrote starts over
        beside it (DEST.tracestore-new), leaving it as it is until close() swaps the new store in; what
        tracestore did not write is never replaced."""
        dest = self.dest
        url = dest.url
        kind, attrs, raw_state = inspect_destination(dest)
        if kind == "empty":
            return None
        if kind == "foreign":
            raise StoreExistsError(foreign_message(dest))
        if overwrite:
            self._swap = True
            self.location = dest.sibling(NEW_SUFFIX)
            self.location.delete_all()
            return None
        if kind == "committed":
            raise StoreExistsError(f"{url} already holds a store ({attrs.get(schema.ATTR_NUM_TRACES)} traces); "
                                   f"pass overwrite=True (--overwrite) to replace it (it stays readable until the "
                                   f"new store is committed)")
        if raw_state is None:  # a writer that stopped before its first staging write: nothing to keep
            dest.delete_all()
            return None
        if resume:
            state: dict[str, Any] = json.loads(raw_state)
            if state.get("params") != self._params():
                raise IncompleteStoreError(
                    f"{url} holds an unfinished store written with other settings ({state.get('params')}); "
                    f"resume it with those, or pass overwrite=True (--overwrite) to start over")
            return state
        raise StoreExistsError(f"{url} holds an unfinished store (a writer stopped before close()); pass "
                               f"resume=True to continue it (tools/convert resumes by itself) or overwrite=True "
                               f"to start over")

    def _root_attrs(self, *, committed: bool, num_traces: int) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            schema.ATTR_FORMAT_VERSION: schema.FORMAT_VERSION,
            schema.ATTR_COMMITTED: committed,
            schema.ATTR_NUM_TRACES: num_traces,
            schema.ATTR_NUM_LAYERS: self.num_layers,
            schema.ATTR_HIDDEN_SIZE: self.hidden_size,
            schema.ATTR_HAS_GRAPHS: self.has_graphs,
            schema.ATTR_TOKENS: ({p: p in self.token_parts for p in TOKEN_PARTS} if self.has_token_ptr else None),
            schema.ATTR_POOL: self.pool,
            schema.ATTR_GRAPH_RECIPE: self.graph_recipe if self.has_graphs else None,
            schema.ATTR_FIELDS: {name: self._fields.final_kind(name) for name in self._fields.kinds} if committed
            else {},
            schema.ATTR_MODEL_NAME: self.model_name,
            schema.ATTR_PROVENANCE: self.provenance,
            schema.ATTR_CREATED_BY: f"tracestore {_version}",
        }
        if self.has_graphs:
            attrs[schema.ATTR_EDGE_ATTR_SIZE] = self.edge_attr_size
        if committed:
            attrs[schema.ATTR_REPORT] = {k: r.to_dict() for k, r in self._reports.items()}
            attrs[schema.ATTR_GENERATION] = self.generation
        return {schema.ATTRS_KEY: attrs}

    def _create_arrays(self) -> None:
        L, D, H = self.num_layers, self.hidden_size, self.edge_attr_size
        root = zarr.create_group(self._zstore, attributes=self._root_attrs(committed=False, num_traces=0),
                                 overwrite=True)
        self._root = root
        root.create_array(schema.SEQUENCES, shape=(0, L, D), dtype=schema.SEQUENCE_DTYPE, fill_value=0,
                          dimension_names=("trace", "layer", "hidden"),
                          **codecs.sharded_array_kwargs((1, L, D), (self.rows_per_shard, L, D)))
        if self.has_token_ptr:
            tok = root.create_group(schema.TOKENS)
            if "hidden" in self.token_parts:
                tok.create_array("hidden", shape=(0, L, D), dtype=schema.TOKEN_HIDDEN_DTYPE, fill_value=0,
                                 dimension_names=("token", "layer", "hidden"),
                                 **codecs.sharded_array_kwargs((1, L, D), (self.rows_per_shard, L, D)))
            if "ids" in self.token_parts:
                tok.create_array("ids", shape=(0,), dtype=schema.TOKEN_ID_DTYPE, fill_value=0,
                                 dimension_names=("token",),
                                 **codecs.sharded_array_kwargs((self.token_id_chunk,), (self.token_id_rows_per_shard,)))
            if "text" in self.token_parts:
                tok.create_array("text", shape=(0,), dtype=str, fill_value="", dimension_names=("token",),
                                 **codecs.ids_array_kwargs((self.text_chunk,)))
        if self.has_graphs:
            g = root.create_group(schema.GRAPHS)
            g.create_array("edge_index", shape=(2, 0), dtype=schema.EDGE_INDEX_DTYPE, fill_value=0,
                           dimension_names=("src_dst", "edge"),
                           **codecs.sharded_array_kwargs((2, self.edge_chunk), (2, self.edge_rows_per_shard)))
            g.create_array("edge_attr", shape=(0, H), dtype=schema.EDGE_ATTR_DTYPE, fill_value=0,
                           dimension_names=("edge", "attr"),
                           **codecs.sharded_array_kwargs((self.edge_chunk, H), (self.edge_rows_per_shard, H)))
        self._open_buffers()

    def _open_arrays(self) -> None:
        self._root = zarr.open_group(self._zstore, mode="r+")
        self._open_buffers()

    def _open_buffers(self) -> None:
        root = self._root
        self._unsynced: list[str] = []
        # one encoding buffer and one list of shards to sync for every array
        row = functools.partial(_RowBuffer, location=self.location, scratch=[None], unsynced=self._unsynced)
        bufs: dict[str, Any] = {  # _RowBuffer, or _TextBuffer for tokens/text
            schema.SEQUENCES: row(schema.SEQUENCES, root[schema.SEQUENCES], rows_per_shard=self.rows_per_shard)}
        if "hidden" in self.token_parts:
            bufs[schema.TOKEN_HIDDEN] = row(schema.TOKEN_HIDDEN, root[schema.TOKEN_HIDDEN],
                                            rows_per_shard=self.rows_per_shard)
        if "ids" in self.token_parts:
            bufs[schema.TOKEN_IDS] = row(schema.TOKEN_IDS, root[schema.TOKEN_IDS],
                                         rows_per_shard=self.token_id_rows_per_shard)
        if "text" in self.token_parts:
            # a chunk of empty strings is written too: a missing chunk is damage to a reader (issue 11 item 9)
            text: Any = root[schema.TOKEN_TEXT]
            bufs[schema.TOKEN_TEXT] = _TextBuffer(schema.TOKEN_TEXT, text.with_config({"write_empty_chunks": True}),
                                                  self.text_chunk)
        if self.has_graphs:
            bufs[schema.EDGE_INDEX] = row(schema.EDGE_INDEX, root[schema.EDGE_INDEX],
                                          rows_per_shard=self.edge_rows_per_shard, axis=1)
            bufs[schema.EDGE_ATTR] = row(schema.EDGE_ATTR, root[schema.EDGE_ATTR], rows_per_shard=self.edge_rows_per_shard)
        self._buffers = bufs

    # -- staging state (resume) -----------------------------------------------------------------------
    def _sync_shards(self) -> None:
        """Make every shard written so far durable (a checkpoint refers to them; the commit publishes them)."""
        self.location.sync_keys(self._unsynced)
        self._unsynced.clear()

    def _write_staging(self, user_state: dict[str, Any]) -> None:
        self._sync_shards()
        serial = self._checkpoint_serial + 1
        prefix = f"{schema.STAGING_PREFIX}checkpoint-{serial}/"
        loc = self.location
        files = {
            "scores.npy": _npy_bytes(np.concatenate(self._scores) if self._scores else np.empty(0, np.float32)),
            "token_counts.npy": _npy_bytes(np.asarray(self._token_counts, np.int64)),
            "edge_counts.npy": _npy_bytes(np.concatenate(self._edge_counts) if self._edge_counts
                                          else np.empty(0, np.int64)),
            "ids.json": json.dumps(self._ids).encode(),
            "fields.json": json.dumps(self._fields.to_state()).encode(),
        }
        for name, buf in self._buffers.items():
            files[_tail_key(name, buf)] = buf.save_tail()
        for key, data in files.items():
            loc.write_bytes(prefix + key, data)
        state = {
            "params": self._params(),
            "serial": serial,
            "num_traces": len(self._ids),
            "flushed": {name: buf.flushed for name, buf in self._buffers.items()},
            "reports": {k: r.to_dict() for k, r in self._reports.items()},
            "user_state": user_state,
        }
        loc.write_bytes(schema.STAGING_STATE_KEY, json.dumps(state).encode())  # the checkpoint is this write
        if self._checkpoint_serial:
            loc.delete(f"{schema.STAGING_PREFIX}checkpoint-{self._checkpoint_serial}")
        self._checkpoint_serial = serial

    def _read_staged(self, key: str) -> bytes:
        raw = self.location.read_bytes(key)
        if raw is None:
            raise IncompleteStoreError(f"{self.dest.url}: checkpoint file {key} is missing; the unfinished store "
                                       f"cannot be resumed: pass overwrite=True (--overwrite) to start over")
        return raw

    def _load_npy(self, key: str) -> np.ndarray:
        return np.load(io.BytesIO(self._read_staged(key)), allow_pickle=False)

    def _load_staging(self, state: dict[str, Any]) -> None:
        serial = int(state["serial"])
        prefix = f"{schema.STAGING_PREFIX}checkpoint-{serial}/"
        self._checkpoint_serial = serial
        if isinstance(self.location, LocalLocation):
            self.location.remove_partial_files()
        self._ids = json.loads(self._read_staged(prefix + "ids.json"))
        self._id_set = set(self._ids)
        scores = self._load_npy(prefix + "scores.npy")
        self._scores = [scores] if scores.size else []
        self._token_counts = self._load_npy(prefix + "token_counts.npy").tolist()
        ec = self._load_npy(prefix + "edge_counts.npy")
        self._edge_counts = [ec] if ec.size else []
        self._fields = FieldColumns.from_state(json.loads(self._read_staged(prefix + "fields.json")))
        self._reports = {k: Float16Report.from_dict(v) for k, v in state["reports"].items()}
        for name, buf in self._buffers.items():
            buf.flushed = int(state["flushed"][name])
            buf.truncate()  # drop what was written after the checkpoint; it is rewritten
            buf.load_tail(self._read_staged(prefix + _tail_key(name, buf)))
        self.resume_state = state.get("user_state", {})

    def checkpoint(self, user_state: dict[str, Any] | None = None) -> None:
        """Make everything appended so far survive a crash: `create(..., resume=True)` then continues from
        here, with `resume_state` set to `user_state` (for example which input files are done). Costs a write
        of the not-yet-flushed tails (at most one shard per array) and of the ids, scores and fields so far."""
        self._check_open()
        self._lock.check("checkpoint")
        self._write_staging(dict(user_state or {}))

    # -- appending ------------------------------------------------------------------------------------
    @property
    def num_traces(self) -> int:
        return len(self._ids)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedWriterError(f"{self.dest.url}: the writer is closed; open a new one with "
                                    f"tracestore.create(..., resume=True) to add more traces")

    def append(self, ids: Sequence[str | int], sequences: Any = None, scores: Any = None,
               graphs: Sequence[Any] | None = None, *, tokens: Sequence[Any] | None = None,
               fields: Mapping[str, Sequence[Any]] | None = None,
               reports: dict[str, Float16Report] | None = None) -> None:
        """Append a batch of B traces; nothing is visible to readers until `close()`.

        Parameters
        ----------
        ids : B unique ids (str or int; ints are stored as their decimal string).
        sequences : [B, L, D] float16/32/64 (numpy or torch): each trace's per-layer vector (the LSTM input).
            None pools them from the tokens' hidden states by the store's `pool` ('last' or 'mean').
        scores : [B] (NaN where unknown) or None.
        graphs : B per-trace graphs (a TraceGraph, or a list of L PyG `Data`) when the store was created with
            graphs=True: edges over the trace's tokens. Their node features `x` [T, L, D] are the tokens'
            hidden states when `tokens` does not give them.
        tokens : B per-trace TraceTokens (or dicts with 'hidden' [T, L, D], 'ids' [T], 'text' [T strings]).
            Every part the store keeps (create(tokens=...)) must be given for every trace; parts it does not
            keep are ignored. A trace's T must agree with its graph's nodes.
        fields : name -> B values (str, int, float or bool; None where missing): per-trace fields.
        reports : for data already validated and cast to float16 with `cast_float16` (in worker processes,
            say), its float16 reports by array name (schema.SEQUENCES, TOKEN_HIDDEN, EDGE_ATTR): those arrays
            are not measured again, and these reports, which measured the rounding against the original
            values, are kept instead. Such float16 arrays are still checked for inf and NaN, and are kept by
            reference until their shard is written: do not reuse them.

        Everything is validated before anything is buffered: a wrong shape or dtype, NaN (unless allow_nan),
        |x| > 65504 (Float16OverflowError, unless on_overflow='clip'), a duplicate id, or a field whose kind
        clashes with its earlier values raises and leaves the writer as it was.
        """
        self._check_open()
        names: list[str] = [str(i.item() if hasattr(i, "item") else i) for i in ids]
        B = len(names)
        where = f"{self.dest.url}"
        self._check_ids(names)
        sc = self._check_scores(scores, names, where)
        if (graphs is not None) != self.has_graphs:
            raise ShapeMismatchError(
                f"{where}: the store was created with graphs={self.has_graphs} but append() got "
                f"{'graphs' if graphs is not None else 'no graphs'}; pass graphs for every batch or create the "
                f"store with graphs={not self.has_graphs}")
        given = reports or {}
        toks, tgs = self._trace_tokens(names, tokens, graphs, where)
        if sequences is None:
            sequences = self._pooled(names, toks, where)
        seq16, seq_rep = self._cast_sequences(names, sequences, given.get(schema.SEQUENCES), where)
        prep = _Prepared(names=names, scores=sc, seq16=seq16, seq_report=seq_rep)
        if self.has_token_ptr:
            self._prepare_tokens(prep, toks, given.get(schema.TOKEN_HIDDEN), where)
        if tgs is not None:
            self._prepare_graphs(prep, tgs, given.get(schema.EDGE_ATTR), where)
        self._fields.add(B, fields, names, where)  # the last check: it keeps the values once they pass
        self._commit(prep)

    def _check_scores(self, scores: Any, names: list[str], where: str) -> np.ndarray:
        B = len(names)
        if scores is None:
            return np.full(B, np.nan, np.float32)
        sc = as_numpy(scores).astype(np.float32).reshape(-1)
        if sc.shape != (B,):
            raise ShapeMismatchError(f"{where}: scores has {sc.size} values for {B} ids")
        if np.isinf(sc).any():
            k = int(np.flatnonzero(np.isinf(sc))[0])
            raise NonFiniteValueError(f"{where}: trace {names[k]!r}: score is {sc[k]}; a score is a finite number, "
                                      f"or NaN where it is unknown")
        return sc

    def _trace_tokens(self, names: list[str], tokens: Sequence[Any] | None, graphs: Sequence[Any] | None,
                      where: str) -> tuple[list[TraceTokens] | None, list[TraceGraph] | None]:
        """Per trace its tokens (hidden from the graph's x where not given) and its normalised graph."""
        B, L, D, H = len(names), self.num_layers, self.hidden_size, self.edge_attr_size
        if tokens is not None and len(tokens) != B:
            raise ShapeMismatchError(f"{where}: got tokens for {len(tokens)} traces and {B} ids")
        if graphs is not None and len(graphs) != B:
            raise ShapeMismatchError(f"{where}: got {len(graphs)} graphs for {B} ids")
        tgs = None
        if graphs is not None:
            tgs = []
            for tid, g in zip(names, graphs, strict=True):
                try:
                    tgs.append(as_trace_graph(g, num_layers=L, hidden_size=D, edge_attr_size=H, trace=tid))
                except (ShapeMismatchError, DTypeError) as e:
                    raise type(e)(f"{where}: {e}") from None
        if tokens is None and tgs is None:
            if self.token_parts:
                raise ShapeMismatchError(f"{where}: the store keeps per-token {', '.join(self.token_parts)} but "
                                         f"append() got no tokens; pass tokens= (or create the store with "
                                         f"tokens='none')")
            return None, None
        toks = []
        for k, tid in enumerate(names):
            try:
                t = as_trace_tokens(tokens[k], num_layers=L, hidden_size=D, trace=tid) if tokens is not None \
                    else TraceTokens()
            except (ShapeMismatchError, DTypeError) as e:
                raise type(e)(f"{where}: {e}") from None
            g = tgs[k] if tgs is not None else None
            if g is not None:
                for part in TOKEN_PARTS:
                    v = getattr(t, part)
                    if v is not None and len(v) != g.num_nodes:
                        raise ShapeMismatchError(f"{where}: trace {tid!r}: its graph has {g.num_nodes} nodes but its "
                                                 f"token {part} covers {len(v)} tokens; graph nodes are the trace's "
                                                 f"tokens")
                if t.hidden is None and g.x is not None:
                    t.hidden = np.asarray(g.x)
                t.count = g.num_nodes
            missing = [p for p in self.token_parts if getattr(t, p) is None]
            if missing:
                raise ShapeMismatchError(f"{where}: trace {tid!r}: the store keeps per-token {', '.join(missing)} "
                                         f"but the trace gives none; give them (tokens=...) for every trace")
            toks.append(t)
        return toks, tgs

    def _pooled(self, names: list[str], toks: list[TraceTokens] | None, where: str) -> np.ndarray:
        if self.pool is None:
            raise ShapeMismatchError(f"{where}: append() got no sequences; give them, or create the store with "
                                     f"pool='last' or 'mean' to pool them from the tokens' hidden states")
        if toks is None or any(t.hidden is None for t in toks):
            raise ShapeMismatchError(f"{where}: append() got no sequences and no token hidden states to pool "
                                     f"them from; give sequences=[B, L, D] or tokens with 'hidden'")
        out = []
        for tid, t in zip(names, toks, strict=True):
            assert t.hidden is not None
            if t.hidden.shape[0] == 0:
                raise ShapeMismatchError(f"{where}: trace {tid!r} has no tokens to pool; give its sequence")
            out.append(pool_tokens(t.hidden, self.pool))
        # numpy's promotion: float64 traces stay float64 and are rounded to float16 once (issue 11 item 17)
        return np.stack(out)

    def _cast_sequences(self, names: list[str], sequences: Any, given: Float16Report | None,
                        where: str) -> tuple[np.ndarray, Float16Report]:
        B, L, D = len(names), self.num_layers, self.hidden_size
        seq = as_numpy(sequences)
        if seq.ndim != 3 or seq.shape[0] != B:
            raise ShapeMismatchError(f"{where}: sequences has shape {tuple(seq.shape)} for {B} ids; expected "
                                     f"({B}, {L}, {D})")
        if seq.shape[1:] != (L, D):
            raise ShapeMismatchError(f"{where}: trace {names[0]!r}: sequence has shape {tuple(seq.shape[1:])}; "
                                     f"expected ({L}, {D})")
        if given is not None:
            if seq.dtype != np.float16:
                raise DTypeError(f"{where}: append(reports=...) takes sequences already cast to float16 by "
                                 f"cast_float16; got {seq.dtype}: leave out reports= to have append cast them")
            # already cast and measured; still checked on the bit patterns (one cheap pass): inf never enters a
            # store, NaN only with allow_nan
            cast_float16(seq, functools.partial(describe_position, where, names, offset=0),
                         on_overflow=self.on_overflow, allow_nan=self.allow_nan, report=None)
            return seq, given
        rep = Float16Report(L)
        step = max(1, _CAST_STEP_BYTES // (L * D * 4))
        seq16 = np.empty((B, L, D), np.float16)
        for a in range(0, B, step):
            if cast_block_fast(seq[a:a + step], seq16[a:a + step], rep):
                continue  # the common case: finite, in range; else cast_float16 raises, clips or counts NaN
            seq16[a:a + step] = cast_float16(
                seq[a:a + step], functools.partial(describe_position, where, names, offset=a),
                on_overflow=self.on_overflow, allow_nan=self.allow_nan, report=rep)
        return seq16, rep

    def _prepare_tokens(self, prep: _Prepared, toks: list[TraceTokens] | None, given: Float16Report | None,
                        where: str) -> None:
        if toks is None:
            raise ShapeMismatchError(f"{where}: the store has a tokens/ group but append() got neither tokens nor "
                                     f"graphs to count each trace's tokens")
        keep_hidden = "hidden" in self.token_parts
        rep = Float16Report(self.num_layers) if keep_hidden else None
        for tid, t in zip(prep.names, toks, strict=True):
            prep.token_counts.append(t.count if t.count is not None else len(t))
            if keep_hidden:
                assert t.hidden is not None and rep is not None
                h = t.hidden
                describe = functools.partial(describe_token, f"{where}: trace {tid!r}")
                if given is not None:
                    if h.dtype != np.float16:
                        raise DTypeError(f"{where}: trace {tid!r}: append(reports=...) takes token hidden states "
                                         f"already cast to float16; got {h.dtype}")
                    cast_float16(h, describe, on_overflow=self.on_overflow, allow_nan=self.allow_nan, report=None)
                    h16 = h
                else:
                    h16 = np.empty(h.shape, np.float16)
                    if not cast_block_fast(h, h16, rep):
                        h16 = cast_float16(h, describe, on_overflow=self.on_overflow, allow_nan=self.allow_nan,
                                           report=rep)
                prep.hidden.append(h16)
            if "ids" in self.token_parts:
                assert t.ids is not None
                prep.token_ids.append(t.ids)
            if "text" in self.token_parts:
                assert t.text is not None
                prep.text.extend(t.text)
        prep.hidden_report = given if given is not None else rep

    def _prepare_graphs(self, prep: _Prepared, tgs: list[TraceGraph], given: Float16Report | None,
                        where: str) -> None:
        L = self.num_layers
        rea = Float16Report(L)
        for tid, g in zip(prep.names, tgs, strict=True):
            w = f"{where}: trace {tid!r}"
            for layer in range(L):
                ea = np.asarray(g.edge_attr[layer])
                describe = functools.partial(describe_edge, w, layer)
                if given is not None and ea.dtype == np.float16:
                    ea16 = cast_float16(ea[None, None], describe, on_overflow=self.on_overflow,
                                        allow_nan=self.allow_nan)[0, 0]
                else:
                    ea16 = cast_edge_attr(ea, describe, layer=layer, on_overflow=self.on_overflow,
                                          allow_nan=self.allow_nan, report=rea)
                ei = g.edge_index[layer]
                prep.edge_index.append(ei.astype(np.int32, copy=False))
                prep.edge_attr.append(ea16)
                prep.edge_counts.append(int(ei.shape[1]))
        prep.edge_report = given if given is not None else rea

    def _commit(self, p: _Prepared) -> None:
        """Buffer a prepared batch (nothing here can fail on the input) and write whole shards."""
        self._reports[schema.SEQUENCES].merge(p.seq_report)
        self._ids.extend(p.names)
        self._id_set.update(p.names)
        self._scores.append(p.scores)
        self._buffers[schema.SEQUENCES].add(p.seq16)
        if self.has_token_ptr:
            self._token_counts.extend(p.token_counts)
        if "hidden" in self.token_parts:
            assert p.hidden_report is not None
            self._reports[schema.TOKEN_HIDDEN].merge(p.hidden_report)
            for h in p.hidden:
                self._buffers[schema.TOKEN_HIDDEN].add(h)
        if "ids" in self.token_parts and p.token_ids:
            self._buffers[schema.TOKEN_IDS].add(np.concatenate(p.token_ids))
        if "text" in self.token_parts:
            self._buffers[schema.TOKEN_TEXT].add(p.text)
        if self.has_graphs:
            assert p.edge_report is not None
            self._reports[schema.EDGE_ATTR].merge(p.edge_report)
            if p.edge_index:
                self._buffers[schema.EDGE_INDEX].add(np.concatenate(p.edge_index, axis=1))
                self._buffers[schema.EDGE_ATTR].add(np.concatenate(p.edge_attr))
            self._edge_counts.append(np.asarray(p.edge_counts, np.int64))
        self._lock.check("next shard")  # a writer paused past its lease never writes into the new holder's store
        for buf in self._buffers.values():
            buf.flush()

    def _check_ids(self, ids: list[str]) -> None:
        seen: dict[str, int] = {}
        for k, i in enumerate(ids):
            if i == "":
                raise ValueError(f"{self.dest.url}: trace at position {k} of the batch has an empty id")
            try:
                check_utf8(i, "id")
            except ValueError as e:
                raise ValueError(f"{self.dest.url}: trace at position {k} of the batch: {e}") from None
            if i in seen:
                raise DuplicateIdError(f"{self.dest.url}: trace id {i!r} appears twice in one batch (positions "
                                       f"{seen[i]} and {k}); ids must be unique")
            if i in self._id_set:
                raise DuplicateIdError(f"{self.dest.url}: trace id {i!r} was already appended (trace "
                                       f"{self._ids.index(i)}); ids must be unique")
            seen[i] = k

    # -- commit ---------------------------------------------------------------------------------------
    def _plain_array(self, name: str, values: np.ndarray, dtype: Any, fill: Any, dims: tuple[str, ...]) -> None:
        n = int(values.shape[0])
        # every chunk is written, even one of fill values only (all scores unknown): a reader of a store with
        # a generation takes a missing chunk for damage (issue 11 item 9)
        every_chunk: Any = {"write_empty_chunks": True}
        if dtype is str:
            z = self._root.create_array(name, shape=(n,), dtype=str, fill_value="", dimension_names=dims,
                                        overwrite=True, config=every_chunk,
                                        **codecs.ids_array_kwargs((max(1, min(n, 1 << 20)),)))
        else:
            z = self._root.create_array(name, shape=(n,), dtype=dtype, fill_value=fill, dimension_names=dims,
                                        overwrite=True, config=every_chunk,
                                        **codecs.plain_array_kwargs((max(1, min(n, 1 << 22)),)))
        if n:
            z[:] = values

    def close(self) -> None:
        """Commit: write the last (partial) shards and chunks, then `ids`, `scores`, the pointers and the
        fields; make every shard durable; then, in one write of the root zarr.json, the commit marker with
        `num_traces`, `fields`, the float16 report and a fresh `generation`; then delete the staging state.
        An overwrite then swaps the new store in for the old one. After close() the store is visible to
        readers, and the destination's lock is released (also when close() fails)."""
        if self._closed:
            return
        try:
            self._close()
        except BaseException:
            self._closed = True
            self._release()
            raise

    def _close(self) -> None:
        # before the last arrays are written (ids, scores: made anew), not only before the commit marker: a
        # writer paused past its lease may wake up after the new holder has committed the same store
        self._lock.fence("last arrays and the commit")
        for buf in self._buffers.values():
            buf.flush(final=True)
        N = len(self._ids)
        self._plain_array(schema.IDS, np.asarray(self._ids, dtype=object), str, "", ("trace",))
        scores = np.concatenate(self._scores) if self._scores else np.empty(0, np.float32)
        self._plain_array(schema.SCORES, scores, schema.SCORE_DTYPE, float("nan"), ("trace",))
        if self.has_token_ptr:
            ptr = np.zeros(N + 1, np.int64)
            np.cumsum(np.asarray(self._token_counts, np.int64), out=ptr[1:])
            self._plain_array(schema.TOKEN_PTR, ptr, schema.PTR_DTYPE, 0, ("trace_ptr",))
        if self.has_graphs:
            ec = np.concatenate(self._edge_counts) if self._edge_counts else np.empty(0, np.int64)
            edge_ptr = np.zeros(N * self.num_layers + 1, np.int64)
            np.cumsum(ec, out=edge_ptr[1:])
            self._plain_array(schema.EDGE_PTR, edge_ptr, schema.PTR_DTYPE, 0, ("trace_layer_ptr",))
        arrays = self._fields.arrays()
        if arrays:
            self._root.require_group(schema.FIELDS)
        for name, (arr, kind) in arrays.items():
            path = f"{schema.FIELDS}/{name}"
            if kind == "str":
                self._plain_array(path, arr, str, "", ("trace",))
            else:
                fill: Any = {"float": float("nan"), "int": 0, "bool": False}[kind]
                self._plain_array(path, arr, schema.FIELD_DTYPES[kind], fill, ("trace",))
        self._sync_shards()
        # the commit: one atomic write of the root group's attributes. The staging state goes after it: a kill
        # in between leaves a committed store with some litter (readers trust `committed`), never a store that
        # is neither readable nor resumable
        self._lock.fence("commit marker")  # a writer paused past its lease never commits over the new holder
        self._root.update_attributes(self._root_attrs(committed=True, num_traces=N))
        self.location.delete(schema.STAGING_PREFIX.rstrip("/"))
        if self._swap:
            swap_in(self.dest, self.location)
        self._closed = True
        self._release()

    def abort(self) -> None:
        """Stop without committing. What was checkpointed stays for a later resume; an overwrite leaves the
        store it was to replace as it was, and deletes the new one it was building (an overwrite starts over)."""
        if self._closed:
            return
        self._closed = True
        try:
            # a writer that lost its lease leaves everything to the new holder (which may be building the same
            # DEST.tracestore-new)
            if self._swap and not self._lock.lost:
                self.location.delete_all()
        finally:
            self._release()

    def _release(self) -> None:
        if getattr(self, "_own_lock", False):
            self._lock.release()

    def __del__(self) -> None:
        # a writer dropped without close() or abort() writes no more: its lock goes with it (what it
        # checkpointed stays for a resume)
        self._release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # commit only on success: an exception inside the block must not publish a partial store
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _tail_key(name: str, buf: _RowBuffer | _TextBuffer) -> str:
    return "tail-" + name.replace("/", "-") + (".json" if isinstance(buf, _TextBuffer) else ".npy")


def create(url: str | Location, *, num_layers: int, hidden_size: int, graphs: bool = False, edge_attr_size: int = 1,
           tokens: str | Sequence[str] | None = None, overwrite: bool = False, resume: bool = False,
           on_overflow: OnOverflow = "error", allow_nan: bool = False, model_name: str | None = None,
           provenance: dict[str, Any] | None = None, shard_bytes: int | None = None, pool: str | None = None,
           graph_recipe: dict[str, Any] | None = None, storage_options: dict[str, Any] | None = None,
           lock: DestinationLock | None = None) -> StoreWriter:
    """Create a store at `url` and return its writer (also a context manager that commits on success).

    Parameters
    ----------
    num_layers, hidden_size: the shape [L, D] of each trace's per-layer vectors.
    graphs: keep per-layer attention graphs (graphs/ group: edges over the trace's tokens);
        edge_attr_size: attention values per edge (H).
    tokens: the per-token arrays to keep in tokens/: 'all' (hidden states, token ids and decoded text),
        'none', or a subset of ('hidden', 'ids', 'text'). Default: 'hidden' with graphs (their node
        features), else none.
    overwrite: replace an existing store (committed or not) at `url`, starting over. The new store is built
        beside it (`url` + '.tracestore-new') and swapped in at close(): until then, and if the writer fails or
        is killed, the old store stays as it was (a later writer on `url` finishes a swap a crash
        interrupted). A directory or zarr store that tracestore did not write is never replaced
        (StoreExistsError, with or without overwrite).
    resume: continue an unfinished store from its last `checkpoint()` (settings must match). Ignored with
        overwrite, which always starts over.
    on_overflow: 'error' (Float16OverflowError on |x| > 65504) or 'clip' (clip and count in the report).
    allow_nan: store NaN values (counted in the report) instead of raising NonFiniteValueError.
    model_name, provenance: recorded in the store's attributes.
    shard_bytes: target shard size (default config.SHARD_BYTES).
    pool: 'last' or 'mean': how `sequences` are made from the tokens' hidden states when append() gets
        none. Recorded in the attributes as the rule of every trace: sequences you give yourself must follow
        it (the converter pools in its workers by the same rule). None: sequences are always given.
    graph_recipe: how the graphs were made (recorded; default {"name": "given"}).
    lock: a DestinationLock already held on `url` (the converter takes it before it looks at `url`);
        default: the writer takes it. One writer at a time per destination: a second one raises
        StoreLockedError at once, naming the holder (pid, host, start time). The lock is the object
        `url` + '.tracestore-lock/lock.json', released at close() or abort().
    """
    return StoreWriter(writable_location(resolve(url, storage_options)), num_layers=num_layers, hidden_size=hidden_size, graphs=graphs,
                       edge_attr_size=edge_attr_size, tokens=tokens, overwrite=overwrite, resume=resume,
                       on_overflow=on_overflow, allow_nan=allow_nan, model_name=model_name, provenance=provenance,
                       shard_bytes=shard_bytes, pool=pool, graph_recipe=graph_recipe, lock=lock)
