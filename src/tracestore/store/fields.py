"""Per-trace fields: extra values a trace carries besides its states and score (the generated answer, a
question id, a dataset name...), one array `fields/<name>` [N] each. Collected trace by trace by the writer and
written at commit; each field's kind (str, int, float, bool) is fixed by its values: ints and bools with a
missing value become float (NaN where missing), a missing string is ""."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import DTypeError, ShapeMismatchError

#: a field name is one zarr node name: no "/", not hidden, not empty
FIELD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
#: kinds in the order they widen to (str stands apart)
_NUMERIC = ("bool", "int", "float")


def field_kind(v: Any) -> str | None:
    """'str', 'bool', 'int' or 'float' for a scalar a field can hold (numpy scalars and 0-d arrays included);
    None for anything else (lists, arrays, dicts...)."""
    if isinstance(v, np.ndarray):
        if v.ndim != 0:
            return None
        v = v[()]
    if hasattr(v, "detach") and getattr(v, "ndim", 1) == 0:  # a 0-d torch tensor
        v = v.item()
    if isinstance(v, str | bytes | np.str_):
        return "str"
    if isinstance(v, bool | np.bool_):
        return "bool"
    if isinstance(v, int | np.integer):
        return "int"
    if isinstance(v, float | np.floating):
        return "float"
    return None


_INT64 = (-(2**63), 2**63 - 1)


def plain_value(v: Any) -> tuple[Any, str] | None:
    """(the value as a plain, JSON-able Python scalar, its kind) for anything a field can hold (numpy and 0-d
    torch scalars included), or None for anything else. Raises ValueError for a scalar that cannot be stored
    as given: an int beyond int64, an infinite float, a string that is not valid Unicode."""
    kind = field_kind(v)
    if kind is None:
        return None
    if isinstance(v, np.ndarray):
        v = v[()]
    if hasattr(v, "detach"):
        v = v.item()
    if kind == "str":
        s = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
        check_utf8(s, "the value")
        return s, kind
    if kind == "bool":
        return bool(v), kind
    if kind == "int":
        i = int(v)
        if not _INT64[0] <= i <= _INT64[1]:
            raise ValueError(f"{i} is beyond the int64 range a field stores; give it as a string")
        return i, kind
    f = float(v)
    if math.isinf(f):
        raise ValueError(f"{f} is infinite; a float field holds finite numbers, or NaN / None where missing")
    return f, kind


def check_utf8(s: str, what: str) -> None:
    """Raise ValueError when `s` cannot be written as UTF-8 (a lone surrogate, from a lossy decode)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} {s[max(0, e.start - 10):e.end + 10]!r} is not valid Unicode (a lone surrogate at "
                         f"character {e.start}); fix its decoding (errors='replace') before converting") from None


def check_field_name(name: str, where: str) -> None:
    if not isinstance(name, str) or not FIELD_NAME.match(name):
        raise ValueError(f"{where}: field name {name!r} is not allowed; use letters, digits, '_', '.' and '-' "
                         f"(not starting with '.' or '-')")


def _widen(a: str, b: str) -> str | None:
    if a == b:
        return a
    if a == "str" or b == "str":
        return None
    return max(a, b, key=_NUMERIC.index)


class FieldColumns:
    """The fields of every trace appended so far: name -> one value (or None, missing) per trace."""

    def __init__(self) -> None:
        self.count = 0
        self.kinds: dict[str, str] = {}
        self.values: dict[str, list[Any]] = {}
        self.missing: dict[str, bool] = {}

    def add(self, n: int, fields: Mapping[str, Sequence[Any]] | None, ids: Sequence[str], where: str) -> None:
        """Add the fields of n traces (`fields[name][k]` for trace ids[k]; None = missing). Everything is
        checked before anything is kept: a kind that clashes with the field's earlier values (a string where
        numbers were) raises DTypeError naming the field and the trace."""
        staged: dict[str, tuple[str, list[Any], bool]] = {}
        for name, vals in (fields or {}).items():
            check_field_name(name, where)
            if isinstance(vals, str | bytes) or not isinstance(vals, Sequence | np.ndarray) or len(vals) != n:
                count = len(vals) if isinstance(vals, Sequence | np.ndarray) and not isinstance(vals, str | bytes) else 1
                raise ShapeMismatchError(f"{where}: field {name!r} has {count} value(s) for {n} traces; give a list of "
                                         f"one value per trace (None where missing)")
            kind = self.kinds.get(name)
            out: list[Any] = []
            missing = False
            for k, v in enumerate(vals):
                if v is None or (isinstance(v, float) and math.isnan(v) and kind != "float" and kind is not None):
                    out.append(None)
                    missing = True
                    continue
                try:
                    got = plain_value(v)
                except ValueError as e:
                    raise DTypeError(f"{where}: trace {ids[k]!r}: field {name!r}: {e}") from None
                if got is None:
                    raise DTypeError(f"{where}: trace {ids[k]!r}: field {name!r} is a {type(v).__name__}; a field "
                                     f"holds one str, int, float or bool per trace")
                pv: Any = got[0]
                vk: str = got[1]
                wk = vk if kind is None else _widen(kind, vk)
                if wk is None:
                    raise DTypeError(f"{where}: trace {ids[k]!r}: field {name!r} is {vk} ({v!r}) but earlier traces "
                                     f"have {kind} values; keep one kind per field (strings or numbers)")
                kind = wk
                out.append(pv)
            if kind is None:
                continue  # every value missing so far: the field appears once it has one
            staged[name] = (kind, out, missing)
        for name, (kind, out, missing) in staged.items():
            if name not in self.values:
                self.values[name] = [None] * self.count
                self.missing[name] = self.count > 0
            self.kinds[name] = kind
            self.values[name].extend(out)
            self.missing[name] = self.missing[name] or missing
        self.count += n
        for name, col in self.values.items():
            if len(col) < self.count:
                col.extend([None] * (self.count - len(col)))
                self.missing[name] = True

    def final_kind(self, name: str) -> str:
        """The kind stored: ints and bools with a missing value are stored as float with NaN."""
        kind = self.kinds[name]
        if self.missing[name] and kind in ("int", "bool"):
            return "float"
        return kind

    def arrays(self) -> dict[str, tuple[np.ndarray, str]]:
        """name -> ([N] array, kind) as stored: str -> object array of str ("" missing), int -> int64,
        float -> float64 (NaN missing), bool -> bool."""
        out = {}
        for name, col in self.values.items():
            kind = self.final_kind(name)
            if kind == "str":
                arr = np.asarray(["" if v is None else v for v in col], dtype=object)
            elif kind == "float":
                arr = np.asarray([math.nan if v is None else float(v) for v in col], np.float64)
            elif kind == "int":
                arr = np.asarray(col, np.int64)
            else:
                arr = np.asarray(col, bool)
            out[name] = (arr, kind)
        return out

    def to_state(self) -> dict[str, Any]:
        return {"count": self.count, "kinds": self.kinds, "values": self.values, "missing": self.missing}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> FieldColumns:
        f = cls()
        f.count = int(state.get("count", 0))
        f.kinds = dict(state.get("kinds", {}))
        f.values = {k: list(v) for k, v in state.get("values", {}).items()}
        f.missing = {k: bool(v) for k, v in state.get("missing", {}).items()}
        return f
