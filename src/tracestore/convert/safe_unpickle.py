"""Load pickles and `.pt` files without running code from them.

A pickle names the callables that rebuild its objects, and `pickle.load` calls whatever it names: a
`__reduce__` payload is arbitrary code. `SafeUnpickler` resolves names only from an allow-list of what trace
archives need (../shared/notes/reliability.md 1.3, measured with a recording `find_class`):

- numpy arrays, dtypes and scalars, pickle protocols 2-5, under numpy 2 (`numpy._core`) and numpy 1
  (`numpy.core`) module names; `_codecs.encode`, which protocol 2 uses for bytes, only for latin-1;
- torch tensors pickled with plain pickle: `torch._utils._rebuild_tensor_v2` and `collections.OrderedDict`,
  and `torch.storage._load_from_bytes` **replaced** by `safe_load_from_bytes`: torch's own calls
  `torch.load(..., weights_only=False)` on bytes from the pickle, a trapdoor that runs a nested payload;
- PyG `Data` and the three helper classes it pickles with.

Anything else is refused with UnsafeInputError naming the class and the file. `.pt` files go through
`torch.load(weights_only=True)` and never fall back to unsafe loading (PyG's `torch_load` does); the PyG
classes are allowed for that one call and torch's global allow-list is restored exactly afterwards.

Allowing classes does not stop a denial of service, so every read is capped (`max_bytes`): a gzip bomb
raises InputTooLargeError before it fills memory.
"""

from __future__ import annotations

import gzip
import importlib
import io
import os
import pickle
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import google_crc32c

from ..errors import InputFormatError, InputTooLargeError, UnsafeInputError

_NUMPY_CORE = ("numpy._core", "numpy.core")

