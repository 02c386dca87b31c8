"""Location: where a store lives, as the rest of the package sees it -- whole objects, ranges, memory maps,
listing, atomic and compare-and-swap writes. The backends implement it: LocalLocation (a directory, urls.py)
and S3Location (object storage, remote.py); urls.resolve() picks one for a URL."""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class Location:
    """Where a store lives. Subclasses: LocalLocation (a directory)."""

    url: str
    #: True where objects cannot be memory-mapped and reads are network requests (batch them)
    is_remote: bool = False

    def zarr_store(self, *, read_only: bool) -> Any:
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes | None:
        """The whole object, or None if it does not exist."""
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes | bytearray | memoryview, *, sync: bool = True) -> None:
        """Write an object atomically: readers see the old or the new bytes, never a part. `sync=False` leaves
        the bytes to the OS's write-back (a process kill loses nothing; a power cut may) until `sync_keys()`."""
        raise NotImplementedError

    def sync_keys(self, keys: list[str]) -> None:
        """Make objects written with sync=False durable (a no-op where every write is: object stores)."""

    def read_range(self, key: str, start: int, length: int) -> bytes:
        raise NotImplementedError

    def read_suffix(self, key: str, length: int) -> bytes | None:
        """The last `length` bytes, or None if the object does not exist."""
        raise NotImplementedError

    def refetch(self, key: str, start: int, length: int) -> bytes:
        """The range again from the storage itself, past any cache, and replacing the cached copy: what a
        reader does once when bytes fail their crc32c (damaged in transit, or a cache entry written from a
        damaged answer), before it calls the store corrupt."""
        return self.read_range(key, start, length)

    def recache(self, key: str, start: int, data: bytes | bytearray | memoryview) -> None:
        """Replace a cached range with `data` (bytes repaired after a crc32c failure); no cache: nothing."""

    def read_ranges(self, key: str, starts: list[int], lengths: list[int]) -> list[bytes]:
        """Several ranges of one object (object stores coalesce and fetch them concurrently)."""
        return [self.read_range(key, s, n) for s, n in zip(starts, lengths, strict=True)]

    def map_parallel(self, fn: Callable[[Any], T], items: list[Any]) -> list[T]:
        """Run `fn` over `items`; object stores use a thread pool so that requests overlap."""
        return [fn(i) for i in items]

    def map(self, key: str) -> memoryview | None:
        """A read-only memory map of the object, or None where the backend cannot map (object stores)
        or the object does not exist."""
        return None

    def exists(self, key: str = "zarr.json") -> bool:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def delete_all(self) -> None:
        raise NotImplementedError

    def delete_keys(self, keys: list[str]) -> None:
        """Delete these objects (not prefixes); object stores batch the requests."""
        for key in keys:
            self.delete(key)

    def copy_from(self, src: Location, key: str) -> None:
        """Copy object `key` of `src` to the same key here (object stores copy server-side where they can)."""
        data = src.read_bytes(key)
        if data is None:
            raise FileNotFoundError(f"{src.url}/{key}: no such object to copy")
        self.write_bytes(key, data)

    def list(self, prefix: str = "") -> Iterator[str]:
        raise NotImplementedError

    def list_dir(self, prefix: str = "") -> builtins.list[str]:
        """The entries directly below `prefix` (a folder; "" for the top), files and folders alike, as keys:
        one LIST request on object storage, however many objects lie deeper."""
        raise NotImplementedError

    def size(self, key: str) -> int | None:
        raise NotImplementedError

    def total_bytes(self) -> int:
        return sum(self.size(k) or 0 for k in self.list())

    def is_empty(self) -> bool:
        """True where nothing is stored (a missing or empty directory, a prefix without objects)."""
        return next(iter(self.list()), None) is None

    def sibling(self, suffix: str) -> Location:
        """The location at this one's URL + `suffix`, beside it (the writer's lock, and the new store built
        beside the old one by an overwrite)."""
        raise NotImplementedError

    def child(self, path: str) -> Location:
        """The location at `path` inside this one (a part of a store made of parts: parts/00001)."""
        raise NotImplementedError

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write an object only if it does not exist yet, atomically against other writers (a local
        O_CREAT|O_EXCL; a conditional PUT on object storage). False where it already existed."""
        raise NotImplementedError

    def read_tagged(self, key: str) -> tuple[bytes | None, str | None]:
        """An object and the tag that replace_if() compares (an ETag on object storage), or (None, None)."""
        raise NotImplementedError

    def replace_if(self, key: str, data: bytes, tag: str) -> str | None:
        """Replace an object only if it is still the one read with `tag` (compare-and-swap: a conditional PUT,
        If-Match, on object storage): of two writers replacing the same version, one wins. Returns the new
        tag, or None where the object changed or is gone."""
        raise NotImplementedError

    def delete_if(self, key: str, tag: str) -> bool:
        """Delete an object only if it is still the one read with `tag`. Object storage has no conditional
        DELETE here: the object is first replaced (replace_if) by an empty one, then deleted, so another
        writer can replace it only in the moment between the two; a lock's holder finds that out at its next
        renewal (the lease's fencing)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
