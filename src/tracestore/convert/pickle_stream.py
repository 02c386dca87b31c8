"""Read a pickled archive record by record, through the allow-list (safe_unpickle.py), in bounded memory.

Archives of pickle protocol 2 or later are read by `StreamingUnpickler` (in pure Python so that it can stop
between opcodes): a pickled list of records is handed over one record at a time and each record is let go
of, memo included, once the caller has it, so memory holds a record, not an archive (a real one is 20-35 GB);
the cap then holds per record. Older protocols (0 and 1) are loaded whole, under the cap for the whole file.
The opcode dispatch costs ~40 us per array over C's, ~1% of a seed record's read.

`PickleArchive` opens a file (plain or gzip, told by its first bytes; `_Source` decompresses it in blocks
and hands out exact reads), `content` is what it holds (a RecordStream for a list of records) and `finish()`
checks what follows the pickle and returns the file's crc32c and sizes. `load_pickle` loads a file whole.
"""

from __future__ import annotations

import collections
import itertools
import os
import pickle
import sys
import types
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import google_crc32c

from ..errors import InputFormatError, InputTooLargeError, UnsafeInputError
from .safe_unpickle import (
    BASE_DISPATCH,
    AllowListUnpickler,
    CappedReader,
    NestedPayloadError,
    RefusedCodecError,
    short_repr,
)

#: the longest line (the text argument of GLOBAL: module and name) a pickle of protocol 2 or later may hold
#: when streamed; longer is refused at once (a line with no end would otherwise be read whole first)
MAX_LINE_BYTES = 64 << 10


#: memo values kept after their record is released: small immutable things later records may name again
#: (dict keys, token strings, classes and functions, dtypes, numpy's one-byte reduce constant b'b');
#: everything else (arrays, lists, dicts, tuples, data bytes) goes
_KEPT_BYTES = 64
#: at least this much may be kept in the memo across records (real archives: tens to hundreds of MB of token
#: strings), or a quarter of the cap per record if more; past it the archive is refused, as a bomb of many
#: small records would otherwise fill memory through the memo
KEPT_MEMO_BYTES = 512 * 2**20
#: what a kept memo entry costs beside its object (its slot in the memo dict, its int key), counted with it
_MEMO_ENTRY_BYTES = 100


#: what the memo keeps whatever its size: numbers, strings, and the allow-list's classes and functions (not
#: whatever is callable: an instance may be too, as PyG's Data is through __call__, and goes with its record)
_KEPT_TYPES = (str, int, float, complex, type, types.FunctionType, types.BuiltinFunctionType)


def _keep_in_memo(v: Any) -> bool:
    if v is None or isinstance(v, _KEPT_TYPES):
        return True
    if isinstance(v, bytes):
        return len(v) <= _KEPT_BYTES
    # numpy's dtypes are shared by every array of a dtype; tuples (shapes, reduce arguments) are built anew for
    # each array by numpy and torch, so they go with their record
    return type(v).__name__ == "dtype" or type(v).__module__.startswith("numpy.dtypes")


def _trace_of(rec: Any) -> str:
    """', trace ID' for a record dict with an id under a usual key, else ''."""
    if isinstance(rec, dict):
        for key in ("id", "question_id", "trace_id"):
            v = rec.get(key)
            if isinstance(v, str | int) and not isinstance(v, bool):
                return f", trace {short_repr(v)}"
    return ""


