"""Converting archives into a part of a store of parts (issue 15; moved out of store/parts.py, which knows
only what a store of parts is): write_part() for a convert-part task or a Dask worker (cluster.py), append() for
`tracestore append` -- each a convert() into DEST/parts/NNNNN -- then the store's commit (store/parts.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import (
    DuplicateIdError,
    IncompleteStoreError,
    PartMismatchError,
    StoreExistsError,
    StoreNotFoundError,
    TracestoreError,
)
from ..format import schema
from ..store.destination import (
    DestinationLock,
    foreign_message,
    inspect_destination,
    settle_destination,
    writable_location,
)
from ..store.parts import (
    CommitResult,
    _refuse_a_part,
    commit_locked,
    listed_parts,
    part_number,
    part_path,
)
from ..store.urls import LocalLocation, Location, resolve
from .attention import GraphRecipe
from .pipeline import convert


@dataclass
class PartResult:
    """What write_part did (picklable: a cluster task returns it)."""

    part: int
    url: str
    num_traces: int
    up_to_date: bool
    seconds: float
    summary: str
    bytes_in: int = 0


def write_part(sources: Sequence[str], dest: str | Location, part: int, *,
               storage_options: dict[str, Any] | None = None, on_bytes: Callable[[int], None] | None = None,
               **convert_options: Any) -> PartResult:
    """Convert `sources` into part `part` of the store at `dest` (DEST/parts/NNNNN): a complete store of its
    own, written as `tools/convert` writes one (locked, resumable after a kill, up to date on a rerun with the
    same archives and options: then nothing is written). It is not part of the store until commit_parts()
    lists it. `on_bytes` gets increments of archive bytes done (for a progress bar elsewhere);
    `convert_options` are convert()'s keyword options."""
    t0 = time.perf_counter()
    root = writable_location(resolve(dest, storage_options) if not isinstance(dest, Location) else dest)
    path = part_path(part)  # checks the number
    _refuse_a_part(root, "write parts into")
    kind, attrs, _ = inspect_destination(root)
    if kind == "foreign" and (isinstance(root, LocalLocation) and root.path.exists() and not root.path.is_dir()):
        raise StoreExistsError(foreign_message(root))
    entries = listed_parts(root.url, attrs, kind)
    listed = [part_number(e["path"]) for e in entries]
    is_listed = any(e["path"] == path for e in entries)
    if listed and part <= max(listed) and not is_listed:
        own = " (a store's own traces are its part 0)" if entries[0]["path"] == schema.ROOT_PART else ""
        raise StoreExistsError(f"{root.url} already holds parts up to {max(listed)}{own}; parts are added after the "
                               f"last: write this one as part {max(listed) + 1} or later (or use tracestore "
                               f"append)")
    loc = root.child(path)
    reported = 0

    def count(n: int) -> None:
        nonlocal reported
        reported += n
        if on_bytes is not None:
            on_bytes(n)

    try:
        res = convert(list(sources), loc, on_bytes=count, **convert_options)
    except IncompleteStoreError as e:
        msg = " ".join(str(e).split())
        if "--overwrite" not in msg:
            raise
        # convert's advice (--overwrite) is not a part's: convert-part and --dask never start a part over
        raise IncompleteStoreError(
            f"{msg.split('; ')[0]}; a part is never started over by itself: rerun the command with this part's own "
            f"archives and options to resume it, or, to convert other archives into part {part}, delete {loc.url} "
            f"and run it again") from None
    except StoreExistsError as e:
        if not is_listed:
            raise
        # a rerun of a part the store lists is checked, never replaced (it would change the store under its
        # readers): the same archives and options are up to date, others refused
        raise StoreExistsError(f"{loc.url} is part {part} of the committed store {root.url}, converted from other "
                               f"archives or options ({' '.join(str(e).split(';')[0].split())}); a committed part "
                               f"is never replaced: add these archives as a new part (tracestore append, or "
                               f"convert-part --part {max(listed) + 1})") from None
    if on_bytes is not None and res.bytes_in > reported:  # up to date, or resumed: the rest counts as done
        on_bytes(res.bytes_in - reported)
    return PartResult(part=part, url=loc.url, num_traces=res.num_traces, up_to_date=res.up_to_date,
                      seconds=time.perf_counter() - t0, summary=res.summary(), bytes_in=res.bytes_in)


@dataclass
class AppendResult:
    """What append() did: the conversion of the new part, and the commit."""

    convert: Any  # convert.pipeline.ConvertResult
    commit: CommitResult
    part: int

    def summary(self) -> str:
        return f"{self.convert.summary()}\n{self.commit.summary()}"


