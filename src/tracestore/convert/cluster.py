"""Conversion on a Dask cluster (`tools/convert SRC... -o DEST --dask SCHEDULER`, issue 15): the archives are
grouped into parts, each part is converted by one task on one of the cluster's workers into DEST/parts/NNNNN
(part_writer.py's write_part: a complete store, resumable), and the client commits the manifest last.

The client plans the parts and commits; it holds no trace data (a task returns a PartResult of a few
numbers). Workers read the archives and write DEST themselves, so both must be where every worker sees them
at the same path: a shared file system, or an s3:// URL. A rerun with the same archives and options finds
every committed part up to date (each archive is read once, on a worker, for its crc32c) and resumes an
unfinished one; a worker killed mid-part has its task run again by the scheduler, which resumes the part.

Progress: each task sends its part's archive bytes done as Dask events (Worker.log_event on a topic of this
run; Pub/Sub was removed from distributed in 2025.4) and the client draws one bar from them.

Dask is optional (`pip install 'tracestore[dask]'`): it is imported inside the functions, so that `import
tracestore` does not import it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import config
from ..config import parse_size
from ..errors import (
    ClusterError,
    DuplicateIdError,
    InputFormatError,
    LeaseLostError,
    PartMismatchError,
    RemoteStoreError,
    StoreExistsError,
    StoreLockedError,
    TracestoreError,
    WorkerCrashedError,
)
from ..format import schema
from .archives import Source, duplicate_archives, find_sources
from .pipeline import _fmt_bytes

if TYPE_CHECKING:
    from ..store.parts import CommitResult
    from .part_writer import PartResult

#: Compressed archive bytes per part (2 GB): a part is one task, so this is the unit of work that a killed
#: worker redoes from its last checkpoint and that the cluster balances; thousands of parts would make the
#: commit open thousands of stores, a handful would leave workers idle. A part reaches at least this size
#: (its last archive may take it past), except the last part.
DEFAULT_PART_BYTES = 2 * 10**9

#: Times a task that failed for a reason other than bad input (an object store that kept failing, a lock
#: still held) is run again. A worker that dies is not counted here: the scheduler reruns the tasks it held
#: by itself (up to distributed.scheduler.allowed-failures times, 3 by default).
RETRIES = 2

#: Seconds between two progress events of one task: the scheduler keeps the last 1000 events of a topic.
PROGRESS_SECONDS = 0.5

#: Seconds to wait for a scheduler given by address to answer (--dask-timeout; distributed's own default is
#: 30 s): a scheduler on a reachable host answers in well under a second.
CONNECT_SECONDS = 10.0

#: The errors of a part that are worth a second try (on another worker, or later); other TracestoreErrors
#: are bad input or a refused destination, reported at once.
_RETRIED = (RemoteStoreError, StoreLockedError)


# -- the plan ---------------------------------------------------------------------------------------------------
def _plan(sources: Sequence[str | os.PathLike[str]], part_bytes: int) -> list[list[Source]]:
    if part_bytes <= 0:
        raise ValueError(f"part_bytes must be a positive number of bytes, got {part_bytes}")
    groups: list[list[Source]] = [[]]
    size = 0
    found = find_sources(list(sources))
    for src in found:
        if size >= part_bytes:
            groups.append([])
            size = 0
        groups[-1].append(src)
        size += src.size
    dups = duplicate_archives(found)
    if dups:
        # refused before any conversion: the same traces in two parts would fail the commit (duplicate ids)
        # only after every part was converted
        part_of = {s.path: k for k, g in enumerate(groups) for s in g}
        lines = [f"{b.path} (part {part_of[b.path]}) is {why} as {a.path} (part {part_of[a.path]})"
                 for a, b, why in dups[:5]] + ([f"... and {len(dups) - 5} more"] if len(dups) > 5 else [])
        raise InputFormatError(f"{len(dups)} archive(s) given twice: " + "; ".join(lines) + ". Each archive's "
                               "traces may be converted once: remove the copies from the sources (or move them "
                               "out of the folder), then run the command again")
    return groups


def plan_parts(sources: Sequence[str | os.PathLike[str]], *, part_bytes: int = DEFAULT_PART_BYTES) -> list[list[str]]:
    """Group the archives (files, directories, globs, found as convert() finds them: sorted by path) into
    consecutive parts: each part takes archives in order until their compressed size reaches `part_bytes`
    (default DEFAULT_PART_BYTES, 2 GB), so every archive is in exactly one part, every part has at least one,
    and only the last part may be smaller. The plan depends on the archives and `part_bytes` alone, not on
    the cluster: a rerun on another cluster finds the same parts (and skips those already converted).
    Returns the archives' absolute paths, part by part."""
    return [[s.path for s in group] for group in _plan(sources, part_bytes)]


