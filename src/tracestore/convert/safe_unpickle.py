"""Load pickles and `.pt` files without running code from them.

A pickle names the callables that rebuild its objects, and `pickle.load` calls whatever it names: a
`__reduce__` payload is arbitrary code. `SafeUnpickler` resolves names only from an allow-list of what trace
archives need (../shared/notes/reliability.md 1.3, measured with a recording `find_class`):

- numpy arrays, dtypes and scalars, pickle protocols 0-5, under numpy 2 (`numpy._core`) and numpy 1
  (`numpy.core`) module names; `_codecs.encode`, which protocol 2 uses for bytes, only for latin-1;
- torch tensors pickled with plain pickle: `torch._utils._rebuild_tensor_v2` and `collections.OrderedDict`,
  and `torch.storage._load_from_bytes` **replaced** by `safe_load_from_bytes`: torch's own calls
  `torch.load(..., weights_only=False)` on bytes from the pickle, a trapdoor that runs a nested payload;
- PyG `Data` and the three helper classes it pickles with.

Anything else is refused with UnsafeInputError naming the class and the file. `.pt` files go through
`torch.load(weights_only=True)` and never fall back to unsafe loading (PyG's `torch_load` does); the PyG
classes are allowed for that one call and torch's global allow-list is restored exactly afterwards.

Allowing classes does not stop a denial of service, so every read is capped (`max_bytes`): a gzip bomb
raises InputTooLargeError before it fills memory. Nor does it stop the allowed constructors from building
big things from a few bytes, so every array must be initialised from data in the stream, and what could be
materialised beyond it counts against the same cap before it is made:

- numpy's `_reconstruct` may only make the empty array that numpy's own pickles make (shape (0,)), and an
  array's BUILD state must carry exactly the data its shape and dtype declare; `numpy.ndarray` itself is
  never called (it would hand over uninitialised memory);
- `bytearray` is built only from bytes or text in the stream, never `bytearray(n)`;
- a torch tensor must lie inside its storage, and one whose values repeat its storage bytes (overlapping
  strides, as `.expand()` makes) is refused past OVERLAP_TINY_BYTES; a BUILD on a tensor (torch's legacy
  `set_`) is refused, as is a BUILD on a class or function (it would set attributes on, say, PyG's `Data`
  for every later archive);
- lists, tuples and dicts that reference the same object many times (`[row] * 512`, nested) are counted
  as `np.asarray` / `np.stack` would materialise them, each reference anew: per record, what they would
  materialise beyond the distinct objects counts against the cap with the bytes read.

These refusals raise UnsafeInputError, InputFormatError or InputTooLargeError naming the file and the
record.

Archives of pickle protocol 2 or later are read by `StreamingUnpickler` (in pure Python so that it can stop
between opcodes): a pickled list of records is handed over one record at a time and each record is let go
of, memo included, once the caller has it, so memory holds a record, not an archive (a real one is 20-35 GB);
the cap then holds per record. Older protocols (0 and 1) are loaded whole, under the cap for the whole file.
The opcode dispatch costs ~40 us per array over C's, ~1% of a seed record's read. `SafeUnpickler` loads
small objects whole. Both are pure Python (the checks above need the BUILD and REDUCE opcodes, which the C
unpickler does not let a subclass see) and share one allow-list and one set of checks.
"""

from __future__ import annotations

import collections
import importlib
import inspect
import io
import itertools
import math
import os
import pickle
import sys
import types
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import google_crc32c
import numpy as np

