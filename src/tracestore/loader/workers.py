"""Loader worker processes that write batches into a ring of shared-memory buffers allocated once.

Chosen by measurement over reader threads for the CPU path (benchmarks/results/stream.md): with 2 threads the
copies release the GIL but the per-batch Python work of the readers and the consumer still takes turns on it;
2 processes gathering into a shared float32 ring ran faster in every interleaved run. Unlike PyTorch's
DataLoader workers, nothing of the batch crosses processes but its number: each worker writes straight into
the ring slot it is told, and sends back (batch number, error or None, graph parts or None).

Workers are persistent (started on the first iteration, reused across epochs), forked where the platform
can (spawn elsewhere: the store pickles), run torch with one intra-op thread (an OpenMP runtime used before a
fork must not be used in the child), and never touch CUDA. A worker that dies or fails is reported by the
parent as an error naming the worker, never a hang. The other way round, a parent that dies -- even by SIGKILL
or `os._exit`, which run no clean-up -- takes its workers with it: each watches its parent (`watch_parent`, as
DataLoader's workers do) and exits within `_PARENT_POLL_S` of its death instead of living on under PID 1.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import threading
import time
from typing import Any

import numpy as np
import torch

from ..errors import LoaderError

#: How often the parent checks that its workers are alive while it waits for a batch (seconds).
_POLL_S = 0.5
#: How often a worker checks that its parent is alive (seconds).
_PARENT_POLL_S = 0.25


def watch_parent(interval: float = _PARENT_POLL_S) -> threading.Thread:
    """In a worker process: a daemon thread that ends the process (`os._exit`) as soon as its parent is gone.

    The parent is gone when this process has been re-parented (`os.getppid()` changed: to PID 1 or a
    subreaper). That test needs no file descriptor: multiprocessing's parent sentinel is a pipe whose write end
    a sibling worker forked later inherits, so it need not close when the parent dies."""
    ppid = os.getppid()

    def watch() -> None:
        while os.getppid() == ppid:
            time.sleep(interval)
        os._exit(1)  # no clean-up to do: the ring and the queues belonged to the parent

    t = threading.Thread(target=watch, name="tracestore-watch-parent", daemon=True)
    t.start()
    return t


def _worker_main(wid: int, source: Any, ring: list[torch.Tensor], tasks: Any, results: Any, graphs: bool) -> None:
    watch_parent()
    torch.set_num_threads(1)
    ring = list(ring)
    while True:
        task = tasks.get()
        if task is None:
            return
        k, slot, pos, fresh = task
        if fresh is not None:
            ring[slot] = fresh  # the parent gave the old buffer of this slot to its caller, who still holds it
        try:
            source.read_sequences(pos, ring[slot][:pos.size])
            parts = source.read_graphs(pos) if graphs else None
            results.put((k, None, parts))
        except BaseException as exc:  # noqa: BLE001 - every failure goes to the parent, which raises it
            try:
                pickle.loads(pickle.dumps(exc))
                err: Any = exc
            except Exception:  # noqa: BLE001 - an exception that does not pickle travels as text
                err = f"{type(exc).__name__}: {exc}"
            results.put((k, err, None))


class ProcessPool:
    """`num_workers` processes reading batches of `source` into `ring` (shared-memory tensors)."""

    def __init__(self, source: Any, ring: list[torch.Tensor], num_workers: int, *, graphs: bool, url: str,
                 generations: list[int] | None = None) -> None:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        ctx: Any = mp.get_context(method)
        self.url = url
        self.pid = os.getpid()
        self.tasks = [ctx.Queue() for _ in range(num_workers)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker_main, args=(w, source, ring, self.tasks[w], self.results, graphs),
                                  name=f"tracestore-loader-{w}", daemon=True) for w in range(num_workers)]
        for p in self.procs:
            p.start()
        self.outstanding: set[int] = set()
        self.ready: dict[int, tuple[Any, Any]] = {}
        # which version of each slot's buffer each worker has (see submit)
        self._gens = [list(generations or [0] * len(ring)) for _ in range(num_workers)]

    def submit(self, k: int, slot: int, pos: np.ndarray, buffer: torch.Tensor | None = None,
               generation: int = 0) -> None:
        """Batch k goes to worker k % num_workers (sampler.worker_batches), into ring slot `slot`. When the slot
        holds a newer buffer than the worker has (`generation`, BufferRing.renew_if_held), `buffer` travels
        with the task: a shared-memory tensor crosses processes as a file descriptor, not as its bytes."""
        self.outstanding.add(k)
        w = k % len(self.procs)
        fresh = None
        if buffer is not None and self._gens[w][slot] != generation:
            fresh = buffer
            self._gens[w][slot] = generation
        self.tasks[w].put((k, slot, pos, fresh))

    def wait(self, k: int, timeout: float | None) -> Any:
        """The graph parts (or None) of batch k once its worker has written it; raises the worker's error, or
        LoaderError if a worker died or `timeout` passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while k not in self.ready:
            self._collect(deadline, k)
        err, parts = self.ready.pop(k)
        if err is not None:
            if isinstance(err, BaseException):
                raise err
            raise RuntimeError(err)
        return parts

    def _collect(self, deadline: float | None, k: int) -> None:
        wait = _POLL_S if deadline is None else max(0.0, min(_POLL_S, deadline - time.monotonic()))
        try:
            kk, err, parts = self.results.get(timeout=wait)
        except queue.Empty:
            dead = [p for p in self.procs if not p.is_alive()]
            if dead:
                p = dead[0]
                raise LoaderError(f"{self.url}: loader worker {p.name} (pid {p.pid}) died with exit code {p.exitcode} "
                                  f"while reading batch {k}; the loader stopped. If it was killed for memory, lower "
                                  f"num_workers or batch_size; resume from loader.state_dict()") from None
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(k) from None
            return
        self.outstanding.discard(kk)
        self.ready[kk] = (err, parts)

    def drain(self, timeout: float = 60.0) -> bool:
        """Wait until no submitted batch is still being written (so the ring may be reused); False if that did
        not happen within `timeout` or a worker died."""
        deadline = time.monotonic() + timeout
        try:
            while self.outstanding:
                self._collect(deadline, min(self.outstanding))
        except (LoaderError, TimeoutError):
            return False
        self.ready.clear()
        return True

    def alive(self) -> bool:
        return self.pid == os.getpid() and all(p.is_alive() for p in self.procs)

    def shutdown(self) -> None:
        """Stop the workers (only from the process that started them)."""
        if self.pid != os.getpid():
            return
        for q in self.tasks:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for q in [*self.tasks, self.results]:
            q.close()
            q.join_thread()