# -- what a run did ---------------------------------------------------------------------------------------------
@dataclass
class ClusterConvertResult:
    """What convert_on_cluster did: a PartResult per part (in part order) and the commit; `summary()` is
    what the command line prints at the end."""

    url: str
    scheduler: str
    num_workers: int
    num_sources: int
    bytes_in: int
    parts: list[PartResult]
    commit: CommitResult
    seconds: float

    @property
    def num_parts(self) -> int:
        return len(self.parts)

    @property
    def num_traces(self) -> int:
        return int(self.commit.num_traces)

    @property
    def parts_up_to_date(self) -> int:
        """Parts a run before this one had converted already: found up to date, nothing written."""
        return sum(1 for p in self.parts if p.up_to_date)

    @property
    def up_to_date(self) -> bool:
        return self.parts_up_to_date == self.num_parts and not self.commit.added

    def summary(self) -> str:
        on = f"on {self.scheduler} ({self.num_workers} Dask worker{'s' if self.num_workers != 1 else ''})"
        if self.up_to_date:
            return (f"{self.url} is up to date ({self.num_traces} traces in {self.num_parts} part(s) from "
                    f"{self.num_sources} archives): every part was converted from these archives with these "
                    f"options (checked {on} by their crc32c: each was read once); nothing was written")
        written = self.num_parts - self.parts_up_to_date
        rate = f", {_fmt_bytes(self.bytes_in / self.seconds)}/s of archives" if self.seconds > 0 else ""
        return "\n".join([
            f"converted {self.num_sources} archive(s) into {self.num_parts} part(s) of {self.url} {on}: "
            f"{written} written, {self.parts_up_to_date} up to date from an earlier run",
            f"  traces {self.num_traces}, archives {_fmt_bytes(self.bytes_in)}, time {self.seconds:.1f} s{rate}",
            f"  {self.commit.summary()}",
            f"  each part's own report: tracestore info {self.url}/{schema.PARTS_DIR}/NNNNN",
        ])


# -- the destination --------------------------------------------------------------------------------------------
def _only_parts(loc: Any) -> bool:
    """Whether everything at `loc` belongs to parts of a store (their directories, locks and staging), so that
    a cluster conversion may go on there; a folder with anything else in it is not tracestore's to write."""
    import re

    # two LISTs (the top, then parts/), not a LIST of every object of every part
    if loc.list_dir() != [schema.PARTS_DIR]:
        return False
    own = re.compile(rf"^{schema.PARTS_DIR}/\d{{5}}(\.tracestore-[a-z]+)?$")
    entries = loc.list_dir(schema.PARTS_DIR)
    return bool(entries) and all(own.match(k) for k in entries)


