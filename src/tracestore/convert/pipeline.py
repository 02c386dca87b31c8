"""convert(): archives in, one store out, in parallel, with bounded memory, resumably.

Worker processes (--workers N) each load one archive at a time through the allow-list unpickler, normalise
it and cast it to float16 block by block with float16 reports (records.cast_blocks), sending each block to
the main process as it is cast. The main process takes the blocks in sorted source order, joins the CSV
scores, appends them to the StoreWriter and checkpoints after every archive (`user_state` = the manifest
of finished sources). A run killed at any point (kill -9 included) and rerun with the same arguments
resumes after the last finished archive and gives the same store as an uninterrupted run. At the end the
store is committed, reopened and compared with its sources.

Memory: a worker reads a pickled list of records one record at a time (pickle_stream.PickleArchive: the
size of the archive does not matter; other layouts are held whole, .pt files memory-mapped) and holds a
few blocks in its queue; the main process holds a block, the writer's pending shard per array and one
shard-encoding buffer. Archive i goes to worker i mod N (a fixed assignment keeps the order deterministic
and the queues bounded). Measured in benchmarks/results/convert_seed.md.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import google_crc32c
import numpy as np

from ..errors import (
    DuplicateIdError,
    IncompleteStoreError,
    InputFormatError,
    ShapeMismatchError,
    StoreExistsError,
    TracestoreError,
    WorkerCrashedError,
)
from ..format import schema
from ..format.cast import OnOverflow
from ..format.report import Float16Report
from ..progress import LineProgress
from ..store.destination import (
    DestinationLock,
    foreign_message,
    inspect_destination,
    settle_destination,
    writable_location,
)
from ..store.urls import Location, resolve
from ..store.writer import StoreWriter, create
from ..threads import import_torch_in_background, one_intraop_thread
from .archives import OpenArchive, Source, default_max_bytes, find_sources
from .attention import DEFAULT_RECIPE, GraphRecipe
from .records import TOKEN_MODES, CastBlock, Options, Pool, ReadOptions, TokensMode, cast_blocks
from .samples import Sample
from .scores import ScoreTable, read_scores
from .verify import compare_samples, verify_all_task

Verify = Literal["sample", "all", "none"]


#: Archives whose traces the default (sample) verification keeps, and traces kept per archive.
_SAMPLE_ARCHIVES = 16
_SAMPLES_PER_ARCHIVE = 4


def _convert_messages(source: Source, opts: Options, samples: int) -> Iterator[tuple[str, Any]]:
    """Worker: read, validate and cast one archive, a record at a time where it is a list of records:
    ("block", CastBlock)..., then ("done", info)."""
    with OpenArchive(source, max_bytes=opts.max_bytes) as arch:
        yield from (("block", b) for b in cast_blocks(arch.content, source.name, opts.read,
                                                      on_overflow=opts.on_overflow, allow_nan=opts.allow_nan,
                                                      samples=samples))
        info = arch.finish()
    yield "done", info


def _verify_messages(item: tuple[Source, int, int, list[str]], opts: Options, url: str) -> Iterator[tuple[str, Any]]:
    yield "done", verify_all_task(item, opts, url)


def _watch_parent(parent: Any) -> None:
    """Exit as soon as the main process is gone (killed: kill -9 runs no clean-up), wherever this worker is:
    inflating an archive, or a queue's feeder thread blocked on a pipe nobody reads."""
    while parent.is_alive():
        time.sleep(1.0)
    os._exit(1)


def _worker_main(fn: Callable[..., Iterator[tuple[str, Any]]], items: list[tuple[int, Any]], args: tuple[Any, ...],
                 q: Any) -> None:
    """A worker process: run fn over its items in order, sending (index, message) to the main process."""
    # one thread per worker: the parallelism is the processes
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # torch (the fast float16 cast) takes a second or two to import: in a thread, while the first archive is
    # read; whatever needs torch waits for it (threads.import_torch), as a second import at once can fail
    import_torch_in_background()
    parent = multiprocessing.parent_process()
    if parent is not None:
        # not q.cancel_join_thread(): a worker that ends normally must flush its last messages; the watch
        # covers the other case, a main process that is gone
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="watch-parent").start()
    for i, item in items:
        try:
            for msg in fn(item, *args):
                _put(q, (i, msg), parent)
        except BaseException as e:  # noqa: B036 - everything goes back to the main process, which decides
            _put(q, (i, ("error", _portable(e))), parent)
            return


def _put(q: Any, obj: Any, parent: Any) -> None:
    while True:
        try:
            q.put(obj, timeout=1.0)
            return
        except queue.Full:
            if parent is not None and not parent.is_alive():
                os._exit(1)  # the main process is gone (killed): stop instead of waiting forever


