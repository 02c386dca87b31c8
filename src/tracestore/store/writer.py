"""StoreWriter: append traces, write whole shards, commit at close. Nothing is visible to readers until
close(): the root group's `committed` attribute is written last. A writer can checkpoint its position
(`checkpoint()`), and `create(..., resume=True)` continues from the last checkpoint after a crash."""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import zarr

from .._version import __version__ as _version
from ..errors import (
    ClosedWriterError,
    DTypeError,
    DuplicateIdError,
    Float16OverflowError,
    IncompleteStoreError,
    NonFiniteValueError,
    ShapeMismatchError,
    StoreExistsError,
)
from ..format import codecs, layout, schema
from ..format.report import FLOAT16_TINY, Float16Report
from ..format.schema import FLOAT16_MAX
from .graphs import TraceGraph, as_numpy, as_trace_graph
from .shards import encode_shard
from .urls import LocalLocation, Location, resolve

OnOverflow = Literal["error", "clip"]

#: Traces cast per step inside append(): bounds the float32 temporaries to a few tens of MB.
_CAST_STEP_BYTES = 16 * 2**20


def cast_float16(x: np.ndarray, describe: Callable[[tuple[int, ...]], str], *, on_overflow: OnOverflow,
                 allow_nan: bool, report: Float16Report | None = None) -> np.ndarray:
    """Validate and cast a float block [B, L, ...] to float16, accounting it in `report` (layer axis 1).

    NaN raises NonFiniteValueError unless allow_nan; |x| > 65504 or inf raises Float16OverflowError unless
    on_overflow == "clip" (then it is clipped to +-65504 and counted). `describe(position)` names the
    position of a bad value for the message (trace, layer, ...)."""
    if not np.issubdtype(x.dtype, np.floating):
        raise DTypeError(f"{describe(())}: values have dtype {x.dtype}; expected float16, float32 or float64")
    L = x.shape[1] if x.ndim > 1 else 1
    if x.dtype == np.float16:
        # on the bit patterns: numpy's float16 isnan/isinf/abs convert every value to float32 first. With the
        # sign bit masked, a pattern >= 0x7C00 is inf (== 0x7C00) or NaN (above), and finite magnitudes order
        # like their patterns.
        mag = np.ascontiguousarray(x).view(np.uint16) & np.uint16(0x7FFF)
        if (mag >= 0x7C00).any():
            nan = mag > 0x7C00
            if nan.any() and not allow_nan:
                pos = tuple(int(i) for i in np.argwhere(nan)[0])
                raise NonFiniteValueError(f"{describe(pos)}: value is NaN; clean the input, or pass allow_nan=True (--allow-nan) "
                                          f"to store NaN (it is counted in the float16 report)")
        else:
            if report is not None:
                report.update_float16_magnitudes(mag)
            return x
        inf = mag == 0x7C00
        if inf.any():
            pos = tuple(int(i) for i in np.argwhere(inf)[0])
            raise Float16OverflowError(f"{describe(pos)}: value is {float(x[pos])} in float16 input: it overflowed "
                                       f"before it reached tracestore; export float32 or bfloat16 instead")
        if report is not None:
            report.update_float16_block(x)
        return x
    x = x.astype(np.float32, copy=False)
    nan = np.isnan(x)
    if not allow_nan and nan.any():
        pos = tuple(int(i) for i in np.argwhere(nan)[0])
        raise NonFiniteValueError(f"{describe(pos)}: value is NaN; clean the input, or pass allow_nan=True (--allow-nan) to "
                                  f"store NaN (it is counted in the float16 report)")
    over = np.abs(x) > schema.FLOAT16_MAX
    n_over = None
    if over.any():
        if on_overflow != "clip":
            pos = tuple(int(i) for i in np.argwhere(over)[0])
            raise Float16OverflowError(
                f"{describe(pos)}: value {float(x[pos]):.6g} is beyond the float16 range (+-65504) and would be "
                f"stored as inf; pass on_overflow='clip' (--on-overflow clip) to clip such values and count them "
                f"in the report")
        n_over = over.reshape(x.shape[0], L, -1).sum(axis=(0, 2))
        x_src = x
        x = np.clip(x, -schema.FLOAT16_MAX, schema.FLOAT16_MAX)
    x16 = x.astype(np.float16)
    if report is not None:
        # errors are measured against the clipped values; the clipping itself is in `clipped`
        report.update_block(x, x16, overflow=n_over, clipped=n_over)
        if n_over is not None:
            # max |x| as given, over finite values (an inf would make the report unprintable as JSON);
            # infinities that were clipped are counted in `inf`
            a = np.abs(x_src).reshape(x.shape[0], L, -1)
            fin = np.isfinite(a)
            report.max_abs = np.maximum(report.max_abs, np.where(fin, a, 0).max(axis=(0, 2)))
            report.inf += np.isinf(a).sum(axis=(0, 2))
    return x16


