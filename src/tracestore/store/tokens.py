"""Per-token data of a trace: its tokens' hidden states at every layer, their ids and their decoded text.
In format v2 these live in the `tokens/` group (CSR: trace i owns tokens ptr[i]:ptr[i+1]); a trace's graphs
are edges over the same tokens (graph node n is token n), so node features are read from here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DTypeError, ShapeMismatchError
from .fields import check_utf8
from .graphs import as_numpy

#: which per-token arrays a store keeps
TOKEN_PARTS = ("hidden", "ids", "text")


@dataclass
class TraceTokens:
    """The tokens of one trace (T of them). Any part may be None where the store (or the input) lacks it.

    hidden: [T, L, D] hidden state of each token at each layer (float16 when read from a store);
    ids: [T] int64 token ids; text: T strings, each token decoded alone.
    """

    hidden: np.ndarray | None = None
    ids: np.ndarray | None = None
    text: list[str] | None = None
    #: T where no part is kept (a store with graphs but no per-token data); None: the parts' length
    count: int | None = None

    def __len__(self) -> int:
        if self.count is not None:
            return self.count
        for part in (self.hidden, self.ids, self.text):
            if part is not None:
                return len(part)
        return 0

    def __repr__(self) -> str:
        have = [p for p in TOKEN_PARTS if getattr(self, p) is not None]
        return f"TraceTokens({len(self)} tokens: {', '.join(have) or 'nothing kept'})"


def as_trace_tokens(obj: Any, *, num_layers: int, hidden_size: int, trace: str) -> TraceTokens:
    """Normalise one trace's tokens as a user passes them (a TraceTokens or a mapping with 'hidden', 'ids',
    'text'; arrays or torch tensors) and check them: hidden [T, L, D] floats, ids [T] integers, text T
    strings, all with the same T."""
    if isinstance(obj, TraceTokens):
        hidden, ids, text = obj.hidden, obj.ids, obj.text
    elif isinstance(obj, Mapping):
        unknown = set(map(str, obj)) - set(TOKEN_PARTS)
        if unknown:
            raise ShapeMismatchError(f"trace {trace!r}: tokens has keys {sorted(unknown)}; expected any of "
                                     f"{', '.join(TOKEN_PARTS)}")
        hidden, ids, text = obj.get("hidden"), obj.get("ids"), obj.get("text")
    else:
        raise ShapeMismatchError(f"trace {trace!r}: tokens is a {type(obj).__name__}; pass a TraceTokens or a dict "
                                 f"with 'hidden' [T, L, D], 'ids' [T] and/or 'text' (T strings)")
    counts: dict[str, int] = {}
    h = None
    if hidden is not None:
        h = as_numpy(hidden)
        if h.ndim != 3 or h.shape[1:] != (num_layers, hidden_size):
            raise ShapeMismatchError(f"trace {trace!r}: token hidden states have shape {tuple(h.shape)}; expected "
                                     f"(T, {num_layers}, {hidden_size})")
        if not np.issubdtype(h.dtype, np.floating):
            raise DTypeError(f"trace {trace!r}: token hidden states have dtype {h.dtype}; expected floats")
        counts["hidden"] = h.shape[0]
    i = None
    if ids is not None:
        i = as_numpy(ids)
        if i.ndim != 1:
            raise ShapeMismatchError(f"trace {trace!r}: token ids have shape {tuple(i.shape)}; expected (T,)")
        if i.size and not np.issubdtype(i.dtype, np.integer):
            raise DTypeError(f"trace {trace!r}: token ids have dtype {i.dtype}; expected integers")
        if i.size and i.dtype.kind == "u" and int(i.max()) > np.iinfo(np.int64).max:
            raise DTypeError(f"trace {trace!r}: token id {int(i.max())} is beyond int64")
        i = i.astype(np.int64, copy=False)
        counts["ids"] = i.shape[0]
    t = None
    if text is not None:
        if isinstance(text, str) or not isinstance(text, Sequence | np.ndarray):
            raise ShapeMismatchError(f"trace {trace!r}: token text is a {type(text).__name__}; expected a list of "
                                     f"T strings (each token decoded alone)")
        t = [_text(s, trace, k) for k, s in enumerate(text)]
        counts["text"] = len(t)
    if len(set(counts.values())) > 1:
        got = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise ShapeMismatchError(f"trace {trace!r}: its tokens disagree on their number ({got}); give every part "
                                 f"for the same T tokens")
    return TraceTokens(hidden=h, ids=i, text=t)


def _text(s: Any, trace: str, k: int) -> str:
    if isinstance(s, bytes):
        return s.decode("utf-8", "replace")
    if not isinstance(s, str):
        raise DTypeError(f"trace {trace!r}: token {k} text is a {type(s).__name__} ({s!r}); expected a string")
    try:
        check_utf8(s, f"token {k} text")
    except ValueError as e:
        raise DTypeError(f"trace {trace!r}: {e}") from None
    return s
