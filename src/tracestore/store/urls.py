"""A store URL or path -> a Location (location.py): LocalLocation, a directory, here; s3:// URLs are
S3Location (remote.py), which resolve() imports only when one is asked for."""

from __future__ import annotations

import builtins
import contextlib
import mmap
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zarr.storage

from ..errors import TracestoreError
from .location import Location


class _LocalMutex:
    """An exclusive flock on `path` (created if absent), held by one process of the host at a time, and
    again after the file was removed and made anew by another process (its inode is checked): the critical
    section of LocalLocation's compare-and-swap."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> _LocalMutex:
        import fcntl

        for _ in range(100):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue  # the directory removed in between
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return self
            os.close(fd)  # removed (a lock released) while we waited: take the new one
        raise TracestoreError(f"{self.path}: could not take this local lock file (it keeps being removed)")

    def remove(self) -> None:
        """Remove the mutex file (still held: whoever waits on it takes the next one)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)  # releases the flock


def _open_new(tmp: Path) -> Any:
    """Open `tmp` for writing, making its directory; again if the directory is removed in between (a writer's
    lock directory, released by another writer at that moment)."""
    for attempt in range(5):
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            return open(tmp, "wb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


class LocalLocation(Location):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().absolute()
        self.url = str(self.path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (LocalLocation, (self.path,))

    def _p(self, key: str) -> Path:
        return self.path / key

    def zarr_store(self, *, read_only: bool) -> Any:
        return zarr.storage.LocalStore(self.path, read_only=read_only)

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self._p(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):  # below a file: nothing stored there either
            return None

    def write_bytes(self, key: str, data: bytes | bytearray | memoryview, *, sync: bool = True) -> None:
        p = self._p(key)
        tmp = p.with_name(f"{p.name}.{uuid.uuid4().hex}.partial")
        try:
            with _open_new(tmp) as f:
                f.write(data)
                f.flush()
                if sync:
                    os.fsync(f.fileno())
            os.replace(tmp, p)
        finally:
            tmp.unlink(missing_ok=True)

    def sync_keys(self, keys: list[str]) -> None:
        for key in keys:
            try:
                fd = os.open(self._p(key), os.O_RDONLY)
            except FileNotFoundError:
                continue  # rewritten since (a resume truncated it); its new version is in the list too
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        with open(self._p(key), "rb") as f:
            return os.pread(f.fileno(), length, start)

    def read_suffix(self, key: str, length: int) -> bytes | None:
        try:
            with open(self._p(key), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                return os.pread(f.fileno(), min(length, size), max(0, size - length))
        except FileNotFoundError:
            return None

    def map(self, key: str) -> memoryview | None:
        try:
            with open(self._p(key), "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return memoryview(b"")
                return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        except FileNotFoundError:
            return None

    def exists(self, key: str = "zarr.json") -> bool:
        return self._p(key).exists()

    def delete(self, key: str) -> None:
        p = self._p(key)
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)

    def delete_all(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path)

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self._p(prefix) if prefix else self.path
        if not base.exists():
            return
        for root, _dirs, files in os.walk(base):
            for name in files:
                yield os.path.relpath(os.path.join(root, name), self.path).replace(os.sep, "/")

    def list_dir(self, prefix: str = "") -> builtins.list[str]:
        base = self._p(prefix) if prefix.strip("/") else self.path
        head = prefix.strip("/") + "/" if prefix.strip("/") else ""
        try:
            return sorted(head + e.name for e in os.scandir(base))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def size(self, key: str) -> int | None:
        try:
            return self._p(key).stat().st_size
        except FileNotFoundError:
            return None

    def is_empty(self) -> bool:
        return not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))

    def sibling(self, suffix: str) -> LocalLocation:
        return LocalLocation(self.path.with_name(self.path.name + suffix))

    def child(self, path: str) -> LocalLocation:
        return LocalLocation(self.path / path)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        # written whole to a temporary file, then hard-linked into place: the link fails if the name exists
        # (O_EXCL's guarantee), and a reader never sees a half-written object
        p = self._p(key)
        tmp = p.with_name(f"{p.name}.{uuid.uuid4().hex}.partial")
        try:
            with _open_new(tmp) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, p)
            except FileExistsError:
                return False
            return True
        finally:
            tmp.unlink(missing_ok=True)

    # compare-and-swap for a writer's lock: the tag is the object's bytes (a lock names its writer's token and
    # expiry, so equal bytes are the same version), compared and replaced under a flock beside the object
    def _mutex(self, key: str) -> _LocalMutex:
        p = self._p(key)
        return _LocalMutex(p.with_name(f"{p.name}.mutex"))

    def read_tagged(self, key: str) -> tuple[bytes | None, str | None]:
        raw = self.read_bytes(key)
        return (raw, raw.hex()) if raw is not None else (None, None)

    def replace_if(self, key: str, data: bytes, tag: str) -> str | None:
        with self._mutex(key) as mutex:
            now: bytes | None = b""
            try:
                now = self.read_bytes(key)
                if now != bytes.fromhex(tag):
                    return None
                self.write_bytes(key, data)
                return data.hex()
            finally:  # no litter beside the object: a process waiting on the mutex takes the next one
                self._drop_mutex(mutex, rmdir=now is None)

    def delete_if(self, key: str, tag: str) -> bool:
        with self._mutex(key) as mutex:
            gone = True
            try:
                if self.read_bytes(key) != bytes.fromhex(tag):
                    gone = not self._p(key).exists()
                    return False
                self._p(key).unlink(missing_ok=True)
                return True
            finally:
                self._drop_mutex(mutex, rmdir=gone)

    def _drop_mutex(self, mutex: _LocalMutex, *, rmdir: bool) -> None:
        mutex.remove()
        if rmdir:  # the object is gone: its directory too, when nothing else is in it (a released lock's)
            with contextlib.suppress(OSError):
                os.rmdir(mutex.path.parent)

    def rename_to(self, other: LocalLocation) -> None:
        """Rename this directory to `other` (atomic: the same file system, `other` must not exist)."""
        os.rename(self.path, other.path)

    def remove_partial_files(self) -> int:
        """Delete `*.partial` files left by a killed writer (zarr's and ours); returns how many."""
        n = 0
        for key in list(self.list()):
            if key.endswith(".partial"):
                self.delete(key)
                n += 1
        return n


def resolve(url: str | os.PathLike[str] | Location, storage_options: dict[str, Any] | None = None) -> Location:
    """A path or URL -> a Location. `file://` URLs and plain paths are local."""
    if isinstance(url, Location):
        return url
    s = os.fspath(url)
    if s.startswith("file://"):
        return LocalLocation(s[len("file://"):])
    if s.startswith(("s3://", "s3a://")):
        from .remote import S3Location

        return S3Location(s, storage_options)
    if "://" in s:
        scheme = s.split("://", 1)[0]
        raise TracestoreError(
            f"{s}: the {scheme}:// scheme is not supported by this version of tracestore; "
            f"give a local path or an s3:// URL"
        )
    return LocalLocation(s)
