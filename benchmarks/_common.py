"""Helpers shared by the benchmarks: timing with percentiles, fast bulk data, reference files, and tables.

Benchmarks measure tracestore and its reference in the same run and report ratios, because this machine is
shared and absolute times drift (see ../shared/notes/baseline.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Timing:
    """Seconds per call over repeated calls."""

    samples: np.ndarray

    @property
    def p50(self) -> float:
        return float(np.percentile(self.samples, 50))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.samples, 99))

    @property
    def mean(self) -> float:
        return float(self.samples.mean())


def time_calls(fn: Callable[[int], Any], n: int, *, warmup: int = 3) -> Timing:
    """Call fn(k) for k in range(n) after `warmup` untimed calls; one perf_counter sample per call."""
    for k in range(warmup):
        fn(k)
    out = np.empty(n)
    for k in range(n):
        t0 = time.perf_counter()
        fn(k)
        out[k] = time.perf_counter() - t0
    return Timing(out)


def time_interleaved(fns: Sequence[Callable[[int], Any]], n: int, *, warmup: int = 3) -> list[Timing]:
    """Time several functions call by call in turn (fn0(k), fn1(k), ..., the order rotating with k), so that
    on a shared, noisy machine each one sees the same background load: ratios of these are fair."""
    for k in range(warmup):
        for f in fns:
            f(k)
    out = np.empty((len(fns), n))
    m = len(fns)
    for k in range(n):
        for j in range(m):
            i = (j + k) % m
            t0 = time.perf_counter()
            fns[i](k)
            out[i, k] = time.perf_counter() - t0
    return [Timing(row) for row in out]


def time_best(fn: Callable[[], Any], repeats: int = 3) -> float:
    """The fastest of `repeats` calls, in seconds (for long operations: the least disturbed run)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def fast_float16_blocks(n: int, num_layers: int, hidden_size: int, *, block: int = 256,
                        seed: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(start, [b, L, D] float16) blocks of n traces of cheap random values. For benchmarks where the values do
    not matter (random access), so that making 1 GB takes seconds, not minutes. Deterministic in seed."""
    rng = np.random.default_rng(seed)
    for a in range(0, n, block):
        b = min(n, a + block)
        yield a, rng.standard_normal((b - a, num_layers, hidden_size), dtype=np.float32).astype(np.float16)


def write_store_and_npy(store_url: str, npy_path: str, n: int, num_layers: int, hidden_size: int, *,
                        shard_bytes: int | None = None, seed: int = 0) -> None:
    """A tracestore store and a .npy file holding the same float16 bytes (the np.memmap reference)."""
    import tracestore

    Path(npy_path).parent.mkdir(parents=True, exist_ok=True)
    mm = np.lib.format.open_memmap(npy_path, mode="w+", dtype=np.float16, shape=(n, num_layers, hidden_size))
    with tracestore.create(store_url, num_layers=num_layers, hidden_size=hidden_size, shard_bytes=shard_bytes,
                           overwrite=True) as w:
        for a, blk in fast_float16_blocks(n, num_layers, hidden_size, seed=seed):
            w.append([f"t{i}" for i in range(a, a + len(blk))], blk, np.zeros(len(blk), np.float32))
            mm[a:a + len(blk)] = blk
    mm.flush()
    del mm


def dir_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of every file under `path` (or of the file itself)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


@contextmanager
def scratch_dir(keep: str | None = None) -> Iterator[Path]:
    """A temporary directory under /tmp (or `keep`, not deleted), removed afterwards."""
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        yield Path(keep)
        return
    d = Path(tempfile.mkdtemp(prefix="tracestore-bench-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny shapes: checks that the benchmark runs (seconds)")
    p.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    p.add_argument("--keep", default=None, help="build the data in this directory and keep it (default: /tmp, deleted)")
    return p


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces a run: `script` with `argv` (default: this process's arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join([".venv/bin/python", f"benchmarks/{Path(script).name}", *args])


def write_result(path: str | None, title: str, body: str, *, script: str, argv: Sequence[str] | None) -> None:
    """Write a results file: title, exact command, machine note, body."""
    if not path:
        return
    import platform

    text = (f"# {title}\n\nCommand (from the repository root):\n\n    {command_line(script, argv)}\n\n"
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; shared and "
            f"noisy, so compare ratios measured in the same run, not absolute times.\n\n{body}\n")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