def _check_destination(dest: str, storage_options: dict[str, Any] | None, groups: list[list[Source]]) -> str:
    """Refuse, before any work, a DEST that this conversion cannot add its parts to; return its URL."""
    from ..store.destination import foreign_message, inspect_destination, writable_location
    from ..store.parts import _refuse_a_part, listed_parts, part_path
    from ..store.urls import resolve

    loc = writable_location(resolve(dest, storage_options))
    _refuse_a_part(loc, "convert into")
    kind, attrs, _state = inspect_destination(loc)
    listed: list[str] = []
    if kind == "committed":
        listed = [e["path"] for e in listed_parts(loc.url, attrs, kind)]
        if schema.ROOT_PART in listed:  # a single store (its own traces), or one appended to
            raise StoreExistsError(
                f"{loc.url} already holds a store converted without --dask ({attrs.get(schema.ATTR_NUM_TRACES)} "
                f"traces); --dask writes a new store of parts: add archives to this one with `tracestore append "
                f"{loc.url} SRC...`, or give --dask a new destination")
    elif kind == "unfinished":
        raise StoreExistsError(
            f"{loc.url} holds an unfinished conversion made without --dask; finish it by rerunning that command "
            f"(it resumes), or give --dask a new destination")
    elif kind == "foreign" and not _only_parts(loc):
        raise StoreExistsError(foreign_message(loc))
    # "foreign" holding only parts: the parts of a cluster conversion that stopped before its commit

    # the parts an earlier run committed must be this plan's parts (the same archives, by name and size; their
    # checksums are checked by each part's task): found here, not by tasks that would write parts of
    # another plan beside them
    advice = (f"a part's archives are set by the sorted list of archives and the part size: give the first "
              f"run's archives and --part-size, or give a new destination; to add archives to a committed store "
              f"use `tracestore append {loc.url} SRC...`")
    def recorded(k: int) -> list[tuple[str, int]] | None:
        raw = loc.read_bytes(f"{part_path(k)}/zarr.json")
        if raw is None:
            return None
        part_attrs = json.loads(raw).get("attributes", {}).get(schema.ATTRS_KEY, {})
        if not part_attrs.get(schema.ATTR_COMMITTED):
            return None  # unfinished: its task resumes it, or refuses it if it is another part's
        sources = (part_attrs.get(schema.ATTR_PROVENANCE) or {}).get("sources") or []
        return [(str(r.get("name")), int(r.get("bytes", -1))) for r in sources]

    if len(listed) > len(groups):
        mine_all = [[(s.name, s.size) for s in find_sources([s.path for s in g])] for g in groups]
        if loc.map_parallel(recorded, list(range(len(groups)))) == mine_all:
            # this plan's parts, and more added after them (tracestore append): this conversion is done
            raise StoreExistsError(
                f"{loc.url} holds the {len(groups)} part(s) of these archives, committed, and "
                f"{len(listed) - len(groups)} more added after them (tracestore append); this conversion is done "
                f"and nothing was written: read the store as it is, add more archives with `tracestore append "
                f"{loc.url} SRC...`, or give --dask a new destination to convert these archives again")
        raise StoreExistsError(f"{loc.url} lists {len(listed)} parts, but these archives make {len(groups)}; "
                               f"{advice}")
    for k, found in enumerate(loc.map_parallel(recorded, list(range(len(groups))))):
        if found is None:
            continue
        mine = [(s.name, s.size) for s in find_sources([s.path for s in groups[k]])]  # names as the part has them
        if found != mine:
            raise StoreExistsError(
                f"{loc.url}/{part_path(k)} was converted from other archives ({_names(found)}) than this plan puts "
                f"in it ({_names(mine)}); {advice}")
    return loc.url


def _names(sources: list[tuple[str, int]]) -> str:
    return ", ".join(name for name, _size in sources[:3]) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")


# -- the worker side --------------------------------------------------------------------------------------------
@dataclass
class _PartFailure:
    """A part that failed on bad input: returned, not raised, so that the scheduler does not retry it."""

    part: int
    error: TracestoreError


class _ProgressEvents:
    """write_part's on_bytes on a Dask worker: the archive bytes this attempt has done, sent to the client as
    events on `topic`, at most one per PROGRESS_SECONDS (and the last at flush)."""

    def __init__(self, topic: str, part: int) -> None:
        from distributed import get_worker

        self.worker = get_worker()
        self.topic, self.part = topic, part
        self.done = 0
        self.sent = -1
        self.sent_at = 0.0

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        if time.monotonic() - self.sent_at >= PROGRESS_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.done != self.sent:
            # the total so far, not the increment: a retried part sends from 0 again and the client keeps
            # the largest it saw, so nothing is counted twice
            self.worker.log_event(self.topic, {"part": self.part, "bytes": self.done})
            self.sent, self.sent_at = self.done, time.monotonic()