from ..errors import InputFormatError, InputTooLargeError, UnsafeInputError
from ..threads import import_torch

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
    ("builtins", "bytes"),  # protocol 2 pickles b"" as bytes()
]}
for _core in _NUMPY_CORE:
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = ("numpy._core.multiarray", "_reconstruct")
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = ("numpy._core.multiarray", "scalar")
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = ("numpy._core.numeric", "_frombuffer")


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it (bytes stored as latin-1 text); no other codec."""
    if not isinstance(obj, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise RefusedCodecError(f"_codecs.encode called with encoding {encoding!r}; only latin-1 is allowed")
    return obj.encode("latin-1", errors)


def safe_load_from_bytes(b: bytes) -> Any:
    """What `torch.storage._load_from_bytes` does, with `weights_only=True`: a storage's bytes inside a plain
    pickle are themselves a pickle, and torch's version loads them unsafely."""
    torch = import_torch()

    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write itself; the refusal below is what matters
            warnings.simplefilter("ignore")
            storage = torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")
    except Exception as e:
        raise NestedPayloadError(str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None
    if not isinstance(storage, torch.storage.TypedStorage | torch.UntypedStorage):
        raise NestedPayloadError(f"the storage bytes hold a {type(storage).__name__}, not a torch storage")
    nbytes = _storage_bytes(storage)[1]
    if nbytes > len(b):
        raise NestedPayloadError(f"{len(b):,} bytes of storage data declare a storage of {nbytes:,} bytes")
    return storage


def _storage_bytes(storage: Any) -> tuple[int, int]:
    """(bytes per element, bytes) of a torch TypedStorage or UntypedStorage (without TypedStorage's
    deprecation warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        itemsize = storage.element_size() if hasattr(storage, "element_size") else 1
        return int(itemsize), int(storage.nbytes())


class RefusedCodecError(pickle.UnpicklingError):
    """Raised inside the unpickler when a pickle asks `_codecs.encode` for a codec other than latin-1."""


class NestedPayloadError(Exception):
    """Raised inside the unpickler when a tensor's storage bytes hold something weights_only refuses."""


_REPLACED: dict[tuple[str, str], Callable[..., Any]] = {
    ("_codecs", "encode"): _latin1_encode,
    ("torch.storage", "_load_from_bytes"): safe_load_from_bytes,
}


def allowed_globals() -> list[str]:
    """The `module.name` globals a pickle may use (for messages and docs)."""
    return sorted({f"{m}.{n}" for m, n in (*_ALLOWED, *_REPLACED)})


#: the pure-Python unpickler (the C one cannot stop between opcodes, nor show BUILD and REDUCE to a subclass);
#: Any: typeshed describes it as the C one
_PurePythonUnpickler: Any = pickle._Unpickler  # type: ignore[attr-defined]
_BASE = _PurePythonUnpickler.dispatch

#: a torch tensor may repeat its storage's bytes (overlapping strides, as `.expand()` makes) by at most this
#: much: past it, a few hundred bytes could declare gigabytes of values
OVERLAP_TINY_BYTES = 64 << 10
#: the longest line (the text argument of GLOBAL: module and name) a pickle of protocol 2 or later may hold
#: when streamed; longer is refused at once (a line with no end would otherwise be read whole first)
MAX_LINE_BYTES = 64 << 10
#: containers nested deeper than this are refused (np.asarray would fail on them anyway; real records: 3)
MAX_NESTING = 64


class _AllowListUnpickler(_PurePythonUnpickler):
    """The allow-list `find_class` and the allocation checks of the module docstring, on the opcodes that
    build objects: REDUCE, NEWOBJ(_EX), INST/OBJ and BUILD. `capped` (a CappedReader under the file) holds
    the cap that allocations count against."""

    dispatch = dict(_BASE)

    def __init__(self, file: Any, *, name: str, capped: CappedReader | None = None) -> None:
        super().__init__(file)
        self.name = name
        self.capped = capped

    def find_class(self, module: str, name: str) -> Any:
        return allowed_global(module, name, self.name)

    def _where(self) -> str:
        """Where the unpickler is, for messages: the file (and the record, when streaming)."""
        return self.name

    # -- calls ---------------------------------------------------------------------------------------------
    def _check_call(self, func: Any, args: Any) -> None:
        if isinstance(func, type) and issubclass(func, np.ndarray):
            raise UnsafeInputError(
                f"{self._where()}: the pickle calls numpy.ndarray{_short(args)} directly, which allocates an array of "
                f"uninitialised memory (numpy's own pickles never do); refusing the file: re-save its arrays with "
                f"numpy's pickle or np.save")
        if func is bytearray or func is bytes:
            _check_bytearray_args(func, args, self._where())
        elif func is _np_reconstruct():
            _check_reconstruct_args(args, self._where())
        elif getattr(func, "__module__", None) == "torch._utils" and getattr(func, "__name__", "") == "_rebuild_tensor_v2":
            excess = _check_tensor_args(args, self._where())
            if excess and self.capped is not None:
                self.capped.allocate(excess, "a torch tensor repeats its storage's values", where=self._where())

    def _load_reduce(self) -> None:
        self._check_call(self.stack[-2], self.stack[-1])
        _BASE[pickle.REDUCE[0]](self)

    def _load_newobj(self) -> None:
        self._check_call(self.stack[-2], self.stack[-1])
        _BASE[pickle.NEWOBJ[0]](self)

    def _load_newobj_ex(self) -> None:
        self._check_call(self.stack[-3], self.stack[-2])
        _BASE[pickle.NEWOBJ_EX[0]](self)

    def _instantiate(self, klass: Any, args: Any) -> None:  # INST and OBJ (protocols 0 and 1)
        self._check_call(klass, tuple(args))
        super()._instantiate(klass, args)

    # -- BUILD: state set on an object ---------------------------------------------------------------------
    def _load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, type) or inspect.isroutine(inst) or inspect.ismodule(inst):
            what = "class" if isinstance(inst, type) else "function"
            raise UnsafeInputError(
                f"{self._where()}: the pickle sets attributes on the {what} "
                f"{getattr(inst, '__module__', '?')}.{getattr(inst, '__qualname__', type(inst).__name__)} itself "
                f"(BUILD on a {what}, not on an instance), which would change it for everything loaded after; "
                f"refusing the file: it was not written by pickling data")
        if type(inst).__module__.split(".")[0] == "torch":
            raise UnsafeInputError(
                f"{self._where()}: the pickle sets the state of a {type(inst).__name__} (BUILD, torch's legacy "
                f"Tensor.set_), which can point it anywhere in any storage; torch's own pickles do not: re-save the "
                f"tensors with a current torch, or as numpy arrays")
        if isinstance(inst, np.ndarray):
            _check_array_state(state, self._where())
        _BASE[pickle.BUILD[0]](self)

    # -- lengths declared in the stream ---------------------------------------------------------------------
    def _load_bytearray8(self) -> None:
        """BYTEARRAY8: pickle's own allocates bytearray(n) before it reads the n bytes; here n is checked first."""
        n = int.from_bytes(self.read(8), "little")
        self._check_declared(n, "BYTEARRAY8")
        b = bytearray(n)
        self.readinto(b)
        self.append(b)

    def _check_declared(self, n: int, opcode: str) -> None:
        """A read of n bytes must fit what is left of the current frame, or else the cap and the file (the
        opcodes that read into a buffer allocate it first)."""
        frame = getattr(getattr(self, "_unframer", None), "current_frame", None)
        if frame is not None:
            with frame.getbuffer() as buf:
                left = buf.nbytes - frame.tell()
            if n > left:
                raise InputFormatError(
                    f"{self._where()}: a {opcode} opcode declares {n:,} bytes, more than the {left:,} left in its "
                    f"frame; the file is damaged: copy it again from its source")
        elif self.capped is not None:
            self.capped.check_read(n)

    for _code, _fn in ((pickle.REDUCE, _load_reduce), (pickle.NEWOBJ, _load_newobj),
                       (pickle.NEWOBJ_EX, _load_newobj_ex), (pickle.BUILD, _load_build),
                       (pickle.BYTEARRAY8, _load_bytearray8)):
        dispatch[_code[0]] = _fn
    del _code, _fn

    def _check_expansion(self, obj: Any, where: str) -> None:
        """Count what `obj`'s shared references would materialise beyond its distinct objects against the cap
        (np.asarray([row] * 512) makes 512 rows of a row read once); `where` names it in messages."""
        used, distinct = _materialised_bytes(obj, where)
        if used > distinct and self.capped is not None:
            self.capped.allocate(used - distinct, f"its lists and dicts refer to the same objects again and again: "
                                 f"np.asarray would materialise {used:,} bytes from {distinct:,}", where=where)


