"""Stores made of parts (issue 15): a store that grows by appends, and one converted part by part on a cluster.

A part is a complete, committed format-v2 store under `parts/NNNNN/` (plain Zarr: any Zarr v3 reader opens
it). The root's tracestore attributes hold the manifest (schema.ATTR_MANIFEST): the parts in order, each with
its trace count and generation, written last and in one atomic write (a rename locally, one PUT on object
storage), so that it is the commit marker of the whole. A single store stays as it always was; its first
append makes it part "." (the root's own data, not moved: moving hundreds of GB on object storage to gain a
uniform layout is not worth it) followed by parts/00001, parts/00002, ... A store converted on a cluster has
no data at its root: parts/00000, parts/00001, ...

Parts never change once committed; a commit only adds parts. A reader lists its parts when it opens, and keeps
that view (an append does not disturb it); the generation of each part is checked as before, so a store
replaced under a reader still raises StaleStoreError.

    commit_parts(dest)              # the manifest: every committed part (tracestore commit DEST)

What converts archives into a part (write_part, append) is the converter's: convert/part_writer.py. This
module knows only what a store of parts is: its layout, the manifest, listing, commit.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import (
    DuplicateIdError,
    IncompleteStoreError,
    LeaseLostError,
    PartMismatchError,
    StoreExistsError,
    StoreNotFoundError,
    TracestoreError,
)
from ..format import schema
from .destination import (
    LOCK_KEY,
    LOCK_SUFFIX,
    DestinationLock,
    foreign_message,
    inspect_destination,
    settle_destination,
    writable_location,
)
from .parted import manifest_entries
from .urls import LocalLocation, Location, resolve

_PART_RE = re.compile(rf"^{schema.PARTS_DIR}/(\d{{5}})/zarr\.json$")
_STAGING_RE = re.compile(rf"^{schema.PARTS_DIR}/(\d{{5}})/{re.escape(schema.STAGING_STATE_KEY)}$")
_LOCK_RE = re.compile(rf"^{schema.PARTS_DIR}/(\d{{5}}){re.escape(LOCK_SUFFIX)}/{re.escape(LOCK_KEY)}$")
_PART_NAME_RE = re.compile(rf"^(\d{{5}})({re.escape(LOCK_SUFFIX)})?$")
_PART_URL_RE = re.compile(rf"/{schema.PARTS_DIR}/\d{{5}}/?$")


def _store_holding(loc: Location) -> Location | None:
    """The store `loc` is a part of (loc = STORE/parts/NNNNN and STORE holds a tracestore store), else None."""
    if _PART_URL_RE.search(loc.url) is None:
        return None
    parent_url = loc.url.rstrip("/").rsplit(f"/{schema.PARTS_DIR}/", 1)[0]
    parent: Location = LocalLocation(parent_url) if isinstance(loc, LocalLocation) else resolve(
        parent_url, getattr(loc, "storage_options", None))
    raw = parent.read_bytes("zarr.json") if not isinstance(parent, LocalLocation) or parent.path.is_dir() else None
    if raw is None and not parent.list_dir(schema.PARTS_DIR):
        return None
    return parent


def _refuse_a_part(loc: Location, what: str) -> None:
    parent = _store_holding(loc)
    if parent is not None:
        raise TracestoreError(f"{loc.url} is a part of the store {parent.url}; {what} the store itself "
                              f"({parent.url}), not one of its parts")


def listed_parts(url: str, attrs: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """The parts a store holds now, as its manifest lists them (checked: parted.manifest_entries); a single
    committed store holds one, its own traces ("."); anything else none."""
    if kind != "committed":
        return []
    m = manifest_of(attrs)
    if m is not None:
        return manifest_entries(m, url)
    return [{"path": schema.ROOT_PART, "num_traces": int(attrs.get(schema.ATTR_NUM_TRACES, 0)),
             "generation": attrs.get(schema.ATTR_GENERATION)}]


def part_path(part: int) -> str:
    """The store-relative path of part `part`: parts/00003 (part 0 of an appended single store is ".")."""
    if part < 0 or part > 99999:
        raise ValueError(f"part {part}: parts are numbered 0..99999")
    return f"{schema.PARTS_DIR}/{part:05d}"


def part_url(dest: str, part: int) -> str:
    """DEST/parts/NNNNN, a local path or an s3:// URL."""
    return f"{str(dest).rstrip('/')}/{part_path(part)}"