def _portable(e: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a RuntimeError with its traceback."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError("".join(traceback.format_exception(e)))


class _Workers:
    """Runs fn(item, *args) -> messages for each item on N worker processes (inline for N=0) and gives the
    messages of item i in order via messages(i). Item i runs on worker i mod N; each worker's queue holds
    at most a few messages, so a worker that runs ahead waits instead of filling memory."""

    #: blocks in flight per worker: 4 keep the writer fed (measured: no slower than 16 on a seed archive) and
    #: bound what waits between processes to 4 blocks (~4 x 20 MiB at Llama-2-7B shape)
    QUEUE_MESSAGES = 4

    def __init__(self, workers: int, fn: Callable[..., Iterator[tuple[str, Any]]], items: Sequence[Any],
                 *args: Any) -> None:
        self.n = workers
        self.fn, self.items, self.args = fn, list(items), args
        self.procs: list[Any] = []
        self.queues: list[Any] = []
        if workers > 0 and self.items:
            # spawn, not fork: the main process runs zarr's threads, and fork with threads can deadlock
            ctx = multiprocessing.get_context("spawn")
            for w in range(min(workers, len(self.items))):
                q = ctx.Queue(maxsize=self.QUEUE_MESSAGES)
                mine = [(i, it) for i, it in enumerate(self.items) if i % workers == w]
                p = ctx.Process(target=_worker_main, args=(fn, mine, args, q), daemon=True,
                                name=f"tracestore-convert-{w}")
                p.start()
                self.procs.append(p)
                self.queues.append(q)

    def messages(self, i: int) -> Iterator[tuple[str, Any]]:
        if not self.procs:
            # in this process: torch's casts and widenings run from this thread, one intra-op thread each
            # (src/tracestore/threads.py), as the worker processes run them
            it = self.fn(self.items[i], *self.args)
            while True:
                with one_intraop_thread():
                    msg = next(it, None)
                if msg is None:
                    return
                yield msg
        w = i % self.n
        q, p = self.queues[w], self.procs[w]
        while True:
            try:
                j, msg = q.get(timeout=1.0)
            except queue.Empty:
                if not p.is_alive():
                    name = getattr(self.items[i], "name", None) or getattr(self.items[i][0], "name", "?")
                    raise WorkerCrashedError(
                        f"{name}: the worker process reading it died (exit code {p.exitcode}); it may have run out "
                        f"of memory: rerun with fewer --workers (the conversion resumes where it stopped)") from None
                continue
            if j != i:  # cannot happen: a worker sends its items in order
                raise RuntimeError(f"worker {w} sent item {j} while item {i} was expected")
            if msg[0] == "error":
                raise msg[1]
            yield msg
            if msg[0] == "done":
                return

    def close(self, *, failed: bool) -> None:
        for p in self.procs:
            if failed and p.is_alive():
                p.terminate()  # an error ends the run now, not after the archives in flight
            p.join(timeout=None if not failed else 10)
        for q in self.queues:
            q.close()
            q.cancel_join_thread()

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(failed=exc_type is not None)


@dataclass
class ConvertResult:
    """What a conversion did; `summary()` is what the command line prints at the end."""

    url: str
    num_traces: int
    num_layers: int
    hidden_size: int
    has_graphs: bool
    num_sources: int
    resumed_sources: int
    bytes_in: int
    bytes_decompressed: int
    bytes_out: int
    seconds: float
    reports: dict[str, Float16Report]
    scores_file: str | None = None
    missing_scores: int = 0
    unused_scores: list[str] = field(default_factory=list)
    #: archive scores the CSV replaced, and how many of those it changed
    replaced_scores: int = 0
    overridden_scores: int = 0
    verified: str = "none"
    pool: str | None = None
    tokens: dict[str, bool] | None = None
    num_tokens: int = 0
    num_edges: int = 0
    graph_recipe: dict[str, Any] | None = None
    fields: dict[str, str] = field(default_factory=dict)
    ignored_keys: dict[str, str] = field(default_factory=dict)
    #: options given that had nothing to act on (said in the summary)
    notes: list[str] = field(default_factory=list)
    #: DEST already held this conversion (same sources by checksum, same options): nothing was written
    up_to_date: bool = False

    def summary(self) -> str:
        if self.up_to_date:
            return (f"{self.url} is up to date ({self.num_traces} traces from {self.num_sources} archives): it was "
                    f"converted from these archives (checked by their crc32c: each was read once) with these "
                    f"options; nothing was written")
        ratio = self.bytes_out / self.bytes_in if self.bytes_in else float("nan")
        lines = [
            f"converted {self.num_sources} archive(s) ({self.resumed_sources} done by an earlier run) into {self.url}",
            f"  traces {self.num_traces}, layers {self.num_layers}, hidden size {self.hidden_size}"
            f"{', with graphs' if self.has_graphs else ''}",
            f"  bytes in {_fmt_bytes(self.bytes_in)} ({_fmt_bytes(self.bytes_decompressed)} decompressed this run), "
            f"out {_fmt_bytes(self.bytes_out)}, out/in {ratio:.3f}",
            f"  time {self.seconds:.1f} s"
            + (f", {self.bytes_in / self.seconds / 1e6:.0f} MB/s of archives" if self.seconds > 0 else ""),
        ]
        lines += describe_contents(self.pool, self.tokens, self.num_tokens, self.graph_recipe, self.num_edges,
                                   self.fields)
        if self.ignored_keys:
            lines.append("  ignored record keys (not a str/int/float/bool field): "
                         + ", ".join(f"{k} ({v})" for k, v in sorted(self.ignored_keys.items())[:8]))
        for name, rep in self.reports.items():
            lines.append(f"  {name}: {rep.summary()}")
            if rep.values and rep.max_rel_error.max(initial=0) > 0:
                worst = int(np.argmax(rep.max_rel_error))
                lines.append(f"    worst layer {worst}: max |x| {rep.max_abs[worst]:.6g}, max rel error "
                             f"{rep.max_rel_error[worst]:.3g}")
        if self.scores_file is not None:
            lines.append(f"  scores from {self.scores_file}: {self.num_traces - self.missing_scores} traces scored, "
                         f"{self.missing_scores} without a score (NaN), {len(self.unused_scores)} scores without a "
                         f"trace{' e.g. ' + ', '.join(map(repr, self.unused_scores[:5])) if self.unused_scores else ''}"
                         + (f", {self.replaced_scores} archive scores replaced by the file's "
                            f"({self.overridden_scores} of them different)" if self.replaced_scores else ""))
        else:
            lines.append(f"  scores: {self.num_traces - self.missing_scores} from the archives, {self.missing_scores} "
                         f"missing (NaN)")
        lines.append(f"  verified: {self.verified}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _up_to_date_result(loc: Location, num_sources: int, bytes_in: int, t0: float) -> ConvertResult:
    from ..store.reader import open as open_store

    store = open_store(loc)
    info = store.info()
    return ConvertResult(
        url=loc.url, num_traces=len(store), num_layers=store.num_layers, hidden_size=store.hidden_size,
        has_graphs=store.has_graphs, num_sources=num_sources, resumed_sources=num_sources, bytes_in=bytes_in,
        bytes_decompressed=0, bytes_out=loc.total_bytes(), seconds=time.perf_counter() - t0, reports=store.report,
        pool=store.pool, tokens=info["tokens"], num_tokens=int(info.get("num_tokens", 0)),
        num_edges=int(info.get("num_edges", 0)), graph_recipe=store.graph_recipe, fields=info["fields"],
        up_to_date=True)


def describe_contents(pool: str | None, tokens: dict[str, bool] | None, num_tokens: int,
                      recipe: dict[str, Any] | None, num_edges: int, fields: dict[str, str]) -> list[str]:
    """Lines saying how the sequences were made, which per-token data is kept, how the graphs were built
    and which fields there are (the converter's summary and `tracestore info`)."""
    from .attention import GraphRecipe

    lines = [f"  sequences: {'pooled from the tokens: ' + pool + (' token' if pool == 'last' else '') if pool else 'per-layer vectors as given'}"]
    if tokens is not None:
        kept = [name for part, name in (("hidden", "hidden states"), ("ids", "token ids"), ("text", "text"))
                if tokens.get(part)]
        lines.append(f"  tokens: {num_tokens} ({', '.join(kept) if kept else 'no per-token data kept'})")
    else:
        lines.append("  tokens: none kept")
    if recipe is not None:
        if recipe.get("name") == "given":
            how = "as given in the archives"
        else:
            try:
                how = GraphRecipe.from_attrs(recipe).describe()
            except (ValueError, KeyError, TypeError):
                how = json.dumps(recipe)
        lines.append(f"  graphs: {num_edges} edges, {how}")
    else:
        lines.append("  graphs: none")
    if fields:
        lines.append("  fields: " + ", ".join(f"{k} ({v})" for k, v in fields.items()))
    return lines


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


def _dest_state(loc: Location, overwrite: bool) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """Check DEST before any work (with its lock held): what it holds (inspect_destination's kind), its
    attributes, and the staging state of an unfinished store to resume (None with --overwrite, which starts
    over). What tracestore did not write is refused, with or without --overwrite."""
    kind, attrs, raw_state = inspect_destination(loc)
    if kind == "foreign":
        raise StoreExistsError(foreign_message(loc))
    if overwrite or kind != "unfinished" or raw_state is None:
        return kind, attrs, None
    return kind, attrs, json.loads(raw_state)


def _file_crc32c(path: str) -> str:
    """The crc32c of a whole file, as the readers record it in the provenance."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = google_crc32c.extend(crc, block)
    return f"{crc:08x}"


def _why_not_up_to_date(attrs: dict[str, Any], srcs: list[Source], fp: str, model_name: str | None) -> str | None:
    """None where the committed store at DEST is what this conversion would write: its provenance records
    the same options (the fingerprint) and the same sources, by name, size and checksum (each archive is read
    once to check it); else what differs."""
    prov = attrs.get(schema.ATTR_PROVENANCE) or {}
    if not isinstance(prov, dict) or prov.get("tool") != "tracestore convert" or "fingerprint" not in prov:
        return "it was not written by a tracestore convert that records its options"
    if prov["fingerprint"] != fp or attrs.get(schema.ATTR_MODEL_NAME) != model_name:
        return "it was converted from other archives, scores or options"
    recorded = prov.get("sources") or []
    if [(r.get("name"), r.get("bytes")) for r in recorded] != [(s.name, s.size) for s in srcs]:
        return "it was converted from other archives"
    for r, s in zip(recorded, srcs, strict=True):
        if r.get("crc32c") != _file_crc32c(s.path):
            return f"{s.name} has changed since (its crc32c differs from the one recorded)"
    return None


def _fingerprint(sources: list[Source], opts: Options, table: ScoreTable | None, shard_bytes: int | None,
                 graphs: bool | None) -> str:
    """Everything that decides the store's content except the sources already done (checked one by one)."""
    r = opts.read
    d = {"sources": [s.name for s in sources], "pool": r.pool, "tokens": r.tokens, "keep_graphs": r.keep_graphs,
         "recipe": r.recipe.to_attrs(), "graphs": graphs, "on_overflow": opts.on_overflow,
         "allow_nan": opts.allow_nan, "shard_bytes": shard_bytes,
         "scores": None if table is None else [table.sha256, table.id_column, table.score_column]}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


class _Progress:
    """A tqdm bar over archive bytes (MB/s) with archives and traces done as its postfix, on a terminal;
    elsewhere (a log, CI) one line per archive done and one at the end (tracestore.progress)."""

    def __init__(self, enabled: bool, total_bytes: int, num_sources: int,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        self.bar: Any = None
        self.on_bytes = on_bytes
        self.n_sources = num_sources
        if enabled:
            from ..progress import bar

            self.bar = bar(total_bytes, "convert", "B", unit_scale=True, unit_divisor=1000)
        self.lines = isinstance(self.bar, LineProgress)

    def update(self, nbytes: int, done: int, traces: int) -> None:
        if nbytes and self.on_bytes is not None:
            self.on_bytes(nbytes)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{done}/{self.n_sources} archives, {traces} traces", refresh=False)
            self.bar.update(nbytes)

    def archive_done(self, name: str, done: int, traces: int) -> None:
        if self.bar is not None and self.lines:
            self.bar.note(f"{name} done ({done}/{self.n_sources} archives, {traces} traces)")

    def close(self, *, failed: bool = False) -> None:
        if self.bar is not None:
            if failed:
                self.bar.leave = False  # erase it: the error line is what the user must see
            self.bar.close()


def convert(sources: Sequence[str | os.PathLike[str]], dest: str | os.PathLike[str] | Location, *,
            scores: str | os.PathLike[str] | None = None, id_column: str | None = None,
            score_column: str | None = None, pool: Pool | None = None, tokens: TokensMode = "all",
            workers: int = 1, overwrite: bool = False, on_overflow: OnOverflow = "error", allow_nan: bool = False,
            verify: Verify = "sample", graphs: bool | None = None, graph_recipe: GraphRecipe = DEFAULT_RECIPE,
            model_name: str | None = None, shard_bytes: int | None = None, max_archive_bytes: int | None = None,
            progress: bool = False, log: Callable[[str], None] | None = None,
            on_bytes: Callable[[int], None] | None = None) -> ConvertResult:
    """Convert archives (files, directories, globs of .pkl/.pkl.gz/.pt) into one store at `dest`.

    Parameters
    ----------
    sources: archives; they are taken in sorted path order, whatever the order given.
    dest: the store to create. An unfinished store left by a killed run with the same arguments is resumed.
        A committed store converted from the same archives (by their recorded crc32c: each is read once to
        check) with the same options is up to date: nothing is written (`ConvertResult.up_to_date`); any
        other committed store is left untouched unless `overwrite`. One conversion at a time per `dest`:
        another one raises StoreLockedError at once, naming it. What tracestore did not write (other files,
        a foreign zarr store) is never replaced.
    overwrite: start over, and replace what `dest` holds (committed or unfinished) once the new store is
        committed: it is built beside `dest` and swapped in, so a failed or killed run leaves `dest` as it was.
    scores: a CSV of ground-truth scores joined by id (`id_column` / `score_column` pick columns); its
        scores replace those in the archives (their `score`, or the `labels` of .pt files), per id; traces
        without one get NaN and are counted.
    pool: 'last' (default: the last token of prompt + answer, the seed pipeline's LSTM input) or 'mean': how
        per-token states become the per-layer vectors of `sequences`. Recorded in the store.
    tokens: which per-token data to keep where the archives carry it: 'all' (hidden states, token ids,
        decoded text), 'ids' (ids and text, no hidden states: graphs then have no node features) or 'none'.
    workers: processes that read, validate and cast archives in parallel (0: in this process). The output
        is the same whatever the number. They are started with multiprocessing's "spawn": a script that
        calls convert() with workers >= 1 must do so under `if __name__ == "__main__":`.
    on_overflow: 'error' (|x| > 65504 stops the conversion, naming file, trace, layer and value) or 'clip'.
    allow_nan: store NaN values (counted in the report) instead of stopping.
    verify: after committing, reopen and compare with the sources: 'sample' (a few traces per archive and
        every id and score), 'all' (every trace: reads the archives again) or 'none'.
    graphs: keep the archives' graphs (None: when the archives have graphs, or attention matrices to build
        them from; False: none).
    graph_recipe: how graphs are built from attention matrices (convert/attention.py; default the seed's
        v1: head mean, an edge j -> i for every j <= i). Graphs given in the archives are kept as given.
    max_archive_bytes: cap on the decompressed size of one record of a pickled list of records (of the whole
        archive for any other layout), against decompression bombs (default: half the machine's memory).
    progress: show a tqdm bar on stderr. log: where to send progress lines (default: nowhere).
    on_bytes: called with each increment of archive bytes done (a part writer on a cluster feeds the client's
        bar with it: store/parts.py).

    Returns a ConvertResult (`.summary()` is a printable report). Raises a TracestoreError naming the file,
    trace, problem and fix for bad input; nothing is committed then.
    """
    t0 = time.perf_counter()
    say = log or (lambda _s: None)
    if verify not in ("sample", "all", "none"):
        raise ValueError(f"verify must be 'sample', 'all' or 'none', got {verify!r}")
    if pool not in (None, "mean", "last"):
        raise ValueError(f"pool must be 'mean' or 'last', got {pool!r}")
    if tokens not in TOKEN_MODES:
        raise ValueError(f"tokens must be one of {', '.join(TOKEN_MODES)}, got {tokens!r}")
    graph_recipe.validate()
    if on_overflow not in ("error", "clip"):
        raise ValueError(f"on_overflow must be 'error' or 'clip', got {on_overflow!r}")
    if workers < 0:
        raise ValueError(f"workers must be 0 (in this process) or more, got {workers}")
    srcs = find_sources(list(sources))
    table = read_scores(scores, id_column=id_column, score_column=score_column) if scores is not None else None
    loc = writable_location(resolve(dest if isinstance(dest, Location) else os.fspath(dest)))  # a symlink: its target
    read = ReadOptions(pool=pool, tokens=tokens, keep_graphs=graphs is not False, recipe=graph_recipe)
    opts = Options(read=read, on_overflow=on_overflow, allow_nan=allow_nan,
                   max_bytes=int(max_archive_bytes or default_max_bytes()))
    fp = _fingerprint(srcs, opts, table, shard_bytes, graphs)

    # one converter at a time on DEST: the lock is taken before DEST is looked at, and kept until the store
    # is committed and checked (the worker processes never touch it)
    lock = DestinationLock.acquire(loc)
    try:
        settle_destination(loc)  # a swap that a killed --overwrite left half done
        return _convert_locked(loc, lock, srcs, table, opts, fp, overwrite=overwrite, verify=verify,
                               workers=workers, shard_bytes=shard_bytes, model_name=model_name, pool=pool,
                               tokens=tokens, on_overflow=on_overflow, allow_nan=allow_nan, graphs=graphs,
                               graph_recipe=graph_recipe, progress=progress, say=say, t0=t0, on_bytes=on_bytes)
    finally:
        lock.release()


def _convert_locked(loc: Location, lock: DestinationLock, srcs: list[Source], table: ScoreTable | None,
                    opts: Options, fp: str, *, overwrite: bool, verify: Verify, workers: int,
                    shard_bytes: int | None, model_name: str | None, pool: Pool | None, tokens: TokensMode,
                    on_overflow: OnOverflow, allow_nan: bool, graphs: bool | None, graph_recipe: GraphRecipe,
                    progress: bool, say: Callable[[str], None], t0: float,
                    on_bytes: Callable[[int], None] | None = None) -> ConvertResult:
    # -- up to date, resume or start ----------------------------------------------------------------------
    kind, attrs, staging = _dest_state(loc, overwrite)
    if kind == "committed" and not overwrite:
        say(f"{loc.url} holds a store: checking whether it is up to date (reads each archive once for its crc32c)")
        why = _why_not_up_to_date(attrs, srcs, fp, model_name)
        if why is not None:
            raise StoreExistsError(f"{loc.url} already holds a store ({attrs.get(schema.ATTR_NUM_TRACES)} traces) "
                                   f"and {why}; it is left untouched: pass --overwrite to replace it, or choose "
                                   f"another destination")
        if loc.exists(schema.STAGING_STATE_KEY):  # a kill between the commit marker and the clean-up
            loc.delete(schema.STAGING_PREFIX.rstrip("/"))
        return _up_to_date_result(loc, len(srcs), sum(s.size for s in srcs), t0)
    user: dict[str, Any] = (staging or {}).get("user_state") or {}
    done: list[dict[str, Any]] = []
    ignored: dict[str, str] = {}
    writer: StoreWriter | None = None
    layout: dict[str, Any] | None = None
    if staging is not None:
        prev = user.get("done", [])
        resumable = user.get("fingerprint") == fp and len(prev) <= len(srcs) and all(
            d["key"] == s.key() for d, s in zip(prev, srcs, strict=False))
        if resumable and prev:
            # name, size and mtime can stay while the bytes change (a copy, an edit that keeps the size):
            # the crc32c recorded when each archive was converted decides
            say(f"{loc.url}: checking the {len(prev)} archives an earlier run converted (reads each once for its "
                f"crc32c)")
            changed = next((s.name for d, s in zip(prev, srcs, strict=False)
                            if d.get("crc32c") != _file_crc32c(s.path)), None)
            if changed is not None:
                raise IncompleteStoreError(
                    f"{loc.url} holds an unfinished conversion, but {changed} has changed since it was converted "
                    f"(its crc32c differs from the one recorded); pass --overwrite to start over")
        if resumable and user.get("layout"):
            layout = user["layout"]
            done = list(prev)
            writer = create(loc, **_writer_args(layout, opts, shard_bytes, model_name), resume=True, lock=lock)
            ignored = dict(user.get("ignored", {}))
            say(f"resuming {loc.url}: {len(done)} of {len(srcs)} archives were done ({writer.num_traces} traces)")
        elif not overwrite and (user.get("fingerprint") is not None or staging.get("num_traces", 0)):
            raise IncompleteStoreError(
                f"{loc.url} holds an unfinished conversion of other inputs or options; rerun it with the same "
                f"arguments to resume it, or pass --overwrite to start over")
    n_resumed = len(done)
    run = _Run(loc=loc, lock=lock, opts=opts, table=table, verify=verify, shard_bytes=shard_bytes,
               model_name=model_name, fp=fp, writer=writer, layout=layout, done=done, n_sources=len(srcs),
               first_name=done[0]["name"] if done else None,
               create_overwrite=overwrite or kind == "unfinished", ignored=ignored if done else {})
    run.sample_every = max(1, -(-len(srcs) // _SAMPLE_ARCHIVES))
    bytes_in = sum(d["bytes"] for d in done)
    bar = _Progress(progress, sum(s.size for s in srcs), len(srcs), on_bytes)
    bar.update(bytes_in, len(done), run.num_traces)
    todo = srcs[len(done):]
    try:
        n_samples = _SAMPLES_PER_ARCHIVE if verify == "sample" else 0
        with _Workers(workers, _convert_messages, todo, opts, n_samples) as pool_:
            for i, src in enumerate(todo):
                last = i == len(todo) - 1
                for kind, payload in pool_.messages(i):
                    if kind == "block":
                        run.add_block(src, payload)
                        bar.update(0, len(done), run.num_traces)
                    else:
                        run.finish_source(src, payload, checkpoint=not last)
                        bar.update(src.size, len(done), run.num_traces)
                        bar.archive_done(src.name, len(done), run.num_traces)
        if run.writer is None:
            raise InputFormatError(f"{', '.join(s.name for s in srcs[:3])}{'...' if len(srcs) > 3 else ''}: the "
                                   f"archives hold no traces; nothing to convert")
        run.writer.provenance = {
            "tool": "tracestore convert",
            # the options and sources that decide the content: a rerun with the same ones is up to date
            "fingerprint": fp,
            "sources": [{"name": d["name"], "bytes": d["bytes"], "crc32c": d["crc32c"], "traces": d["traces"],
                         "scores_from": d.get("scores_from")} for d in done],
            # traces whose score is an archive's 0/1 label (1 = hallucination), not a score: `train` warns
            # against reading them with --positive-below
            "label_scores": sum(int(d.get("label_scores", 0)) for d in done),
            "scores": None if table is None else {"name": table.name, "sha256": table.sha256,
                                                  "id_column": table.id_column, "score_column": table.score_column},
            # the options as given; what they did is in the store's own attributes (pool, tokens, graph_recipe)
            "options": {"pool": pool, "tokens": tokens, "on_overflow": on_overflow, "allow_nan": allow_nan,
                        "graphs": graphs, "graph_recipe": graph_recipe.to_attrs()},
        }
        run.writer.close()
    except BaseException:
        bar.close(failed=True)
        if run.writer is not None:
            run.writer.abort()
        raise
    bar.close()

    # -- check the output ---------------------------------------------------------------------------------
    from ..store.reader import open as open_store

    store = open_store(loc)
    verified = "none"
    if verify != "none":
        verified = compare_samples(store, run.expected, run.samples, done)
        if verify == "all":
            say("verifying every trace against its archive")
            parts = [p for p in ("hidden", "ids", "text") if (store.info()["tokens"] or {}).get(p)]
            items = [(s, int(d["offset"]), int(d["traces"]), parts) for s, d in zip(srcs, done, strict=True)]
            n = 0
            with _Workers(workers, _verify_messages, items, opts, loc.url) as pool_:
                for i in range(len(items)):
                    for _kind, checked in pool_.messages(i):
                        n += checked
            verified = f"all {n} traces equal their source after float16 rounding; ids and scores checked"
    missing = int(np.isnan(store.scores).sum())
    info = store.info()
    notes = []
    if graph_recipe != DEFAULT_RECIPE and (store.graph_recipe or {}).get("name") != graph_recipe.name:
        notes.append("the graph recipe options were not used: "
                     + ("the archives' graphs are kept as given" if store.has_graphs else "the archives have no "
                        "attention matrices to build graphs from"))
    if pool is not None and store.pool is None:
        notes.append(f"--pool {pool} was not used: the archives give per-layer vectors, kept as given")
    unused: list[str] = []
    if table is not None:
        table.used = set(map(str, store.ids))
        unused = table.unused()
    return ConvertResult(
        url=loc.url, num_traces=len(store), num_layers=store.num_layers, hidden_size=store.hidden_size,
        has_graphs=store.has_graphs, num_sources=len(srcs), resumed_sources=n_resumed,
        bytes_in=sum(s.size for s in srcs), bytes_decompressed=run.bytes_decompressed, bytes_out=loc.total_bytes(),
        seconds=time.perf_counter() - t0, reports=store.report, scores_file=table.name if table else None,
        missing_scores=missing, unused_scores=unused, replaced_scores=run.replaced, overridden_scores=run.overridden,
        verified=verified, pool=store.pool, tokens=info["tokens"], num_tokens=int(info.get("num_tokens", 0)),
        num_edges=int(info.get("num_edges", 0)), graph_recipe=store.graph_recipe, fields=info["fields"],
        ignored_keys=run.ignored, notes=notes)


@dataclass
class _Run:
    """The main process's side of a conversion: the writer, the manifest and what the checks need."""

    loc: Location
    lock: DestinationLock
    opts: Options
    table: ScoreTable | None
    verify: Verify
    shard_bytes: int | None
    model_name: str | None
    fp: str
    writer: StoreWriter | None
    layout: dict[str, Any] | None
    done: list[dict[str, Any]]
    n_sources: int
    first_name: str | None
    create_overwrite: bool
    ignored: dict[str, str] = field(default_factory=dict)
    sample_every: int = 1
    replaced: int = 0
    overridden: int = 0
    source_label_scores: int = 0  # traces of the current archive whose score is its 0/1 label
    source_score_key: str | None = None
    bytes_decompressed: int = 0
    seen: dict[str, str] = field(default_factory=dict)  # id -> archive, for this run's archives
    source_start: int | None = None  # the writer's trace count when the current archive began
    source_ids: list[str] = field(default_factory=list)
    source_scores: list[np.ndarray] = field(default_factory=list)
    expected: list[tuple[Source, int, list[str], np.ndarray]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    @property
    def num_traces(self) -> int:
        return self.writer.num_traces if self.writer is not None else 0

    def add_block(self, src: Source, blk: CastBlock) -> None:
        if self.writer is None:
            self.layout = dict(blk.layout)
            self.writer = create(self.loc, **_writer_args(self.layout, self.opts, self.shard_bytes, self.model_name),
                                 overwrite=self.create_overwrite, lock=self.lock)
            self.first_name = src.name
        assert self.layout is not None
        _check_layout(src, blk, self.layout, self.first_name or "")
        if self.source_start is None:
            self.source_start = self.writer.num_traces
        scores, n_rep, n_over = _join_scores(blk, self.table)
        self.replaced += n_rep
        self.overridden += n_over
        if blk.score_key == "labels":  # 0/1 labels (1 = hallucination) that no CSV score replaced
            joined = set(self.table.scores) if self.table is not None else set()
            self.source_label_scores += sum(1 for i, tid in enumerate(blk.ids)
                                            if tid not in joined and not np.isnan(blk.scores[i]))
        if blk.score_key is not None:
            self.source_score_key = blk.score_key
        for tid in blk.ids:
            prev = self.seen.get(tid)
            if prev is not None:
                raise DuplicateIdError(f"{src.name}: trace {tid!r} is also in {prev}; ids must be unique across "
                                       f"archives: rename or drop one of them")
            self.seen[tid] = src.name
        try:
            self.writer.append(blk.ids, blk.sequences, scores, graphs=blk.graphs, tokens=blk.tokens, fields=blk.fields,
                               reports=blk.reports)
        except DuplicateIdError as e:
            raise DuplicateIdError(f"{src.name}: {e} (the id is in an archive converted before the resume); ids must "
                                   f"be unique across archives") from None
        except TracestoreError as e:
            # the archive names the place better than the store the writer writes to
            msg = str(e).removeprefix(f"{self.loc.url}: ")
            raise type(e)(f"{src.name}: {msg}") from None
        self.ignored.update({k: v for k, v in blk.ignored.items() if k not in self.ignored})
        if self.verify == "sample":
            self.source_ids.extend(blk.ids)
            self.source_scores.append(scores)
            if len(self.done) % self.sample_every == 0:
                for pos, sample in blk.samples.items():
                    sample.row = self.source_start + pos
                    self.samples.append(sample)

    def finish_source(self, src: Source, info: dict[str, Any], *, checkpoint: bool) -> None:
        start = self.source_start if self.source_start is not None else self.num_traces
        n = self.num_traces - start
        self.done.append({"key": src.key(), "name": src.name, "bytes": src.size, "crc32c": info["crc32c"],
                          "traces": n, "offset": start, "scores_from": self.source_score_key,
                          "label_scores": self.source_label_scores})
        self.bytes_decompressed += int(info["decompressed_bytes"])
        if self.verify == "sample" and n:
            self.expected.append((src, start, self.source_ids,
                                  np.concatenate(self.source_scores) if self.source_scores else np.empty(0, np.float32)))
        self.source_start, self.source_ids, self.source_scores = None, [], []
        self.source_score_key, self.source_label_scores = None, 0
        # the last archive needs no checkpoint: close() follows, and a kill before it redoes one archive
        if self.writer is not None and checkpoint:
            self.writer.checkpoint({"tool": "tracestore convert", "fingerprint": self.fp, "layout": self.layout,
                                    "done": self.done, "ignored": self.ignored})


def _writer_args(layout: dict[str, Any], opts: Options, shard_bytes: int | None,
                 model_name: str | None) -> dict[str, Any]:
    return {"num_layers": layout["num_layers"], "hidden_size": layout["hidden_size"], "graphs": layout["graphs"],
            "edge_attr_size": layout["edge_attr_size"], "tokens": list(layout["tokens"]), "pool": layout["pool"],
            "graph_recipe": layout["graph_recipe"], "on_overflow": opts.on_overflow, "allow_nan": opts.allow_nan,
            "shard_bytes": shard_bytes, "model_name": model_name}


_LAYOUT_WORDS = {"tokens": "per-token data", "pool": "pooling", "graph_recipe": "graph recipe"}


def _check_layout(src: Source, cast: CastBlock, layout: dict[str, Any], first: str) -> None:
    L, D = layout["num_layers"], layout["hidden_size"]
    tid = cast.ids[0]
    if (cast.num_layers, cast.hidden_size) != (L, D):
        raise ShapeMismatchError(f"{src.name}: trace {tid!r}: per-layer vectors have shape "
                                 f"({cast.num_layers}, {cast.hidden_size}); expected ({L}, {D}) like the earlier "
                                 f"archives (from {first}); convert archives of different models into separate stores")
    got = cast.layout
    has = got["graphs"]
    if has != layout["graphs"]:
        raise InputFormatError(f"{src.name}: trace {tid!r}: the records {'have' if has else 'have no'} graphs (or "
                               f"attentions) but those of {first} {'have none' if has else 'have them'}; every archive "
                               f"must have graphs or none: pass --no-graphs to keep only the per-layer vectors")
    if has and got["edge_attr_size"] != layout["edge_attr_size"]:
        raise ShapeMismatchError(f"{src.name}: trace {tid!r}: graphs have {got['edge_attr_size']} attention values "
                                 f"per edge; expected {layout['edge_attr_size']} like {first}")
    for key, words in _LAYOUT_WORDS.items():
        if got[key] != layout[key]:
            raise InputFormatError(f"{src.name}: trace {tid!r}: its {words} is {got[key]!r} but that of {first} is "
                                   f"{layout[key]!r}; every archive of a store must carry the same kinds of data "
                                   f"(per-token states, token ids and text, graphs or attentions): convert "
                                   f"different kinds into separate stores")


def _join_scores(cast: CastBlock, table: ScoreTable | None) -> tuple[np.ndarray, int, int]:
    """The archive's scores with the CSV's in their place where it has one; how many archive scores it
    replaced, and how many of those with a different value."""
    if table is None:
        return cast.scores, 0, 0
    out = cast.scores.copy()
    replaced = overridden = 0
    for i, tid in enumerate(cast.ids):
        v = table.scores.get(tid)
        if v is None:
            continue
        old = out[i]
        if not np.isnan(old):
            replaced += 1
            if not np.isclose(old, v, rtol=0, atol=1e-6):
                overridden += 1
        out[i] = v
    return out, replaced, overridden