class SafeUnpickler(_AllowListUnpickler):
    """An unpickler whose `find_class` resolves only allow-listed globals and whose constructors are checked
    (see the module docstring); `load()` loads the whole object. Pure Python.

    `name` is the file name used in messages; `max_bytes` caps what is read plus what the object's shared
    references would materialise beyond it (default: `default_max_bytes()`)."""

    def __init__(self, file: Any, *, name: str, max_bytes: int | None = None) -> None:
        capped = CappedReader(file, max_bytes=max_bytes or default_max_bytes(), name=name, compressed=False)
        super().__init__(capped, name=name, capped=capped)

    def load(self) -> Any:
        obj = super().load()
        self._check_expansion(obj, self.name)
        return obj


def default_max_bytes() -> int:
    """Default decompressed-size cap per record of a pickled list (per archive for any other layout): half
    the machine's memory (more than that could not be converted with bounded memory anyway), at least 1 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 * 2**30
    return max(2**30, total // 2)


def _trace_of(rec: Any) -> str:
    """', trace ID' for a record dict with an id under a usual key, else ''."""
    if isinstance(rec, dict):
        for key in ("id", "question_id", "trace_id"):
            v = rec.get(key)
            if isinstance(v, str | int) and not isinstance(v, bool):
                return f", trace {_short(v)}"
    return ""


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _np_reconstruct() -> Any:
    from numpy._core.multiarray import _reconstruct

    return _reconstruct


def _num_elements(shape: Any) -> int | None:
    """The number of elements of a shape given in a pickle (a tuple of non-negative ints, or one int); None
    for anything else."""
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                               for n in shape):
        return None
    return math.prod(shape)


def _check_bytearray_args(func: type, args: Any, where: str) -> None:
    """bytearray() and bytes() from bytes or text in the stream (what pickle writes: bytearray(b'...') or,
    protocol 2, bytearray('...', 'latin-1') and bytes()), never bytearray(n): n zero bytes from a few bytes
    of pickle."""
    ok = isinstance(args, tuple) and (
        not args
        or (len(args) == 1 and isinstance(args[0], bytes | bytearray | list | tuple))
        or (1 < len(args) <= 3 and isinstance(args[0], str) and all(isinstance(a, str) for a in args[1:])))
    if not ok:
        raise UnsafeInputError(
            f"{where}: the pickle calls {func.__name__}{_short(args)}, which allocates bytes that are not in the "
            f"file (pickle writes a {func.__name__} as its bytes); refusing the file: it was not written by pickling "
            f"data")


def _check_reconstruct_args(args: Any, where: str) -> None:
    """numpy's _reconstruct(ndarray, shape, b'b') makes the array that a BUILD then fills with its data; numpy's
    pickles pass shape (0,): a non-empty shape would be uninitialised memory if no BUILD follows."""
    if not (isinstance(args, tuple) and len(args) == 3 and args[0] is np.ndarray and _num_elements(args[1]) == 0):
        shape = args[1] if isinstance(args, tuple) and len(args) == 3 else args
        raise UnsafeInputError(
            f"{where}: the pickle asks numpy's _reconstruct for an array of shape {_short(shape)} before its data "
            f"(numpy's own pickles ask for an empty one and then fill it): its memory would be uninitialised, "
            f"holding whatever the process had there before; refusing the file: re-save its arrays with numpy")


def _check_array_state(state: Any, where: str) -> None:
    """An ndarray's BUILD state (version, shape, dtype, is_fortran, data) must carry exactly the data its
    shape and dtype declare (numpy itself trusts the shape of an object array and reads past a short list)."""
    st = state[1:] if isinstance(state, tuple) and len(state) == 5 else state
    if not (isinstance(st, tuple) and len(st) == 4 and isinstance(st[1], np.dtype)):
        raise InputFormatError(f"{where}: a numpy array's state in the pickle is {type(state).__name__} "
                               f"{_short(state)[:60]}, not (version, shape, dtype, is_fortran, data); the file is "
                               f"damaged or not written by numpy: re-save it")
    shape, dt, _fortran, data = st
    n = _num_elements(shape)
    if n is None:
        raise InputFormatError(f"{where}: a numpy array in the pickle has shape {_short(shape)}; expected a tuple "
                               f"of non-negative ints: the file is damaged")
    if dt.hasobject:
        if dt != np.dtype(object) or not isinstance(data, list) or len(data) != n:
            carried = f"a list of {len(data):,}" if isinstance(data, list) else type(data).__name__
            raise UnsafeInputError(
                f"{where}: a numpy object array of shape {shape} and dtype {dt} in the pickle carries {carried} values, "
                f"not {n:,}; numpy would read past them into uninitialised memory: refusing the file")
        return
    want = n * dt.itemsize
    got = len(data) if isinstance(data, bytes | bytearray | str) else None
    if got != want:
        raise InputFormatError(
            f"{where}: a numpy array of shape {shape} and dtype {dt} in the pickle declares {want:,} bytes of values "
            f"but carries {f'{got:,} bytes' if got is not None else type(data).__name__}; the file is damaged or "
            f"hostile: re-save it")


def _check_tensor_args(args: Any, where: str) -> int:
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...): the tensor must lie inside its
    storage, and may repeat the storage's bytes (overlapping strides) by at most OVERLAP_TINY_BYTES. Returns
    the bytes of values beyond the storage (counted against the cap)."""
    import torch

    if not (isinstance(args, tuple) and len(args) >= 4
            and isinstance(args[0], torch.storage.TypedStorage | torch.UntypedStorage)):
        got = type(args[0]).__name__ if isinstance(args, tuple) and args else _short(args)
        raise UnsafeInputError(f"{where}: the pickle rebuilds a torch tensor from {got}, not from a storage; "
                               f"refusing the file: it was not written by torch")
    storage, offset, size, stride = args[:4]
    n = _num_elements(tuple(size)) if isinstance(size, tuple | list) else None
    if (n is None or not isinstance(stride, tuple | list) or len(stride) != len(size)
            or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in (offset, *stride))):
        raise InputFormatError(f"{where}: a torch tensor in the pickle has size {_short(size)}, stride "
                               f"{_short(stride)} and offset {_short(offset)}; expected non-negative ints, one "
                               f"stride per dimension: the file is damaged")
    itemsize, nbytes = _storage_bytes(storage)
    elements = nbytes // itemsize
    if n:
        last = offset + sum((d - 1) * k for d, k in zip(size, stride, strict=True))
        if last >= elements:
            raise InputFormatError(
                f"{where}: a torch tensor of size {tuple(size)}, stride {tuple(stride)} and offset {offset} reaches "
                f"element {last:,} of a storage of {elements:,}; the file is damaged: re-save it")
    declared, backed = n * itemsize, elements * itemsize
    excess = max(0, declared - backed)
    if excess > OVERLAP_TINY_BYTES:
        raise InputFormatError(
            f"{where}: a torch tensor declares size {tuple(size)} with stride {tuple(stride)}: {declared:,} bytes of "
            f"values over {backed:,} bytes of storage (overlapping strides repeat the same values, as .expand() "
            f"makes); converting it would materialise them all: re-save the tensor with .contiguous() (or "
            f".clone()) if the values are meant, or without the expand")
    return excess


