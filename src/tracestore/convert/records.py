"""What is inside an archive, normalised trace by trace: id, per-layer vector, per-token states, token ids and
text, graphs (given, or built from attention matrices by a recipe), score, and per-trace fields.

Layouts (../shared/notes/seed-pipeline.md and ../shared/DESIGN.md "Input archives"):

- a list of trace records (dicts), the seed's raw archives: an id under `id`, `question_id` or `trace_id`;
  `hidden_states` as a list of L arrays [T, D] (per token; also one array [L, T, D]) or [L, D] (pooled);
  `attentions` (a list of L [H, T, T] matrices: graphs are built from them by the recipe); `tokens` (token
  ids [T]); `tokens_decoded` (T strings); `graphs` (L PyG `Data` with `x` [T, D], `edge_index` [2, E],
  `edge_attr` [E] or [E, H]: taken as given, and their `x` are the token states when `hidden_states` has
  none); `score`; any other key with a str, int, float or bool value becomes a field (e.g.
  `generated_answer_clean`); keys with other values are ignored and reported;
- a batch dict: ids under `ids`/`question_ids`/..., `hidden_states` or `sequences` [N, L, D] (or
  [N, L, T, D] per token), scores under `scores`/`score`/`labels`: the seed's `lstm_solo` .pt files and the
  first slice's batches;
- a graphs dict: `graphs` = per trace a list of L PyG `Data`, `labels` (optional), `question_ids`: the seed's
  `gnn` .pt files and their later `sharded_data_part_N.pt` form.

Per-token traces get their per-layer vector by pooling (`pool`, default 'last': the last token of prompt +
answer, the seed's LSTM input). `iter_traces` yields the traces of an archive as given (the verifier compares
these with the store); `cast_blocks` casts blocks of them to float16 with float16 reports, in the worker
processes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..errors import (
    DTypeError,
    DuplicateIdError,
    InputFormatError,
    ShapeMismatchError,
    TracestoreError,
    describe_edge,
    describe_position,
    describe_token,
)
from ..format import schema
from ..format.cast import OnOverflow, cast_block_fast, cast_edge_attr, cast_float16, measure_float16
from ..format.report import Float16Report
from ..store.fields import FIELD_NAME, check_utf8, plain_value
from ..store.graphs import TraceGraph, as_numpy, as_trace_graph
from ..store.tokens import TraceTokens
from ..store.writer import pool_tokens
from .attention import DEFAULT_RECIPE, GraphRecipe, trace_edges
from .pickle_stream import RecordStream
from .samples import Sample, make_sample

Pool = Literal["mean", "last"]
TokensMode = Literal["all", "ids", "none"]
ID_KEYS = ("id", "question_id", "trace_id")
BATCH_ID_KEYS = ("ids", "question_ids", "trace_ids", *ID_KEYS)
#: the pool of per-token records when none is asked for (the seed's LSTM input)
DEFAULT_POOL: Pool = "last"
#: record keys with a meaning of their own (never fields)
RECORD_KEYS = frozenset({"hidden_states", "attentions", "tokens", "tokens_decoded", "graphs", "score"})
#: what each --tokens mode keeps of what the archives carry
TOKEN_MODES: dict[str, tuple[str, ...]] = {"all": ("hidden", "ids", "text"), "ids": ("ids", "text"), "none": ()}

#: Float32 bytes per block of traces: bounds the temporaries of casting and pooling.
BLOCK_BYTES = 8 * 2**20


@dataclass(frozen=True)
class ReadOptions:
    """How archives are read: the same in every worker, and part of the resume fingerprint."""

    pool: Pool | None = None  # None: DEFAULT_POOL for per-token traces
    tokens: TokensMode = "all"
    keep_graphs: bool = True
    recipe: GraphRecipe = DEFAULT_RECIPE

    @property
    def pool_rule(self) -> Pool:
        return self.pool or DEFAULT_POOL


@dataclass
class SourceTrace:
    """One trace as its archive gives it (values in their own dtype), with what the options keep."""

    id: str
    sequence: np.ndarray  # [L, D]: given, or pooled from `hidden`
    hidden: np.ndarray | None  # [T, L, D] per-token states (kept or not: the pool needs them)
    token_ids: np.ndarray | None  # [T] int64
    text: list[str] | None
    graph: TraceGraph | None  # edges over the tokens (x None), edge_attr as given / built, [E, H]
    score: float
    fields: dict[str, Any]
    num_tokens: int | None  # T, where the trace has tokens
    pooled: bool  # `sequence` was pooled from per-token states
    graph_recipe: dict[str, Any] | None  # how `graph` was made

    def tokens(self, parts: tuple[str, ...]) -> TraceTokens:
        return TraceTokens(hidden=self.hidden if "hidden" in parts else None,
                           ids=self.token_ids if "ids" in parts else None,
                           text=self.text if "text" in parts else None, count=self.num_tokens)


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
    try:
        check_utf8(s, "its id")
    except ValueError as e:
        raise InputFormatError(f"{name}: {where}: {e}") from None
    return s


def _check_float(a: np.ndarray, name: str, tid: str, what: str) -> None:
    if not np.issubdtype(a.dtype, np.floating):
        raise DTypeError(f"{name}: trace {tid!r}: {what} has dtype {a.dtype}; expected float16, float32 or float64 "
                         f"values (re-export the hidden states as floats)")


class _Shape:
    """What the archive's traces look like, set by the first and checked for the rest: [L, D], whether they
    are per token, which per-token parts and whether graphs they carry."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ld: tuple[int, int] | None = None
        self.first: str | None = None
        self.kind: dict[str, bool] | None = None

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

    def check_kind(self, t: SourceTrace) -> None:
        kind = {"per-token hidden states": t.hidden is not None, "token ids ('tokens')": t.token_ids is not None,
                "token text ('tokens_decoded')": t.text is not None, "graphs": t.graph is not None}
        if self.kind is None:
            self.kind = kind
            return
        for what, has in kind.items():
            if has != self.kind[what]:
                raise InputFormatError(f"{self.name}: trace {t.id!r} {'has' if has else 'has no'} {what} but trace "
                                       f"{self.first!r} {'has none' if has else 'has them'}; every trace of an "
                                       f"archive must carry the same kinds of data")


