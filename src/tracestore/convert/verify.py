"""Checks of a store: against its sources (the converter checks its own output) and on its own (every
checksum, for `tracestore verify`).

"Equal after float16 rounding" is exact here: the stored value must be the float16 that numpy rounds the
source value to (after clipping to +-65504 where --on-overflow clip clipped it), NaN where the source is NaN.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from ..errors import CorruptStoreError, VerifyMismatchError
from ..format import schema
from ..store.graphs import TraceGraph
from ..store.shards import ShardedArray, UnsupportedLayout
from ..store.urls import Location, resolve

if TYPE_CHECKING:
    from ..store.reader import TraceStore
    from .archives import Source
    from .pipeline import Options


def as_stored(src: np.ndarray) -> np.ndarray:
    """The float16 values a source array is stored as (clipped to the float16 range, then rounded)."""
    x = np.asarray(src).astype(np.float32, copy=False)
    return np.clip(x, -schema.FLOAT16_MAX, schema.FLOAT16_MAX).astype(np.float16)


def _first_diff(stored: np.ndarray, src: np.ndarray) -> tuple[tuple[int, ...], float, float] | None:
    exp = as_stored(src)
    same = (stored == exp) | (np.isnan(stored) & np.isnan(exp))
    if same.all():
        return None
    pos = tuple(int(i) for i in np.argwhere(~same)[0])
    return pos, float(stored[pos]), float(np.asarray(src)[pos])


def _mismatch(url: str, src_name: str, tid: str, row: int, what: str, pos: tuple[int, ...], got: float,
              want: float) -> VerifyMismatchError:
    where = ", ".join(f"{k} {v}" for k, v in zip(("layer", "hidden") if what == "sequence" else ("node", "layer", "hidden"),
                                                 pos, strict=False))
    return VerifyMismatchError(
        f"{url}: trace {tid!r} (row {row}, from {src_name}): stored {what} at {where} is {got!r} but the source has "
        f"{want!r} (float16 {float(as_stored(np.asarray(want, np.float32)))!r}); the store does not match its sources: delete it, "
        f"convert again and report this as a bug")


def compare_graph(url: str, src_name: str, tid: str, row: int, stored: TraceGraph | None, src: Any) -> None:
    """Compare a stored graph with the source's (a TraceGraph or a list of L PyG Data)."""
    g = src if isinstance(src, TraceGraph) else TraceGraph.from_pyg(list(src), trace=tid)
    if stored is None:
        raise VerifyMismatchError(f"{url}: trace {tid!r} (row {row}, from {src_name}): the store has no graph but the "
                                  f"source has one; delete the store and convert again")
    d = _first_diff(np.asarray(stored.x), np.asarray(g.x)) if stored.x.shape == np.asarray(g.x).shape else \
        ((0,), float("nan"), float("nan"))
    if d is not None:
        raise _mismatch(url, src_name, tid, row, "graph x", *d)
    for layer in range(g.num_layers):
        ei_ok = np.array_equal(np.asarray(stored.edge_index[layer]), np.asarray(g.edge_index[layer]))
        ea_src = np.asarray(g.edge_attr[layer])
        ea_src = ea_src[:, None] if ea_src.ndim == 1 else ea_src
        ea_ok = stored.edge_attr[layer].shape == ea_src.shape and _first_diff(stored.edge_attr[layer], ea_src) is None
        if not (ei_ok and ea_ok):
            raise VerifyMismatchError(f"{url}: trace {tid!r} (row {row}, from {src_name}): layer {layer} stored "
                                      f"{'edge_index' if not ei_ok else 'edge_attr'} differs from the source; delete "
                                      f"the store, convert again and report this as a bug")


