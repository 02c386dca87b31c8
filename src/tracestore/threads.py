"""torch's intra-op threads for work issued synchronously from the caller's thread.

Measured on the 2-core shared machine: torch copies and casts issued from the caller's thread with torch's
default OpenMP threads ran 5-10x slower under contention than with one thread (the loader's copies,
benchmarks/results/stream.md; the converter's float16 -> float32 widening of attention matrices with
--workers 0, benchmarks/results/convert_seed.md: 7.9 ms against 0.056 ms per layer with two busy processes
beside it). torch has no per-thread setting, so the process-wide one is lowered for the duration and
restored; worker processes set it once for good instead."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def one_intraop_thread() -> Iterator[None]:
    """Run torch ops without intra-op parallelism inside the block, then restore the setting (a no-op when
    torch is not imported yet: nothing to lower)."""
    import sys

    torch = sys.modules.get("torch")
    n = torch.get_num_threads() if torch is not None else 1
    if n == 1:
        yield
        return
    torch.set_num_threads(1)  # type: ignore[union-attr]
    try:
        yield
    finally:
        torch.set_num_threads(n)  # type: ignore[union-attr]


# -- torch imported in the background (converter workers) -------------------------------------------------
#: set while no background import of torch is running
_torch_ready = threading.Event()
_torch_ready.set()


def import_torch_in_background() -> None:
    """Start importing torch (a second or two) in a thread, with one intra-op thread for good (a worker
    process's setting): the work that needs torch calls `import_torch()`, which waits for it. Everything that
    imports torch in such a process must go through `import_torch()`: a second thread importing torch while
    the first still is can fail half-way (KeyError: 'torch')."""
    _torch_ready.clear()

    def run() -> None:
        try:
            import torch

            torch.set_num_threads(1)
        except Exception:  # noqa: BLE001 - the casts fall back to numpy; nothing to report here
            pass
        finally:
            _torch_ready.set()

    threading.Thread(target=run, daemon=True, name="import-torch").start()


def import_torch() -> Any:
    """torch, once any background import of it has finished."""
    _torch_ready.wait()
    import torch

    return torch