def _stack_layers(hs: Any, name: str, tid: str) -> np.ndarray:
    """hidden_states as given -> [L, D] (pooled) or [T, L, D] (per token): a list of L [T, D] arrays (the
    seed's raw records) is stacked on axis 1 in one copy; one [L, T, D] array is transposed."""
    if isinstance(hs, list | tuple) and hs and getattr(hs[0], "ndim", None) == 2:
        layers = [as_numpy(h) for h in hs]
        for layer, h in enumerate(layers):
            if h.shape != layers[0].shape:
                raise ShapeMismatchError(f"{name}: trace {tid!r}: hidden_states[{layer}] has shape {tuple(h.shape)}; "
                                         f"expected {tuple(layers[0].shape)} like hidden_states[0] (every layer holds "
                                         f"the same tokens: [T, D])")
        return np.stack(layers, axis=1)
    if isinstance(hs, list | tuple) and hs and not all(hasattr(h, "shape") or isinstance(h, list | tuple) for h in hs):
        raise InputFormatError(f"{name}: trace {tid!r}: hidden_states holds a {type(hs[0]).__name__}; expected a list "
                               f"of L arrays [T, D] (one per layer), or an array [L, D] or [L, T, D]")
    try:
        a = as_numpy(hs)
    except (ValueError, TypeError) as e:
        raise InputFormatError(f"{name}: trace {tid!r}: hidden_states cannot be read as an array ({e}); expected a "
                               f"list of L arrays [T, D], or an array [L, D] or [L, T, D]") from None
    if a.dtype == object:
        raise InputFormatError(f"{name}: trace {tid!r}: hidden_states is ragged (dtype object); expected a list of L "
                               f"arrays [T, D] of one shape, or an array [L, D] or [L, T, D]")
    if a.ndim == 3:
        return np.ascontiguousarray(a.transpose(1, 0, 2))
    return a