def compare_samples(store: TraceStore, expected: list[tuple[Source, int, list[str], np.ndarray]],
                    samples: list[tuple[Source, int, str, np.ndarray, Any]], done: list[dict[str, Any]]) -> str:
    """The default check: row count, unique ids, the ids and scores of every archive converted in this run,
    and the values of the sampled traces. Returns a line for the summary."""
    url = store.url
    n = sum(int(d["traces"]) for d in done)
    if len(store) != n:
        raise VerifyMismatchError(f"{url}: the store has {len(store)} traces but its archives hold {n}; delete it and "
                                  f"convert again")
    ids = store.ids
    if len(set(ids.tolist())) != len(ids):
        raise VerifyMismatchError(f"{url}: the store's ids are not unique; delete it and convert again")
    all_scores = store.scores
    for src, offset, src_ids, scores in expected:
        got = ids[offset:offset + len(src_ids)].tolist()
        if got != list(src_ids):
            k = next(i for i, (a, b) in enumerate(zip(got, src_ids, strict=False)) if a != b) if len(got) == len(src_ids) else 0
            raise VerifyMismatchError(f"{url}: row {offset + k} has id {got[k] if k < len(got) else None!r} but "
                                      f"{src.name} puts {src_ids[k]!r} there; delete the store and convert again")
        s = all_scores[offset:offset + len(src_ids)]
        if not np.array_equal(s, scores.astype(np.float32), equal_nan=True):
            k = int(np.flatnonzero(~((s == scores) | (np.isnan(s) & np.isnan(scores))))[0])
            raise VerifyMismatchError(f"{url}: trace {src_ids[k]!r} (from {src.name}) has score {s[k]} in the store "
                                      f"but {scores[k]} in its sources; delete the store and convert again")
    for src, row, tid, seq, g in samples:
        stored = store.sequences[row]
        d = _first_diff(stored, seq) if stored.shape == seq.shape else ((0,), float("nan"), float("nan"))
        if d is not None:
            raise _mismatch(url, src.name, tid, row, "sequence", *d)
        if g is not None:
            compare_graph(url, src.name, tid, row, store.graph(row), g)
    return (f"sample: {len(samples)} traces equal their source after float16 rounding; ids and scores of "
            f"{sum(len(e[2]) for e in expected)} traces checked")


def verify_all_task(item: tuple[Source, int, int], opts: Options, url: str) -> int:
    """Worker: read an archive again and compare every trace with rows offset.. of the store."""
    from ..store.reader import open as open_store
    from .archives import load_archive
    from .records import iter_blocks

    src, offset, count = item
    store = open_store(url)
    obj, _info = load_archive(src, max_bytes=opts.max_bytes)
    row = offset
    for blk in iter_blocks(obj, src.name, pool=opts.pool, keep_graphs=opts.keep_graphs):
        k = len(blk.ids)
        if row + k > offset + count:
            raise VerifyMismatchError(f"{url}: {src.name} now holds more than the {count} traces converted from it; "
                                      f"the archive changed after conversion: convert again")
        got = store.ids[row:row + k].tolist()
        if got != blk.ids:
            raise VerifyMismatchError(f"{url}: rows {row}..{row + k} have ids {got[:3]}... but {src.name} has "
                                      f"{blk.ids[:3]}...; delete the store and convert again")
        stored = store.sequences[row:row + k]
        d = _first_diff(stored, blk.sequences)
        if d is not None:
            (j, *rest), got_v, want_v = d
            raise _mismatch(url, src.name, blk.ids[j], row + j, "sequence", tuple(rest), got_v, want_v)
        if blk.graphs is not None and store.has_graphs:
            for j, g in enumerate(blk.graphs):
                compare_graph(url, src.name, blk.ids[j], row + j, store.graph(row + j), g)
        row += k
    if row != offset + count:
        raise VerifyMismatchError(f"{url}: {src.name} holds {row - offset} traces but {count} were converted from it; "
                                  f"the archive changed after conversion: convert again")
    return count


# -- tracestore verify ---------------------------------------------------------------------------------------
_SHARDED = (schema.SEQUENCES, schema.NODE_X, schema.EDGE_INDEX, schema.EDGE_ATTR)
_PLAIN = (schema.IDS, schema.SCORES, schema.NODE_PTR, schema.EDGE_PTR)


def _read_plain(loc: Location, path: str) -> np.ndarray:
    """Read a small array chunk by chunk through zarr (which checks each chunk's crc32c), naming the chunk
    that fails."""
    arr = zarr.open_array(loc.zarr_store(read_only=True), path=path, mode="r")
    n = arr.shape[0]
    step = arr.chunks[0]
    parts = []
    for c, a in enumerate(range(0, n, step)):
        try:
            parts.append(np.asarray(arr[a:min(n, a + step)]))
        except Exception as e:
            raise CorruptStoreError(f"{loc.url}: array '{path}' chunk {c} (rows {a}..{min(n, a + step)}) cannot be "
                                    f"read: {type(e).__name__}: {str(e)[:160]}; the store is corrupt: rebuild it from "
                                    f"its sources") from None
    return np.concatenate(parts) if parts else np.asarray(arr[:])