def _convert_part(sources: list[str], dest: str, part: int, topic: str, storage_options: dict[str, Any] | None,
                  convert_options: dict[str, Any]) -> PartResult | _PartFailure:
    """The task of one part, run on a Dask worker."""
    from .part_writer import write_part

    events = _ProgressEvents(topic, part)
    # a part whose writer died on another host (preempted, evicted) stays locked until that writer's lease
    # expires: wait for it here, rather than fail the retry at once; a lease that keeps being renewed (its
    # writer is alive) is waited on up to two leases, then the task fails and is retried (RETRIES)
    deadline = time.monotonic() + 2 * config.LOCK_LEASE_SECONDS + 5
    try:
        while True:
            try:
                return write_part(sources, dest, part, storage_options=storage_options, on_bytes=events,
                                  **convert_options)
            except StoreLockedError as e:
                wait = e.expires_in
                if wait is None or isinstance(e, LeaseLostError) or time.monotonic() + wait > deadline:
                    raise
                time.sleep(wait + min(2.0, config.LOCK_RENEW_SECONDS))
    except _RETRIED:
        raise
    except TracestoreError as e:
        return _PartFailure(part, e)
    finally:
        events.flush()


# -- the client side --------------------------------------------------------------------------------------------
class _PartsProgress:
    """One bar over the archive bytes of every part, fed by the workers' events; parts done and traces as
    its postfix; off a terminal a line per part done (tracestore.progress)."""

    def __init__(self, enabled: bool, sizes: list[int]) -> None:
        from ..progress import LineProgress, bar

        self.sizes = sizes
        self.shown = [0] * len(sizes)  # per part: the most bytes any attempt reported, capped at its size
        self.parts_done = 0
        self.traces = 0
        self.bar: Any = bar(sum(sizes), "convert", "B", unit_scale=True, unit_divisor=1000) if enabled else None
        self.lines = isinstance(self.bar, LineProgress)

    def _show(self, part: int, nbytes: int) -> None:
        new = min(max(self.shown[part], nbytes), self.sizes[part])
        if self.bar is not None and new > self.shown[part]:
            self.bar.update(new - self.shown[part])
        self.shown[part] = new

    def event(self, msg: dict[str, Any]) -> None:
        part = msg.get("part")
        if isinstance(part, int) and 0 <= part < len(self.sizes):
            self._show(part, int(msg.get("bytes", 0)))

    def part_done(self, res: PartResult) -> None:
        self._show(res.part, self.sizes[res.part])
        self.parts_done += 1
        self.traces += res.num_traces
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.parts_done}/{len(self.sizes)} parts, {self.traces} traces",
                                     refresh=False)
            if self.lines:
                self.bar.note(f"part {res.part:05d} {'up to date' if res.up_to_date else 'done'} "
                              f"({res.num_traces} traces; {self.parts_done}/{len(self.sizes)} parts)")

    def close(self, *, failed: bool = False) -> None:
        if self.bar is not None:
            if failed:
                self.bar.leave = False  # erase it: the error line is what the user must see
            self.bar.close()


def _local_workers(scheduler: str) -> int | None:
    """N of 'local:N', None for an address."""
    if not scheduler.startswith("local:"):
        return None
    n = scheduler.removeprefix("local:")
    if not n.isdigit() or int(n) < 1:
        raise ClusterError(f"--dask {scheduler!r}: local:N takes a number of worker processes N >= 1 (local:4), "
                           f"or give a scheduler address such as tcp://host:8786")
    return int(n)


def _local_cluster(n_workers: int) -> Any:
    """A distributed.LocalCluster of `n_workers` processes of one thread each on 127.0.0.1, without a
    dashboard; its HTTP endpoints (health, metrics) on a free port: distributed's default, 8787, is often
    another cluster's (and taking another is a warning)."""
    import logging
    import signal
    import threading

    from distributed import LocalCluster

    # Ctrl-C on a terminal goes to the whole process group: started with SIGINT ignored (which a new Python
    # process keeps), the local nannies and workers leave it to this process, which stops them and prints one
    # line, instead of each printing its own KeyboardInterrupt traceback
    main = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        # silence_logs: distributed's WARNING lines about cancelled tasks would bury the one error line
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                            dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                            silence_logs=logging.ERROR)
    finally:
        if main:
            signal.signal(signal.SIGINT, before)