#: (module, name) -> where the real object lives (module, name). Both numpy spellings map to the installed one.
_ALLOWED: dict[tuple[str, str], tuple[str, str]] = {
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("collections", "OrderedDict"): ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"): ("torch._utils", "_rebuild_tensor_v2"),
    ("torch_geometric.data.data", "Data"): ("torch_geometric.data.data", "Data"),
    ("torch_geometric.data.data", "DataEdgeAttr"): ("torch_geometric.data.data", "DataEdgeAttr"),
    ("torch_geometric.data.data", "DataTensorAttr"): ("torch_geometric.data.data", "DataTensorAttr"),
    ("torch_geometric.data.storage", "GlobalStorage"): ("torch_geometric.data.storage", "GlobalStorage"),
    ("builtins", "set"): ("builtins", "set"),
    ("builtins", "frozenset"): ("builtins", "frozenset"),
    ("builtins", "slice"): ("builtins", "slice"),
    ("builtins", "complex"): ("builtins", "complex"),
    ("builtins", "bytearray"): ("builtins", "bytearray"),
}
for _core in _NUMPY_CORE:
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = ("numpy._core.multiarray", "_reconstruct")
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = ("numpy._core.multiarray", "scalar")
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = ("numpy._core.numeric", "_frombuffer")


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it (bytes stored as latin-1 text); no other codec."""
    if not isinstance(obj, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode called with encoding {encoding!r}; only latin-1 is allowed")
    return obj.encode("latin-1", errors)


def safe_load_from_bytes(b: bytes) -> Any:
    """What `torch.storage._load_from_bytes` does, with `weights_only=True`: a storage's bytes inside a plain
    pickle are themselves a pickle, and torch's version loads them unsafely."""
    import torch

    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write itself; the refusal below is what matters
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")
    except Exception as e:
        raise NestedPayloadError(str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None


class NestedPayloadError(Exception):
    """Raised inside the unpickler when a tensor's storage bytes hold something weights_only refuses."""


_REPLACED: dict[tuple[str, str], Callable[..., Any]] = {
    ("_codecs", "encode"): _latin1_encode,
    ("torch.storage", "_load_from_bytes"): safe_load_from_bytes,
}


def allowed_globals() -> list[str]:
    """The `module.name` globals a pickle may use (for messages and docs)."""
    return sorted({f"{m}.{n}" for m, n in (*_ALLOWED, *_REPLACED)})


class SafeUnpickler(pickle.Unpickler):
    """A pickle.Unpickler whose `find_class` resolves only allow-listed globals; see the module docstring.

    `name` is the file name used in messages."""

    def __init__(self, file: Any, *, name: str) -> None:
        super().__init__(file)
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _REPLACED:
            return _REPLACED[key]
        target = _ALLOWED.get(key)
        if target is None:
            raise UnsafeInputError(
                f"{self.name}: the pickle asks for {module}.{name}, which is not on tracestore's allow-list (numpy "
                f"arrays, torch tensors, PyG Data); refusing to load it, since a pickle can run code this way. If "
                f"the file is yours and safe, re-save its arrays as plain numpy/torch objects")
        mod = importlib.import_module(target[0])
        return getattr(mod, target[1])


class CappedReader:
    """A read-only file wrapper that counts bytes and refuses to go past `max_bytes`.

    Used under the unpickler: a gzip bomb or a length field claiming gigabytes stops with InputTooLargeError
    (or, for a plain file, InputFormatError: truncated) before anything that large is allocated."""

    def __init__(self, f: BinaryIO, *, max_bytes: int, name: str, compressed: bool) -> None:
        self._f = f
        self.max_bytes = max_bytes
        self.name = name
        self.compressed = compressed
        self.pos = 0

    def _check(self, n: int) -> None:
        if self.pos + n > self.max_bytes:
            if self.compressed:
                raise InputTooLargeError(
                    f"{self.name}: decompresses to more than {self.max_bytes:,} bytes (the cap; at offset "
                    f"{self.pos:,} the pickle asks for {n:,} more); if this is a real archive raise the cap with "
                    f"--max-archive-bytes, otherwise the file is a decompression bomb: do not use it")
            raise InputFormatError(
                f"{self.name}: the pickle asks for {n:,} bytes at offset {self.pos:,} but the file holds "
                f"{self.max_bytes:,}; the file is truncated or not a pickle: copy it again from its source")

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.max_bytes - self.pos + 1
            data = self._f.read(n)
            self._check(len(data))
        else:
            self._check(n)
            data = self._f.read(n)
        self.pos += len(data)
        return data

    def readinto(self, b: Any) -> int:
        mv = memoryview(b)
        self._check(mv.nbytes)
        got = self._f.readinto(mv)  # type: ignore[attr-defined]
        self.pos += got or 0
        return got or 0

    def readline(self, size: int = -1) -> bytes:
        limit = self.max_bytes - self.pos + 1
        data = self._f.readline(limit if size is None or size < 0 else min(size, limit))
        self._check(len(data))
        self.pos += len(data)
        return data


class _HashingReader(io.RawIOBase):
    """Passes reads through and checksums the bytes (the archive's crc32c for provenance, at no extra read).

    crc32c, not sha256: it runs at ~6 GB/s where sha256 ran at ~0.55 GB/s here, which would have cost ~10%
    of the conversion; provenance needs to tell file versions apart, not resist forgery."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.crc = 0
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._f.readinto(b)  # type: ignore[attr-defined]
        if n:
            self.crc = google_crc32c.extend(self.crc, bytes(memoryview(b)[:n]))
            self.nbytes += n
        return n or 0

    def drain(self) -> None:
        """Hash the rest of the file (bytes after the pickle's STOP, or a gzip trailer not read yet)."""
        while self._f.read(1 << 20):
            pass


_GZIP_MAGIC = b"\x1f\x8b"

#: Everything an unpickler or gzip can raise on bad bytes (../shared/notes/reliability.md 1.4).
_CORRUPT = (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, KeyError, OverflowError,
            struct.error, TypeError, UnicodeError, ValueError, RecursionError, zlib.error, gzip.BadGzipFile,
            MemoryError)


def load_pickle(path: str | os.PathLike[str], *, max_bytes: int, name: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Unpickle `path` (plain or gzip, told by its first bytes) with SafeUnpickler and a cap of `max_bytes`
    decompressed bytes. Returns (object, info) with info = {"crc32c", "bytes", "decompressed_bytes"}.

    Raises UnsafeInputError (a class outside the allow-list), InputTooLargeError (past the cap) or
    InputFormatError (truncated, not gzip, not a pickle), each naming the file."""
    p = Path(path)
    name = name or p.name
    size = p.stat().st_size
    with open(p, "rb", buffering=0) as raw:
        hashing = _HashingReader(raw)
        buffered = io.BufferedReader(hashing, buffer_size=1 << 20)
        head = buffered.peek(2)[:2]
        compressed = head == _GZIP_MAGIC
        stream: Any = gzip.GzipFile(fileobj=buffered, mode="rb") if compressed else buffered
        capped = CappedReader(stream, max_bytes=max_bytes if compressed else min(max_bytes, size), name=name,
                              compressed=compressed)
        if not compressed and size > max_bytes:
            raise InputTooLargeError(f"{name}: {size:,} bytes, more than the cap of {max_bytes:,}; raise it with "
                                     f"--max-archive-bytes if this archive is real")
        try:
            obj = SafeUnpickler(capped, name=name).load()
        except (UnsafeInputError, InputTooLargeError, InputFormatError):
            raise
        except NestedPayloadError as e:
            raise UnsafeInputError(
                f"{name}: a torch tensor in the pickle carries storage bytes that torch.load(weights_only=True) "
                f"refuses ({e}); they could run code (torch.storage._load_from_bytes loads them unsafely), so the "
                f"file is refused: re-save its tensors as numpy arrays") from None
        except Exception as e:
            raise _corrupt_error(name, e, capped.pos, compressed) from None
        if compressed:
            # read to the end of the gzip stream so that its CRC and length are checked
            try:
                if stream.read(1):
                    raise InputFormatError(f"{name}: holds bytes after the end of the pickle; the file is not one "
                                           f"pickled object: check how it was written")
            except InputFormatError:
                raise
            except Exception as e:
                raise _corrupt_error(name, e, capped.pos, compressed) from None
        buffered.read()
        hashing.drain()
    return obj, {"crc32c": f"{hashing.crc:08x}", "bytes": size, "decompressed_bytes": capped.pos}


def _corrupt_error(name: str, e: BaseException, pos: int, compressed: bool) -> InputFormatError:
    what = type(e).__name__
    detail = str(e).split("\n")[0][:200]
    if isinstance(e, EOFError) and compressed:
        return InputFormatError(f"{name}: the gzip stream ends early (after {pos:,} decompressed bytes: {detail}); "
                                f"the file is truncated: copy it again from its source")
    if isinstance(e, gzip.BadGzipFile | zlib.error):
        return InputFormatError(f"{name}: not a valid gzip stream at {pos:,} decompressed bytes ({what}: {detail}); "
                                f"the file is damaged: copy it again from its source")
    if isinstance(e, MemoryError):
        return InputFormatError(f"{name}: ran out of memory at offset {pos:,} while unpickling; lower --workers or "
                                f"check the file is what it claims")
    if pos <= 2 or isinstance(e, pickle.UnpicklingError) and "invalid load key" in detail:
        return InputFormatError(f"{name}: not a pickle ({what}: {detail}); expected a pickled list of trace records "
                                f"or a batch dict (.pkl/.pkl.gz), or a torch .pt file")
    return InputFormatError(f"{name}: the pickle is damaged at decompressed offset {pos:,} ({what}: {detail}); the file "
                            f"is truncated or corrupt: copy it again from its source")


def _pyg_safe_classes() -> list[Any]:
    try:
        from torch_geometric.data.data import Data, DataEdgeAttr, DataTensorAttr
        from torch_geometric.data.storage import GlobalStorage
    except ImportError:
        return []
    return [Data, DataEdgeAttr, DataTensorAttr, GlobalStorage]


def load_torch(path: str | os.PathLike[str], *, max_bytes: int, name: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Load a `.pt` file with `torch.load(weights_only=True, map_location='cpu')` and nothing else: no fallback
    to unsafe loading. PyG's Data classes are allowed for this call only: torch's process-wide allow-list is
    saved and restored exactly afterwards (torch.serialization.safe_globals would drop entries that PyG
    registered on import)."""
    import torch
    import torch.serialization as ts

    p = Path(path)
    name = name or p.name
    size = p.stat().st_size
    if size > max_bytes:
        raise InputTooLargeError(f"{name}: {size:,} bytes, more than the cap of {max_bytes:,}; raise it with "
                                 f"--max-archive-bytes if this file is real")
    crc = 0
    with open(p, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
        f.seek(0)
        while block := f.read(1 << 22):
            crc = google_crc32c.extend(crc, block)
    before = list(ts.get_safe_globals())
    try:
        ts.add_safe_globals(_pyg_safe_classes())
        # mmap: tensors stay in the page cache until they are cast, instead of a second copy in memory
        obj = torch.load(str(p), weights_only=True, map_location="cpu", mmap=is_zip)
    except pickle.UnpicklingError as e:
        detail = str(e)
        if "Unsupported global" in detail or "Weights only load failed" in detail:
            glob = _unsupported_global(detail)
            raise UnsafeInputError(
                f"{name}: torch.load(weights_only=True) refused it{f' ({glob})' if glob else ''}: the file needs "
                f"classes outside tracestore's allow-list (tensors, numpy arrays, PyG Data) and could run code; "
                f"re-save it with plain tensors") from None
        raise InputFormatError(f"{name}: not a readable torch file ({detail.splitlines()[0][:200]}); copy it again "
                               f"or re-save it with torch.save") from None
    except UnsafeInputError:
        raise
    except Exception as e:
        raise InputFormatError(f"{name}: not a readable torch file ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                               f"copy it again or re-save it with torch.save") from None
    finally:
        ts.clear_safe_globals()
        ts.add_safe_globals(before)
    return obj, {"crc32c": f"{crc:08x}", "bytes": size, "decompressed_bytes": size}


def _unsupported_global(detail: str) -> str:
    for line in detail.splitlines():
        if "Unsupported global" in line or "GLOBAL" in line:
            return line.strip()[:160]
    return ""