def _store_defaults(attrs: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """convert() options not given default to what the store's first part recorded, so that `tracestore append
    STORE SRC...` makes a part that matches it."""
    out = dict(options)
    given = ((attrs.get(schema.ATTR_PROVENANCE) or {}).get("options") or {}) if isinstance(
        attrs.get(schema.ATTR_PROVENANCE), dict) else {}
    for k in ("pool", "tokens", "on_overflow", "allow_nan", "graphs"):
        if out.get(k) is None and given.get(k) is not None:
            out[k] = given[k]
    if out.get("graph_recipe") is None and isinstance(given.get("graph_recipe"), dict):
        try:
            out["graph_recipe"] = GraphRecipe.from_attrs(given["graph_recipe"])
        except (TypeError, ValueError, KeyError):
            pass
    if out.get("model_name") is None and attrs.get(schema.ATTR_MODEL_NAME) is not None:
        out["model_name"] = attrs[schema.ATTR_MODEL_NAME]
    return {k: v for k, v in out.items() if v is not None}


def append(store: str | Location, sources: Sequence[str], *, storage_options: dict[str, Any] | None = None,
           log: Callable[[str], None] | None = None, **convert_options: Any) -> AppendResult:
    """Convert `sources` into a new part of the committed store at `store` and commit it (tracestore append).

    The part is the next number after the store's last; options not given are taken from the store (its
    pool, tokens, graph recipe, overflow rule, model name). Readers opened before keep their view; the next
    open sees the new traces after the old ones. A killed append is resumed by the same command; a part whose
    ids repeat the store's is refused and removed (nothing of the store changes)."""
    root = resolve(store, storage_options) if not isinstance(store, Location) else store
    loc = writable_location(root)
    say = log or (lambda _s: None)
    lock = DestinationLock.acquire(loc)
    try:
        _refuse_a_part(loc, "append to")
        settle_destination(loc)
        kind, attrs, _ = inspect_destination(loc)
        if kind == "foreign":
            raise StoreExistsError(foreign_message(loc))
        if kind != "committed":
            what = {"empty": "no store here", "unfinished": "an unfinished store (rerun its convert to finish it)"
                    }.get(kind, kind)
            raise StoreNotFoundError(f"{loc.url}: {what}; append adds archives to a committed store: create it "
                                     f"first with tools/convert")
        if int(attrs.get(schema.ATTR_FORMAT_VERSION, 0)) == 1:
            raise TracestoreError(f"{loc.url} is a format version 1 store, which tracestore reads but does not "
                                  f"extend: convert its archives again (tools/convert --overwrite writes version "
                                  f"2), then append")
        entries = listed_parts(loc.url, attrs, kind)
        k = max(part_number(e["path"]) for e in entries) + 1
        # the options of the store are its first part's (the root's own attributes, or parts/00000's)
        first_path = entries[0]["path"]
        first_attrs = attrs if first_path == schema.ROOT_PART else inspect_destination(loc.child(first_path))[1]
        opts = _store_defaults(first_attrs, convert_options)
        part_loc = loc.child(part_path(k))
        say(f"{loc.url}: converting {len(sources)} source(s) into part {part_path(k)}")
        prov = first_attrs.get(schema.ATTR_PROVENANCE)
        scored = prov.get("scores") if isinstance(prov, dict) else None
        if isinstance(scored, dict) and not opts.get("scores"):
            say(f"note: {loc.url} took its scores from {scored.get('name')}; this append has no --scores, so the "
                f"new traces keep their archives' scores (or labels)")
        try:
            res = convert(list(sources), part_loc, log=log, **opts)
        except (StoreExistsError, IncompleteStoreError) as e:
            raise type(e)(f"{part_loc.url} holds a part from an earlier append or convert-part of other archives "
                          f"or options that was never committed ({' '.join(str(e).split(';')[0].split())}): rerun "
                          f"that command to finish it (then `tracestore commit {loc.url}` if it was a convert-part), "
                          f"or delete {part_loc.url}, then append again") from None
        try:
            commit = commit_locked(loc, [k], lock=lock, log=log)
        except (DuplicateIdError, PartMismatchError) as e:
            part_loc.delete_all()  # made by this command, and it cannot join the store: nothing else changed
            raise type(e)(f"{e}; the part this append wrote ({part_loc.url}) was removed") from None
        return AppendResult(convert=res, commit=commit, part=k)
    finally:
        lock.release()