@contextlib.contextmanager
def _connect(scheduler: str, timeout: float | None = None) -> Iterator[Any]:
    """A distributed.Client of the scheduler at `scheduler` (waiting `timeout` seconds for it to answer,
    CONNECT_SECONDS by default), or of a LocalCluster of N worker processes on 127.0.0.1 for 'local:N'
    (started here and closed on exit)."""
    n = _local_workers(scheduler)
    try:
        from distributed import Client
    except ImportError:
        raise ClusterError("--dask needs Dask's distributed scheduler: pip install 'tracestore[dask]'") from None
    if n is not None:
        with _local_cluster(n) as cluster, Client(cluster) as client:
            yield client
        return
    try:
        wait = CONNECT_SECONDS if timeout is None else float(timeout)
        client = Client(scheduler, timeout=wait)
    except (OSError, TimeoutError, ValueError) as e:
        raise ClusterError(f"--dask {scheduler}: no Dask scheduler answered within {wait:g} s "
                           f"({' '.join(str(e).split())[:200]}); check the address (tcp://host:8786) and that the "
                           f"scheduler runs (a slow network: --dask-timeout), or use local:N") from None
    with client:
        yield client


def _part_error(e: TracestoreError, part: int, url: str) -> TracestoreError:
    """The error of one part, as the user sees it: where, what, and that the work done is kept."""
    msg = " ".join(str(e).split())
    if isinstance(e, StoreExistsError) and "; it is left untouched" in msg:
        # convert's advice (--overwrite) is not this command's: a part's archives are fixed by the plan
        msg = (msg.split("; it is left untouched")[0] + "; it is left untouched: a rerun must give the first run's "
               "archives, --part-size and options (a part's archives are set by the sorted list of archives and "
               "the part size); to add archives to a committed store use `tracestore append`, or give a new "
               "destination")
        return type(e)(f"part {part:05d} ({url}): {msg}")
    # bad input or a refusal comes back the same on a rerun: say to fix it first
    again = ("fix it, then rerun the same command (the parts done are kept)" if isinstance(e, (
        InputFormatError, StoreExistsError, PartMismatchError, DuplicateIdError)) else
        "the other parts' work is kept: rerun the same command to resume")
    text = f"part {part:05d} ({url}): {msg}; {again}"
    try:
        return type(e)(text)
    except TypeError:
        return TracestoreError(text)


def _outcome(fut: Any, part: int, url: str) -> PartResult:
    """The PartResult of a finished task, or the one clear error of a failed one."""
    from distributed import KilledWorker

    if fut.status == "finished":
        res = fut.result()
        if isinstance(res, _PartFailure):
            raise _part_error(res.error, part, url) from None
        return res  # type: ignore[no-any-return]
    if fut.status == "cancelled":
        raise ClusterError(f"part {part:05d} ({url}): the Dask scheduler dropped its task (did the scheduler "
                           f"stop, or the client lose its connection?); rerun the same command to resume")
    exc = fut.exception()
    if isinstance(exc, KilledWorker):
        raise WorkerCrashedError(
            f"part {part:05d} ({url}): the Dask workers running it kept dying; a worker may be running out of "
            f"memory: give the workers more memory or use a smaller --part-size, then rerun the same command "
            f"(it resumes)") from None
    if isinstance(exc, TracestoreError):
        raise _part_error(exc, part, url) from None
    return fut.result()  # type: ignore[no-any-return]  # re-raises a bug with the worker's traceback


