"""A trace kept for the converter's own check (Sample): what the record reader keeps of a few traces while it
casts them, and what verify.py compares the written store against -- the values as the store must hold them
(as_stored) and their checksums."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import google_crc32c
import numpy as np

from ..format import schema

if TYPE_CHECKING:
    from .records import SourceTrace


def as_stored(src: np.ndarray) -> np.ndarray:
    """The float16 values a source array is stored as (clipped to the float16 range, then rounded once:
    float64 goes to float16 directly, as the converter casts it, not through float32)."""
    a = np.asarray(src)
    x = a.astype(np.float64 if a.dtype.itemsize >= 8 else np.float32, copy=False)
    return np.clip(x, -schema.FLOAT16_MAX, schema.FLOAT16_MAX).astype(np.float16)


def crc_float16(a: np.ndarray) -> int:
    """crc32c of float16 values, every NaN counted as one canonical NaN (payload bits do not matter)."""
    u = np.ascontiguousarray(a, dtype=np.float16).view(np.uint16)
    nan = (u & np.uint16(0x7FFF)) > np.uint16(0x7C00)
    if nan.any():
        u = np.where(nan, np.uint16(0x7E00), u)
    return int(google_crc32c.value(u.tobytes()))


def _crc_int(a: np.ndarray) -> int:
    return int(google_crc32c.value(np.ascontiguousarray(a, dtype=np.int64).tobytes()))


@dataclass
class Sample:
    """A trace kept for the converter's own check, compactly: its per-layer vector as given, and for its
    token states and graph only what they must be stored as (shapes and checksums), so that a sample of a
    real-size trace (tens of MB of token states) costs the main process a few hundred bytes."""

    source: str
    row: int  # where the store puts it
    id: str
    sequence: np.ndarray  # [L, D] as given
    hidden: tuple[tuple[int, ...], int] | None  # (shape, crc_float16 of the stored values)
    token_ids: np.ndarray | None
    text: list[str] | None
    edges: tuple[list[int], int, int] | None  # (edges per layer, crc of edge_index, crc_float16 of edge_attr)


def make_sample(t: SourceTrace, parts: tuple[str, ...] | list[str], source: str, row: int) -> Sample:
    """The Sample of a trace as given (its archive's name, its row in the store); `parts` are the per-token
    parts the store keeps."""
    hidden = None
    if "hidden" in parts and t.hidden is not None:
        hidden = (tuple(t.hidden.shape), crc_float16(as_stored(t.hidden)))
    edges = None
    if t.graph is not None:
        g = t.graph
        counts = [int(np.asarray(e).shape[1]) for e in g.edge_index]
        ei = np.concatenate([np.asarray(e, np.int64) for e in g.edge_index], axis=1)
        eas = [np.asarray(a) for a in g.edge_attr]
        ea = np.concatenate([a[:, None] if a.ndim == 1 else a for a in eas])
        edges = (counts, _crc_int(ei), crc_float16(as_stored(ea)))
    return Sample(source=source, row=row, id=t.id, sequence=np.array(t.sequence), hidden=hidden,
                  token_ids=None if "ids" not in parts or t.token_ids is None else np.array(t.token_ids),
                  text=None if "text" not in parts else t.text, edges=edges)