def _pool(hidden: np.ndarray, pool: Pool, name: str, tid: str) -> np.ndarray:
    if hidden.shape[0] == 0:
        raise InputFormatError(f"{name}: trace {tid!r}: its per-token states hold no tokens (shape "
                               f"{tuple(hidden.shape)}): nothing to pool into a per-layer vector; drop the trace or "
                               f"fix its export")
    return pool_tokens(hidden, pool)


def _record_graph(g: Any, name: str, tid: str) -> TraceGraph:
    if isinstance(g, TraceGraph):
        return g
    if not isinstance(g, list | tuple) or not g:
        raise InputFormatError(f"{name}: trace {tid!r}: 'graphs' is a {type(g).__name__}; expected a list of L "
                               f"torch_geometric Data (one per layer)")
    try:
        return TraceGraph.from_pyg(list(g), trace=tid)
    except TracestoreError as e:
        raise type(e)(f"{name}: {e}") from None


def _given_graph(g: TraceGraph, name: str, tid: str) -> TraceGraph:
    """A graph taken as given: edges only (its x, if any, is the tokens' hidden states), edge_attr [E, H]."""
    eas = []
    for layer, ea in enumerate(g.edge_attr):
        a = as_numpy(ea)
        a = a[:, None] if a.ndim == 1 else a
        if a.ndim != 2:
            raise ShapeMismatchError(f"{name}: trace {tid!r}: layer {layer} edge_attr has shape {tuple(a.shape)}; "
                                     f"expected (E,) or (E, H)")
        eas.append(a)
    return TraceGraph(x=None, edge_index=[as_numpy(e) for e in g.edge_index], edge_attr=eas, num_tokens=g.num_nodes)


def _token_ids(v: Any, name: str, tid: str, T: int | None) -> np.ndarray:
    a = as_numpy(v)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise InputFormatError(f"{name}: trace {tid!r}: 'tokens' has shape {tuple(a.shape)} and dtype {a.dtype}; "
                               f"expected the token ids, integers [T]")
    if a.size and a.dtype.kind == "u" and int(a.max()) > np.iinfo(np.int64).max:
        raise InputFormatError(f"{name}: trace {tid!r}: 'tokens' holds id {int(a.max())}, beyond int64; token ids "
                               f"are vocabulary indices: check the export")
    if T is not None and a.shape[0] != T:
        raise ShapeMismatchError(f"{name}: trace {tid!r}: 'tokens' has {a.shape[0]} ids but the trace has {T} tokens "
                                 f"(per-token hidden states); they must be the same tokens")
    return a.astype(np.int64, copy=False)


def _token_text(v: Any, name: str, tid: str, T: int | None) -> list[str]:
    if isinstance(v, str) or not isinstance(v, list | tuple | np.ndarray):
        raise InputFormatError(f"{name}: trace {tid!r}: 'tokens_decoded' is a {type(v).__name__}; expected a list "
                               f"of T strings (each token decoded alone)")
    out = []
    for k, s in enumerate(v):
        if isinstance(s, bytes):
            s = s.decode("utf-8", "replace")
        if not isinstance(s, str):
            raise InputFormatError(f"{name}: trace {tid!r}: tokens_decoded[{k}] is a {type(s).__name__} ({s!r}); "
                                   f"expected a string: each token decoded alone, e.g. tokenizer.decode([id])")
        try:
            check_utf8(s, f"tokens_decoded[{k}]")
        except ValueError as e:
            raise InputFormatError(f"{name}: trace {tid!r}: {e}") from None
        out.append(s)
    if T is not None and len(out) != T:
        raise ShapeMismatchError(f"{name}: trace {tid!r}: 'tokens_decoded' has {len(out)} strings but the trace has "
                                 f"{T} tokens; they must be the same tokens")
    return out