def convert_on_cluster(sources: Sequence[str | os.PathLike[str]], dest: str | os.PathLike[str], scheduler: str, *,
                       part_bytes: int = DEFAULT_PART_BYTES, storage_options: dict[str, Any] | None = None,
                       overwrite: bool = False, progress: bool = False, log: Callable[[str], None] | None = None,
                       connect_timeout: float | None = None, **convert_options: Any) -> ClusterConvertResult:
    """Convert archives into a store of parts at `dest` on a Dask cluster, then commit it.

    Parameters
    ----------
    sources: archives (files, directories, globs); grouped by plan_parts(sources, part_bytes=part_bytes).
        Every worker must read them at these paths (a shared file system).
    dest: the store: a local path on a file system every worker shares, or an s3:// URL. Each part is
        written into DEST/parts/NNNNN by write_part on a worker; the manifest is written by this process
        last, so readers see the store only once every part is done. A rerun with the same archives,
        part size and options skips the parts already converted and resumes an unfinished one.
    scheduler: a distributed scheduler address (tcp://host:8786: a SLURMCluster, a KubeCluster, a
        `dask scheduler` of your own) or 'local:N', a LocalCluster of N worker processes (one thread each)
        on 127.0.0.1, started and closed by this call.
    part_bytes: compressed archive bytes per part (default DEFAULT_PART_BYTES, 2 GB).
    storage_options: for an s3:// `dest` (sent to the workers with each task); None: the AWS_* environment
        variables of each worker.
    overwrite: not supported: a store of parts is never replaced; delete DEST or choose another.
    progress: a bar on stderr over the archive bytes of all parts, fed by the workers. log: progress lines.
    convert_options: convert()'s keyword options (scores=, pool=, tokens=, graphs=, graph_recipe=,
        on_overflow=, allow_nan=, verify=, shard_bytes=, max_archive_bytes=, model_name=, workers=...), the
        same for every part. `workers` defaults to 0: each Dask worker converts its part in its own process
        (size the cluster, not this); more needs workers that may start processes (Dask's workers are
        daemonic unless distributed.worker.daemon is False).

    A part that fails on bad input raises that part's TracestoreError (naming the archive) at once; the
    tasks not yet started are cancelled, those running finish on their workers (Dask cannot stop a running
    task), and the work done is kept for a rerun. A worker that dies has its
    task rerun by the scheduler (the part resumes); tasks that fail otherwise are retried RETRIES times.
    Returns a ClusterConvertResult (`.summary()` is a printable report).
    """
    t0 = time.perf_counter()
    say = log or (lambda _s: None)
    if overwrite:
        raise ClusterError("--overwrite does not go with --dask: a store of parts is never replaced; delete the "
                           "destination yourself or choose a new one")
    _local_workers(scheduler)  # a bad local:N before any work
    groups = _plan(sources, part_bytes)
    # the tasks get the absolute path (a worker's working directory is not this one's) or the URL
    url = _check_destination(os.fspath(dest), storage_options, groups)
    sizes = [sum(s.size for s in g) for g in groups]
    options = {"workers": 0, **convert_options}
    if options.get("scores") is not None:  # read by the workers, whose working directory is not this one's
        options["scores"] = os.path.abspath(os.fspath(options["scores"]))
    run = uuid.uuid4().hex[:8]
    topic = f"tracestore-convert-{run}"
    with _connect(scheduler, connect_timeout) as client:
        n_workers = len(client.scheduler_info().get("workers", {}))
        say(f"{url}: {sum(len(g) for g in groups)} archives ({_fmt_bytes(sum(sizes))}) in {len(groups)} part(s) of "
            f"{_fmt_bytes(part_bytes)} or more; converting on {scheduler} ({n_workers} Dask workers now)")
        # events and finished tasks arrive on other threads: one queue hands both to this one
        inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        client.subscribe_topic(topic, lambda event: inbox.put(("bytes", event[1])))
        bar = _PartsProgress(progress, sizes)
        futures: list[Any] = []
        try:
            for k, group in enumerate(groups):
                fut = client.submit(_convert_part, [s.path for s in group], url, k, topic, storage_options, options,
                                    key=f"convert-part-{k:05d}-{run}", pure=False, retries=RETRIES)
                fut.add_done_callback(lambda _f, k=k: inbox.put(("done", k)))
                futures.append(fut)
            results: dict[int, PartResult] = {}
            while len(results) < len(futures):
                try:
                    kind, payload = inbox.get(timeout=1.0)
                except queue.Empty:
                    continue
                if kind == "bytes":
                    bar.event(payload)
                elif payload not in results:
                    results[payload] = _outcome(futures[payload], payload, f"{url}/{schema.PARTS_DIR}/{payload:05d}")
                    bar.part_done(results[payload])
        except BaseException:
            client.cancel(futures)
            bar.close(failed=True)
            raise
        finally:
            client.unsubscribe_topic(topic)
        bar.close()
    say(f"{url}: all {len(groups)} part(s) are converted; committing the manifest")
    from ..store.parts import commit_parts

    commit = commit_parts(url, parts=list(range(len(groups))), storage_options=storage_options, log=log)
    return ClusterConvertResult(url=url, scheduler=scheduler, num_workers=n_workers,
                                num_sources=sum(len(g) for g in groups), bytes_in=sum(sizes),
                                parts=[results[k] for k in range(len(groups))], commit=commit,
                                seconds=time.perf_counter() - t0)


