"""What is inside an archive, normalised: ids, one [L, D] vector per layer per trace, scores, graphs.

Layouts (../shared/DESIGN.md "Input archives"):

- a list of trace records (dicts): an id under `id`, `question_id` or `trace_id`; `hidden_states` [L, D]
  (pooled) or [L, T, D] (per token, needs `pool`), and/or `graphs` (L PyG `Data` with `x` [T, D],
  `edge_index` [2, E], `edge_attr` [E] or [E, H]); optional `score`. A record with graphs and no
  `hidden_states` gets its vectors by pooling the graphs' `x`;
- a batch dict: `ids`, `hidden_states` [N, L, D] (or [N, L, T, D] with `pool`), optional `scores`;
- a legacy preprocessed `.pt` dict: `sequences` float16 [N, L, D], `scores` or `labels`, optional `ids`.

`iter_blocks` yields the traces of an archive in blocks of a few MB as float arrays (the verifier compares
these with the store); `cast_blocks` casts them to float16 with float16 reports, in the worker processes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..errors import DTypeError, DuplicateIdError, InputFormatError, ShapeMismatchError, TracestoreError
from ..format import schema
from ..format.report import Float16Report
from ..store.graphs import TraceGraph, as_numpy, as_trace_graph
from ..store.writer import (
    OnOverflow,
    cast_block_fast,
    cast_edge_attr,
    cast_float16,
    describe_edge,
    describe_node,
    describe_position,
)

Pool = Literal["mean", "last"]
ID_KEYS = ("id", "question_id", "trace_id")

#: Float32 bytes per block of traces: bounds the temporaries of casting and pooling.
BLOCK_BYTES = 16 * 2**20


@dataclass
class Block:
    """Consecutive traces of one archive: `sequences` [k, L, D] float (as given, pooled), `scores` [k]
    float32 (NaN = none in the archive), `graphs` (TraceGraph per trace, as given) or None."""

    ids: list[str]
    sequences: np.ndarray
    scores: np.ndarray
    graphs: list[TraceGraph] | None


def _id_str(v: Any, name: str, where: str) -> str:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise InputFormatError(f"{name}: {where} has id {v!r} of type {type(v).__name__}; ids must be strings or "
                               f"integers")
    s = str(v)
    if not s:
        raise InputFormatError(f"{name}: {where} has an empty id; give every trace a non-empty id")
    return s


def _pool(a: np.ndarray, pool: Pool | None, name: str, tid: str, what: str, token_axis: int) -> np.ndarray:
    if pool is None:
        raise InputFormatError(f"{name}: trace {tid!r}: {what} has shape {tuple(a.shape)} (one vector per token); "
                               f"pass --pool mean or --pool last (pool='mean'|'last') to reduce it to one vector "
                               f"per layer")
    if a.shape[token_axis] == 0:
        raise InputFormatError(f"{name}: trace {tid!r}: {what} has shape {tuple(a.shape)}: no tokens to pool; drop "
                               f"the trace or fix its export")
    if pool == "last":
        return np.take(a, a.shape[token_axis] - 1, axis=token_axis)
    return a.astype(np.float32, copy=False).mean(axis=token_axis, dtype=np.float64).astype(np.float32)


def _check_float(a: np.ndarray, name: str, tid: str, what: str) -> None:
    if not np.issubdtype(a.dtype, np.floating):
        raise DTypeError(f"{name}: trace {tid!r}: {what} has dtype {a.dtype}; expected float16, float32 or float64 "
                         f"values (re-export the hidden states as floats)")


class _Shape:
    """The [L, D] of the archive's traces, set by the first and checked for the rest."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ld: tuple[int, int] | None = None
        self.first: str | None = None

    def check(self, ld: tuple[int, ...], tid: str, what: str) -> None:
        if self.ld is None:
            if len(ld) != 2 or min(ld) <= 0:
                raise ShapeMismatchError(f"{self.name}: trace {tid!r}: {what} gives per-layer vectors of shape {ld}; "
                                         f"expected (L, D) with L, D > 0")
            self.ld, self.first = (int(ld[0]), int(ld[1])), tid
            return
        if tuple(ld) != self.ld:
            L, D = self.ld
            raise ShapeMismatchError(f"{self.name}: trace {tid!r}: {what} gives per-layer vectors of shape "
                                     f"{tuple(ld)}; expected ({L}, {D}) like trace {self.first!r} of the same "
                                     f"archive; every trace must have the same layers and hidden size")