def _score(sc: Any, name: str, tid: str) -> float:
    if sc is None:
        return float("nan")
    a = as_numpy(sc)
    if a.size != 1 or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise InputFormatError(f"{name}: trace {tid!r} has score {sc!r}; expected one number (or no 'score' key)")
    return float(a.reshape(-1)[0])


class _Reader:
    """Turns the parts of one trace into a SourceTrace, checking them against each other and against the
    archive's first trace."""

    def __init__(self, name: str, opts: ReadOptions) -> None:
        self.name = name
        self.opts = opts
        self.shape = _Shape(name)
        self.seen: dict[str, int] = {}
        self.ignored: dict[str, str] = {}  # record key -> type name, keys that became no field
        #: where the archive's scores come from ('score' of records; 'scores'/'score'/'labels' of batches)
        self.score_key: str | None = None

    def check_id(self, tid: str, k: int) -> None:
        if tid in self.seen:
            raise DuplicateIdError(f"{self.name}: trace {tid!r} appears twice (records {self.seen[tid]} and {k}); ids "
                                   f"must be unique: fix the export or drop the duplicate")
        self.seen[tid] = k

    def trace(self, tid: str, *, hidden_states: Any = None, attentions: Any = None, tokens: Any = None,
              text: Any = None, graphs: Any = None, score: Any = None,
              fields: dict[str, Any] | None = None) -> SourceTrace:
        name, opts = self.name, self.opts
        seq = hidden = None
        if hidden_states is not None:
            a = _stack_layers(hidden_states, name, tid)
            _check_float(a, name, tid, "hidden_states")
            if a.ndim == 3:
                self.shape.check((a.shape[1], a.shape[2]), tid, "hidden_states")
                hidden = a
            elif a.ndim == 2:
                self.shape.check(a.shape, tid, "hidden_states")
                seq = a
            else:
                L, D = self.shape.ld or ("L", "D")
                raise ShapeMismatchError(f"{name}: trace {tid!r}: hidden_states has shape {tuple(a.shape)}; expected "
                                         f"a list of {L} per-token arrays (T, {D}), or ({L}, {D})")
        given = _record_graph(graphs, name, tid) if graphs is not None else None
        if given is not None and given.x is not None:
            x = np.asarray(given.x)
            _check_float(x, name, tid, "graphs x")
            self.shape.check((given.num_layers, x.shape[2]), tid, "graphs (x per layer)")
            if hidden is None:
                hidden = x  # the graph nodes' features are the tokens' states
            elif x.shape[0] != hidden.shape[0]:
                raise ShapeMismatchError(f"{name}: trace {tid!r}: its graphs have {x.shape[0]} nodes but its "
                                         f"hidden_states {hidden.shape[0]} tokens; graph nodes are the trace's tokens")
        T = hidden.shape[0] if hidden is not None else (given.num_nodes if given is not None else None)
        ids = _token_ids(tokens, name, tid, T) if tokens is not None else None
        if T is None and ids is not None:
            T = int(ids.shape[0])
        txt = _token_text(text, name, tid, T) if text is not None else None
        if T is None and txt is not None:
            T = len(txt)
        graph, recipe = None, None
        if opts.keep_graphs and given is not None:
            graph, recipe = _given_graph(given, name, tid), {"name": "given"}
        elif opts.keep_graphs and attentions is not None:
            if T is None:
                raise InputFormatError(f"{name}: trace {tid!r} has attentions but no per-token hidden states, token "
                                       f"ids or text to tell its tokens; graphs need the tokens as nodes")
            eis, eas = trace_edges(attentions, T, opts.recipe, where=f"{name}: trace {tid!r}")
            graph = TraceGraph(x=None, edge_index=eis, edge_attr=eas, num_tokens=T)
            recipe = opts.recipe.to_attrs()
        if graph is not None and self.shape.ld is not None and graph.num_layers != self.shape.ld[0]:
            raise ShapeMismatchError(f"{name}: trace {tid!r}: its graphs have {graph.num_layers} layers; expected "
                                     f"{self.shape.ld[0]} like its hidden states (one graph per layer)")
        pooled = False
        if seq is None:
            if hidden is None:
                raise InputFormatError(f"{name}: trace {tid!r} has neither 'hidden_states' nor graphs with node "
                                       f"features; give one of them")
            seq = _pool(hidden, opts.pool_rule, name, tid)
            pooled = True
        t = SourceTrace(id=tid, sequence=seq, hidden=hidden, token_ids=ids, text=txt, graph=graph,
                        score=_score(score, name, tid), fields=fields or {}, num_tokens=T, pooled=pooled,
                        graph_recipe=recipe)
        self.shape.check_kind(t)
        return t

    def record_fields(self, rec: dict[Any, Any], id_key: str, tid: str) -> dict[str, Any]:
        """The record's other keys that hold one str, int, float or bool: as plain Python values (a numpy or
        torch scalar would not travel to the main process as itself). None is a missing value; keys with
        other values, or names a field cannot have, are reported as ignored."""
        out = {}
        for key, v in rec.items():
            if key == id_key or key in RECORD_KEYS or v is None:
                continue
            skey = str(key)
            try:
                got = plain_value(v) if FIELD_NAME.match(skey) else None
            except ValueError as e:
                raise InputFormatError(f"{self.name}: trace {tid!r}: key {skey!r}: {e}") from None
            if got is None:
                self.ignored.setdefault(skey, type(v).__name__)
                continue
            out[skey] = got[0]
        return out