# -- the command line (tracestore convert --dask; wired in by cli.py) ----------------------------------------------
def parse_part_size(text: str) -> int:
    """--part-size: bytes, or a number with a unit ('2GB', '512MB', '1.5G', '64MiB')."""
    try:
        n = parse_size(text, what="--part-size")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n is None or n <= 0:
        raise argparse.ArgumentTypeError(f"--part-size {text!r}: give a positive size, e.g. 2GB or 512MB")
    return n


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --dask SCHEDULER and --part-size SIZE to the convert command's parser."""
    g = parser.add_argument_group("conversion on a Dask cluster (pip install 'tracestore[dask]')")
    g.add_argument("--dask", metavar="SCHEDULER", default=None,
                   help="convert on a Dask cluster: a scheduler address (tcp://host:8786) or local:N (N worker "
                        "processes on this machine); the archives are grouped into parts, one task per part "
                        "writes DEST/parts/NNNNN on a worker, and the manifest is committed last. Archives and "
                        "DEST must be on a file system every worker shares, or DEST an s3:// URL. A rerun "
                        "skips the parts done. Each Dask worker converts its part in its own process (--workers "
                        "above 1 is refused: size the cluster instead); --overwrite is refused")
    g.add_argument("--dask-timeout", type=float, default=None, metavar="SECONDS",
                   help=f"with --dask ADDRESS: seconds to wait for the scheduler to answer (default "
                        f"{CONNECT_SECONDS:g})")
    g.add_argument("--part-size", type=parse_part_size, default=None, metavar="SIZE",
                   help=f"with --dask: compressed archive bytes per part (default {DEFAULT_PART_BYTES / 1e9:.0f}GB; "
                        f"e.g. 512MB): a part is one task, and what a killed worker redoes. A rerun must give the "
                        f"same size to find the same parts")


def uses_cluster(args: argparse.Namespace) -> bool:
    """Whether the convert command runs on a Dask cluster (--dask); --part-size without it is refused."""
    if getattr(args, "dask", None):
        return True
    if getattr(args, "dask_timeout", None) is not None:
        raise ClusterError("--dask-timeout goes with --dask (the scheduler to wait for)")
    if getattr(args, "part_size", None) is not None:
        raise ClusterError("--part-size goes with --dask (the parts of a conversion on a cluster); without --dask "
                           "the store is written in one piece")
    return False


def run_from_args(args: argparse.Namespace, convert_options: dict[str, Any]) -> ClusterConvertResult:
    """Run `tracestore convert ... --dask SCHEDULER`: `convert_options` are the keyword options the convert
    command passes to convert() (everything but the sources and DEST). Its `progress` and `log` drive the
    client's bar and lines; `overwrite=True` is refused; `workers` above 1 is refused (each Dask worker
    converts its part in its own process: the default 1 becomes 0)."""
    opts = dict(convert_options)
    progress = bool(opts.pop("progress", False))
    log = opts.pop("log", None)
    overwrite = bool(opts.pop("overwrite", False))
    workers = opts.pop("workers", None)
    if workers is not None and int(workers) > 1:
        raise ClusterError(f"--workers {workers} does not go with --dask: each Dask worker converts one part in its "
                           f"own process; give the cluster more workers instead (local:N, or scale the cluster)")
    part_bytes = args.part_size if args.part_size is not None else DEFAULT_PART_BYTES
    timeout = getattr(args, "dask_timeout", None)
    if timeout is not None and not timeout > 0:
        raise ClusterError(f"--dask-timeout {timeout:g}: give a positive number of seconds")
    return convert_on_cluster(args.sources, args.output, args.dask, part_bytes=part_bytes, overwrite=overwrite,
                              progress=progress, log=log, connect_timeout=timeout, **opts)


__all__ = ["DEFAULT_PART_BYTES", "ClusterConvertResult", "add_cluster_arguments", "convert_on_cluster",
           "parse_part_size", "plan_parts", "run_from_args", "uses_cluster"]
