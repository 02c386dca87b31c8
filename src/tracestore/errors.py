"""Error classes. Each is also the builtin a caller would expect, so `except ValueError` still works.

Messages name the file or store, the trace, the value, the rule and the fix, built as one f-string.
"""

from __future__ import annotations

from typing import Any


class TracestoreError(Exception):
    """Base class of every error tracestore raises on purpose."""


class StoreNotFoundError(TracestoreError, FileNotFoundError):
    """No store at the URL."""


class StoreExistsError(TracestoreError, FileExistsError):
    """A store already exists where one was to be created (pass overwrite=True to replace it)."""


class IncompleteStoreError(TracestoreError, FileNotFoundError):
    """The store has no commit marker: its writer did not finish."""


class FormatVersionError(TracestoreError, ValueError):
    """The store was written in a format version this tracestore cannot read."""


class ShapeMismatchError(TracestoreError, ValueError):
    """An array does not have the shape the store expects."""


class DTypeError(TracestoreError, TypeError):
    """An array has a dtype the store cannot take (for example integers where floats are needed)."""


class Float16OverflowError(TracestoreError, OverflowError):
    """A value does not fit float16 (|x| > 65504) and would become inf."""


class NonFiniteValueError(TracestoreError, ValueError):
    """A NaN or inf where finite values are required."""


class DuplicateIdError(TracestoreError, ValueError):
    """A trace id appears twice."""


class PartMismatchError(TracestoreError, ValueError):
    """A part of a store made of parts does not agree with the others (layers, per-token data, options)."""


class CorruptStoreError(TracestoreError, OSError):
    """Stored bytes do not match their checksum, or a shard is truncated."""


class StaleStoreError(TracestoreError, OSError):
    """The store was replaced (another generation committed) since it was opened: reopen it."""


class StoreLockedError(TracestoreError, BlockingIOError):
    """Another writer holds the destination's lock; the message names the holder. `expires_in`: seconds until
    the holder's lease expires if it stops renewing it (a retry after that may take it over), or None where
    the lock has no lease (written by tracestore before 0.3) or cannot be read."""

    def __init__(self, message: str, *, expires_in: float | None = None) -> None:
        super().__init__(message)
        self.expires_in = expires_in

    def __reduce__(self) -> tuple[Any, ...]:  # keeps expires_in across processes (Dask sends errors pickled)
        return type(self), (str(self.args[0]) if self.args else "",), {"expires_in": self.expires_in}


class LeaseLostError(StoreLockedError):
    """This writer lost its lock's lease (it was paused past the lease while another writer took the lock
    over): it stops before it commits anything, leaving the destination to the new holder."""


class UnsafeInputError(TracestoreError, ValueError):
    """An input archive asks to run code or to build a class outside the allow-list."""


class InputFormatError(TracestoreError, ValueError):
    """An input archive is truncated, not what its name says, or holds records of the wrong shape."""


class ClosedWriterError(TracestoreError, RuntimeError):
    """The writer was closed or aborted; nothing more can be appended."""


class RemoteStoreError(TracestoreError, OSError):
    """An object store kept failing past the retry deadline."""


class CheckpointError(TracestoreError, FileNotFoundError):
    """A training checkpoint is missing, damaged, or was written by a different run configuration."""


class TrainConfigError(TracestoreError, ValueError):
    """A training option does not fit the store (for example a graph model on a store without graphs)."""


class TrainingDivergedError(TracestoreError, FloatingPointError):
    """The training loss is not finite (NaN or infinite): the probe diverged, or its inputs hold such values."""


class LoaderError(TracestoreError, RuntimeError):
    """TraceLoader could not deliver a batch: a reader failed or timed out, or the loader was misused."""


class InputTooLargeError(TracestoreError, ValueError):
    """An input archive decompresses past the size cap (a gzip bomb, or a cap set too low for real data)."""


class VerifyMismatchError(TracestoreError, ValueError):
    """A converted store does not hold what its sources hold (found by the converter's own check)."""


class WorkerCrashedError(TracestoreError, RuntimeError):
    """A worker process died while reading an archive (killed, or out of memory)."""


class ClusterError(TracestoreError, RuntimeError):
    """A conversion on a Dask cluster could not run: Dask is not installed, no scheduler answers at the
    address, options that do not go with --dask, or the scheduler lost the work."""


# -- where a bad value sits, for messages (the writer and the converter use the same words) ----------------
def describe_position(where: str, ids: list[str], p: tuple[int, ...], *, offset: int = 0) -> str:
    """'WHERE: trace ID, layer L, hidden D' for position p of a block [B, L, D] whose first trace is ids[offset]."""
    if not p:
        return where
    s = f"{where}: trace {ids[offset + p[0]]!r}"
    if len(p) > 1:
        s += f", layer {p[1]}"
    if len(p) > 2:
        s += f", hidden {p[2]}"
    return s


def describe_token(where: str, p: tuple[int, ...]) -> str:
    """'WHERE, token T, layer L, hidden D' for position p of one trace's token states [T, L, D]."""
    return where + (f", token {p[0]}, layer {p[1]}, hidden {p[2]}" if len(p) == 3 else "")


def describe_edge(where: str, layer: int, p: tuple[int, ...]) -> str:
    return where + (f", layer {layer} edge {p[2]} attribute {p[3]}" if len(p) == 4 else f", layer {layer} edges")
