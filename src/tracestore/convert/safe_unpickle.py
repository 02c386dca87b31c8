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

`SafeUnpickler` loads small objects whole; the archives themselves, a pickled list of records 20-35 GB long,
are read record by record by pickle_stream.py's StreamingUnpickler, a subclass of the same allow-list
unpickler. Both are pure Python (the checks above need the BUILD and REDUCE opcodes, which the C unpickler
does not let a subclass see) and share one allow-list, one set of checks and one cap (`CappedReader`).
"""

from __future__ import annotations

import importlib
import inspect
import io
import math
import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
BASE_DISPATCH = _PurePythonUnpickler.dispatch

#: a torch tensor may repeat its storage's bytes (overlapping strides, as `.expand()` makes) by at most this
#: much: past it, a few hundred bytes could declare gigabytes of values
OVERLAP_TINY_BYTES = 64 << 10
#: containers nested deeper than this are refused (np.asarray would fail on them anyway; real records: 3)
MAX_NESTING = 64


class AllowListUnpickler(_PurePythonUnpickler):
    """The allow-list `find_class` and the allocation checks of the module docstring, on the opcodes that
    build objects: REDUCE, NEWOBJ(_EX), INST/OBJ and BUILD. `capped` (a CappedReader under the file) holds
    the cap that allocations count against."""

    dispatch = dict(BASE_DISPATCH)

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
                f"{self._where()}: the pickle calls numpy.ndarray{short_repr(args)} directly, which allocates an array of "
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
        BASE_DISPATCH[pickle.REDUCE[0]](self)

    def _load_newobj(self) -> None:
        self._check_call(self.stack[-2], self.stack[-1])
        BASE_DISPATCH[pickle.NEWOBJ[0]](self)

    def _load_newobj_ex(self) -> None:
        self._check_call(self.stack[-3], self.stack[-2])
        BASE_DISPATCH[pickle.NEWOBJ_EX[0]](self)

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
        BASE_DISPATCH[pickle.BUILD[0]](self)

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


class SafeUnpickler(AllowListUnpickler):
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


def short_repr(v: Any) -> str:
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
            f"{where}: the pickle calls {func.__name__}{short_repr(args)}, which allocates bytes that are not in the "
            f"file (pickle writes a {func.__name__} as its bytes); refusing the file: it was not written by pickling "
            f"data")


def _check_reconstruct_args(args: Any, where: str) -> None:
    """numpy's _reconstruct(ndarray, shape, b'b') makes the array that a BUILD then fills with its data; numpy's
    pickles pass shape (0,): a non-empty shape would be uninitialised memory if no BUILD follows."""
    if not (isinstance(args, tuple) and len(args) == 3 and args[0] is np.ndarray and _num_elements(args[1]) == 0):
        shape = args[1] if isinstance(args, tuple) and len(args) == 3 else args
        raise UnsafeInputError(
            f"{where}: the pickle asks numpy's _reconstruct for an array of shape {short_repr(shape)} before its data "
            f"(numpy's own pickles ask for an empty one and then fill it): its memory would be uninitialised, "
            f"holding whatever the process had there before; refusing the file: re-save its arrays with numpy")


def _check_array_state(state: Any, where: str) -> None:
    """An ndarray's BUILD state (version, shape, dtype, is_fortran, data) must carry exactly the data its
    shape and dtype declare (numpy itself trusts the shape of an object array and reads past a short list)."""
    st = state[1:] if isinstance(state, tuple) and len(state) == 5 else state
    if not (isinstance(st, tuple) and len(st) == 4 and isinstance(st[1], np.dtype)):
        raise InputFormatError(f"{where}: a numpy array's state in the pickle is {type(state).__name__} "
                               f"{short_repr(state)[:60]}, not (version, shape, dtype, is_fortran, data); the file is "
                               f"damaged or not written by numpy: re-save it")
    shape, dt, _fortran, data = st
    n = _num_elements(shape)
    if n is None:
        raise InputFormatError(f"{where}: a numpy array in the pickle has shape {short_repr(shape)}; expected a tuple "
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
        got = type(args[0]).__name__ if isinstance(args, tuple) and args else short_repr(args)
        raise UnsafeInputError(f"{where}: the pickle rebuilds a torch tensor from {got}, not from a storage; "
                               f"refusing the file: it was not written by torch")
    storage, offset, size, stride = args[:4]
    n = _num_elements(tuple(size)) if isinstance(size, tuple | list) else None
    if (n is None or not isinstance(stride, tuple | list) or len(stride) != len(size)
            or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in (offset, *stride))):
        raise InputFormatError(f"{where}: a torch tensor in the pickle has size {short_repr(size)}, stride "
                               f"{short_repr(stride)} and offset {short_repr(offset)}; expected non-negative ints, one "
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