def _materialised_bytes(obj: Any, where: str) -> tuple[int, int]:
    """(bytes np.asarray / np.stack would materialise from obj's containers, every reference counted anew;
    bytes of its distinct leaves). Lists, tuples, sets and dicts (values) are walked, and objects with a
    __dict__ (PyG Data and its storage); arrays, tensors, strings and bytes count their size, anything else
    8 bytes."""
    total: dict[int, int] = {}  # id(container) -> its materialised bytes
    seen: set[int] = set()  # ids of leaves counted in `distinct`
    busy: set[int] = set()
    distinct = 0

    def walk(o: Any, depth: int) -> int:
        nonlocal distinct
        k = id(o)
        got = total.get(k)
        if got is not None:
            return got
        if isinstance(o, list | tuple | set | frozenset | dict) or (
                hasattr(o, "__dict__") and not isinstance(o, type | np.ndarray) and not inspect.isroutine(o)
                and not hasattr(o, "element_size")):
            if depth > MAX_NESTING:
                raise InputFormatError(f"{where}: holds lists or dicts nested more than {MAX_NESTING} deep; "
                                       f"expected arrays, lists of arrays and flat lists: the file is not an archive "
                                       f"of trace records")
            if k in busy:
                raise InputFormatError(f"{where}: holds a list or dict that contains itself; the file is not an "
                                       f"archive of trace records")
            busy.add(k)
            items = o.values() if isinstance(o, dict) else (vars(o).values() if not isinstance(
                o, list | tuple | set | frozenset) else o)
            n = sum(walk(v, depth + 1) for v in items)
            busy.discard(k)
            total[k] = n
            return n
        if isinstance(o, np.ndarray):
            n = int(o.nbytes)
        elif hasattr(o, "element_size") and hasattr(o, "numel"):  # a torch tensor
            n = int(o.numel()) * int(o.element_size())
        elif isinstance(o, str | bytes | bytearray):
            n = len(o)
        else:
            n = 8
        if k not in seen:
            seen.add(k)
            distinct += n
        return n

    used = walk(obj, 0)
    return used, distinct