def _record_graph(rec: dict[str, Any], name: str, tid: str) -> TraceGraph | None:
    g = rec.get("graphs")
    if g is None:
        return None
    if isinstance(g, TraceGraph):
        return g
    if not isinstance(g, list | tuple) or not g:
        raise InputFormatError(f"{name}: trace {tid!r}: 'graphs' is a {type(g).__name__}; expected a list of L "
                               f"torch_geometric Data (one per layer)")
    try:
        return TraceGraph.from_pyg(list(g), trace=tid)
    except TracestoreError as e:
        raise type(e)(f"{name}: {e}") from None


def _record_blocks(recs: list[Any], name: str, pool: Pool | None, keep_graphs: bool) -> Iterator[Block]:
    shape = _Shape(name)
    seen: dict[str, int] = {}
    has_graphs: bool | None = None
    buf: list[tuple[str, np.ndarray, float, TraceGraph | None]] = []
    step = 1
    for k, rec in enumerate(recs):
        if not isinstance(rec, dict):
            raise InputFormatError(f"{name}: record {k} is a {type(rec).__name__}; expected a dict with 'id' and "
                                   f"'hidden_states' and/or 'graphs'")
        key = next((kk for kk in ID_KEYS if kk in rec), None)
        if key is None:
            raise InputFormatError(f"{name}: record {k} has no id (looked for {', '.join(ID_KEYS)}; keys: "
                                   f"{sorted(map(str, rec))[:8]}); add an id to every record")
        tid = _id_str(rec[key], name, f"record {k}")
        if tid in seen:
            raise DuplicateIdError(f"{name}: trace {tid!r} appears twice (records {seen[tid]} and {k}); ids must be "
                                   f"unique: fix the export or drop the duplicate")
        seen[tid] = k
        graph = _record_graph(rec, name, tid)
        if has_graphs is None:
            has_graphs = graph is not None
        elif has_graphs != (graph is not None):
            raise InputFormatError(f"{name}: trace {tid!r} {'has' if graph is not None else 'has no'} graphs but "
                                   f"trace {shape.first!r} {'has none' if graph is not None else 'has them'}; every "
                                   f"record of a conversion must have graphs or none (pass --no-graphs to ignore them)")
        hs = rec.get("hidden_states")
        if hs is not None:
            a = as_numpy(hs)
            _check_float(a, name, tid, "hidden_states")
            if a.ndim == 3:
                shape.check((a.shape[0], a.shape[2]), tid, "hidden_states")
                a = _pool(a, pool, name, tid, "hidden_states", token_axis=1)
            elif a.ndim == 2:
                shape.check(a.shape, tid, "hidden_states")
            else:
                L, D = shape.ld or ("L", "D")
                raise ShapeMismatchError(f"{name}: trace {tid!r}: hidden_states has shape {tuple(a.shape)}; expected "
                                         f"({L}, {D}) or ({L}, T, {D})")
        elif graph is not None:
            _check_float(np.asarray(graph.x), name, tid, "graphs x")
            shape.check((graph.num_layers, graph.x.shape[2]), tid, "graphs (x per layer)")
            a = _pool(np.asarray(graph.x), pool, name, tid, "graphs x [T, L, D]", token_axis=0)
        else:
            raise InputFormatError(f"{name}: trace {tid!r} has neither 'hidden_states' nor 'graphs'; give one of them")
        # free the source as we go: memory holds one archive, not an archive and its copy
        rec["hidden_states"] = rec["graphs"] = None
        score = _score(rec.get("score"), name, tid)
        buf.append((tid, a, score, graph if keep_graphs else None))
        if k == 0:
            L, D = shape.ld  # type: ignore[misc]
            step = max(1, BLOCK_BYTES // (L * D * 4))
        if len(buf) >= step:
            yield _block(buf, keep_graphs and bool(has_graphs))
            buf = []
    if buf:
        yield _block(buf, keep_graphs and bool(has_graphs))


def _score(sc: Any, name: str, tid: str) -> float:
    if sc is None:
        return float("nan")
    a = as_numpy(sc)
    if a.size != 1 or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise InputFormatError(f"{name}: trace {tid!r} has score {sc!r}; expected one number (or no 'score' key)")
    return float(a.reshape(-1)[0])


def _block(buf: list[tuple[str, np.ndarray, float, TraceGraph | None]], graphs: bool) -> Block:
    seq = np.stack([b[1] for b in buf]) if len({b[1].dtype for b in buf}) == 1 else \
        np.stack([b[1].astype(np.float32) for b in buf])
    return Block(ids=[b[0] for b in buf], sequences=seq, scores=np.asarray([b[2] for b in buf], np.float32),
                 graphs=[b[3] for b in buf] if graphs else None)  # type: ignore[misc]


def _batch_ids(obj: dict[str, Any], n: int, name: str, key: str | None) -> list[str]:
    if key is None:
        # legacy .pt batches may have no ids: name the traces after the file, which must then be unique
        return [f"{name}#{i}" for i in range(n)]
    raw = obj[key]
    raw = raw.tolist() if hasattr(raw, "tolist") else list(raw)
    if len(raw) != n:
        raise ShapeMismatchError(f"{name}: '{key}' has {len(raw)} entries for {n} traces; expected one id per trace")
    ids = [_id_str(v, name, f"trace {i}") for i, v in enumerate(raw)]
    if len(set(ids)) != n:
        seen: dict[str, int] = {}
        for i, t in enumerate(ids):
            if t in seen:
                raise DuplicateIdError(f"{name}: trace {t!r} appears twice (positions {seen[t]} and {i}); ids must be "
                                       f"unique: fix the export or drop the duplicate")
            seen[t] = i
    return ids


def _batch_blocks(obj: dict[str, Any], name: str, pool: Pool | None, seq_key: str, score_keys: tuple[str, ...],
                  id_keys: tuple[str, ...]) -> Iterator[Block]:
    seq = as_numpy(obj[seq_key])
    if seq.ndim not in (3, 4):
        raise ShapeMismatchError(f"{name}: '{seq_key}' has shape {tuple(seq.shape)}; expected (N, L, D) or "
                                 f"(N, L, T, D)")
    n = seq.shape[0]
    key = next((k for k in id_keys if k in obj), None)
    ids = _batch_ids(obj, n, name, key)
    _check_float(seq, name, ids[0] if ids else "-", seq_key)
    if seq.ndim == 4 and pool is None:
        raise InputFormatError(f"{name}: '{seq_key}' has shape {tuple(seq.shape)} (one vector per token); pass "
                               f"--pool mean or --pool last to reduce it to one vector per layer")
    skey = next((k for k in score_keys if k in obj and obj[k] is not None), None)
    if skey is not None:
        scores = as_numpy(obj[skey]).astype(np.float32).reshape(-1)
        if scores.shape != (n,):
            raise ShapeMismatchError(f"{name}: '{skey}' has {scores.size} values for {n} traces; expected one score "
                                     f"per trace")
    else:
        scores = np.full(n, np.nan, np.float32)
    L, D = seq.shape[1], seq.shape[-1]
    step = max(1, BLOCK_BYTES // (L * D * 4))
    for a in range(0, n, step):
        b = min(n, a + step)
        blk = seq[a:b]
        if blk.ndim == 4:
            blk = _pool(blk, pool, name, ids[a], seq_key, token_axis=2)
        yield Block(ids=ids[a:b], sequences=np.asarray(blk), scores=scores[a:b], graphs=None)


def iter_blocks(obj: Any, name: str, *, pool: Pool | None, keep_graphs: bool) -> Iterator[Block]:
    """The traces of a loaded archive, in order, in blocks of about BLOCK_BYTES (see the module docstring).
    Raises InputFormatError / ShapeMismatchError / DTypeError / DuplicateIdError naming the file and trace."""
    if isinstance(obj, list | tuple):
        if not obj:
            return
        yield from _record_blocks(list(obj), name, pool, keep_graphs)
    elif isinstance(obj, dict) and "hidden_states" in obj:
        yield from _batch_blocks(obj, name, pool, "hidden_states", ("scores", "score", "labels"), ("ids", *ID_KEYS))
    elif isinstance(obj, dict) and "sequences" in obj:
        yield from _batch_blocks(obj, name, pool, "sequences", ("scores", "labels"), ("ids", *ID_KEYS))
    else:
        what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise InputFormatError(f"{name}: holds {what}; expected a list of trace records (dicts with an id and "
                               f"'hidden_states' and/or 'graphs'), a batch dict ('ids', 'hidden_states', 'scores') or "
                               f"a legacy .pt dict ('sequences', 'scores')")


@dataclass
class CastBlock:
    """Consecutive traces of an archive cast to float16 in a worker: what the main process appends."""

    offset: int  # position of the first trace in its archive
    ids: list[str]
    sequences: np.ndarray  # [k, L, D] float16
    scores: np.ndarray  # [k] float32, NaN where the archive has none
    graphs: list[TraceGraph] | None  # x and edge_attr float16, edge_attr [E, H]
    edge_attr_size: int
    reports: dict[str, Float16Report]  # of this block only
    #: positions in the archive -> (sequence as given [L, D], graph as given or None): the verifier's sample
    samples: dict[int, tuple[np.ndarray, TraceGraph | None]] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.sequences.shape[1])

    @property
    def hidden_size(self) -> int:
        return int(self.sequences.shape[2])


def sample_positions(n: int, k: int = 4) -> list[int]:
    """Positions of the traces the default verification compares: first, last and evenly spaced between."""
    if n <= 0:
        return []
    return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})


