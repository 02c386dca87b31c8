"""Object storage (s3://) behind the Location interface, on obstore.

One retry layer: obstore's own retries are switched off and every request goes through `_retrying`, which
retries 5xx (503 SlowDown), reset connections, truncated bodies and stalled responses with exponential
backoff until an overall deadline, then raises RemoteStoreError naming the bucket, key and byte range. Stacked
retry layers turned one persistent 503 into 25 GETs and 54 s in s3fs (../shared/notes/reliability.md 4).

Credentials and endpoint come from `storage_options` or the standard AWS environment variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP); secrets are never
printed: reprs and messages show the URL only.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import hashlib
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from ..config import parse_size
from ..errors import RemoteStoreError, StaleStoreError
from .location import Location

T = TypeVar("T")

#: storage_options keys tracestore reads itself; every other key goes to obstore's S3Config
_OWN_KEYS = {"deadline", "timeout", "connect_timeout", "allow_http", "cache_dir", "cache_limit", "max_concurrency"}
_ALIASES = {
    "endpoint_url": "endpoint", "key": "access_key_id", "secret": "secret_access_key", "token": "session_token",
    "region_name": "region", "aws_access_key_id": "access_key_id", "aws_secret_access_key": "secret_access_key",
}


class _Truncated(Exception):
    pass


class RangeCache:
    """Byte ranges fetched from the network, kept on local disk, least-recently-used evicted past `limit`.

    One entry per range asked for, never a coalesced span with gaps: a TraceLoader epoch asks for whole
    shuffle chunks (one entry each, read again whole by the next epoch), a random read for one trace."""

    def __init__(self, directory: str | os.PathLike[str], limit: int | None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.limit = limit
        self._lock = threading.Lock()
        self._entries: OrderedDict[Path, int] = OrderedDict()
        files = [p for p in self.dir.rglob("*.bin")]
        for p in sorted(files, key=lambda p: p.stat().st_atime):
            self._entries[p] = p.stat().st_size
        self._total = sum(self._entries.values())

    def _path(self, url: str, start: int, length: int) -> Path:
        h = hashlib.sha1(url.encode()).hexdigest()
        return self.dir / h[:2] / f"{h}-{start}-{length}.bin"

    def get(self, url: str, start: int, length: int) -> bytes | None:
        p = self._path(url, start, length)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return None
        if len(data) != length:
            return None
        with self._lock:
            if p in self._entries:
                self._entries.move_to_end(p)
        return data

    def put(self, url: str, start: int, length: int, data: bytes | memoryview) -> None:
        p = self._path(url, start, length)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".{os.getpid()}.{threading.get_ident()}.partial")
        tmp.write_bytes(data)
        os.replace(tmp, p)
        with self._lock:
            self._total += len(data) - self._entries.pop(p, 0)
            self._entries[p] = len(data)
            while self.limit is not None and self._total > self.limit and len(self._entries) > 1:
                old, size = self._entries.popitem(last=False)
                old.unlink(missing_ok=True)
                self._total -= size

    @property
    def total_bytes(self) -> int:
        return self._total


#: Ranges of one object closer than this are fetched in one GET (obstore's get_ranges default).
_COALESCE_BYTES = 1024 * 1024


class S3Location(Location):
    """A store under s3://bucket/prefix."""

    is_remote = True

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        from obstore.store import S3Store

        if not url.startswith(("s3://", "s3a://")):
            raise ValueError(f"{url}: not an s3:// URL")
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        rest = self.url.split("://", 1)[1]
        self.bucket, _, self.prefix = rest.partition("/")
        if not self.bucket:
            raise ValueError(f"{url}: no bucket in the URL; expected s3://BUCKET/PATH")
        opts = self.storage_options
        self.deadline = float(opts.get("deadline", os.environ.get("TRACESTORE_S3_DEADLINE", 20.0)))
        timeout = float(opts.get("timeout", 10.0))
        allow_http = opts.get("allow_http")
        if allow_http is None:
            allow_http = os.environ.get("AWS_ALLOW_HTTP", "").lower() in ("1", "true", "yes")
        client: Any = {"timeout": timedelta(seconds=timeout),
                  "connect_timeout": timedelta(seconds=float(opts.get("connect_timeout", min(5.0, timeout)))),
                  "allow_http": bool(allow_http)}
        config: Any = {}
        for k, v in opts.items():
            if k in _OWN_KEYS:
                continue
            config[_ALIASES.get(k, k)] = v
        if "endpoint" in config and str(config["endpoint"]).startswith("http://"):
            client["allow_http"] = True
        # path-style requests unless asked otherwise: what MinIO, moto and most S3-compatible servers need
        config.setdefault("virtual_hosted_style_request", False)
        # obstore's runtime does not survive fork(): use this location from threads or spawned processes
        self._store_args: dict[str, Any] = {
            "config": config, "client_options": client,
            "retry_config": {"max_retries": 0, "retry_timeout": timedelta(seconds=self.deadline)}}
        self._store = S3Store(self.bucket, prefix=self.prefix or None, **self._store_args)
        self._bucket_store: Any = None
        cache_dir = opts.get("cache_dir")
        self.cache = RangeCache(cache_dir, parse_size(opts.get("cache_limit"), what="cache_limit")) if cache_dir else None
        self.max_concurrency = int(opts.get("max_concurrency", 16))
        self._pool: ThreadPoolExecutor | None = None
        self._range_pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        # the ETag of each object whose shard index was read (read_suffix): later range reads of it are
        # conditional on it (If-Match), so that a shard replaced since (an --overwrite copies the new store's
        # objects over the old keys) is a StaleStoreError, never the new bytes at the old index's offsets
        self._versions: dict[str, str] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (S3Location, (self.url, self.storage_options))

    def __repr__(self) -> str:
        return f"S3Location({self.url!r})"  # never the storage options: they may hold secrets

    # -- the one retry layer --------------------------------------------------------------------------
    def _retrying(self, what: str, key: str, rng: str, fn: Callable[[], T]) -> T:
        import obstore.exceptions as oe

        start = time.monotonic()
        delay, attempt = 0.05, 0
        while True:
            attempt += 1
            try:
                return fn()
            except (FileNotFoundError, oe.NotFoundError):
                raise
            except oe.PreconditionError:
                raise StaleStoreError(f"{self._where(key, rng)}: the object changed since its shard index was read "
                                      f"(the store was replaced); its traces would mix two stores: reopen the "
                                      f"store with tracestore.open()") from None
            except (oe.PermissionDeniedError, oe.UnauthenticatedError) as e:
                raise RemoteStoreError(f"{self._where(key, rng)}: {what} was refused ({type(e).__name__}); check the "
                                       f"credentials (AWS_ACCESS_KEY_ID / storage_options) and the bucket policy") from None
            except (oe.InvalidPathError, oe.UnknownConfigurationKeyError, oe.NotSupportedError) as e:
                raise RemoteStoreError(f"{self._where(key, rng)}: {what}: {_short(e)}") from None
            except Exception as e:  # 5xx, reset connection, timeout, truncated body: retry until the deadline
                elapsed = time.monotonic() - start
                if elapsed >= self.deadline:
                    raise RemoteStoreError(
                        f"{self._where(key, rng)}: {what} failed {attempt} time(s) in {elapsed:.1f} s (last error: "
                        f"{_short(e)}); the object store is unreachable or failing. Check the endpoint "
                        f"(AWS_ENDPOINT_URL) and retry later, or raise storage_options['deadline'] "
                        f"(now {self.deadline:g} s)") from None
                time.sleep(min(delay * (0.5 + random.random()), max(0.0, self.deadline - elapsed)))
                delay = min(delay * 2, 2.0)

    def _cache_key(self, key: str) -> str:
        """The disk cache's name for an object: with its ETag where known, so that a replaced object's cached
        ranges are never served for the new one."""
        v = self._versions.get(key)
        return self._where(key) if v is None else f"{self._where(key)}@{v}"

    def _where(self, key: str, rng: str = "") -> str:
        path = f"{self.prefix}/{key}" if self.prefix else key
        return f"s3://{self.bucket}/{path}" + (f" bytes {rng}" if rng else "")

    # -- Location -------------------------------------------------------------------------------------
    def zarr_store(self, *, read_only: bool) -> Any:
        import zarr.storage

        return zarr.storage.ObjectStore(self._store, read_only=read_only)

    def read_bytes(self, key: str) -> bytes | None:
        import obstore

        def fetch() -> bytes:
            r = obstore.get(self._store, key)
            data = bytes(r.bytes())
            if len(data) != r.meta["size"]:
                raise _Truncated(f"got {len(data)} of {r.meta['size']} bytes")
            return data

        try:
            return self._retrying("GET", key, "", fetch)
        except (FileNotFoundError, _not_found()):
            return None

    def write_bytes(self, key: str, data: bytes | bytearray | memoryview, *, sync: bool = True) -> None:
        import obstore

        # a single PUT is atomic on S3: readers see the old or the new object
        self._retrying("PUT", key, "", lambda: obstore.put(self._store, key, data))

    def sibling(self, suffix: str) -> S3Location:
        return S3Location(self.url + suffix, self.storage_options)

    def child(self, path: str) -> S3Location:
        # the parts of one store share its disk cache (one cache_limit for the store, one scan of the
        # directory), not one cache each
        own = {k: v for k, v in self.storage_options.items() if k not in ("cache_dir", "cache_limit")}
        c = S3Location(f"{self.url}/{path.strip('/')}", own)
        c.storage_options = dict(self.storage_options)
        c.cache = self.cache
        return c

    def create_exclusive(self, key: str, data: bytes) -> bool:
        import obstore
        import obstore.exceptions as oe

        # a conditional PUT (If-None-Match: *): S3 (since 2024), MinIO and moto refuse it with 412 where the
        # object exists. A server that ignores the header would let two writers in: there is no fallback
        def put() -> bool:
            try:
                obstore.put(self._store, key, data, mode="create")
            except oe.AlreadyExistsError:
                return False
            return True

        return self._retrying("PUT (if absent)", key, "", put)

    def read_tagged(self, key: str) -> tuple[bytes | None, str | None]:
        import obstore

        def fetch() -> tuple[bytes, str | None]:
            r = obstore.get(self._store, key)
            data = bytes(r.bytes())
            if len(data) != r.meta["size"]:
                raise _Truncated(f"got {len(data)} of {r.meta['size']} bytes")
            return data, r.meta.get("e_tag")

        try:
            return self._retrying("GET", key, "", fetch)
        except (FileNotFoundError, _not_found()):
            return None, None

    def replace_if(self, key: str, data: bytes, tag: str) -> str | None:
        import obstore
        import obstore.exceptions as oe

        # a conditional PUT (If-Match: the ETag read): S3 (since 2024), MinIO and moto refuse it with 412 where
        # the object changed. A PUT retried after a lost answer finds its own write: compared by content
        def put() -> str | None:
            try:
                return str(obstore.put(self._store, key, data, mode={"e_tag": tag})["e_tag"])
            except (oe.PreconditionError, FileNotFoundError, _not_found()):
                now, now_tag = self.read_tagged(key)
                return now_tag if now == data else None

        return self._retrying("PUT (if match)", key, "", put)

    def delete_if(self, key: str, tag: str) -> bool:
        import obstore

        new_tag = self.replace_if(key, b"", tag)
        if new_tag is None:
            return False
        # one attempt, never retried: a DELETE whose answer was lost and that is sent again could remove the
        # lock that the next writer made in between. Left behind, the empty object counts as released
        with contextlib.suppress(Exception):
            obstore.delete(self._store, key)
        return True

    def copy_from(self, src: Location, key: str) -> None:
        """Server-side copy (CopyObject) within one bucket and endpoint; else through this process."""
        import obstore
        from obstore.store import S3Store

        if not (isinstance(src, S3Location) and src.bucket == self.bucket
                and src.storage_options == self.storage_options):
            super().copy_from(src, key)
            return
        if self._bucket_store is None:
            self._bucket_store = S3Store(self.bucket, **self._store_args)
        a = f"{src.prefix}/{key}" if src.prefix else key
        b = f"{self.prefix}/{key}" if self.prefix else key
        self._retrying("COPY", key, "", lambda: obstore.copy(self._bucket_store, a, b))

    def delete_keys(self, keys: builtins.list[str]) -> None:
        import obstore

        for a in range(0, len(keys), 1000):
            part = keys[a:a + 1000]
            self._retrying("DELETE", part[0], "", functools.partial(obstore.delete, self._store, part))

    def read_range(self, key: str, start: int, length: int) -> bytes:
        return self.read_ranges(key, [start], [length])[0]

    def refetch(self, key: str, start: int, length: int) -> bytes:
        return self.read_ranges(key, [start], [length], fresh=True)[0]

    def recache(self, key: str, start: int, data: bytes | bytearray | memoryview) -> None:
        if self.cache:
            self.cache.put(self._cache_key(key), start, len(data), memoryview(data))

    def read_ranges(self, key: str, starts: list[int], lengths: list[int], *, fresh: bool = False) -> list[bytes]:
        """Several ranges of one object: cached ones from disk, the rest in one get_ranges call (obstore
        coalesces nearby ranges and fetches them concurrently). Each result is checked for length."""
        import obstore

        out: list[bytes | None] = [None] * len(starts)
        todo = []
        for i, (s, n) in enumerate(zip(starts, lengths, strict=True)):
            if n == 0:
                out[i] = b""
                continue
            hit = self.cache.get(self._cache_key(key), s, n) if self.cache and not fresh else None
            if hit is not None:
                out[i] = hit
            else:
                todo.append(i)
        if todo:
            s_ = [starts[i] for i in todo]
            e_ = [starts[i] + lengths[i] for i in todo]
            rng = f"{min(s_)}-{max(e_) - 1}" if len(todo) > 1 else f"{s_[0]}-{e_[0] - 1}"

            version = self._versions.get(key)

            def fetch() -> list[bytes]:
                if version is None:
                    got = [bytes(b) for b in obstore.get_ranges(self._store, key, starts=s_, ends=e_)]
                else:  # get_ranges takes no If-Match: the same coalescing, with conditional GETs
                    got = self._conditional_ranges(key, version, s_, e_)
                for b, s, e in zip(got, s_, e_, strict=True):
                    if len(b) != e - s:
                        raise _Truncated(f"range {s}-{e - 1}: got {len(b)} of {e - s} bytes")
                return got

            got = self._retrying("ranged GET", key, rng, fetch)
            for i, b in zip(todo, got, strict=True):
                out[i] = b
                if self.cache:
                    self.cache.put(self._cache_key(key), starts[i], lengths[i], b)
        return out  # type: ignore[return-value]

    def _conditional_ranges(self, key: str, version: str, starts: list[int], ends: list[int]) -> list[bytes]:
        """Ranges of one object fetched with If-Match: version, ranges less than _COALESCE_BYTES apart merged
        into one GET (as obstore's get_ranges does), the GETs run concurrently on a pool of their own (the
        caller may be a task of map_parallel's pool)."""
        import obstore

        spans: list[list[Any]] = []  # [start, end, [indices]]
        for i in sorted(range(len(starts)), key=starts.__getitem__):
            if spans and starts[i] <= spans[-1][1] + _COALESCE_BYTES:
                spans[-1][1] = max(spans[-1][1], ends[i])
                spans[-1][2].append(i)
            else:
                spans.append([starts[i], ends[i], [i]])

        def get(span: list[Any]) -> Any:
            return obstore.get(self._store, key, options={"range": (span[0], span[1]), "if_match": version}).bytes()

        if len(spans) == 1:
            bufs = [get(spans[0])]
        else:
            with self._pool_lock:
                if self._range_pool is None:
                    self._range_pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="tracestore-s3r")
            bufs = list(self._range_pool.map(get, spans))
        out: list[bytes] = [b""] * len(starts)
        for (a, _b, idx), buf in zip(spans, bufs, strict=True):
            mv = memoryview(buf)
            for i in idx:
                out[i] = bytes(mv[starts[i] - a:ends[i] - a])
        return out

    def read_span(self, key: str, start: int, length: int) -> Any:
        """One byte range as a read-only buffer (obstore's, not copied into `bytes`: for the loader's whole
        shuffle chunks, tens of MiB, that copy cost more than the crc32c checks). Cached on disk as one entry,
        like read_range; checked for length."""
        import obstore

        where = self._cache_key(key)
        hit = self.cache.get(where, start, length) if self.cache else None
        if hit is not None:
            return hit
        version = self._versions.get(key)

        def fetch() -> Any:
            if version is None:
                got = obstore.get_range(self._store, key, start=start, end=start + length)
            else:
                got = obstore.get(self._store, key, options={"range": (start, start + length),
                                                            "if_match": version}).bytes()
            if len(memoryview(got)) != length:
                raise _Truncated(f"range {start}-{start + length - 1}: got {len(memoryview(got))} of {length} bytes")
            return got

        got = self._retrying("ranged GET", key, f"{start}-{start + length - 1}", fetch)
        if self.cache:
            self.cache.put(where, start, length, memoryview(got))
        return got

    def read_suffix(self, key: str, length: int) -> bytes | None:
        import obstore

        def fetch() -> bytes:
            r = obstore.get(self._store, key, options={"range": {"suffix": length}})
            data = bytes(r.bytes())
            want = min(length, r.meta["size"])
            if len(data) != want:
                raise _Truncated(f"got {len(data)} of {want} bytes")
            if r.meta.get("e_tag"):
                self._versions[key] = str(r.meta["e_tag"])
            return data

        if self.cache:
            try:
                head = self._retrying("HEAD", key, "", lambda: obstore.head(self._store, key))
            except (FileNotFoundError, _not_found()):
                return None
            if head.get("e_tag"):
                self._versions[key] = str(head["e_tag"])
            size = int(head["size"])
            n = min(length, size)
            return self.read_range(key, size - n, n)
        try:
            return self._retrying("GET (suffix)", key, f"-{length}", fetch)
        except (FileNotFoundError, _not_found()):
            return None

    def exists(self, key: str = "zarr.json") -> bool:
        return self.size(key) is not None

    def size(self, key: str) -> int | None:
        import obstore

        try:
            return int(self._retrying("HEAD", key, "", lambda: obstore.head(self._store, key))["size"])
        except (FileNotFoundError, _not_found()):
            return None

    def list(self, prefix: str = "") -> Iterator[str]:
        import obstore

        batches = self._retrying("LIST", prefix, "", lambda: list(obstore.list(self._store, prefix=prefix or None)))
        for batch in batches:
            for meta in batch:
                yield meta["path"]

    def is_empty(self) -> bool:
        return not self.list_dir()  # one LIST of the top entries, not of every object

    def list_dir(self, prefix: str = "") -> builtins.list[str]:
        import obstore

        head = prefix.strip("/") + "/" if prefix.strip("/") else None
        got = self._retrying("LIST", prefix, "", lambda: obstore.list_with_delimiter(self._store, prefix=head))
        return sorted([*got["common_prefixes"], *(o["path"] for o in got["objects"])])

    def delete(self, key: str) -> None:
        import obstore

        keys = [k for k in self.list(key.rstrip("/") + "/")] + ([key] if self.exists(key) else [])
        if keys:
            self._retrying("DELETE", key, "", lambda: obstore.delete(self._store, keys))

    def delete_all(self) -> None:
        import obstore

        keys = list(self.list())
        for a in range(0, len(keys), 1000):
            part = keys[a:a + 1000]
            self._retrying("DELETE", part[0], "", functools.partial(obstore.delete, self._store, part))

    def map_parallel(self, fn: Callable[[Any], T], items: builtins.list[Any]) -> builtins.list[T]:
        """Run `fn` over items on a small thread pool (obstore's blocking calls release the GIL)."""
        if len(items) <= 1:
            return [fn(i) for i in items]
        with self._pool_lock:  # loader threads may arrive together: one pool
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="tracestore-s3")
        return list(self._pool.map(fn, items))


def _not_found() -> type[BaseException]:
    import obstore.exceptions as oe

    return oe.NotFoundError


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"
