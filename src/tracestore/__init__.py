"""tracestore: LLM hidden-state and attention traces as chunked float16 Zarr v3 stores.

    w = tracestore.create(url, num_layers=L, hidden_size=D)   # write
    tracestore.append(url, ["new_archives/"])                 # grow it by a part
    store = tracestore.open(url)                              # read at random
    loader = tracestore.TraceLoader(store, batch_size=64)     # stream to train
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    CorruptStoreError,
    DuplicateIdError,
    Float16OverflowError,
    FormatVersionError,
    IncompleteStoreError,
    LeaseLostError,
    NonFiniteValueError,
    PartMismatchError,
    ShapeMismatchError,
    StaleStoreError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
    TracestoreError,
)
from .store.graphs import TraceGraph
from .store.parts import commit_parts
from .store.reader import Trace, TraceStore, open
from .store.tokens import TraceTokens
from .store.writer import StoreWriter, create

if TYPE_CHECKING:
    from .convert.part_writer import append, write_part
    from .loader.batch import Batch
    from .loader.loader import TraceLoader
    from .probe import ProbeResult, probe_layers

__all__ = [
    "__version__",
    "create",
    "open",
    "append",
    "write_part",
    "commit_parts",
    "TraceStore",
    "StoreWriter",
    "Trace",
    "TraceGraph",
    "TraceTokens",
    "TraceLoader",
    "Batch",
    "probe_layers",
    "ProbeResult",
    "TracestoreError",
    "StoreNotFoundError",
    "StoreExistsError",
    "IncompleteStoreError",
    "FormatVersionError",
    "ShapeMismatchError",
    "Float16OverflowError",
    "NonFiniteValueError",
    "DuplicateIdError",
    "PartMismatchError",
    "CorruptStoreError",
    "StaleStoreError",
    "LeaseLostError",
    "StoreLockedError",
]


def __getattr__(name: str) -> Any:
    # the loader imports torch; keep `import tracestore` light for notebooks that only read
    if name == "TraceLoader":
        from .loader.loader import TraceLoader

        return TraceLoader
    if name == "Batch":
        from .loader.batch import Batch

        return Batch
    if name in ("append", "write_part"):  # the converter: imported when asked for
        from .convert import part_writer

        return getattr(part_writer, name)
    if name in ("probe_layers", "ProbeResult"):  # scikit-learn: imported when asked for
        from . import probe

        return getattr(probe, name)
    raise AttributeError(f"module 'tracestore' has no attribute {name!r}")