def _records(recs: Iterable[Any], name: str, opts: ReadOptions, reader: _Reader) -> Iterator[SourceTrace]:
    for k, rec in enumerate(recs):
        if not isinstance(rec, dict):
            raise InputFormatError(f"{name}: record {k} is a {type(rec).__name__}; expected a dict with 'id' and "
                                   f"'hidden_states' and/or 'graphs'")
        key = next((kk for kk in ID_KEYS if kk in rec), None)
        if key is None:
            raise InputFormatError(f"{name}: record {k} has no id (looked for {', '.join(ID_KEYS)}; keys: "
                                   f"{sorted(map(str, rec))[:8]}); add an id to every record")
        tid = _id_str(rec[key], name, f"record {k}")
        reader.check_id(tid, k)
        if "score" in rec:
            reader.score_key = "score"
        t = reader.trace(tid, hidden_states=rec.get("hidden_states"), attentions=rec.get("attentions"),
                         tokens=rec.get("tokens"), text=rec.get("tokens_decoded"), graphs=rec.get("graphs"),
                         score=rec.get("score"), fields=reader.record_fields(rec, key, tid))
        # free the source as we go: memory holds one archive, not an archive and its copy
        for big in ("hidden_states", "attentions", "graphs"):
            if big in rec:
                rec[big] = None
        yield t


def _batch_ids(obj: dict[str, Any], n: int, name: str, key: str | None) -> list[str]:
    if key is None:
        # legacy .pt batches may have no ids: name the traces after the file, which must then be unique
        return [f"{name}#{i}" for i in range(n)]
    raw = obj[key]
    raw = raw.tolist() if hasattr(raw, "tolist") else list(raw)
    if len(raw) != n:
        raise ShapeMismatchError(f"{name}: '{key}' has {len(raw)} entries for {n} traces; expected one id per trace")
    return [_id_str(v, name, f"trace {i}") for i, v in enumerate(raw)]


def _batch_scores(obj: dict[str, Any], n: int, name: str) -> tuple[np.ndarray, str | None]:
    skey = next((k for k in ("scores", "score", "labels") if k in obj and obj[k] is not None), None)
    if skey is None:
        return np.full(n, np.nan, np.float32), None
    scores = as_numpy(obj[skey]).astype(np.float32).reshape(-1)
    if scores.shape != (n,):
        raise ShapeMismatchError(f"{name}: '{skey}' has {scores.size} values for {n} traces; expected one score "
                                 f"per trace")
    return scores, skey


