"""Input archives: find them (files, directories, globs) in a deterministic order, and load one safely.

Kinds, told by the name: `*.pkl`, `*.pickle` and their `.gz` forms are pickles (gzip or not is told by the
first bytes, not the name); `*.pt`, `*.pth` are torch files (legacy preprocessed batches)."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputFormatError
from .pickle_stream import PickleArchive
from .safe_unpickle import default_max_bytes, load_torch

PICKLE_SUFFIXES = (".pkl", ".pickle", ".pkl.gz", ".pickle.gz")
TORCH_SUFFIXES = (".pt", ".pth")


def archive_kind(path: str | os.PathLike[str]) -> str | None:
    """'pickle', 'torch', or None for a name that is not an archive."""
    n = os.fspath(path).lower()
    if n.endswith(PICKLE_SUFFIXES):
        return "pickle"
    if n.endswith(TORCH_SUFFIXES):
        return "torch"
    return None


@dataclass(frozen=True)
class Source:
    """One input archive. `name` is the path relative to the sources' common folder (messages, provenance);
    (size, mtime_ns) identify the file's version for resume."""

    path: str
    name: str
    kind: str
    size: int
    mtime_ns: int

    def key(self) -> list[Any]:
        return [self.name, self.size, self.mtime_ns]


#: Bytes read from each end of two archives of the same size before the whole of both is checksummed.
_PROBE_BYTES = 1 << 20


def _crc32c_of(path: str, ranges: list[tuple[int, int]] | None = None) -> int:
    import google_crc32c

    c = google_crc32c.Checksum()
    with open(path, "rb") as f:
        for start, length in ranges or [(0, -1)]:
            f.seek(start)
            if length < 0:
                for block in iter(lambda: f.read(8 << 20), b""):
                    c.update(block)
            else:
                c.update(f.read(length))
    return int.from_bytes(c.digest(), "big")


def duplicate_archives(sources: list[Source]) -> list[tuple[Source, Source, str]]:
    """Pairs (first, repeat, why) of sources that are the same archive: the same file under two names (a
    link), or two files of the same content (the same size and crc32c). Only archives of equal size are read:
    first 1 MiB at each end, then the whole of those that still agree."""
    out: list[tuple[Source, Source, str]] = []
    by_inode: dict[tuple[int, int], Source] = {}
    unique: list[Source] = []
    for src in sources:
        st = os.stat(src.path)
        first = by_inode.setdefault((st.st_dev, st.st_ino), src)
        if first is not src:
            out.append((first, src, "the same file"))
        else:
            unique.append(src)
    by_size: dict[int, list[Source]] = {}
    for src in unique:
        by_size.setdefault(src.size, []).append(src)
    for size, same in by_size.items():
        if len(same) < 2:
            continue
        ends = [(0, _PROBE_BYTES), (max(0, size - _PROBE_BYTES), _PROBE_BYTES)]
        probes: dict[int, list[Source]] = {}
        for src in same:
            probes.setdefault(_crc32c_of(src.path, ends), []).append(src)
        for group in probes.values():
            if len(group) < 2:
                continue
            whole: dict[int, Source] = {}
            for src in group:
                first = whole.setdefault(_crc32c_of(src.path) if size > 2 * _PROBE_BYTES else -1, src)
                if first is not src:
                    out.append((first, src, f"the same content ({size} bytes, the same crc32c)"))
    return sorted(out, key=lambda d: d[1].path)


def find_sources(specs: list[str | os.PathLike[str]]) -> list[Source]:
    """Expand files, directories (their archives, recursively) and glob patterns into sources, sorted by path
    so that the output order is the same whatever the order of the arguments or of the file system.

    A file given by name must be an archive; a directory or glob that matches no archive is an error."""
    paths: set[str] = set()
    for spec in specs:
        s = os.fspath(spec)
        if os.path.isdir(s):
            found = [os.path.join(root, f) for root, _dirs, files in os.walk(s) for f in files if archive_kind(f)]
            if not found:
                raise InputFormatError(f"{s}: a directory with no archives in it (looked for "
                                       f"{', '.join('*' + x for x in PICKLE_SUFFIXES + TORCH_SUFFIXES)})")
            paths.update(found)
        elif os.path.isfile(s):
            if archive_kind(s) is None:
                raise InputFormatError(f"{s}: not an archive name; expected one of "
                                       f"{', '.join(PICKLE_SUFFIXES + TORCH_SUFFIXES)} (give score files with --scores)")
            paths.add(s)
        elif glob.has_magic(s):
            found = [p for p in glob.glob(s, recursive=True) if os.path.isfile(p) and archive_kind(p)]
            if not found:
                raise InputFormatError(f"{s}: the pattern matches no archives; check the path")
            paths.update(found)
        else:
            raise InputFormatError(f"{s}: no such file or directory; check the path")
    if not paths:
        raise InputFormatError("no input archives given; pass .pkl, .pkl.gz or .pt files, directories or globs")
    absolute = sorted({os.path.abspath(p) for p in paths})
    common = os.path.commonpath([os.path.dirname(p) for p in absolute])
    out = []
    for p in absolute:
        st = os.stat(p)
        out.append(Source(path=p, name=os.path.relpath(p, common), kind=archive_kind(p) or "pickle",
                          size=st.st_size, mtime_ns=st.st_mtime_ns))
    return out


class OpenArchive:
    """An archive opened through the allow-list (safe_unpickle, pickle_stream): `content` is what it holds, a
    RecordStream for a pickled list of records (read one record at a time: memory holds a record, not the
    archive) or the whole object (a batch dict, a .pt file, memory-mapped where torch can); `finish()`
    returns {crc32c, bytes, decompressed_bytes} once the content is consumed. A context manager."""

    def __init__(self, source: Source, *, max_bytes: int) -> None:
        self._pickle: PickleArchive | None = None
        self._info: dict[str, Any] | None = None
        if source.kind == "torch":
            self.content, self._info = load_torch(Path(source.path), max_bytes=max_bytes, name=source.name)
        else:
            self._pickle = PickleArchive(Path(source.path), max_bytes=max_bytes, name=source.name)
            self.content = self._pickle.content

    def finish(self) -> dict[str, Any]:
        if self._pickle is not None:
            return self._pickle.finish()
        assert self._info is not None
        return self._info

    def __enter__(self) -> OpenArchive:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pickle is not None:
            self._pickle.close()


__all__ = ["PICKLE_SUFFIXES", "TORCH_SUFFIXES", "OpenArchive", "Source", "archive_kind", "default_max_bytes",
           "find_sources"]