def allowed_global(module: str, name: str, filename: str) -> Any:
    """The object a pickle's global (module, name) may resolve to, or UnsafeInputError naming the file."""
    if module == "__builtin__":  # protocol 2 names builtins as Python 2 did (sets, bytearrays)
        module = "builtins"
    key = (module, name)
    if key in _REPLACED:
        return _REPLACED[key]
    target = _ALLOWED.get(key)
    if target is None:
        raise UnsafeInputError(
            f"{filename}: the pickle asks for {module}.{name}, which is not on tracestore's allow-list (numpy "
            f"arrays, torch tensors, PyG Data); refusing to load it, since a pickle can run code this way. If "
            f"the file is yours and safe, re-save its arrays as plain numpy/torch objects")
    if target[0].startswith("torch"):
        import_torch()  # not while a background thread is still importing it
    mod = importlib.import_module(target[0])
    return getattr(mod, target[1])


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


class StreamingUnpickler(_AllowListUnpickler):
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

    dispatch = dict(_AllowListUnpickler.dispatch)

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
        _BASE[pickle.TUPLE2[0]](self)

    def _load_tuple3(self) -> None:
        if len(self.stack) < 3:
            self._tuple_of_records(3)
        _BASE[pickle.TUPLE3[0]](self)

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


class CappedReader:
    """A read-only file wrapper that counts bytes and refuses to go past a cap.

    Used under the unpickler: a gzip bomb or a length field claiming gigabytes stops with InputTooLargeError
    (or, for a plain file, InputFormatError: truncated) before anything that large is allocated. The cap
    `max_bytes` holds for what is read since the last `new_record()` (the whole stream when never called):
    streaming a list of records, it bounds each record, not the archive. `file_bytes`, for a plain file,
    is the end no read may pass. `max_line` caps one line (`readline`: the text arguments of GLOBAL and the
    protocol-0 opcodes), None for no cap beyond `max_bytes`: a line that runs past it is refused
    (InputFormatError) as soon as it does, whatever the cap."""

    def __init__(self, f: Any, *, max_bytes: int, name: str, compressed: bool, file_bytes: int | None = None,
                 max_line: int | None = None) -> None:
        self._f = f
        self.max_bytes = max_bytes
        self.max_line = max_line
        self.name = name
        self.compressed = compressed
        self.file_bytes = file_bytes
        self.pos = 0
        self.record_start = 0
        self.streaming = False
        #: bytes the record's objects would take beyond what was read (see `allocate`)
        self.allocated = 0

    def new_record(self) -> None:
        """What follows belongs to a new record: the cap counts from here."""
        self.record_start = self.pos
        self.allocated = 0
        self.streaming = True

    def allocate(self, n: int, what: str, *, where: str) -> None:
        """Count n bytes that the record's objects would take beyond the bytes read (an allocation not backed by
        data in the stream) against the cap, before they are allocated; `what` says what they are and `where`
        names the file and record for the message."""
        used = self.pos - self.record_start + self.allocated
        if used + n > self.max_bytes:
            what_cap = "the cap per record" if self.streaming else "the cap"
            raise InputTooLargeError(
                f"{where}: {what}, which with the {used:,} bytes read so far passes {what_cap} of "
                f"{self.max_bytes:,} bytes; if this is a real archive raise the cap with --max-archive-bytes, "
                f"otherwise the file is built to exhaust memory: do not use it")
        self.allocated += n

    @property
    def _limit(self) -> int:
        cap = self.record_start + self.max_bytes
        return cap if self.file_bytes is None else min(cap, self.file_bytes)

    def check_read(self, n: int) -> None:
        """Raise as a read of n more bytes would (before a buffer for them is allocated)."""
        self._check(n)

    def _check(self, n: int) -> None:
        if self.file_bytes is not None and self.pos + n > self.file_bytes:
            raise InputFormatError(
                f"{self.name}: the pickle asks for {n:,} bytes at offset {self.pos:,} but the file holds "
                f"{self.file_bytes:,}; the file is truncated or not a pickle: copy it again from its source")
        if self.pos + n + self.allocated > self.record_start + self.max_bytes:
            what = "one record decompresses" if self.streaming else "decompresses"
            raise InputTooLargeError(
                f"{self.name}: {what} to more than {self.max_bytes:,} bytes (the cap; at offset {self.pos:,} the "
                f"pickle asks for {n:,} more); if this is a real archive raise the cap with --max-archive-bytes, "
                f"otherwise the file is a decompression bomb: do not use it")

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._limit - self.pos + 1
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
        limit = self._limit - self.pos + 1
        if self.max_line is not None:
            limit = min(limit, self.max_line + 1)
        data = self._f.readline(limit if size is None or size < 0 else min(size, limit))
        if self.max_line is not None and len(data) > self.max_line and not data.endswith(b"\n"):
            raise InputFormatError(
                f"{self.name}: a line of the pickle at offset {self.pos:,} runs past {self.max_line:,} bytes without "
                f"ending (the text argument of a GLOBAL or other opcode: a pickle's are a few dozen bytes); the file is "
                f"damaged or not a pickle: copy it again from its source")
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
            self._unpickler: _AllowListUnpickler
            try:
                start = self._stream.peek(1)
            except Exception as e:  # a small gzip file is inflated whole here, its trailer checked
                raise _corrupt_error(self.name, e, 0, self.compressed) from None
            if start in _OLD_PROTOCOL_STARTS:
                # protocol 0 or 1 (no PROTO opcode): loaded whole, under the cap, with no line cap (protocol 0
                # writes bytes as text lines)
                self._capped.max_line = None
                self._unpickler = _AllowListUnpickler(self._capped, name=self.name, capped=self._capped)
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
    registered on import).

    What weights_only allows can still build big things from a few bytes, so a file whose pickle calls
    `bytearray` is refused before loading (UnsafeInputError), and a tensor whose values repeat its storage
    (overlapping strides, as `.expand()` makes) by more than OVERLAP_TINY_BYTES after it (InputFormatError)."""
    import_torch()
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
    if is_zip:
        _refuse_bytearray_in_pt(p, name)
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
    _check_loaded_tensors(obj, name, torch.Tensor)
    return obj, {"crc32c": f"{crc:08x}", "bytes": size, "decompressed_bytes": size}


def _refuse_bytearray_in_pt(p: Path, name: str) -> None:
    """torch.load(weights_only=True) calls builtins.bytearray with whatever the pickle gives, bytearray(n)
    included (n zero bytes from a few); tensors never need it, so a .pt whose pickle names it is refused."""
    import pickletools
    import zipfile

    try:
        with zipfile.ZipFile(p) as z:
            pkls = [i for i in z.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
            data = z.read(pkls[0]) if pkls and pkls[0].file_size <= 64 << 20 else None
    except (OSError, zipfile.BadZipFile):
        return  # torch.load reports a damaged file
    if data is None:
        return
    strings: list[str] = []
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                names = arg.split(" ", 1)
            elif op.name == "STACK_GLOBAL":
                names = strings[-2:]
            else:
                if isinstance(arg, str):
                    strings.append(arg)
                continue
            if len(names) == 2 and names[0] in ("builtins", "__builtin__") and names[1] == "bytearray":
                raise UnsafeInputError(
                    f"{name}: the file's pickle calls builtins.bytearray, which torch.load(weights_only=True) allows "
                    f"with any argument (bytearray(n) allocates n bytes from a few); tensor files do not need it: "
                    f"re-save the file with plain tensors")
    except UnsafeInputError:
        raise
    except Exception:
        return  # not a pickle pickletools can walk: torch.load reports it


def _check_loaded_tensors(obj: Any, name: str, tensor_type: Any) -> None:
    """Refuse tensors (in dicts, lists, tuples and PyG Data) whose values repeat their storage by more than
    OVERLAP_TINY_BYTES: converting them would materialise every repeat."""
    stack: list[Any] = [obj]
    seen: set[int] = set()
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, tensor_type):
            declared = o.numel() * o.element_size()
            backed = o.untyped_storage().nbytes()
            if declared - backed > OVERLAP_TINY_BYTES:
                raise InputFormatError(
                    f"{name}: a torch tensor declares size {tuple(o.shape)} with stride {tuple(o.stride())}: "
                    f"{declared:,} bytes of values over {backed:,} bytes of storage (overlapping strides repeat the "
                    f"same values, as .expand() makes); converting it would materialise them all: re-save the tensor "
                    f"with .contiguous() (or .clone()) if the values are meant, or without the expand")
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, list | tuple):
            stack.extend(o)
        elif hasattr(o, "stores") and not isinstance(o, type):  # PyG Data: its attributes
            for st in o.stores:
                stack.extend(st.values())


def _unsupported_global(detail: str) -> str:
    for line in detail.splitlines():
        if "Unsupported global" in line or "GLOBAL" in line:
            return line.strip()[:160]
    return ""
