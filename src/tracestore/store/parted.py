"""A store made of parts, read as one store: its parts' arrays concatenated along the rows, their metadata joined.

A store of parts (store/parts.py: the layout, the manifest, commit) opens as a TraceStore whose parts are
TraceStores of their own, one per manifest entry, in manifest order. `open_parts` opens them (side by side
on object storage), checks each against its manifest entry and against the first (layers, per-token data,
graphs, fields), and joins what a reader needs whole (ids, scores, fields, pointers shifted by the rows before
each part, provenance, the float16 report); trace data stays in the parts' own arrays, reached through a
PartedArray (one searchsorted per read, no copy). The single store's reading is reader.py's.
"""

from __future__ import annotations

import bisect
import re
from typing import TYPE_CHECKING, Any

import numpy as np

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
from .shards import ShardBudget, ShardCache, read_only

if TYPE_CHECKING:
    from .reader import TraceStore, _Array


class PartedArray:
    """One array of a store made of parts: the parts' arrays concatenated along the rows (axis 1 for
    edge_index), with no copy. A read looks its rows' parts up in `offsets` (one searchsorted) and reads each
    part's rows as that part would; sorted rows (a loader batch, a slice) go straight into slices of `out`."""

    direct = None

    def __init__(self, parts: list[_Array], offsets: np.ndarray, path: str) -> None:
        self.parts: list[_Array] | None = parts
        self.arrays = parts
        self.offsets = np.asarray(offsets, np.int64)  # [P + 1]: part p holds rows offsets[p]:offsets[p+1]
        self._bounds: list[int] = self.offsets.tolist()  # the same, for one row's lookup without numpy calls
        self.path = path
        self.axis = 1 if path == schema.EDGE_INDEX else 0

    @property
    def shape(self) -> tuple[int, ...]:
        s = list(self.arrays[0].shape)
        s[self.axis] = int(self.offsets[-1])
        return tuple(s)

    @property
    def dtype(self) -> np.dtype:
        return self.arrays[0].dtype

    def locate(self, rows: np.ndarray) -> np.ndarray:
        """The part of each row."""
        return np.searchsorted(self.offsets, rows, side="right") - 1

    def row(self, r: int) -> np.ndarray:
        p = bisect.bisect_right(self._bounds, r) - 1  # a numpy searchsorted costs ~5 us, a trace's read ~2
        return self.arrays[p].row(r - self._bounds[p])

    def take(self, rows: np.ndarray, out: np.ndarray | None = None, sub: tuple[Any, ...] = ()) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        if rows.size == 0:
            return self.arrays[0].take(rows, out=out, sub=sub)
        part = self.locate(rows)
        if (part == part[0]).all():  # one part: as that part reads
            p = int(part[0])
            return self.arrays[p].take(rows - self.offsets[p], out=out, sub=sub)
        local = rows - self.offsets[part]
        if out is None:  # the row shape the index `sub` leaves, from an empty read (nothing copied)
            empty = self.arrays[int(part[0])].take(local[:0], sub=sub)
            out = np.empty((rows.size, *empty.shape[1:]), empty.dtype)
        brk = (np.flatnonzero(np.diff(part)) + 1).tolist()
        if len(brk) < len(self.arrays):
            # sorted rows (one run per part): each run read by its part straight into its slice of out
            for a, b in zip([0, *brk], [*brk, rows.size], strict=True):
                self.arrays[int(part[a])].take(local[a:b], out=out[a:b], sub=sub)
            return out
        # unsorted rows: one call per part, each row copied from its part straight to its place in out
        for p in np.unique(part).tolist():
            at = np.flatnonzero(part == p)
            self.arrays[p].take(local[at], out=out, sub=sub, positions=at)
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) along the concatenated axis (a trace's tokens or edges lie in one part)."""
        total = int(self.offsets[-1])
        start, stop = max(0, start), min(total, stop)
        p = int(self.locate(np.array([start]))[0]) if start < total else len(self.arrays) - 1
        if stop <= int(self.offsets[p + 1]):
            return self.arrays[p].read(start - int(self.offsets[p]), stop - int(self.offsets[p]))
        pieces = []
        while start < stop:
            end = min(stop, int(self.offsets[p + 1]))
            pieces.append(self.arrays[p].read(start - int(self.offsets[p]), end - int(self.offsets[p])))
            start, p = end, p + 1
        return np.concatenate(pieces, axis=self.axis)


class CacheGroup:
    """The shard caches of a store's parts, closed and checked together."""

    def __init__(self, caches: list[ShardCache]) -> None:
        self.caches = caches

    def close(self) -> None:
        for c in self.caches:
            c.close()

    @property
    def closed(self) -> bool:
        return all(c.closed for c in self.caches)

    def check(self, what: str) -> None:
        for c in self.caches:
            c.check(what)


def concat_ptr(ptrs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """CSR pointers of parts joined: ([sum n_p + 1] with each part's shifted by the rows before it, and the
    row offsets [P + 1] of the parts in the pointed-to array)."""
    ends = np.array([int(p[-1]) if p.size else 0 for p in ptrs], np.int64)
    offsets = np.concatenate(([0], np.cumsum(ends))).astype(np.int64)
    joined = np.concatenate([p[:-1] + o for p, o in zip(ptrs, offsets[:-1].tolist(), strict=True)]
                            + [np.array([offsets[-1]], np.int64)])
    return joined, offsets


_PART_PATH = re.compile(rf"^{schema.PARTS_DIR}/\d{{5}}$")


def manifest_entries(manifest: Any, url: str) -> list[dict[str, Any]]:
    """The parts a manifest lists, checked: a non-empty list of {"path": "." or "parts/NNNNN" (each once,
    "." first if at all), "num_traces": int >= 0, "generation": str or null}; CorruptStoreError otherwise."""
    def bad(why: str) -> CorruptStoreError:
        return CorruptStoreError(f"{url}: the manifest of its parts is damaged ({why}); run `tracestore verify "
                                 f"{url}`, rebuild it from its parts with `tracestore commit` on a copy, or from its "
                                 f"sources")

    parts = manifest.get("parts") if isinstance(manifest, dict) else None
    if not isinstance(parts, list) or not parts:
        raise bad("no list of parts")
    seen: set[str] = set()
    out = []
    for i, e in enumerate(parts):
        if not isinstance(e, dict):
            raise bad(f"entry {i} is not an object")
        path, n, gen = e.get("path"), e.get("num_traces"), e.get("generation")
        if not isinstance(path, str) or not (path == schema.ROOT_PART and i == 0 or _PART_PATH.match(path)):
            raise bad(f"entry {i} has path {path!r}; parts are '.' (first) or parts/NNNNN")
        if path in seen:
            raise bad(f"{path} is listed twice")
        seen.add(path)
        if type(n) is not int or n < 0:
            raise bad(f"{path} has num_traces {n!r}")
        if gen is not None and not isinstance(gen, str):
            raise bad(f"{path} has generation {gen!r}")
        out.append({"path": path, "num_traces": n, "generation": gen})
    return out


def open_parts(store: TraceStore, manifest: Any, rows: np.ndarray | None, view: list[dict[str, Any]] | None,
               part_cls: type[TraceStore]) -> None:
    """Open a store made of parts as the concatenation of its parts, in manifest order: `view` (the parts
    a pickled copy was opened with) or the manifest's. Metadata is joined once (ids, scores, fields,
    pointers shifted by the rows before each part); trace data stays in the parts' own arrays. Each part is
    a `part_cls` (reader.TraceStore, passed in so that this module does not import the reader)."""
    url = store.location.url
    replaced = view is not None  # a copy of an opened store: a part that changed means the store was replaced
    entries = view if view is not None else manifest_entries(manifest, url)
    parts: list[TraceStore] = []
    def open_one(e: dict[str, Any]) -> TraceStore:
        path = e["path"]
        return part_cls(store.location if path == schema.ROOT_PART else store.location.child(path),
                        verify=store.verify, _as_part=True)

    # on object storage each part's open is a few round trips (its metadata, ids, scores, pointers): opened
    # side by side, a store of many parts opens in about the time of a few
    futures = None
    if getattr(store.location, "is_remote", False) and len(entries) > 1:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(min(len(entries), config.REMOTE_FETCH_CONCURRENCY),
                                  thread_name_prefix="tracestore-parts")
        futures = [pool.submit(open_one, e) for e in entries]
        pool.shutdown(wait=False)
    for i, e in enumerate(entries):
        path = e["path"]
        try:
            part = futures[i].result() if futures is not None else open_one(e)
        except (StoreNotFoundError, IncompleteStoreError, FormatVersionError) as err:
            if replaced:
                raise StaleStoreError(f"{url}: the store was replaced since it was opened (its part {path} is "
                                      f"gone: {err}); reopen it with tracestore.open()") from None
            raise CorruptStoreError(f"{url}: its manifest lists part {path}, which cannot be opened ({err}); "
                                    f"the store is damaged: run `tracestore verify {url}`") from None
        if e.get("generation") is not None and part.generation != e.get("generation"):
            cls = StaleStoreError if replaced else CorruptStoreError
            raise cls(f"{url}: part {path} is not the one its manifest lists (generation {part.generation}, "
                      f"listed {e.get('generation')}): " + ("the store was replaced since it was opened; reopen "
                                                            "it with tracestore.open()" if replaced else
                                                            "the store is damaged: rebuild it"))
        if e.get("num_traces") is not None and len(part) != e["num_traces"]:
            raise CorruptStoreError(f"{url}: part {path} holds {len(part)} traces, its manifest says "
                                    f"{e['num_traces']}; the store is damaged: rebuild it")
        parts.append(part)
    first = parts[0]
    store._parts = parts
    store._view = [{"path": e["path"], "generation": p.generation, "num_traces": len(p)}
                  for e, p in zip(entries, parts, strict=True)]
    store.layout = first.layout
    problems = [f"part {e['path']} has {what}" for e, p in zip(entries[1:], parts[1:], strict=True)
                for what in part_mismatch(first, p)]
    if problems:
        raise CorruptStoreError(f"{url}: {'; '.join(problems[:4])}, unlike part {entries[0]['path']}; a "
                                f"store's parts must agree: the store is damaged, rebuild it")
    report: dict[str, Float16Report] = {}
    for p in parts:
        for k, r in p.report.items():
            if k in report:
                report[k].merge(r)
            else:
                report[k] = r
    # provenance of the whole: each part's, the sources of all, and the counts a reader checks (label_scores:
    # the trainer's guard against 0/1 labels read as scores)
    provs: list[dict[str, Any]] = []
    for p in parts:
        pv = p.attrs.get(schema.ATTR_PROVENANCE)
        provs.append(pv if isinstance(pv, dict) else {})
    sources: list[Any] = []
    for pv in provs:
        if isinstance(pv.get("sources"), list):
            sources += pv["sources"]
    provenance = {"parts": {e["path"]: pv for e, pv in zip(entries, provs, strict=True)}, "sources": sources,
                  "label_scores": sum(int(pv.get("label_scores") or 0) for pv in provs)}
    store.attrs = {**first.attrs, schema.ATTR_PROVENANCE: provenance,
                  schema.ATTR_FORMAT_VERSION: schema.PARTS_FORMAT_VERSION,
                  schema.ATTR_NUM_TRACES: sum(len(p) for p in parts),
                  schema.ATTR_REPORT: {k: r.to_dict() for k, r in report.items()},
                  schema.ATTR_GENERATION: (manifest or {}).get("generation", store.attrs.get(
                      schema.ATTR_GENERATION)), schema.ATTR_MANIFEST: {"parts": store._view}}
    gen = store.attrs.get(schema.ATTR_GENERATION)
    store.generation = None if gen is None else str(gen)
    # one bound on the shards mapped over all parts, as for a single store (each part checks its own
    # generation)
    budget = ShardBudget()
    for p in parts:
        p._cache.budget = budget
    store._cache = CacheGroup([p._cache for p in parts])  # type: ignore[assignment]
    store._dense_chunks = first._dense_chunks
    counts = np.array([len(p) for p in parts], np.int64)
    store._part_starts = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    store._all_ids = read_only(np.concatenate([p._all_ids for p in parts]))
    store._all_scores = read_only(np.concatenate([p._all_scores for p in parts]))
    store._all_fields = {k: read_only(np.concatenate([p._all_fields[k] for p in parts]))
                        for k in first._all_fields}
    store._seq = PartedArray([p._seq for p in parts], store._part_starts, schema.SEQUENCES)  # type: ignore[assignment]
    store.has_graphs = first.has_graphs
    store.token_ptr = None
    store._hidden = store._token_ids = None
    store._text = None
    if first.token_ptr is not None:
        ptr, tok_off = concat_ptr([p.token_ptr for p in parts])  # type: ignore[misc]
        store.token_ptr = read_only(ptr)
        if first._hidden is not None:
            store._hidden = PartedArray([p._hidden for p in parts], tok_off,  # type: ignore[assignment,misc]
                                        str(first.layout.token_hidden))
        if first._token_ids is not None:
            store._token_ids = PartedArray([p._token_ids for p in parts], tok_off,  # type: ignore[assignment,misc]
                                           str(first.layout.token_ids))
    if store.has_graphs:
        eptr, e_off = concat_ptr([p.edge_ptr for p in parts])
        store.edge_ptr = read_only(eptr)
        store._ei = PartedArray([p._ei for p in parts], e_off, schema.EDGE_INDEX)  # type: ignore[assignment]
        store._ea = PartedArray([p._ea for p in parts], e_off, schema.EDGE_ATTR)  # type: ignore[assignment]
    store._rows = None if rows is None else read_only(np.array(rows, np.int64))
    store._id_index = None


def part_mismatch(a: TraceStore, b: TraceStore) -> list[str]:
    """What part b has that part a has not (layers, per-token data, graphs, fields)."""
    out = []
    if (a.num_layers, a.hidden_size) != (b.num_layers, b.hidden_size):
        out.append(f"{b.num_layers} layers x {b.hidden_size} (not {a.num_layers} x {a.hidden_size})")
    for what, x, y in (("graphs", a.has_graphs, b.has_graphs),
                       ("token hidden states", a._hidden is not None, b._hidden is not None),
                       ("token ids", a._token_ids is not None, b._token_ids is not None),
                       ("token text", a._text is not None, b._text is not None)):
        if x != y:
            out.append(f"{'' if y else 'no '}{what}")
    if a.has_graphs and b.has_graphs and a._ea.shape[1] != b._ea.shape[1]:
        out.append(f"{b._ea.shape[1]} edge attributes (not {a._ea.shape[1]})")
    if sorted(a._all_fields) != sorted(b._all_fields):
        out.append(f"fields {sorted(b._all_fields)} (not {sorted(a._all_fields)})")
    return out