def verify_store(url: str | Location) -> dict[str, Any]:
    """Check a store end to end: the commit marker, every shard index and inner-chunk checksum of every
    sharded array, every chunk of the small arrays, their shapes against each other, and unique ids.

    Returns {"url", "num_traces", "arrays": {path: chunks checked}}; raises CorruptStoreError naming the
    array and chunk of the first fault (IncompleteStoreError if there is no commit marker)."""
    from ..store.reader import read_root_attrs

    loc = resolve(url)
    try:
        attrs = read_root_attrs(loc)
    except json.JSONDecodeError as e:
        raise CorruptStoreError(f"{loc.url}: zarr.json is not valid JSON ({e}); the store is corrupt") from None
    has_graphs = bool(attrs.get(schema.ATTR_HAS_GRAPHS))
    L = int(attrs[schema.ATTR_NUM_LAYERS])
    D = int(attrs[schema.ATTR_HIDDEN_SIZE])
    checked: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for path in _SHARDED:
        if path.startswith(schema.GRAPHS) and not has_graphs:
            continue
        raw = loc.read_bytes(f"{path}/zarr.json")
        if raw is None:
            raise CorruptStoreError(f"{loc.url}: array '{path}' is missing (no {path}/zarr.json); the store is damaged: "
                                    f"rebuild it from its sources")
        try:
            arr = ShardedArray.open(loc, path, verify=True)
            checked[path] = arr.verify_all()
            shapes[path] = arr.shape
        except UnsupportedLayout:
            z = zarr.open_array(loc.zarr_store(read_only=True), path=path, mode="r")
            shapes[path] = tuple(z.shape)
            try:
                np.asarray(z[...])
            except Exception as e:
                raise CorruptStoreError(f"{loc.url}: array '{path}' cannot be read: {type(e).__name__}: {e}") from None
            checked[path] = int(z.nchunks)
    plain: dict[str, np.ndarray] = {}
    for path in _PLAIN:
        if path.startswith(schema.GRAPHS) and not has_graphs:
            continue
        plain[path] = _read_plain(loc, path)
        checked[path] = -(-len(plain[path]) // max(1, zarr.open_array(loc.zarr_store(read_only=True), path=path,
                                                                     mode="r").chunks[0]))
    n = len(plain[schema.IDS])
    problems = []
    if shapes[schema.SEQUENCES] != (n, L, D):
        problems.append(f"sequences has shape {shapes[schema.SEQUENCES]}; expected ({n}, {L}, {D})")
    if plain[schema.SCORES].shape != (n,):
        problems.append(f"scores has {plain[schema.SCORES].shape[0]} values for {n} ids")
    if has_graphs:
        node_ptr, edge_ptr = plain[schema.NODE_PTR], plain[schema.EDGE_PTR]
        if node_ptr.shape != (n + 1,) or (np.diff(node_ptr) < 0).any() or node_ptr[-1] != shapes[schema.NODE_X][0]:
            problems.append(f"graphs/node_ptr does not fit graphs/x ({shapes[schema.NODE_X][0]} nodes)")
        if edge_ptr.shape != (n * L + 1,) or (np.diff(edge_ptr) < 0).any() or \
                edge_ptr[-1] != shapes[schema.EDGE_INDEX][1] or edge_ptr[-1] != shapes[schema.EDGE_ATTR][0]:
            problems.append("graphs/edge_ptr does not fit graphs/edge_index and graphs/edge_attr")
    ids = np.asarray(plain[schema.IDS], dtype=object).astype(str)
    if len(set(ids.tolist())) != n:
        uniq, counts = np.unique(ids, return_counts=True)
        problems.append(f"ids are not unique (e.g. {uniq[counts > 1][:3].tolist()})")
    if int(attrs.get(schema.ATTR_NUM_TRACES, n)) != n:
        problems.append(f"the commit marker says {attrs.get(schema.ATTR_NUM_TRACES)} traces but there are {n} ids")
    if problems:
        raise CorruptStoreError(f"{loc.url}: {'; '.join(problems)}; the store is damaged: rebuild it from its sources")
    return {"url": loc.url, "num_traces": n, "arrays": checked}

