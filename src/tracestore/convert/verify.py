"""Checks of a store: against its sources (the converter checks its own output) and on its own (every
checksum, for `tracestore verify`).

"Equal after float16 rounding" is exact here: the stored value must be the float16 that numpy rounds the
source value to (after clipping to +-65504 where --on-overflow clip clipped it), NaN where the source is NaN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from ..errors import CorruptStoreError, VerifyMismatchError
from ..format import schema
from ..store.graphs import pointer_problem
from ..store.shards import ShardedArray, UnsupportedLayout
from ..store.urls import Location, resolve
from .samples import Sample, _crc_int, as_stored, crc_float16, make_sample

if TYPE_CHECKING:
    from ..store.reader import TraceStore
    from .archives import Source
    from .records import Options


def _first_diff(stored: np.ndarray, src: np.ndarray) -> tuple[tuple[int, ...], float, float] | None:
    exp = as_stored(src)
    same = (stored == exp) | (np.isnan(stored) & np.isnan(exp))
    if same.all():
        return None
    pos = tuple(int(i) for i in np.argwhere(~same)[0])
    return pos, float(stored[pos]), float(np.asarray(src)[pos])


def _mismatch(url: str, src_name: str, tid: str, row: int, what: str, pos: tuple[int, ...], got: float,
              want: float) -> VerifyMismatchError:
    where = ", ".join(f"{k} {v}" for k, v in zip(("layer", "hidden"), pos, strict=False))
    return VerifyMismatchError(
        f"{url}: trace {tid!r} (row {row}, from {src_name}): stored {what} at {where} is {got!r} but the source has "
        f"{want!r} (float16 {float(as_stored(np.asarray(want, np.float64)))!r}); the store does not match its sources: delete it, "
        f"convert again and report this as a bug")


def compare_sample(store: TraceStore, s: Sample) -> None:
    """Check one trace of the store against its Sample; raises VerifyMismatchError naming the trace, the row,
    the archive and what differs."""
    url, row = store.url, s.row

    def bad(what: str) -> VerifyMismatchError:
        return VerifyMismatchError(f"{url}: trace {s.id!r} (row {row}, from {s.source}): {what}; the store does not "
                                   f"match its sources: delete it, convert again and report this as a bug")

    tr = store[row]
    if tr.id != s.id:
        raise bad(f"the store has id {tr.id!r} there")
    d = _first_diff(tr.sequence, s.sequence) if tr.sequence.shape == s.sequence.shape else ((0,), float("nan"),
                                                                                            float("nan"))
    if d is not None:
        raise _mismatch(url, s.source, s.id, row, "sequence", *d)
    tok = tr.tokens
    if s.hidden is not None:
        if tok is None or tok.hidden is None or tuple(tok.hidden.shape) != s.hidden[0]:
            got = None if tok is None or tok.hidden is None else tuple(tok.hidden.shape)
            raise bad(f"stored token hidden states have shape {got}; the source's are {s.hidden[0]}")
        if crc_float16(tok.hidden) != s.hidden[1]:
            raise bad("stored token hidden states differ from the source's after float16 rounding")
    if s.token_ids is not None and (tok is None or tok.ids is None or not np.array_equal(tok.ids, s.token_ids)):
        raise bad("stored token ids differ from the source's")
    if s.text is not None and (tok is None or tok.text != s.text):
        raise bad("stored token text differs from the source's")
    if s.edges is not None:
        g = tr.graph
        if g is None:
            raise bad("the store has no graph but the source has one")
        counts = [int(e.shape[1]) for e in g.edge_index]
        if counts != s.edges[0]:
            raise bad(f"stored graphs have {counts[:4]}... edges per layer; the source's {s.edges[0][:4]}...")
        ei = np.concatenate([np.asarray(e, np.int64) for e in g.edge_index], axis=1)
        if _crc_int(ei) != s.edges[1]:
            raise bad("stored graph edges (edge_index) differ from the source's")
        if crc_float16(np.concatenate(g.edge_attr)) != s.edges[2]:
            raise bad("stored graph edge weights (edge_attr) differ from the source's after float16 rounding")


def compare_samples(store: TraceStore, expected: list[tuple[Source, int, list[str], np.ndarray]],
                    samples: list[Sample], done: list[dict[str, Any]]) -> str:
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
    for sample in samples:
        compare_sample(store, sample)
    return (f"sample: {len(samples)} traces equal their source after float16 rounding; ids and scores of "
            f"{sum(len(e[2]) for e in expected)} traces checked")


def verify_all_task(item: tuple[Source, int, int, list[str]], opts: Options, url: str) -> int:
    """Worker: read an archive again and compare every trace with rows offset.. of the store (`parts`: the
    per-token parts the store keeps)."""
    from ..store.reader import open as open_store
    from .archives import OpenArchive
    from .records import iter_traces

    src, offset, count, parts = item
    store = open_store(url)
    row = offset
    with OpenArchive(src, max_bytes=opts.max_bytes) as arch:
        for t in iter_traces(arch.content, src.name, opts.read):
            if row >= offset + count:
                raise VerifyMismatchError(f"{url}: {src.name} now holds more than the {count} traces converted from "
                                          f"it; the archive changed after conversion: convert again")
            compare_sample(store, make_sample(t, parts, src.name, row))
            row += 1
    if row != offset + count:
        raise VerifyMismatchError(f"{url}: {src.name} holds {row - offset} traces but {count} were converted from it; "
                                  f"the archive changed after conversion: convert again")
    return count


# -- tracestore verify ---------------------------------------------------------------------------------------
def _read_plain(loc: Location, path: str, dense: bool) -> np.ndarray:
    """Read a small array chunk by chunk through zarr (which checks each chunk's crc32c), naming the chunk
    that fails; a chunk whose object is missing fails too where it cannot be the fill value (`ids`, never
    empty) or the store stores every chunk (`dense`): zarr would read it as "" ids or NaN scores."""
    from ..store.reader import missing_chunks

    try:
        arr = zarr.open_array(loc.zarr_store(read_only=True), path=path, mode="r")
    except Exception as e:
        raise CorruptStoreError(f"{loc.url}: array '{path}' cannot be opened ({type(e).__name__}: {str(e)[:160]}); "
                                f"the store is corrupt: rebuild it from its sources") from None
    n = arr.shape[0]
    step = arr.chunks[0]
    if dense or path == schema.IDS:
        gone = missing_chunks(loc, arr, path)
        if gone:
            c = gone[0]
            raise CorruptStoreError(f"{loc.url}: array '{path}' chunk {c} (rows {c * step}..{min(n, (c + 1) * step) - 1}) "
                                    f"is missing{f' (and {len(gone) - 1} more)' if len(gone) > 1 else ''}; the store is "
                                    f"corrupt: rebuild it from its sources")
    parts = []
    for c, a in enumerate(range(0, n, step)):
        try:
            parts.append(np.asarray(arr[a:min(n, a + step)]))
        except Exception as e:
            raise CorruptStoreError(f"{loc.url}: array '{path}' chunk {c} (rows {a}..{min(n, a + step)}) cannot be "
                                    f"read: {type(e).__name__}: {str(e)[:160]}; the store is corrupt: rebuild it from "
                                    f"its sources") from None
    return np.concatenate(parts) if parts else np.asarray(arr[:])


def _edges_outside_traces(loc: Location, token_ptr: np.ndarray, edge_ptr: np.ndarray, L: int,
                          step: int = 1 << 22) -> str | None:
    """Check, a block of edges at a time, that every edge joins two tokens of its own trace."""
    ei_arr = ShardedArray.open(loc, schema.EDGE_INDEX, axis=1)
    nodes = np.diff(token_ptr)
    total = int(edge_ptr[-1])
    for a in range(0, total, step):
        b = min(total, a + step)
        ei = ei_arr.read(a, b)
        graph = np.searchsorted(edge_ptr, np.arange(a, b), side="right") - 1
        limit = nodes[graph // L]
        bad = (ei < 0) | (ei >= limit[None, :])
        if bad.any():
            e = a + int(np.flatnonzero(bad.any(axis=0))[0])
            g = int(np.searchsorted(edge_ptr, e, side="right") - 1)
            return (f"graphs/edge_index edge {e} (trace {g // L}, layer {g % L}) refers to a token outside its trace "
                    f"of {int(nodes[g // L])} tokens")
    return None


def verify_store(url: str | Location) -> dict[str, Any]:
    """Check a store end to end: the commit marker, every shard index and inner-chunk checksum of every
    sharded array, every chunk of the small arrays (present: a deleted chunk of `ids`, or of any small array of
    a store with a generation, which stores every chunk, is a fault, not a column of "" or NaN), their shapes
    against each other, and unique ids.

    Returns {"url", "num_traces", "arrays": {path: chunks checked}}; raises CorruptStoreError naming the
    store, the array and chunk of the first fault (bad root JSON and a missing array directory included;
    IncompleteStoreError if there is no commit marker)."""
    from ..store.parted import manifest_entries
    from ..store.reader import open as open_store
    from ..store.reader import read_root_attrs

    loc = resolve(url)
    attrs = read_root_attrs(loc)  # bad root JSON: a CorruptStoreError naming the store's zarr.json
    manifest = attrs.get(schema.ATTR_MANIFEST)
    if manifest is None:
        res = _verify_one(loc, attrs)
        del res["ids"]
        return res
    # a store made of parts: each part checked as a store, then what joins them (the manifest's counts and
    # generations, the parts' agreement and ids unique across them: what opening the whole store checks)
    checked: dict[str, int] = {}
    ids: list[np.ndarray] = []
    for e in manifest_entries(manifest, loc.url):
        path = e["path"]
        ploc = loc if path == schema.ROOT_PART else loc.child(path)
        res = _verify_one(ploc, attrs if path == schema.ROOT_PART else read_root_attrs(ploc))
        checked.update({(k if path == schema.ROOT_PART else f"{path}/{k}"): v for k, v in res["arrays"].items()})
        ids.append(res["ids"])
    whole = open_store(loc)
    n = len(whole)
    whole.close()
    all_ids = np.concatenate(ids) if ids else np.zeros(0, str)
    if len(np.unique(all_ids)) != all_ids.size:
        uniq, counts = np.unique(all_ids, return_counts=True)
        raise CorruptStoreError(f"{loc.url}: ids are not unique across its parts (e.g. {uniq[counts > 1][:3].tolist()});"
                                f" the store is damaged: rebuild it from its sources")
    return {"url": loc.url, "num_traces": n, "arrays": checked, "parts": len(ids)}


def _verify_one(loc: Location, attrs: dict[str, Any]) -> dict[str, Any]:
    """verify_store for one store (a single store, or one part of a store made of parts)."""
    from ..format.versions import resolve_layout
    from ..store.reader import dtype_problems

    lay = resolve_layout(attrs)
    dense = attrs.get(schema.ATTR_GENERATION) is not None  # written by a writer that stores every chunk
    L = int(attrs[schema.ATTR_NUM_LAYERS])
    D = int(attrs[schema.ATTR_HIDDEN_SIZE])
    checked: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    shapes_dtypes: dict[str, tuple[tuple[int, ...], Any]] = {}
    for path in lay.sharded_arrays():
        raw = loc.read_bytes(f"{path}/zarr.json")
        if raw is None:
            raise CorruptStoreError(f"{loc.url}: array '{path}' is missing (no {path}/zarr.json); the store is damaged: "
                                    f"rebuild it from its sources")
        try:
            arr = ShardedArray.open(loc, path, verify=True, axis=1 if path == schema.EDGE_INDEX else 0)
            checked[path] = arr.verify_all()
            shapes[path] = arr.shape
            shapes_dtypes[path] = (arr.shape, arr.dtype)
        except UnsupportedLayout:
            z = zarr.open_array(loc.zarr_store(read_only=True), path=path, mode="r")
            shapes[path] = tuple(z.shape)
            shapes_dtypes[path] = (tuple(z.shape), z.dtype)
            try:
                np.asarray(z[...])
            except Exception as e:
                raise CorruptStoreError(f"{loc.url}: array '{path}' cannot be read: {type(e).__name__}: {e}") from None
            checked[path] = int(z.nchunks)
    plain: dict[str, np.ndarray] = {}
    for path in lay.plain_arrays():
        if loc.read_bytes(f"{path}/zarr.json") is None:
            raise CorruptStoreError(f"{loc.url}: array '{path}' is missing (no {path}/zarr.json); the store is damaged: "
                                    f"rebuild it from its sources")
        plain[path] = _read_plain(loc, path, dense)
        checked[path] = -(-len(plain[path]) // max(1, zarr.open_array(loc.zarr_store(read_only=True), path=path,
                                                                     mode="r").chunks[0]))
    n = len(plain[schema.IDS])
    problems = []
    if shapes[schema.SEQUENCES] != (n, L, D):
        problems.append(f"sequences has shape {shapes[schema.SEQUENCES]}; expected ({n}, {L}, {D})")
    if plain[schema.SCORES].shape != (n,):
        problems.append(f"scores has {plain[schema.SCORES].shape[0]} values for {n} ids")
    if lay.token_ptr is not None:
        ptr = plain[lay.token_ptr]
        for opt_path in (lay.token_hidden, lay.token_ids, lay.token_text):
            if opt_path is None:
                continue
            path = opt_path
            rows = shapes[path][0] if path in shapes else plain[path].shape[0]
            if path == lay.token_hidden and shapes[path][1:] != (L, D):
                problems.append(f"{path} has shape {shapes[path]}; expected (T, {L}, {D})")
            p = pointer_problem(lay.token_ptr, ptr, n + 1, rows, f"{path}'s rows")
            if p:
                problems.append(p)
    if lay.has_graphs:
        edge_ptr = plain[schema.EDGE_PTR]
        for path, ax in ((schema.EDGE_INDEX, 1), (schema.EDGE_ATTR, 0)):
            p = pointer_problem(schema.EDGE_PTR, edge_ptr, n * L + 1, shapes[path][ax], f"{path}'s edges")
            if p:
                problems.append(p)
        if lay.token_ptr is None:
            problems.append("graphs without a token pointer (tokens/ptr)")
        elif not problems:  # both pointers fit their arrays: check each edge against its trace's tokens
            bad = _edges_outside_traces(loc, plain[lay.token_ptr], edge_ptr, L)
            if bad is not None:
                problems.append(bad)
    for name, (path, _kind) in lay.fields.items():
        if plain[path].shape != (n,):
            problems.append(f"field {name!r} has {plain[path].shape[0]} values for {n} traces")
    ids = np.asarray(plain[schema.IDS], dtype=object).astype(str)
    if len(set(ids.tolist())) != n:
        uniq, counts = np.unique(ids, return_counts=True)
        problems.append(f"ids are not unique (e.g. {uniq[counts > 1][:3].tolist()})")
    problems += dtype_problems(lay, {**{p: d for p, (_s, d) in shapes_dtypes.items()},
                                     **{p: a.dtype for p, a in plain.items() if a.dtype != object}})
    if int(attrs.get(schema.ATTR_NUM_TRACES, n)) != n:
        problems.append(f"the commit marker says {attrs.get(schema.ATTR_NUM_TRACES)} traces but there are {n} ids")
    if problems:
        raise CorruptStoreError(f"{loc.url}: {'; '.join(dict.fromkeys(problems))}; the store is damaged: rebuild it from its sources")
    return {"url": loc.url, "num_traces": n, "arrays": checked, "ids": ids}