def _batch(obj: dict[str, Any], name: str, seq_key: str, reader: _Reader) -> Iterator[SourceTrace]:
    seq = as_numpy(obj[seq_key])
    if seq.ndim not in (3, 4):
        raise ShapeMismatchError(f"{name}: '{seq_key}' has shape {tuple(seq.shape)}; expected (N, L, D) or "
                                 f"(N, L, T, D)")
    n = seq.shape[0]
    ids = _batch_ids(obj, n, name, next((k for k in BATCH_ID_KEYS if k in obj), None))
    scores, reader.score_key = _batch_scores(obj, n, name)
    for i in range(n):
        reader.check_id(ids[i], i)
        yield reader.trace(ids[i], hidden_states=seq[i], score=scores[i])


def _graph_batch(obj: dict[str, Any], name: str, reader: _Reader) -> Iterator[SourceTrace]:
    graphs = obj["graphs"]
    if isinstance(graphs, tuple):
        graphs = list(graphs)
    if not isinstance(graphs, list):
        raise InputFormatError(f"{name}: 'graphs' is a {type(graphs).__name__}; expected per trace a list of L "
                               f"torch_geometric Data (the seed's gnn .pt layout)")
    n = len(graphs)
    ids = _batch_ids(obj, n, name, next((k for k in BATCH_ID_KEYS if k in obj), None))
    scores, reader.score_key = _batch_scores(obj, n, name)
    for i in range(n):
        reader.check_id(ids[i], i)
        yield reader.trace(ids[i], graphs=graphs[i], score=scores[i])
        graphs[i] = None  # free as we go (a list we were given whole: the archive object is ours)


def iter_traces(obj: Any, name: str, opts: ReadOptions, *, reader: _Reader | None = None) -> Iterator[SourceTrace]:
    """The traces of a loaded archive, in order, normalised (see the module docstring). Raises
    InputFormatError / ShapeMismatchError / DTypeError / DuplicateIdError naming the file and trace."""
    reader = reader or _Reader(name, opts)
    if isinstance(obj, RecordStream):
        yield from _records(obj, name, opts, reader)
    elif isinstance(obj, list | tuple):
        yield from _records(obj, name, opts, reader)
    elif isinstance(obj, dict) and "hidden_states" in obj:
        yield from _batch(obj, name, "hidden_states", reader)
    elif isinstance(obj, dict) and "sequences" in obj:
        yield from _batch(obj, name, "sequences", reader)
    elif isinstance(obj, dict) and "graphs" in obj:
        yield from _graph_batch(obj, name, reader)
    else:
        what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise InputFormatError(f"{name}: holds {what}; expected a list of trace records (dicts with an id and "
                               f"'hidden_states' and/or 'graphs'), a batch dict ('ids', 'hidden_states' or "
                               f"'sequences', 'scores' or 'labels') or a graphs dict ('graphs', 'question_ids')")


def archive_len(obj: Any) -> int | None:
    """Number of traces in a loaded archive (0 for one that is not a known layout: iter_traces says why; None
    for records still being read: their number is known at the end)."""
    if isinstance(obj, RecordStream):
        return None
    if isinstance(obj, list | tuple):
        return len(obj)
    if isinstance(obj, dict):
        for key in ("hidden_states", "sequences", "graphs"):
            v = obj.get(key)
            if v is not None:
                return int(v.shape[0]) if hasattr(v, "shape") else len(v)
    return 0


