"""Pickle files as this field writes them (gzip-compressed or plain), reproducibly: the one writer under both
the synthetic archives (archives.py) and the seed pipeline's files (seed.py)."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path
from typing import Any


def write_pickle(path: str | os.PathLike[str], obj: Any, *, compresslevel: int | None = 1, protocol: int = 4) -> Path:
    """Pickle `obj` to `path`, gzip-compressed at `compresslevel` (None: plain pickle)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if compresslevel is None:
        with open(p, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)
    else:
        # mtime=0: the same archive gives the same bytes (reproducible hashes in provenance)
        with open(p, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=compresslevel, mtime=0) as f:
            pickle.dump(obj, f, protocol=protocol)
    return p