def part_number(path: str) -> int:
    """0 for ".", k for parts/0000k."""
    return 0 if path == schema.ROOT_PART else int(path.rsplit("/", 1)[1])


def manifest_of(attrs: dict[str, Any]) -> dict[str, Any] | None:
    m = attrs.get(schema.ATTR_MANIFEST)
    return m if isinstance(m, dict) else None


@dataclass
class CommitResult:
    """What commit_parts did: the store's parts after the commit and the ones it added."""

    url: str
    parts: list[int]
    added: list[int]
    num_traces: int
    seconds: float
    up_to_date: bool = False
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.added:
            return (f"{self.url} is up to date: it holds {len(self.parts)} part(s), {self.num_traces} traces, and no "
                    f"part to add; nothing was written")
        return (f"committed {self.url}: {len(self.parts)} part(s), {self.num_traces} traces "
                f"(added part{'s' if len(self.added) > 1 else ''} {', '.join(map(str, self.added))}) in "
                f"{self.seconds:.1f} s")


def _found_parts(loc: Location) -> tuple[dict[int, str], list[int]]:
    """The part directories under loc/parts/: {number: its generation} of the committed ones, and the numbers
    of the unfinished ones (a staging state, or a writer's lock: a part being written that has not reached its
    first checkpoint). One LIST of parts/ (not of every shard object of every part), then each part's
    zarr.json and staging state."""
    committed: dict[int, str] = {}
    unfinished: set[int] = set()
    for key in loc.list_dir(schema.PARTS_DIR + "/"):
        name = key.rsplit("/", 1)[-1]
        m = _PART_NAME_RE.match(name)
        if m is None:
            continue
        k = int(m.group(1))
        if m.group(2):  # NNNNN.tracestore-lock: a writer's, if its lock object is there (not a leftover folder)
            if loc.exists(f"{key}/{LOCK_KEY}"):
                unfinished.add(k)
            continue
        kind, attrs, state = inspect_destination(loc.child(part_path(k)))
        if kind == "committed":
            committed[k] = str(attrs.get(schema.ATTR_GENERATION))
        elif kind == "unfinished" or state is not None:
            unfinished.add(k)
    return committed, sorted(unfinished - set(committed))


def _layout_key(store: Any) -> dict[str, Any]:
    """What two parts must share to be read as one store."""
    lay = store.layout
    return {"layers": store.num_layers, "hidden size": store.hidden_size, "graphs": store.has_graphs,
            "edge attribute size": int(store._ea.shape[1]) if store.has_graphs else None,
            "token hidden states": lay.token_hidden is not None, "token ids": lay.token_ids is not None,
            "token text": lay.token_text is not None, "pool": lay.pool,
            "graph recipe": lay.graph_recipe if store.has_graphs else None, "model name": store.model_name,
            "fields": {k: kind for k, (_p, kind) in sorted(lay.fields.items())}}


def _label(url: str, path: str) -> str:
    return f"{url} (its own traces)" if path == schema.ROOT_PART else f"{url}/{path}"


def commit_parts(dest: str | Location, *, parts: Sequence[int] | None = None,
                 storage_options: dict[str, Any] | None = None,
                 log: Callable[[str], None] | None = None) -> CommitResult:
    """Write the manifest of the store at `dest`: the parts it lists already, then `parts` (None: every
    committed part found under DEST/parts/ that it does not list yet), in number order. Checks that every
    part is committed and agrees with the others (layers, hidden size, per-token data, pool, graph recipe,
    fields) and that no id is in two parts; raises TracestoreError naming the parts and what to do
    otherwise, and then writes nothing. One commit (or convert, or append) at a time per store."""
    root = resolve(dest, storage_options) if not isinstance(dest, Location) else dest
    loc = writable_location(root)
    lock = DestinationLock.acquire(loc)
    try:
        settle_destination(loc)
        return commit_locked(loc, parts, lock=lock, log=log)
    finally:
        lock.release()