# -- casting in the workers ----------------------------------------------------------------------------------
@dataclass
class CastBlock:
    """Consecutive traces of an archive cast to float16 in a worker: what the main process appends."""

    offset: int  # position of the first trace in its archive
    ids: list[str]
    sequences: np.ndarray  # [k, L, D] float16
    scores: np.ndarray  # [k] float32, NaN where the archive has none
    tokens: list[TraceTokens] | None  # the kept parts; hidden float16
    graphs: list[TraceGraph] | None  # edges, edge_attr float16 [E, H], x None
    fields: dict[str, list[Any]]  # name -> k values (None where a trace lacks it)
    reports: dict[str, Float16Report]  # of this block only
    #: what the store must look like for these traces (checked against the first archive's)
    layout: dict[str, Any]
    #: record keys ignored (not a field: not a scalar, or not a usable name) -> their type
    ignored: dict[str, str] = field(default_factory=dict)
    #: the archive's key its scores come from ('labels' for the seed's .pt files: 0/1, 1 = hallucination)
    score_key: str | None = None
    #: positions in the archive -> the trace as given, compactly: the verifier's sample (its `row` is the
    #: position in the archive until the main process knows where the archive starts)
    samples: dict[int, Sample] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.sequences.shape[1])

    @property
    def hidden_size(self) -> int:
        return int(self.sequences.shape[2])


def sample_positions(n: int | None, k: int = 4) -> list[int]:
    """Positions of the traces the default verification compares: first, last and evenly spaced between; for
    records still being read (n None), the first and then ever further apart: 0, 1, 3, 7, ..."""
    if n is None:
        return [2**i - 1 for i in range(k)]
    if n <= 0:
        return []
    return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})


def _layout(t: SourceTrace, opts: ReadOptions, edge_attr_size: int) -> dict[str, Any]:
    present = {"hidden": t.hidden is not None, "ids": t.token_ids is not None, "text": t.text is not None}
    parts = [p for p in TOKEN_MODES[opts.tokens] if present[p]]
    return {"num_layers": int(t.sequence.shape[0]), "hidden_size": int(t.sequence.shape[1]),
            "graphs": t.graph is not None, "edge_attr_size": edge_attr_size if t.graph is not None else 1,
            "tokens": parts, "pool": opts.pool_rule if t.pooled else None, "graph_recipe": t.graph_recipe}


def _blocks(obj: Any, name: str, opts: ReadOptions, reader: _Reader) -> Iterator[list[SourceTrace]]:
    """Consecutive traces in blocks of about BLOCK_BYTES of float32 (per-token states included)."""
    buf: list[SourceTrace] = []
    size = 0
    for t in iter_traces(obj, name, opts, reader=reader):
        buf.append(t)
        size += t.sequence.size * 4 + (t.hidden.size * 4 if t.hidden is not None else 0)
        if size >= BLOCK_BYTES:
            yield buf
            buf, size = [], 0
    if buf:
        yield buf


