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

import importlib
import io
import os
import pickle
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import google_crc32c

from ..errors import InputFormatError, InputTooLargeError, UnsafeInputError

_NUMPY_CORE = ("numpy._core", "numpy.core")

#: (module, name) -> where the real object lives (module, name). Both numpy spellings map to the installed one.
_ALLOWED: dict[tuple[str, str], tuple[str, str]] = {g: g for g in [
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch_geometric.data.data", "Data"),
    ("torch_geometric.data.data", "DataEdgeAttr"),
    ("torch_geometric.data.data", "DataTensorAttr"),
    ("torch_geometric.data.storage", "GlobalStorage"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("builtins", "bytearray"),
]}
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

    def __init__(self, f: Any, *, max_bytes: int, name: str, compressed: bool) -> None:
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


class _Source:
    """The archive's bytes, gunzipped if `compressed`, with read/readinto/readline for the unpickler, and the
    crc32c of the file as read (provenance, at no extra read).

    gzip is inflated here with zlib directly, 4 MiB of input per call, instead of through gzip.GzipFile, whose
    pure-Python reader works in 8 KiB steps (~8% of a conversion here); each call is capped in output so a
    gzip bomb never inflates much past what the unpickler asked for. zlib checks the gzip trailer (CRC-32 and
    length) at the end of each member. crc32c, not sha256, for provenance: ~6 GB/s against ~0.55 GB/s here,
    where sha256 would have cost ~10% of the conversion; provenance tells file versions apart, it does not
    resist forgery."""

    _IN = 4 << 20
    _OUT = 8 << 20

    def __init__(self, f: BinaryIO, *, compressed: bool) -> None:
        self._f = f
        self.compressed = compressed
        self.crc = 0
        self._d = zlib.decompressobj(31) if compressed else None
        self._buf = bytearray()
        self._pos = 0
        self._done = False

    def _raw(self, n: int) -> bytes:
        data = self._f.read(n)
        if data:
            self.crc = google_crc32c.extend(self.crc, data)
        return data

    def _more(self) -> bool:
        """Append more bytes to the buffer; False at the end of the data."""
        if self._done:
            return False
        if self._d is None:
            data = self._raw(self._IN)
            if not data:
                self._done = True
                return False
            self._append(data)
            return True
        d = self._d
        if d.unconsumed_tail:
            data = d.unconsumed_tail
        elif d.eof:
            data = d.unused_data or self._raw(self._IN)
            if not data.strip(b"\0"):  # the end (zero padding after the last member is tolerated)
                self._done = True
                return False
            self._d = d = zlib.decompressobj(31)  # another gzip member follows
        else:
            data = self._raw(self._IN)
            if not data:
                raise EOFError("compressed file ended before the end-of-stream marker was reached")
        self._append(d.decompress(data, self._OUT))
        return True

    def _append(self, out: bytes) -> None:
        if self._pos > (16 << 20):
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += out

    def _avail(self) -> int:
        return len(self._buf) - self._pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            while self._more():
                pass
            n = self._avail()
        while self._avail() < n and self._more():
            pass
        out = bytes(self._buf[self._pos:self._pos + n])
        self._pos += len(out)
        return out

    def readinto(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        n = len(mv)
        while self._avail() < n and self._more():
            pass
        k = min(n, self._avail())
        mv[:k] = self._buf[self._pos:self._pos + k]
        self._pos += k
        return k

    def readline(self, size: int = -1) -> bytes:
        while True:
            i = self._buf.find(b"\n", self._pos)
            if i >= 0 or not self._more():
                break
        end = len(self._buf) if i < 0 else i + 1
        if size is not None and size >= 0:
            end = min(end, self._pos + size)
        out = bytes(self._buf[self._pos:end])
        self._pos = end
        return out

    def drain(self) -> None:
        """Checksum the rest of the file (bytes after the pickle's end)."""
        while self._raw(self._IN):
            pass


_GZIP_MAGIC = b"\x1f\x8b"

def load_pickle(path: str | os.PathLike[str], *, max_bytes: int, name: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Unpickle `path` (plain or gzip, told by its first bytes) with SafeUnpickler and a cap of `max_bytes`
    decompressed bytes. Returns (object, info) with info = {"crc32c", "bytes", "decompressed_bytes"}.

    Raises UnsafeInputError (a class outside the allow-list), InputTooLargeError (past the cap) or
    InputFormatError (truncated, not gzip, not a pickle), each naming the file."""
    p = Path(path)
    name = name or p.name
    size = p.stat().st_size
    with open(p, "rb") as raw:
        compressed = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        if not compressed and size > max_bytes:
            raise InputTooLargeError(f"{name}: {size:,} bytes, more than the cap of {max_bytes:,}; raise it with "
                                     f"--max-archive-bytes if this archive is real")
        stream = _Source(raw, compressed=compressed)
        capped = CappedReader(stream, max_bytes=max_bytes if compressed else min(max_bytes, size), name=name,
                              compressed=compressed)
        try:
            obj = SafeUnpickler(capped, name=name).load()
            # read to the end of the gzip stream: zlib checks its CRC and length there
            extra = stream.read(1) if compressed else b""
        except (UnsafeInputError, InputTooLargeError, InputFormatError):
            raise
        except NestedPayloadError as e:
            raise UnsafeInputError(
                f"{name}: a torch tensor in the pickle carries storage bytes that torch.load(weights_only=True) "
                f"refuses ({e}); they could run code (torch.storage._load_from_bytes loads them unsafely), so the "
                f"file is refused: re-save its tensors as numpy arrays") from None
        except Exception as e:
            raise _corrupt_error(name, e, capped.pos, compressed) from None
        if extra:
            raise InputFormatError(f"{name}: holds bytes after the end of the pickle; the file is not one pickled "
                                   f"object: check how it was written")
        stream.drain()
    return obj, {"crc32c": f"{stream.crc:08x}", "bytes": size, "decompressed_bytes": capped.pos}


def _corrupt_error(name: str, e: BaseException, pos: int, compressed: bool) -> InputFormatError:
    what = type(e).__name__
    detail = str(e).split("\n")[0][:200]
    if isinstance(e, EOFError) and compressed:
        return InputFormatError(f"{name}: the gzip stream ends early (after {pos:,} decompressed bytes: {detail}); "
                                f"the file is truncated: copy it again from its source")
    if isinstance(e, zlib.error):
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
    # PyG first: importing it registers safe globals of its own, which the restore below must keep
    pyg = _pyg_safe_classes()
    before = list(ts.get_safe_globals())
    try:
        ts.add_safe_globals(pyg)
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