def _cast_graph(g: TraceGraph, name: str, tid: str, L: int, D: int, H: int | None, on_overflow: OnOverflow,
                allow_nan: bool, rx: Float16Report, rea: Float16Report) -> tuple[TraceGraph, int]:
    if H is None:
        ea0 = np.asarray(g.edge_attr[0]) if g.edge_attr else np.empty(0)
        H = 1 if ea0.ndim == 1 else int(ea0.shape[-1])
    try:
        tg = as_trace_graph(g, num_layers=L, hidden_size=D, edge_attr_size=H, trace=tid)
    except TracestoreError as e:
        raise type(e)(f"{name}: {e}") from None
    where = f"{name}: trace {tid!r}"
    x16 = cast_float16(np.asarray(tg.x), functools.partial(describe_node, where), on_overflow=on_overflow,
                       allow_nan=allow_nan, report=rx)
    eas = []
    for layer in range(L):
        eas.append(cast_edge_attr(np.asarray(tg.edge_attr[layer]), functools.partial(describe_edge, where, layer),
                                  layer=layer, on_overflow=on_overflow, allow_nan=allow_nan, report=rea))
    return TraceGraph(x=x16, edge_index=[np.asarray(e, np.int64) for e in tg.edge_index], edge_attr=eas), H


def archive_len(obj: Any) -> int:
    """Number of traces in a loaded archive (0 for one that is not a known layout: iter_blocks says why)."""
    if isinstance(obj, list | tuple):
        return len(obj)
    if isinstance(obj, dict):
        for key in ("hidden_states", "sequences"):
            v = obj.get(key)
            if v is not None:
                return int(v.shape[0]) if hasattr(v, "shape") else len(v)
    return 0