#: Bytes per step of the fast cast: temporaries that stay in the CPU cache, few enough calls per block.
_FAST_STEP_BYTES = 1 << 19


def cast_block_fast(x: np.ndarray, out: np.ndarray, report: Float16Report) -> bool:
    """Cast a block [k, L, D] into `out` (float16) and account it in `report`, as `cast_float16` would, for
    the common case: float32 or float16 values, all finite and within +-65504. Returns False, leaving the
    report untouched, when the block is not that case; the caller then uses `cast_float16` (which raises or
    clips) and overwrites `out`.

    Why a second path: numpy converts float32 <-> float16 element by element (5.8 and 3.7 ns per value
    here, measured), torch with F16C vector instructions (0.15 ns), and the conversion is most of the
    workers' time; and NaN, inf and overflow all show in the per-layer max |x| computed anyway, so the
    common case needs no separate scans. Same rounding (IEEE round-to-nearest-even): tests check that
    both paths give the same bits and the same report."""
    import torch

    if x.dtype not in (np.float32, np.float16) or x.ndim != 3 or x.size == 0 or out.shape != x.shape:
        return False
    k, L = x.shape[0], x.shape[1]
    x = np.ascontiguousarray(x)
    if x.dtype == np.float16:
        amax = torch.from_numpy(x).abs().reshape(k, L, -1).amax(dim=(0, 2)).double().numpy()
        if not (amax <= FLOAT16_MAX).all():  # NaN or inf: let cast_float16 name it
            return False
        out[...] = x
        report.values += x.size
        report.max_abs = np.maximum(report.max_abs, amax)
        return True
    step = max(1, _FAST_STEP_BYTES // x[0].nbytes)
    amax = np.zeros(L, np.float32)
    errmax = np.zeros(L, np.float32)
    relmax = np.zeros(L, np.float32)
    n0 = min(step, k)
    absbuf = np.empty((n0, *x.shape[1:]), np.float32)
    errbuf = np.empty((n0, *x.shape[1:]), np.float32)
    t_out = torch.from_numpy(out) if out.flags.c_contiguous else None
    for a in range(0, k, step):
        b = min(k, a + step)
        xs, ax, err = x[a:b], absbuf[:b - a], errbuf[:b - a]
        np.abs(xs, out=ax)
        m = ax.reshape(b - a, L, -1).max(axis=(0, 2))
        if not (m <= FLOAT16_MAX).all():  # NaN propagates: one reduction finds NaN, inf and overflow
            return False
        amax = np.maximum(amax, m)
        if t_out is not None:
            t_out[a:b].copy_(torch.from_numpy(xs))
            torch.from_numpy(err).copy_(t_out[a:b])
        else:
            out[a:b] = xs
            err[...] = out[a:b]
        np.subtract(err, xs, out=err)
        np.abs(err, out=err)
        errmax = np.maximum(errmax, err.reshape(b - a, L, -1).max(axis=(0, 2)))
        # relative error only where |x| is a normal float16 (as Float16Report.update_block)
        np.multiply(err, ax >= FLOAT16_TINY, out=err)
        np.maximum(ax, FLOAT16_TINY, out=ax)
        np.divide(err, ax, out=err)
        relmax = np.maximum(relmax, err.reshape(b - a, L, -1).max(axis=(0, 2)))
    report.values += x.size
    report.max_abs = np.maximum(report.max_abs, amax)
    report.max_abs_error = np.maximum(report.max_abs_error, errmax)
    report.max_rel_error = np.maximum(report.max_rel_error, relmax)
    return True


def cast_edge_attr(ea: np.ndarray, describe: Callable[[tuple[int, ...]], str], *, layer: int,
                   on_overflow: OnOverflow, allow_nan: bool, report: Float16Report) -> np.ndarray:
    """Validate and cast one layer's edge attributes [E, H] to float16 (rules of cast_float16), accounting
    them in `report` under `layer`, clipped values included (counted, and errors measured after the clip)."""
    ea16 = cast_float16(ea[None, None], describe, on_overflow=on_overflow, allow_nan=allow_nan)[0, 0]
    if ea.size:
        if ea.dtype == np.float16:
            report.update_float16_layer(layer, ea)
        else:
            ea32 = ea.astype(np.float32)
            n_over = int((np.abs(ea32) > schema.FLOAT16_MAX).sum())  # NaN compares False
            if n_over:
                ea32 = np.clip(ea32, -schema.FLOAT16_MAX, schema.FLOAT16_MAX)
            report.update_layer(layer, ea32, ea16, overflow=n_over, clipped=n_over)
    return ea16


@dataclass
class _RowBuffer:
    """Rows waiting for a whole shard of one array. Rows run along `axis` (1 for edge_index)."""

    name: str
    array: Any  # zarr.Array
    location: Location
    rows_per_shard: int
    axis: int = 0
    flushed: int = 0
    pending: list[np.ndarray] = field(default_factory=list)
    pending_rows: int = 0
    _scratch: bytearray | None = None

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
                            inner_shape=inner, chunks_per_shard=cps, out=self._scratch)
        self._scratch = data.obj  # type: ignore[assignment]
        coords = ["0"] * parts[0].ndim
        coords[self.axis] = str(a // self.rows_per_shard)
        self.location.write_bytes(f"{self.name}/c/" + "/".join(coords), data)
        self.flushed = a + n


class StoreWriter:
    """Writes a tracestore store. Use `tracestore.create(...)`; see its docstring."""

    def __init__(self, location: Location, *, num_layers: int, hidden_size: int, graphs: bool = False,
                 edge_attr_size: int = 1, overwrite: bool = False, resume: bool = False,
                 on_overflow: OnOverflow = "error", allow_nan: bool = False, model_name: str | None = None,
                 provenance: dict[str, Any] | None = None, shard_bytes: int | None = None) -> None:
        for name, v in (("num_layers", num_layers), ("hidden_size", hidden_size), ("edge_attr_size", edge_attr_size)):
            if not isinstance(v, int | np.integer) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if on_overflow not in ("error", "clip"):
            raise ValueError(f"on_overflow must be 'error' or 'clip', got {on_overflow!r}")
        self.location = location
        self.num_layers = int(num_layers)
        self.hidden_size = int(hidden_size)
        self.has_graphs = bool(graphs)
        self.edge_attr_size = int(edge_attr_size)
        self.on_overflow: OnOverflow = on_overflow
        self.allow_nan = allow_nan
        self.model_name = model_name
        self.provenance = dict(provenance or {})
        row_bytes = self.num_layers * self.hidden_size * 2
        self.rows_per_shard = layout.rows_per_shard(row_bytes, shard_bytes)
        self.edge_chunk = layout.edge_chunk_rows(self.edge_attr_size)
        self.edge_rows_per_shard = self.edge_chunk * layout.edge_chunks_per_shard(
            self.edge_chunk, self.edge_attr_size, shard_bytes)
        self._closed = False
        self._checkpoint_serial = 0
        #: what the caller saved with the last checkpoint (None on a fresh store)
        self.resume_state: dict[str, Any] | None = None

        self._ids: list[str] = []
        self._id_set: set[str] = set()
        self._scores: list[np.ndarray] = []
        self._node_counts: list[int] = []
        self._edge_counts: list[np.ndarray] = []
        self._reports = {schema.SEQUENCES: Float16Report(self.num_layers)}
        if self.has_graphs:
            self._reports[schema.NODE_X] = Float16Report(self.num_layers)
            self._reports[schema.EDGE_ATTR] = Float16Report(self.num_layers)

        state = self._prepare_location(overwrite=overwrite, resume=resume)
        self._zstore = location.zarr_store(read_only=False)
        if state is None:
            self._create_arrays()
            self._write_staging({})
        else:
            self._open_arrays()
            self._load_staging(state)

    # -- set-up ---------------------------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "hidden_size": self.hidden_size, "graphs": self.has_graphs,
                "edge_attr_size": self.edge_attr_size, "rows_per_shard": self.rows_per_shard,
                "edge_rows_per_shard": self.edge_rows_per_shard, "edge_chunk": self.edge_chunk,
                "on_overflow": self.on_overflow, "allow_nan": self.allow_nan}

    def _prepare_location(self, *, overwrite: bool, resume: bool) -> dict[str, Any] | None:
        loc = self.location
        url = loc.url
        raw_root = loc.read_bytes("zarr.json")
        raw_state = loc.read_bytes(schema.STAGING_STATE_KEY)
        if raw_root is None and raw_state is None:
            if isinstance(loc, LocalLocation) and loc.is_nonempty_dir():
                raise StoreExistsError(f"{url} exists and is not a tracestore store; refusing to write into it. "
                                       f"Choose another destination or remove it yourself")
            return None
        attrs = json.loads(raw_root).get("attributes", {}).get(schema.ATTRS_KEY, {}) if raw_root else {}
        committed = bool(attrs.get(schema.ATTR_COMMITTED))
        if raw_root is not None and not attrs:
            if not overwrite:
                raise StoreExistsError(f"{url} holds a zarr store that tracestore did not write; refusing to touch "
                                       f"it. Pass overwrite=True (--overwrite) to replace it")
        if committed:
            if not overwrite:
                raise StoreExistsError(f"{url} already holds a store ({attrs.get(schema.ATTR_NUM_TRACES)} traces); "
                                       f"pass overwrite=True (--overwrite) to replace it")
            loc.delete_all()
            return None
        if resume and raw_state is not None:
            state = json.loads(raw_state)
            if state.get("params") != self._params():
                if overwrite:
                    loc.delete_all()
                    return None
                raise IncompleteStoreError(
                    f"{url} holds an unfinished store written with other settings ({state.get('params')}); "
                    f"resume it with those, or pass overwrite=True (--overwrite) to start over")
            return state
        if overwrite or raw_state is None:
            loc.delete_all()
            return None
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
            schema.ATTR_MODEL_NAME: self.model_name,
            schema.ATTR_PROVENANCE: self.provenance,
            schema.ATTR_CREATED_BY: f"tracestore {_version}",
        }
        if self.has_graphs:
            attrs[schema.ATTR_EDGE_ATTR_SIZE] = self.edge_attr_size
        if committed:
            attrs[schema.ATTR_REPORT] = {k: r.to_dict() for k, r in self._reports.items()}
        return {schema.ATTRS_KEY: attrs}

    def _create_arrays(self) -> None:
        L, D, H = self.num_layers, self.hidden_size, self.edge_attr_size
        root = zarr.create_group(self._zstore, attributes=self._root_attrs(committed=False, num_traces=0),
                                 overwrite=True)
        self._root = root
        seq = root.create_array(schema.SEQUENCES, shape=(0, L, D), dtype=schema.SEQUENCE_DTYPE, fill_value=0,
                                dimension_names=("trace", "layer", "hidden"),
                                **codecs.sharded_array_kwargs((1, L, D), (self.rows_per_shard, L, D)))
        self._buffers = {schema.SEQUENCES: _RowBuffer(schema.SEQUENCES, seq, self.location, self.rows_per_shard)}
        if self.has_graphs:
            g = root.create_group(schema.GRAPHS)
            x = g.create_array("x", shape=(0, L, D), dtype=schema.NODE_X_DTYPE, fill_value=0,
                               dimension_names=("node", "layer", "hidden"),
                               **codecs.sharded_array_kwargs((1, L, D), (self.rows_per_shard, L, D)))
            ei = g.create_array("edge_index", shape=(2, 0), dtype=schema.EDGE_INDEX_DTYPE, fill_value=0,
                                dimension_names=("src_dst", "edge"),
                                **codecs.sharded_array_kwargs((2, self.edge_chunk), (2, self.edge_rows_per_shard)))
            ea = g.create_array("edge_attr", shape=(0, H), dtype=schema.EDGE_ATTR_DTYPE, fill_value=0,
                                dimension_names=("edge", "attr"),
                                **codecs.sharded_array_kwargs((self.edge_chunk, H), (self.edge_rows_per_shard, H)))
            self._buffers[schema.NODE_X] = _RowBuffer(schema.NODE_X, x, self.location, self.rows_per_shard)
            self._buffers[schema.EDGE_INDEX] = _RowBuffer(schema.EDGE_INDEX, ei, self.location, self.edge_rows_per_shard, axis=1)
            self._buffers[schema.EDGE_ATTR] = _RowBuffer(schema.EDGE_ATTR, ea, self.location, self.edge_rows_per_shard)

    def _open_arrays(self) -> None:
        self._root = zarr.open_group(self._zstore, mode="r+")
        names = [schema.SEQUENCES] + ([schema.NODE_X, schema.EDGE_INDEX, schema.EDGE_ATTR] if self.has_graphs else [])
        self._buffers = {}
        for name in names:
            arr = self._root[name]
            if name == schema.EDGE_INDEX:
                self._buffers[name] = _RowBuffer(name, arr, self.location, self.edge_rows_per_shard, axis=1)
            else:
                rps = self.edge_rows_per_shard if name == schema.EDGE_ATTR else self.rows_per_shard
                self._buffers[name] = _RowBuffer(name, arr, self.location, rps)

    # -- staging state (resume) -----------------------------------------------------------------------
    def _npy_bytes(self, a: np.ndarray) -> bytes:
        b = io.BytesIO()
        np.save(b, a, allow_pickle=False)
        return b.getvalue()

    def _write_staging(self, user_state: dict[str, Any]) -> None:
        serial = self._checkpoint_serial + 1
        prefix = f"{schema.STAGING_PREFIX}checkpoint-{serial}/"
        loc = self.location
        files = {
            "scores": np.concatenate(self._scores) if self._scores else np.empty(0, np.float32),
            "node_counts": np.asarray(self._node_counts, np.int64),
            "edge_counts": (np.concatenate(self._edge_counts) if self._edge_counts else np.empty(0, np.int64)),
        }
        for name, buf in self._buffers.items():
            files["tail-" + name.replace("/", "-")] = buf.tail()
        for name, arr in files.items():
            loc.write_bytes(prefix + name + ".npy", self._npy_bytes(np.ascontiguousarray(arr)))
        loc.write_bytes(prefix + "ids.json", json.dumps(self._ids).encode())
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

    def _load_npy(self, key: str) -> np.ndarray:
        raw = self.location.read_bytes(key)
        if raw is None:
            raise IncompleteStoreError(f"{self.location.url}: checkpoint file {key} is missing; the unfinished store "
                                       f"cannot be resumed: pass overwrite=True (--overwrite) to start over")
        return np.load(io.BytesIO(raw), allow_pickle=False)

    def _load_staging(self, state: dict[str, Any]) -> None:
        serial = int(state["serial"])
        prefix = f"{schema.STAGING_PREFIX}checkpoint-{serial}/"
        self._checkpoint_serial = serial
        if isinstance(self.location, LocalLocation):
            self.location.remove_partial_files()
        ids_raw = self.location.read_bytes(prefix + "ids.json")
        self._ids = json.loads(ids_raw) if ids_raw else []
        self._id_set = set(self._ids)
        scores = self._load_npy(prefix + "scores.npy")
        self._scores = [scores] if scores.size else []
        self._node_counts = self._load_npy(prefix + "node_counts.npy").tolist()
        ec = self._load_npy(prefix + "edge_counts.npy")
        self._edge_counts = [ec] if ec.size else []
        self._reports = {k: Float16Report.from_dict(v) for k, v in state["reports"].items()}
        for name, buf in self._buffers.items():
            buf.flushed = int(state["flushed"][name])
            shape = list(buf.array.shape)
            shape[buf.axis] = buf.flushed
            buf.array.resize(tuple(shape))  # drop shards written after the checkpoint; they are rewritten
            buf.pending, buf.pending_rows = [], 0
            buf.add(self._load_npy(prefix + "tail-" + name.replace("/", "-") + ".npy"))
        self.resume_state = state.get("user_state", {})

    def checkpoint(self, user_state: dict[str, Any] | None = None) -> None:
        """Make everything appended so far survive a crash: `create(..., resume=True)` then continues from
        here, with `resume_state` set to `user_state` (for example which input files are done). Costs a write
        of the not-yet-flushed tails (at most one shard per array)."""
        self._check_open()
        self._write_staging(dict(user_state or {}))

    # -- appending ------------------------------------------------------------------------------------
    @property
    def num_traces(self) -> int:
        return len(self._ids)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedWriterError(f"{self.location.url}: the writer is closed; open a new one with "
                                    f"tracestore.create(..., resume=True) to add more traces")

    def append(self, ids: Sequence[str | int], sequences: Any, scores: Any = None,
               graphs: Sequence[Any] | None = None, *, reports: dict[str, Float16Report] | None = None) -> None:
        """Append a batch of B traces; nothing is visible to readers until `close()`.

        ids: B unique ids (str or int). sequences: [B, L, D] float16/32/64 (numpy or torch). scores: [B]
        (NaN where unknown) or None. graphs: B per-trace graphs (a TraceGraph or a list of L PyG `Data`)
        when the store was created with graphs=True. reports: for data already validated and cast to
        float16 with `cast_float16` (in worker processes, say), its float16 reports by array name
        (schema.SEQUENCES, NODE_X, EDGE_ATTR): the sequences are not validated again, and these reports,
        which measured the rounding against the original values, are kept instead of what append would
        measure on float16 input (no rounding at all). Such float16 sequences are still checked for inf and
        NaN, and are kept by reference until their shard is written: do not reuse the array.

        Everything is validated before anything is buffered: a wrong shape or dtype, NaN (unless
        allow_nan), |x| > 65504 (Float16OverflowError, unless on_overflow='clip') or a duplicate id raises
        and leaves the writer as it was.
        """
        self._check_open()
        names: list[str] = [str(i.item() if hasattr(i, "item") else i) for i in ids]
        B = len(names)
        seq = as_numpy(sequences)
        L, D = self.num_layers, self.hidden_size
        where = f"{self.location.url}"
        if seq.ndim != 3 or seq.shape[0] != B:
            raise ShapeMismatchError(f"{where}: sequences has shape {tuple(seq.shape)} for {B} ids; expected "
                                     f"({B}, {L}, {D})")
        if seq.shape[1:] != (L, D):
            raise ShapeMismatchError(f"{where}: trace {names[0]!r}: sequence has shape {tuple(seq.shape[1:])}; "
                                     f"expected ({L}, {D})")
        self._check_ids(names)
        if scores is None:
            sc = np.full(B, np.nan, np.float32)
        else:
            sc = as_numpy(scores).astype(np.float32).reshape(-1)
            if sc.shape != (B,):
                raise ShapeMismatchError(f"{where}: scores has {sc.size} values for {B} ids")
            if np.isinf(sc).any():
                k = int(np.flatnonzero(np.isinf(sc))[0])
                raise NonFiniteValueError(f"{where}: trace {names[k]!r}: score is {sc[k]}; a score is a finite number, "
                                          f"or NaN where it is unknown")
        if (graphs is not None) != self.has_graphs:
            raise ShapeMismatchError(
                f"{where}: the store was created with graphs={self.has_graphs} but append() got "
                f"{'graphs' if graphs is not None else 'no graphs'}; pass graphs for every batch or create the "
                f"store with graphs={not self.has_graphs}")
        # validate and cast everything before buffering anything
        given = reports or {}
        if schema.SEQUENCES in given:
            if seq.dtype != np.float16:
                raise DTypeError(f"{where}: append(reports=...) takes sequences already cast to float16 by "
                                 f"cast_float16; got {seq.dtype}: leave out reports= to have append cast them")
            # already cast and measured; still checked on the bit patterns (one cheap pass): inf never enters a
            # store, NaN only with allow_nan
            seq16 = cast_float16(seq, functools.partial(describe_position, where, names, offset=0), on_overflow=self.on_overflow,
                                 allow_nan=self.allow_nan, report=None)
            rep = given[schema.SEQUENCES]
        else:
            rep = Float16Report(L)
            step = max(1, _CAST_STEP_BYTES // (L * D * 4))
            seq16 = np.empty((B, L, D), np.float16)
            for a in range(0, B, step):
                if cast_block_fast(seq[a:a + step], seq16[a:a + step], rep):
                    continue  # the common case: finite, in range; else cast_float16 raises, clips or counts NaN
                blk = seq[a:a + step]
                seq16[a:a + step] = cast_float16(
                    blk, functools.partial(describe_position, where, names, offset=a), on_overflow=self.on_overflow,
                    allow_nan=self.allow_nan, report=rep)
        graph_parts = self._prepare_graphs(names, graphs) if graphs is not None else None
        # commit the batch to the buffers
        self._reports[schema.SEQUENCES].merge(rep)
        self._ids.extend(names)
        self._id_set.update(names)
        self._scores.append(sc)
        self._buffers[schema.SEQUENCES].add(seq16)
        if graph_parts is not None:
            xs, eis, eas, n_nodes, n_edges, rx, rea = graph_parts
            rx, rea = given.get(schema.NODE_X, rx), given.get(schema.EDGE_ATTR, rea)
            self._reports[schema.NODE_X].merge(rx)
            self._reports[schema.EDGE_ATTR].merge(rea)
            self._buffers[schema.NODE_X].add(xs)
            self._buffers[schema.EDGE_INDEX].add(eis)
            self._buffers[schema.EDGE_ATTR].add(eas)
            self._node_counts.extend(n_nodes)
            self._edge_counts.append(n_edges)
        for buf in self._buffers.values():
            buf.flush()

    def _check_ids(self, ids: list[str]) -> None:
        seen: dict[str, int] = {}
        for k, i in enumerate(ids):
            if i == "":
                raise ValueError(f"{self.location.url}: trace at position {k} of the batch has an empty id")
            if i in seen:
                raise DuplicateIdError(f"{self.location.url}: trace id {i!r} appears twice in one batch (positions "
                                       f"{seen[i]} and {k}); ids must be unique")
            if i in self._id_set:
                raise DuplicateIdError(f"{self.location.url}: trace id {i!r} was already appended (trace "
                                       f"{self._ids.index(i)}); ids must be unique")
            seen[i] = k

    def _prepare_graphs(self, ids: list[str], graphs: Sequence[Any]) -> tuple[Any, ...]:
        if len(graphs) != len(ids):
            raise ShapeMismatchError(f"{self.location.url}: got {len(graphs)} graphs for {len(ids)} ids")
        L, D, H = self.num_layers, self.hidden_size, self.edge_attr_size
        rx, rea = Float16Report(L), Float16Report(L)
        xs, eis, eas, n_nodes, n_edges = [], [], [], [], []
        for tid, g in zip(ids, graphs, strict=True):
            tg: TraceGraph = as_trace_graph(g, num_layers=L, hidden_size=D, edge_attr_size=H, trace=tid)
            where = f"{self.location.url}: trace {tid!r}"
            xs.append(cast_float16(np.asarray(tg.x), functools.partial(describe_node, where), on_overflow=self.on_overflow,
                                   allow_nan=self.allow_nan, report=rx))
            for layer in range(L):
                ea16 = cast_edge_attr(np.asarray(tg.edge_attr[layer]), functools.partial(describe_edge, where, layer),
                                      layer=layer, on_overflow=self.on_overflow, allow_nan=self.allow_nan, report=rea)
                eis.append(tg.edge_index[layer].astype(np.int32))
                eas.append(ea16)
                n_edges.append(tg.edge_index[layer].shape[1])
            n_nodes.append(tg.num_nodes)
        return (np.concatenate(xs) if xs else np.empty((0, L, D), np.float16),
                np.concatenate(eis, axis=1) if eis else np.empty((2, 0), np.int32),
                np.concatenate(eas) if eas else np.empty((0, H), np.float16),
                n_nodes, np.asarray(n_edges, np.int64), rx, rea)

    # -- commit ---------------------------------------------------------------------------------------
    def close(self) -> None:
        """Write the last (partial) shards, the ids, scores and graph pointers, the float16 report, and then
        the commit marker. After close() the store is visible to readers."""
        if self._closed:
            return
        for buf in self._buffers.values():
            buf.flush(final=True)
        N = len(self._ids)
        root = self._root
        ids = root.create_array(schema.IDS, shape=(N,), dtype=str, fill_value="", dimension_names=("trace",),
                                overwrite=True, **codecs.ids_array_kwargs((max(1, min(N, 1 << 20)),)))
        if N:
            ids[:] = np.asarray(self._ids, dtype=object)
        scores = np.concatenate(self._scores) if self._scores else np.empty(0, np.float32)
        sa = root.create_array(schema.SCORES, shape=(N,), dtype=schema.SCORE_DTYPE, fill_value=float("nan"),
                               dimension_names=("trace",), overwrite=True,
                               **codecs.plain_array_kwargs((max(1, min(N, 1 << 22)),)))
        if N:
            sa[:] = scores
        if self.has_graphs:
            node_ptr = np.zeros(N + 1, np.int64)
            np.cumsum(np.asarray(self._node_counts, np.int64), out=node_ptr[1:])
            ec = np.concatenate(self._edge_counts) if self._edge_counts else np.empty(0, np.int64)
            edge_ptr = np.zeros(N * self.num_layers + 1, np.int64)
            np.cumsum(ec, out=edge_ptr[1:])
            for name, arr, dim in ((schema.NODE_PTR, node_ptr, "trace_ptr"), (schema.EDGE_PTR, edge_ptr, "trace_layer_ptr")):
                z = root.create_array(name, shape=arr.shape, dtype=schema.PTR_DTYPE, fill_value=0,
                                      dimension_names=(dim,), overwrite=True,
                                      **codecs.plain_array_kwargs((max(1, min(arr.size, 1 << 22)),)))
                z[:] = arr
        # the commit: one atomic write of the root group's attributes. The staging state goes after it: a kill
        # in between leaves a committed store with some litter (readers trust `committed`), never a store that
        # is neither readable nor resumable
        root.update_attributes(self._root_attrs(committed=True, num_traces=N))
        self.location.delete(schema.STAGING_PREFIX.rstrip("/"))
        self._closed = True

    def abort(self) -> None:
        """Stop without committing. What was checkpointed stays for a later resume."""
        self._closed = True

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # commit only on success: an exception inside the block must not publish a partial store
        if exc_type is None:
            self.close()
        else:
            self.abort()


def describe_position(where: str, ids: list[str], p: tuple[int, ...], *, offset: int = 0) -> str:
    """'WHERE: trace ID, layer L, hidden D' for position p of a block [B, L, D] whose first trace is ids[offset]."""
    if not p:
        return where
    s = f"{where}: trace {ids[offset + p[0]]!r}"
    if len(p) > 1:
        s += f", layer {p[1]}"
    if len(p) > 2:
        s += f", hidden {p[2]}"
    return s


def describe_node(where: str, p: tuple[int, ...]) -> str:
    return where + (f", graph node {p[0]}, layer {p[1]}, hidden {p[2]}" if len(p) == 3 else "")


def describe_edge(where: str, layer: int, p: tuple[int, ...]) -> str:
    return where + (f", layer {layer} edge {p[2]} attribute {p[3]}" if len(p) == 4 else f", layer {layer} edges")


def create(url: str | Location, *, num_layers: int, hidden_size: int, graphs: bool = False, edge_attr_size: int = 1,
           overwrite: bool = False, resume: bool = False, on_overflow: OnOverflow = "error", allow_nan: bool = False,
           model_name: str | None = None, provenance: dict[str, Any] | None = None, shard_bytes: int | None = None,
           storage_options: dict[str, Any] | None = None) -> StoreWriter:
    """Create a store at `url` and return its writer (also a context manager that commits on success).

    Parameters
    ----------
    num_layers, hidden_size: the shape [L, D] of each trace's per-layer vectors.
    graphs: keep per-layer attention graphs (graphs/ group); edge_attr_size: attention values per edge (H).
    overwrite: replace an existing store (committed or not) at `url`.
    resume: continue an unfinished store from its last `checkpoint()` (settings must match).
    on_overflow: 'error' (Float16OverflowError on |x| > 65504) or 'clip' (clip and count in the report).
    allow_nan: store NaN values (counted in the report) instead of raising NonFiniteValueError.
    model_name, provenance: recorded in the store's attributes.
    shard_bytes: target shard size (default config.SHARD_BYTES).
    """
    return StoreWriter(resolve(url, storage_options), num_layers=num_layers, hidden_size=hidden_size, graphs=graphs,
                       edge_attr_size=edge_attr_size, overwrite=overwrite, resume=resume, on_overflow=on_overflow,
                       allow_nan=allow_nan, model_name=model_name, provenance=provenance, shard_bytes=shard_bytes)
