"""Progress on long work: a tqdm bar on a terminal, one plain line per finished piece elsewhere.

A redrawn bar written to a log file or a CI console is hundreds of kilobytes of carriage returns (`make demo >
log`); tqdm's own `disable=None` instead prints nothing at all, so a log says nothing about a long job. Off a
terminal `bar()` returns a `LineProgress` with tqdm's small interface (update, set_postfix_str, close) that
writes one line when it closes, plus one per `note()` (an archive done, an epoch done).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False


def _fmt_count(n: float, unit: str) -> str:
    if unit == "B":
        for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if n >= scale:
                return f"{n / scale:.2f} {name}"
        return f"{int(n)} B"
    return f"{int(n)} {unit}"


class LineProgress:
    """tqdm's interface, printing whole lines: `note(text)` at once, a summary at `close()`."""

    def __init__(self, total: int | None, desc: str, unit: str, file: TextIO | None, leave: bool) -> None:
        self.total, self.desc, self.unit, self.leave = total, desc, unit, leave
        self.file = sys.stderr if file is None else file
        self.n = 0
        self.postfix = ""
        self.started = time.perf_counter()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def _line(self, text: str) -> None:
        print(text, file=self.file, flush=True)

    def note(self, text: str) -> None:
        elapsed = time.perf_counter() - self.started
        self._line(f"{self.desc}: {text} ({elapsed:.1f} s)")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.leave:
            return
        elapsed = time.perf_counter() - self.started
        if self.total is None:
            done = _fmt_count(self.n, self.unit)
        elif self.unit == "B":
            done = f"{_fmt_count(self.n, 'B')} of {_fmt_count(self.total, 'B')}"
        else:
            done = f"{int(self.n)} of {_fmt_count(self.total, self.unit)}"
        rate = f", {_fmt_count(self.n / elapsed, self.unit)}/s" if elapsed > 0 and self.n else ""
        post = f", {self.postfix}" if self.postfix else ""
        self._line(f"{self.desc}: {done} in {elapsed:.1f} s{rate}{post}")

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _TerminalBar:
    """tqdm with `note()`: a line written above the bar."""

    def __init__(self, bar: Any) -> None:
        object.__setattr__(self, "_bar", bar)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._bar, name, value)  # bar.leave = False reaches tqdm

    def note(self, text: str) -> None:
        self._bar.write(f"{self._bar.desc}: {text}", file=self._bar.fp)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)

    def __enter__(self) -> _TerminalBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()


def bar(total: int | None, desc: str, unit: str = "it", *, file: TextIO | None = None, leave: bool = True,
        terminal: bool | None = None, **tqdm_kwargs: Any) -> Any:
    """A progress bar for `total` units: tqdm on a terminal, else a `LineProgress` (one line at the end).

    terminal: force one or the other (default: whether `file`, default stderr, is a terminal). Either has
    update(n), set_postfix_str(s), note(text) and close().
    """
    stream = sys.stderr if file is None else file
    if terminal is None:
        terminal = is_terminal(stream)
    if not terminal:
        return LineProgress(total, desc, unit, stream, leave)
    from tqdm.auto import tqdm

    return _TerminalBar(tqdm(total=total, desc=desc, unit=unit, file=stream, leave=leave, dynamic_ncols=True,
                             **tqdm_kwargs))


def quiet_library_bars() -> None:
    """Off a terminal, turn off the bars third-party libraries draw (transformers' 'Loading weights')."""
    if is_terminal():
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