def commit_locked(loc: Location, parts: Sequence[int] | None, *, lock: DestinationLock | None = None,
                  log: Callable[[str], None] | None = None) -> CommitResult:
    """commit_parts with the store's lock held (append holds it across its conversion): `lock`, whose lease
    is renewed (and checked: LeaseLostError) just before the manifest is written."""
    from .reader import open_part

    t0 = time.perf_counter()
    say = log or (lambda _s: None)
    url = loc.url
    _refuse_a_part(loc, "commit")
    kind, attrs, _ = inspect_destination(loc)  # first: a file is refused here, before any read inside it
    if kind == "foreign" and isinstance(loc, LocalLocation) and loc.path.exists() and not loc.path.is_dir():
        raise StoreExistsError(foreign_message(loc))
    raw, root_tag = loc.read_tagged("zarr.json")  # the manifest is replaced only if it is still this one
    committed, unfinished = _found_parts(loc)
    if kind == "foreign" and raw is None and (committed or unfinished):
        kind = "parts only"  # a cluster conversion before its first commit: parts and nothing else
    if kind == "foreign":
        raise StoreExistsError(foreign_message(loc))
    if kind == "unfinished":
        raise IncompleteStoreError(f"{url} holds an unfinished store (its writer stopped before committing it): "
                                   f"finish it first (rerun the same convert command), then commit parts to it")
    if kind == "empty":
        raise StoreNotFoundError(f"{url}: no store and no parts here: write parts first (tracestore convert-part, "
                                 f"or tools/convert --dask)")
    if kind == "committed" and int(attrs.get(schema.ATTR_FORMAT_VERSION, 0)) == 1:
        raise TracestoreError(f"{url} is a format version 1 store, which tracestore reads but does not extend: "
                              f"convert its archives again (tools/convert --overwrite writes version 2), then "
                              f"add parts to it")
    listed = listed_parts(url, attrs, kind)  # a single store: its own traces become the first part
    listed_numbers = {part_number(e["path"]) for e in listed}
    if any(e["path"] == schema.ROOT_PART for e in listed) and 0 in committed:
        raise PartMismatchError(f"{url}/{part_path(0)} cannot join {url}: the store's own traces are its part 0, "
                                f"so parts are numbered from 1; write those archives as part "
                                f"{max(listed_numbers) + 1} (convert-part --part), or with tracestore append, and "
                                f"delete {url}/{part_path(0)}")
    if parts is None:
        blocking = [k for k in unfinished if k not in listed_numbers]
        if blocking:
            raise IncompleteStoreError(
                f"{url}: part(s) {', '.join(part_path(k) for k in blocking)} are unfinished (being written, or "
                f"their writer stopped before committing them): wait for their task, or rerun it (it resumes), or "
                f"delete them, then commit")
        new = sorted(k for k in committed if k not in listed_numbers)
        next_number = max(listed_numbers) + 1 if listed_numbers else 0
        gaps = sorted(set(range(next_number, max(new) + 1)) - set(new)) if new else []
        if gaps:
            raise IncompleteStoreError(
                f"{url}: part(s) {', '.join(part_path(k) for k in gaps)} are missing (not written yet, or their task "
                f"failed) before {part_path(max(new))}: write them first (their convert-part task), or commit the "
                f"others on purpose with --parts; a part left out now could only join after the last one")
    else:
        new = sorted({int(k) for k in parts} - listed_numbers)
        missing = [k for k in new if k not in committed]
        if missing:
            state = ["unfinished" if k in unfinished else "missing" for k in missing]
            raise IncompleteStoreError(
                f"{url}: part(s) " + ", ".join(f"{part_path(k)} ({s})" for k, s in zip(missing, state, strict=True))
                + ": write them first (rerun their task: an unfinished part resumes), then commit")
    if listed and new and min(new) <= max(listed_numbers):
        raise TracestoreError(f"{url}: part(s) {', '.join(part_path(k) for k in new if k <= max(listed_numbers))} "
                              f"are numbered before the store's last part ({max(listed_numbers)}): parts are added "
                              f"in number order; renumber them above it, or delete them")
    if not new:
        total = sum(int(e["num_traces"] or 0) for e in listed)
        return CommitResult(url=url, parts=sorted(listed_numbers), added=[], num_traces=total,
                            seconds=time.perf_counter() - t0, up_to_date=True)
    # every part, old and new, opened (their pointers and ids checked as any open does): the new ones must
    # agree with the first, and ids must be unique across all of them
    entries = listed + [{"path": part_path(k), "num_traces": None, "generation": committed[k]} for k in new]
    say(f"{url}: checking {len(entries)} part(s)")
    ref_key: dict[str, Any] | None = None
    ref_label = ""
    id_arrays: list[np.ndarray] = []
    model_names: set[Any] = set()
    for e in entries:
        label = _label(url, e["path"])
        store = open_part(loc.child(e["path"]) if e["path"] != schema.ROOT_PART else loc)
        try:
            if e["generation"] is not None and store.generation != e["generation"]:
                raise TracestoreError(f"{label} was replaced since it was listed (generation {store.generation}, "
                                      f"listed {e['generation']}); the store is damaged: rebuild it")
            key = _layout_key(store)
            if ref_key is None:
                ref_key, ref_label = key, label
            elif key != ref_key:
                diff = "; ".join(f"{k}: {ref_key[k]!r} there, {key[k]!r} here" for k in key if key[k] != ref_key[k])
                raise PartMismatchError(f"{label} does not match {ref_label} ({diff}); a store's parts must agree: "
                                      f"convert its archives again with the options of the store (tracestore info "
                                      f"{url} shows them), or delete {label}")
            e["num_traces"] = len(store)
            e["generation"] = store.generation
            id_arrays.append(np.asarray(store.ids))
            model_names.add(store.model_name)
        finally:
            store.close()
    all_ids = np.concatenate(id_arrays) if id_arrays else np.zeros(0, str)
    uniq, first, counts = np.unique(all_ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        bounds = np.cumsum([0] + [int(e["num_traces"]) for e in entries])
        dup = str(uniq[np.flatnonzero(counts > 1)[0]])
        where = [_label(url, entries[int(np.searchsorted(bounds, i, side="right") - 1)]["path"])
                 for i in np.flatnonzero(all_ids == dup)[:2]]
        n_dup = int((counts > 1).sum())
        raise DuplicateIdError(f"{url}: id {dup!r} is in {where[0]} and in {where[1]} ({n_dup} id(s) are in more "
                               f"than one part); ids must be unique across a store's parts: the new archives "
                               f"repeat traces the store holds (an append of the same archives twice?). Nothing "
                               f"was committed")
    total = int(sum(int(e["num_traces"]) for e in entries))
    new_manifest = {"generation": uuid.uuid4().hex, "num_traces": total,
                    "parts": [{"path": e["path"], "num_traces": int(e["num_traces"]), "generation": e["generation"]}
                              for e in entries]}
    if kind == "committed":
        doc = json.loads(raw or b"{}")
        root_attrs = doc.setdefault("attributes", {}).setdefault(schema.ATTRS_KEY, {})
        root_attrs[schema.ATTR_MANIFEST] = new_manifest
        root_attrs[schema.ATTR_FORMAT_VERSION] = schema.PARTS_FORMAT_VERSION
        if entries[0]["path"] != schema.ROOT_PART:  # a root of parts only: its counts are the whole store's
            root_attrs[schema.ATTR_NUM_TRACES] = total
            root_attrs[schema.ATTR_GENERATION] = new_manifest["generation"]
    else:
        mn = sorted(model_names, key=str)
        assert ref_key is not None
        doc = {"zarr_format": 3, "node_type": "group", "attributes": {schema.ATTRS_KEY: {
            schema.ATTR_FORMAT_VERSION: schema.PARTS_FORMAT_VERSION, schema.ATTR_COMMITTED: True,
            schema.ATTR_NUM_TRACES: total, schema.ATTR_NUM_LAYERS: ref_key["layers"],
            schema.ATTR_HIDDEN_SIZE: ref_key["hidden size"], schema.ATTR_MODEL_NAME: mn[0] if len(mn) == 1 else None,
            schema.ATTR_CREATED_BY: f"tracestore {__version__}", schema.ATTR_GENERATION: new_manifest["generation"],
            schema.ATTR_MANIFEST: new_manifest}}}
    if lock is not None:
        lock.fence("manifest")
    # one write: a rename locally, one PUT on object storage; readers see the old manifest or the new one. A
    # compare-and-swap on the version read at the start: a commit paused past its lease, whose lock another
    # commit took over, never writes its older manifest over the newer one
    data = json.dumps(doc, indent=2).encode()
    swapped = loc.replace_if("zarr.json", data, root_tag) is not None if root_tag is not None else \
        loc.create_exclusive("zarr.json", data)
    if not swapped:
        raise LeaseLostError(f"{url}: its manifest changed while this commit ran (another commit took the store's "
                             f"lock over and committed); nothing was written: run `tracestore commit {url}` again "
                             f"to add what is still missing")
    numbers = [part_number(e["path"]) for e in entries]
    return CommitResult(url=url, parts=numbers, added=new, num_traces=total, seconds=time.perf_counter() - t0)