class StreamingUnpickler(AllowListUnpickler):
    """The allow-list unpickler (same `find_class`), in pure Python so that it can stop between opcodes:
    `records()` hands over the items of a top-level list of dicts one at a time, as soon as each is complete,
    and after each one releases the memo entries that hold its arrays, lists and dicts (the memo would
    otherwise keep the whole archive alive). A pickle whose top-level object is anything else is loaded
    whole and handed over as one item.

    Records are complete when the next begins: a dict record is built in place (EMPTY_DICT, then its items),
    so it is handed over when the next record's EMPTY_DICT lands beside it, or at the APPEND(S) that would
    add it to the list, or at the bare APPEND (no MARK) that ends the pure-Python pickler's lists of N = 1
    (mod 1000) items. A later reference to a released object (a record that shares an array with an earlier
    one) raises a clear error, as does a list whose items are tuples of dicts."""

    dispatch = dict(AllowListUnpickler.dispatch)

    def __init__(self, file: Any, *, name: str, capped: CappedReader | None = None) -> None:
        super().__init__(file, name=name, capped=capped)
        self._top: list[Any] | None = None
        self._ready: list[Any] = []
        self._new_memo: list[Any] = []
        self._memo_next = 0  # MEMOIZE's next index (len(memo) no longer is: released entries are deleted)
        self._kept_bytes = 0
        self._kept = 0
        #: the stack frame of the top-level list's MARK (its items are pushed there), while it is open
        self._top_frame: list[Any] | None = None
        self.whole = False
        #: records handed over so far
        self.handed = 0

    def _where(self) -> str:
        return f"{self.name}: record {self.handed}" if self._top is not None else self.name

    # -- the memo: remember what each record added, release it afterwards ----------------------------------
    def _memo_get(self, key: Any) -> Any:
        try:
            return self.memo[key]
        except KeyError:
            if not (isinstance(key, int) and key < self._memo_next):
                raise pickle.UnpicklingError(f"Memo value not found at index {key}") from None
            # the record being read: the next on the list's frame when the item itself is the shared object (the
            # records before it on the frame are complete), else the last there (the one being filled)
            frame = self._top_frame
            record = self.handed + (len(frame) if self.stack is frame else max(0, len(frame or ()) - 1))
            raise InputFormatError(
                f"{self.name}: record {record} refers back to an object of an earlier record (an array, list, dict, "
                f"tuple or other object: pickle memo {key}), which tracestore has already converted and let go of: it "
                f"reads records one at a time to bound memory, so records must not share objects other than "
                f"strings and numbers; save each record's values as their own objects (copy.deepcopy(record), or "
                f".copy() for an array)") from None

    def _load_get(self) -> None:
        self.append(self._memo_get(int(self.readline()[:-1])))

    def _load_binget(self) -> None:
        self.append(self._memo_get(self.read(1)[0]))

    def _load_long_binget(self) -> None:
        self.append(self._memo_get(int.from_bytes(self.read(4), "little")))

    def _put(self, key: Any) -> None:
        self.memo[key] = self.stack[-1]
        self._new_memo.append(key)
        if key >= self._memo_next:
            self._memo_next = key + 1

    def _load_put(self) -> None:
        i = int(self.readline()[:-1])
        if i < 0:
            raise ValueError("negative PUT argument")
        self._put(i)

    def _load_binput(self) -> None:
        self._put(self.read(1)[0])

    def _load_long_binput(self) -> None:
        i = int.from_bytes(self.read(4), "little")
        if i > sys.maxsize:
            raise ValueError("negative LONG_BINPUT argument")
        self._put(i)

    def _load_memoize(self) -> None:
        self._put(self._memo_next)

    def _release(self, upto: int) -> None:
        """Drop the memo entries added before `upto` (in `_new_memo`) that hold a record's big things; keep
        the small shared ones, up to KEPT_MEMO_BYTES in all."""
        memo = self.memo
        for key in self._new_memo[:upto]:
            v = memo.get(key)
            if _keep_in_memo(v):
                self._kept_bytes += sys.getsizeof(v) + _MEMO_ENTRY_BYTES
                self._kept += 1
            else:
                memo.pop(key, None)
        del self._new_memo[:upto]
        limit = self.kept_limit()
        if self._kept_bytes > limit:
            raise InputTooLargeError(
                f"{self.name}: past record {self.handed} the archive's records share more than {limit / 2**20:,.0f} "
                f"MiB of memoised strings and small objects ({self._kept:,} of them: dict keys, token strings...), "
                f"which stay in memory while the archive is read, as any later record may refer back to them; the "
                f"limit is a quarter of the cap per record (at least {KEPT_MEMO_BYTES / 2**20:,.0f} MiB): raise the "
                f"cap with --max-archive-bytes if the machine has the memory, or re-save the records in smaller "
                f"files")

    def kept_limit(self) -> int:
        """How many bytes of memo entries may be kept across records (see KEPT_MEMO_BYTES)."""
        cap = self.capped.max_bytes if self.capped is not None else 0
        return max(KEPT_MEMO_BYTES, cap // 4)

    # -- the top-level list: hand its items over instead of keeping them --------------------------------
    def _to_top(self, items: list[Any]) -> bool:
        """Whether items appended to the candidate top-level list are records to hand over: dicts (or anything,
        once records were handed over: the consumer judges them). Other items end the streaming: the list
        is built as usual."""
        if not (self.stack and self.stack[-1] is self._top):
            return False
        if self.handed or all(type(i) is dict for i in items):
            return True
        self._top = None
        return False

    def _load_appends(self) -> None:
        items = self.pop_mark()
        if self._to_top(items):
            self._ready.extend(items)
            return
        list_obj = self.stack[-1]
        extend = getattr(list_obj, "extend", None)
        if extend is not None:
            extend(items)
        else:
            for item in items:
                list_obj.append(item)

    def _load_append(self) -> None:
        value = self.stack.pop()
        if self._to_top([value]):
            self._ready.append(value)
            return
        self.stack[-1].append(value)

    for _code, _fn in ((pickle.GET, _load_get), (pickle.BINGET, _load_binget), (pickle.LONG_BINGET, _load_long_binget),
                       (pickle.PUT, _load_put), (pickle.BINPUT, _load_binput), (pickle.LONG_BINPUT, _load_long_binput),
                       (pickle.MEMOIZE, _load_memoize), (pickle.APPENDS, _load_appends), (pickle.APPEND, _load_append)):
        dispatch[_code[0]] = _fn
    del _code, _fn

    def records(self) -> Iterator[Any]:
        """The items of the top-level list one at a time (or the whole object, once, when it is not a list);
        each item is the caller's alone: nothing here keeps it once the caller asks for the next."""
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)  # type: ignore[attr-defined]
        self.read = self._unframer.read
        self.readinto = self._unframer.readinto
        self.readline = self._unframer.readline
        self.metastack: list[Any] = []
        self.stack: list[Any] = []
        self.append = self.stack.append
        self.proto = 0
        read, dispatch = self.read, self.dispatch
        top_frame: list[Any] | None = None
        first = True
        key = read(1)
        if key and key != pickle.PROTO:
            # protocols 2-5 begin with PROTO; PickleArchive reads protocols 0-1 whole
            raise pickle.UnpicklingError(f"invalid load key, {key!r}: a pickle begins with PROTO (protocols 2-5) "
                                         f"or, protocols 0-1, a list, dict, tuple or global")
        while True:
            if not key:
                raise EOFError
            try:
                dispatch[key[0]](self)
            except pickle._Stop as stop:  # type: ignore[attr-defined]
                value = stop.value
                break
            key = read(1)
            if first:
                if not self.metastack and self.stack:
                    # the first object pushed: an empty list may be the archive's list of records
                    first = False
                    if type(self.stack[0]) is list and not self.stack[0]:
                        self._top = self.stack[0]
                continue
            if self._top is None:
                continue
            if not self.metastack and len(self.stack) > 1:
                if self.stack[0] is self._top and type(self.stack[1]) is dict:
                    # a record built beside the list, for a bare APPEND (no MARK): the pure-Python pickler's
                    # last batch of one item, the C pickler's list of one
                    continue
                # something beside the list at the top: the list was not the archive's top-level object
                if self.handed:
                    raise self._not_top(f"sits inside another object, beside a value of type {type(self.stack[-1]).__name__}")
                self._top, self._ready = None, []
                continue
            if self._ready:
                yield from self._handover()
            stack = self.stack
            if top_frame is None and len(self.metastack) == 1 and self.metastack[0] and self.metastack[0][-1] is self._top:
                top_frame = self._top_frame = stack  # the frame of the list's MARK: its items are pushed here
            if stack is top_frame and len(stack) == 2 and type(stack[0]) is dict and type(stack[1]) is dict:
                # the next record (a dict: EMPTY_DICT) has begun above the one at the bottom of the frame, which is
                # therefore complete. Exactly two dicts: a one-key dict is filled by SETITEM on this same frame
                # (record, key, value), and a key is never a dict
                self._ready.append(stack.pop(0))
                yield from self._handover(keep_last=True)
            elif stack is not top_frame and len(self.metastack) == 0:
                top_frame = self._top_frame = None  # the APPENDS closed the frame; the next MARK opens another
        if self._top is not None and value is self._top:
            if self._ready:
                yield from self._handover()
            return
        if self.handed:
            raise self._not_top(f"sits inside a {type(value).__name__}")
        self.whole = True
        self._check_expansion(value, self.name)
        yield value

    def _not_top(self, where: str) -> InputFormatError:
        """The error for a list of records (some handed over already) that turns out not to be the pickle's
        top-level object; `where` says where it is."""
        return InputFormatError(
            f"{self.name}: the pickle's top-level object is not a list of records: its list of records {where} "
            f"(such as (records, ...)); tracestore reads a pickled list of trace records, or a batch dict: re-save "
            f"the list of records itself")

    def _load_tuple2(self) -> None:
        if len(self.stack) < 2:
            self._tuple_of_records(2)
        BASE_DISPATCH[pickle.TUPLE2[0]](self)

    def _load_tuple3(self) -> None:
        if len(self.stack) < 3:
            self._tuple_of_records(3)
        BASE_DISPATCH[pickle.TUPLE3[0]](self)

    def _tuple_of_records(self, n: int) -> None:
        """TUPLE2/3 short of items: the archive's list holds tuples of dicts, the first of which were taken
        for records (two dicts side by side in the list's frame are two records, in a list of records)."""
        if self._top is None or not self.handed:
            return  # a damaged pickle: pickle's own TUPLE2/3 raises
        item = self.handed - (n - len(self.stack))
        raise InputFormatError(
            f"{self.name}: item {item} of the archive's list is a tuple of {n} objects, not a record (a dict); "
            f"tracestore reads a pickled list of trace records, each a dict with an id and 'hidden_states' and/or "
            f"'graphs' (or a batch dict): re-save the archive with one dict per trace")

    dispatch[pickle.TUPLE2[0]] = _load_tuple2
    dispatch[pickle.TUPLE3[0]] = _load_tuple3

    def _handover(self, keep_last: bool = False) -> Iterator[Any]:
        """Yield the ready records; release their memo entries after each (all but those of the record that
        has just begun, when `keep_last`)."""
        while self._ready:
            rec = self._ready.pop(0)
            mark = len(self._new_memo) - (self._new_memo_of_current() if keep_last else 0)
            self._check_expansion(rec, f"{self.name}: record {self.handed}{_trace_of(rec)}")
            self.handed += 1
            yield rec
            del rec
            self._release(mark)
            if self.capped is not None:
                self.capped.new_record()

    def _new_memo_of_current(self) -> int:
        """How many of the latest memo entries belong to the record that has just begun (its dict, memoized
        right after it is pushed: none yet, or that one)."""
        cur = self.stack[-1] if self.stack else None
        n = 0
        for key in reversed(self._new_memo):
            if self.memo.get(key) is cur:
                n += 1
            else:
                break
        return n


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
        # decompressed chunks not read yet (the first from _off on): a read is sliced from them, one copy, with
        # no buffer to grow and move (a bytearray buffer cost ~0.5 s per GB here)
        self._chunks: collections.deque[bytes] = collections.deque()
        self._off = 0
        self._n = 0  # bytes available
        self._done = False

    def _raw(self, n: int) -> bytes:
        data = self._f.read(n)
        if data:
            self.crc = google_crc32c.extend(self.crc, data)
        return data

    def _more(self) -> bool:
        """Append more bytes to the chunks; False at the end of the data."""
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
        if out:
            self._chunks.append(out)
            self._n += len(out)

    def _take(self, n: int, into: memoryview | None = None) -> bytes:
        """The next n bytes (at most what is available), as bytes, or copied into `into`."""
        n = min(n, self._n)
        first = self._chunks[0] if self._chunks else b""
        if into is None and self._off + n <= len(first):
            out = first if (self._off == 0 and n == len(first)) else first[self._off:self._off + n]
            self._advance(n)
            return out
        parts, left, off = [], n, self._off
        for c in self._chunks:
            k = min(left, len(c) - off)
            parts.append(memoryview(c)[off:off + k])
            left -= k
            off = 0
            if not left:
                break
        if into is not None:
            pos = 0
            for part in parts:
                into[pos:pos + len(part)] = part
                pos += len(part)
            self._advance(n)
            return b""
        out = b"".join(parts)
        self._advance(n)
        return out

    def peek(self, n: int) -> bytes:
        """The next n bytes (fewer at the end), left to be read."""
        while self._n < n and self._more():
            pass
        return b"".join(memoryview(c)[self._off if k == 0 else 0:] for k, c in enumerate(self._chunks))[:n]

    def _advance(self, n: int) -> None:
        self._n -= n
        off = self._off + n
        while self._chunks and off >= len(self._chunks[0]):
            off -= len(self._chunks.popleft())
        self._off = off

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            while self._more():
                pass
            n = self._n
        while self._n < n and self._more():
            pass
        return self._take(n)

    def readinto(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        n = len(mv)
        while self._n < n and self._more():
            pass
        k = min(n, self._n)
        self._take(k, into=mv[:k])
        return k

    def readline(self, size: int = -1) -> bytes:
        """Up to and including the next newline (the text arguments of GLOBAL and protocol-0 opcodes), or
        `size` bytes when the line is longer (a negative size: no limit). Linear in the line: each chunk is
        searched once, and no more is read than the line or `size` needs."""
        limit = None if size is None or size < 0 else size
        k, seen, end = 0, 0, -1  # chunk index, bytes before it, end of the line
        while True:
            if k == len(self._chunks) and not self._more():
                end = self._n
                break
            if k == len(self._chunks):
                continue  # an empty inflate step (a gzip header): nothing appended
            c = self._chunks[k]
            start = self._off if k == 0 else 0
            stop = len(c) if limit is None else min(len(c), start + limit - seen)
            i = c.find(b"\n", start, stop)
            if i >= 0:
                end = seen + i + 1 - start
                break
            seen += stop - start
            if limit is not None and seen >= limit:
                end = limit
                break
            k += 1
        return self._take(end)

    def drain(self) -> None:
        """Checksum the rest of the file (bytes after the pickle's end)."""
        while self._raw(self._IN):
            pass


_GZIP_MAGIC = b"\x1f\x8b"
#: the first opcode of a protocol 0 or 1 pickle of a list, dict, tuple or global (MARK, EMPTY_LIST,
#: EMPTY_DICT, EMPTY_TUPLE, GLOBAL); anything else without PROTO is not a pickle tracestore reads
_OLD_PROTOCOL_STARTS = (pickle.MARK, pickle.EMPTY_LIST, pickle.EMPTY_DICT, pickle.EMPTY_TUPLE, pickle.GLOBAL)

class RecordStream:
    """The records of an archive's top-level list, read one at a time as they are iterated (once)."""

    def __init__(self, first: list[Any], rest: Iterator[Any]) -> None:
        self._first, self._rest = first, rest

    def __iter__(self) -> Iterator[Any]:
        while self._first:
            yield self._first.pop(0)
        yield from self._rest


class PickleArchive:
    """An open pickle archive: `content` is a RecordStream when its top-level object is a list (each record
    unpickled when the caller gets to it, and let go of once the caller moves on), else the whole object.
    `finish()`, once the content is consumed, checks the end of the stream (nothing may follow the pickle:
    InputFormatError) and returns {"crc32c", "bytes", "decompressed_bytes"}. A context manager (closes the
    file). A pickle of protocol 0 or 1 is loaded whole: `content` is then the whole object, a list included.

    The `max_bytes` cap holds per record of a list (a 30 GB archive of 30 MB records passes; one record, or one
    allocation, past the cap does not) and for the whole object otherwise. The strings and small objects that
    records share (dict keys, token strings) stay in memory while the archive is read, up to a quarter of the
    cap (at least KEPT_MEMO_BYTES): past that, InputTooLargeError."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int, name: str | None = None) -> None:
        p = Path(path)
        self.name = name or p.name
        self.size = p.stat().st_size
        self._raw = open(p, "rb")  # noqa: SIM115 - closed by close()
        try:
            self.compressed = self._raw.read(2) == _GZIP_MAGIC
            self._raw.seek(0)
            self._stream = _Source(self._raw, compressed=self.compressed)
            self._capped = CappedReader(self._stream, max_bytes=max_bytes, name=self.name, compressed=self.compressed,
                                        file_bytes=None if self.compressed else self.size, max_line=MAX_LINE_BYTES)
            self._unpickler: AllowListUnpickler
            try:
                start = self._stream.peek(1)
            except Exception as e:  # a small gzip file is inflated whole here, its trailer checked
                raise _corrupt_error(self.name, e, 0, self.compressed) from None
            if start in _OLD_PROTOCOL_STARTS:
                # protocol 0 or 1 (no PROTO opcode): loaded whole, under the cap, with no line cap (protocol 0
                # writes bytes as text lines)
                self._capped.max_line = None
                self._unpickler = AllowListUnpickler(self._capped, name=self.name, capped=self._capped)
                self.content: Any = next(self._guarded(self._whole()))
                return
            self._unpickler = streaming = StreamingUnpickler(self._capped, name=self.name, capped=self._capped)
            items = self._guarded(streaming.records())
            first = list(itertools.islice(items, 1))
            self.content = first[0] if streaming.whole else RecordStream(first, items)
        except BaseException:
            self._raw.close()
            raise

    def _whole(self) -> Iterator[Any]:
        obj = self._unpickler.load()
        self._unpickler._check_expansion(obj, self.name)
        yield obj

    def _guarded(self, items: Iterator[Any]) -> Iterator[Any]:
        """The unpickler's items, with its failures turned into one clear error naming the file."""
        try:
            yield from items
        except (UnsafeInputError, InputTooLargeError, InputFormatError):
            raise
        except RefusedCodecError as e:
            raise UnsafeInputError(f"{self.name}: the pickle asks to rebuild bytes with a codec tracestore does not "
                                   f"allow ({e}); refusing to load it: re-save its arrays with a current numpy and "
                                   f"pickle") from None
        except NestedPayloadError as e:
            raise UnsafeInputError(
                f"{self.name}: a torch tensor in the pickle carries storage bytes that torch.load(weights_only=True) "
                f"refuses ({e}); they could run code (torch.storage._load_from_bytes loads them unsafely), so the "
                f"file is refused: re-save its tensors as numpy arrays") from None
        except Exception as e:
            raise _corrupt_error(self.name, e, self._capped.pos, self.compressed) from None

    def finish(self) -> dict[str, Any]:
        """Check the end of the stream (zlib checks the gzip trailer there; nothing may follow the pickle, in a
        plain file as in a gzip one: a second pickle appended to the file would be dropped) and return the
        archive's info. Call it after the content is consumed."""
        try:
            extra, first = self._after_the_end()
        except Exception as e:
            raise _corrupt_error(self.name, e, self._capped.pos, self.compressed) from None
        if extra:
            end = self._capped.pos - self._frame_left()
            what = ("another pickle follows (the file was written by more than one pickle.dump): tracestore reads "
                    "one pickled object per file and would drop the rest; re-save the records as one list in one "
                    "pickle.dump" if first == pickle.PROTO else
                    "the file is not one pickled object, and converting it would drop them: check how it was written")
            raise InputFormatError(f"{self.name}: {extra} bytes after the end of the pickle, at decompressed offset "
                                   f"{end:,}; {what}")
        self._stream.drain()
        return {"crc32c": f"{self._stream.crc:08x}", "bytes": self.size, "decompressed_bytes": self._capped.pos}

    def _frame_left(self) -> int:
        """Bytes of the pickle's last frame (protocol 4+) not read when it stopped."""
        frame = getattr(getattr(self._unpickler, "_unframer", None), "current_frame", None)
        if frame is None:
            return 0
        with frame.getbuffer() as buf:
            return int(buf.nbytes - frame.tell())

    def _after_the_end(self) -> tuple[str, bytes]:
        """(how many bytes follow the pickle's STOP, as a phrase, or '' for none; the first of them)."""
        in_frame = self._frame_left()
        first = self._unpickler._unframer.current_frame.read(1) if in_frame else self._stream.read(1)
        if not self.compressed:
            n = in_frame + self.size - self._capped.pos
            return (f"{n:,}" if n else ""), first
        if not first:
            return "", first
        # gzip: count what follows up to 16 MiB (it could be a bomb), no further
        n, step = in_frame or len(first), 1 << 20
        while n < 16 << 20 and (got := len(self._stream.read(step))):
            n += got
        more = n >= 16 << 20 and self._stream.read(1)
        return (f"at least {n:,}" if more else f"{n:,}"), first

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> PickleArchive:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def load_pickle(path: str | os.PathLike[str], *, max_bytes: int, name: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Unpickle `path` whole (plain or gzip, told by its first bytes) through the allow-list, a top-level list
    included (its records all in memory: use PickleArchive to stream them). The cap `max_bytes` holds per
    record of a top-level list, else for the whole object. Returns (object, info) with info = {"crc32c",
    "bytes", "decompressed_bytes"}.

    Raises UnsafeInputError (a class outside the allow-list), InputTooLargeError (past the cap) or
    InputFormatError (truncated, not gzip, not a pickle), each naming the file."""
    with PickleArchive(path, max_bytes=max_bytes, name=name) as arch:
        obj = list(arch.content) if isinstance(arch.content, RecordStream) else arch.content
        return obj, arch.finish()


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
        return InputFormatError(f"{name}: ran out of memory at decompressed offset {pos:,} while unpickling (the "
                                f"lengths the pickle declares are checked against the cap before they are allocated, "
                                f"so the machine had less memory free than the cap, --max-archive-bytes, allows): "
                                f"lower --max-archive-bytes or --workers, or free memory")
    if pos <= 2 or isinstance(e, pickle.UnpicklingError) and "invalid load key" in detail:
        return InputFormatError(f"{name}: not a pickle ({what}: {detail}); expected a pickled list of trace records "
                                f"or a batch dict (.pkl/.pkl.gz), or a torch .pt file")
    return InputFormatError(f"{name}: the pickle is damaged at decompressed offset {pos:,} ({what}: {detail}); the file "
                            f"is truncated or corrupt: copy it again from its source")