def cast_blocks(obj: Any, name: str, *, pool: Pool | None, keep_graphs: bool, on_overflow: OnOverflow,
                allow_nan: bool, samples: int = 4) -> Iterator[CastBlock]:
    """Normalise and cast a loaded archive to float16 block by block, each with its float16 reports (run in
    the worker processes, so that validation and casting scale with --workers; the main process appends a
    block while the worker casts the next).

    Values beyond +-65504 raise Float16OverflowError naming file, trace, layer and value (unless
    on_overflow='clip'); NaN raises NonFiniteValueError unless allow_nan."""
    want = set(sample_positions(archive_len(obj), samples))
    H: int | None = None
    pos = 0
    for blk in iter_blocks(obj, name, pool=pool, keep_graphs=keep_graphs):
        k, L, D = blk.sequences.shape
        reports = {schema.SEQUENCES: Float16Report(L)}
        out = np.empty((k, L, D), np.float16)
        bids = blk.ids
        if not cast_block_fast(blk.sequences, out, reports[schema.SEQUENCES]):
            out[...] = cast_float16(blk.sequences, functools.partial(describe_position, name, bids), on_overflow=on_overflow,
                                    allow_nan=allow_nan, report=reports[schema.SEQUENCES])
        kept = {}
        for j in range(k):
            if pos + j in want:
                kept[pos + j] = (np.array(blk.sequences[j]), blk.graphs[j] if blk.graphs is not None else None)
        graphs = None
        if blk.graphs is not None:
            reports[schema.NODE_X] = Float16Report(L)
            reports[schema.EDGE_ATTR] = Float16Report(L)
            graphs = []
            for tid, g in zip(bids, blk.graphs, strict=True):
                cg, H = _cast_graph(g, name, tid, L, D, H, on_overflow, allow_nan, reports[schema.NODE_X],
                                    reports[schema.EDGE_ATTR])
                graphs.append(cg)
        yield CastBlock(offset=pos, ids=bids, sequences=out, scores=blk.scores, graphs=graphs,
                        edge_attr_size=H or 1, reports=reports, samples=kept)
        pos += k