def cast_blocks(obj: Any, name: str, opts: ReadOptions, *, on_overflow: OnOverflow, allow_nan: bool,
                samples: int = 4) -> Iterator[CastBlock]:
    """Normalise and cast a loaded archive to float16 block by block, each with its float16 reports (run in
    the worker processes, so that validation, pooling, graph building and casting scale with --workers; the
    main process appends a block while the worker casts the next).

    Values beyond +-65504 raise Float16OverflowError naming file, trace, layer and value (unless
    on_overflow='clip'); NaN raises NonFiniteValueError unless allow_nan."""
    want = set(sample_positions(archive_len(obj), samples))
    reader = _Reader(name, opts)
    pos = 0
    H: int | None = None
    H_from = ""
    for traces in _blocks(obj, name, opts, reader):
        k = len(traces)
        first = traces[0]
        L, D = first.sequence.shape
        ids = [t.id for t in traces]
        # mixed dtypes promote (float16 + float32 -> float32; with float64 -> float64, rounded once to float16)
        seq = np.stack([t.sequence for t in traces])
        reports = {schema.SEQUENCES: Float16Report(L)}
        out = np.empty((k, L, D), np.float16)
        if not cast_block_fast(seq, out, reports[schema.SEQUENCES]):
            out[...] = cast_float16(seq, functools.partial(describe_position, name, ids), on_overflow=on_overflow,
                                    allow_nan=allow_nan, report=reports[schema.SEQUENCES])
        if first.graph is not None and H is None:
            ea0 = first.graph.edge_attr[0] if first.graph.edge_attr else np.empty((0, 1))
            H, H_from = int(ea0.shape[1]), first.id
        if first.graph is not None:
            for t in traces:
                eas = t.graph.edge_attr if t.graph is not None else []
                h = int(eas[0].shape[1]) if eas else H
                if h != H:
                    what = "attention heads (--edge-attr heads keeps one value per head)" \
                        if t.graph_recipe and t.graph_recipe.get("edge_attr") == "heads" else "values per edge"
                    raise ShapeMismatchError(f"{name}: trace {t.id!r}: its graphs have {h} {what}, but trace "
                                             f"{H_from!r} has {H}; every trace of a store needs the same number: "
                                             f"convert traces of different models into separate stores"
                                             + (", or use --edge-attr mean" if "heads" in what else ""))
        lay = _layout(first, opts, H or 1)
        parts = tuple(lay["tokens"])
        tokens = None
        if first.num_tokens is not None:
            tokens = []
            if "hidden" in parts:
                reports[schema.TOKEN_HIDDEN] = Float16Report(L)
            for t in traces:
                tt = t.tokens(parts)
                if tt.hidden is not None:
                    tt.hidden = _cast_hidden(tt.hidden, f"{name}: trace {t.id!r}", on_overflow, allow_nan,
                                             reports[schema.TOKEN_HIDDEN])
                tokens.append(tt)
        graphs = None
        if first.graph is not None:
            reports[schema.EDGE_ATTR] = Float16Report(L)
            graphs = [_cast_graph(t, name, L, D, H or 1, on_overflow, allow_nan, reports[schema.EDGE_ATTR])
                      for t in traces]
        fields: dict[str, list[Any]] = {}
        for j, t in enumerate(traces):
            for fname, v in t.fields.items():
                fields.setdefault(fname, [None] * k)[j] = v
        kept = {pos + j: make_sample(traces[j], parts, name, pos + j) for j in range(k) if pos + j in want}
        yield CastBlock(offset=pos, ids=ids, sequences=out, scores=np.asarray([t.score for t in traces], np.float32),
                        tokens=tokens, graphs=graphs, fields=fields, reports=reports, layout=lay,
                        ignored=dict(reader.ignored), score_key=reader.score_key, samples=kept)
        pos += k


def _cast_hidden(h: np.ndarray, where: str, on_overflow: OnOverflow, allow_nan: bool,
                 report: Float16Report) -> np.ndarray:
    if h.dtype == np.float16 and measure_float16(h, report):
        return h  # float16 in: stored as it is (the seed's raw archives), no copy
    out = np.empty(h.shape, np.float16)
    if cast_block_fast(h, out, report):
        return out
    return cast_float16(h, functools.partial(describe_token, where), on_overflow=on_overflow, allow_nan=allow_nan,
                        report=report)


def _cast_graph(t: SourceTrace, name: str, L: int, D: int, H: int, on_overflow: OnOverflow, allow_nan: bool,
                rea: Float16Report) -> TraceGraph:
    assert t.graph is not None
    try:
        tg = as_trace_graph(t.graph, num_layers=L, hidden_size=D, edge_attr_size=H, trace=t.id)
    except TracestoreError as e:
        raise type(e)(f"{name}: {e}") from None
    where = f"{name}: trace {t.id!r}"
    eas = [cast_edge_attr(np.asarray(tg.edge_attr[layer]), functools.partial(describe_edge, where, layer), layer=layer,
                          on_overflow=on_overflow, allow_nan=allow_nan, report=rea) for layer in range(L)]
    return TraceGraph(x=None, edge_index=[np.asarray(e, np.int64) for e in tg.edge_index], edge_attr=eas,
                      num_tokens=tg.num_nodes)


@dataclass(frozen=True)
class Options:
    """What the workers need to read an archive the same way every time (also the resume fingerprint)."""

    read: ReadOptions
    on_overflow: OnOverflow
    allow_nan: bool
    max_bytes: int
