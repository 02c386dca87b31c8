"""What float16 did to the values: per layer max |x|, max absolute and relative rounding error, and counts
of overflowed, clipped, NaN and inf values. Accumulated batch by batch, merged across workers, stored in
the store's attributes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .schema import FLOAT16_MAX

#: Smallest normal float16; relative error is reported only for |x| at or above it (subnormals keep fewer
#: mantissa bits by design, and their absolute error is already in max_abs_error).
FLOAT16_TINY = float(np.finfo(np.float16).tiny)


@dataclass
class Float16Report:
    num_layers: int
    values: int = 0
    max_abs: np.ndarray = field(default=None)  # type: ignore[assignment,arg-type]
    max_abs_error: np.ndarray = field(default=None)  # type: ignore[assignment,arg-type]
    max_rel_error: np.ndarray = field(default=None)  # type: ignore[assignment,arg-type]
    overflow: np.ndarray = field(default=None)  # type: ignore[assignment,arg-type]
    clipped: np.ndarray = field(default=None)  # type: ignore[assignment,arg-type]
    nan: np.ndarray = field(default=None)  # type: ignore[assignment,arg-type]
    inf: np.ndarray = field(default=None)  # type: ignore[assignment,arg-type]

    def __post_init__(self) -> None:
        L = self.num_layers
        for name, dt in (("max_abs", np.float64), ("max_abs_error", np.float64), ("max_rel_error", np.float64),
                         ("overflow", np.int64), ("clipped", np.int64), ("nan", np.int64), ("inf", np.int64)):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(L, dt))
            else:
                setattr(self, name, np.asarray(getattr(self, name), dt).reshape(L))

    def update_layer(self, layer: int, x: np.ndarray, x16: np.ndarray, *, overflow: int = 0, clipped: int = 0) -> None:
        """Account one layer's values: `x` as given (float32/float64), `x16` as stored. NaN and inf in `x`
        are counted here and left out of the error figures."""
        self.values += x.size
        finite = np.isfinite(x)
        if finite.all():
            ax = np.abs(x)
            err = np.abs(x16.astype(x.dtype) - x)
        else:
            nan = np.isnan(x)
            self.nan[layer] += int(nan.sum())
            self.inf[layer] += int((~finite & ~nan).sum())
            ax = np.abs(np.where(finite, x, 0))
            err = np.abs(np.where(finite, x16.astype(x.dtype) - x, 0))
        if ax.size:
            self.max_abs[layer] = max(self.max_abs[layer], float(ax.max()))
            self.max_abs_error[layer] = max(self.max_abs_error[layer], float(err.max()))
            normal = ax >= FLOAT16_TINY
            if normal.any():
                rel = err[normal] / ax[normal]
                self.max_rel_error[layer] = max(self.max_rel_error[layer], float(rel.max()))
        self.overflow[layer] += overflow
        self.clipped[layer] += clipped

    def update_block(self, x: np.ndarray, x16: np.ndarray, *, overflow: np.ndarray | None = None,
                     clipped: np.ndarray | None = None) -> None:
        """Account a block [B, L, ...] (layer axis 1) given as float32 or float64 `x` and stored as `x16`
        (errors are measured in `x`'s precision); NaN/inf in `x` are counted and left out of the error
        figures. `overflow`/`clipped` are per-layer counts."""
        B, L = x.shape[0], x.shape[1]
        if L != self.num_layers:
            raise ValueError(f"block has {L} layers; the report has {self.num_layers}")
        self.values += x.size
        if x.size == 0:
            return
        xr = x.reshape(B, L, -1)
        x16r = x16.reshape(B, L, -1)
        ax = np.abs(xr)
        err = np.abs(x16r.astype(xr.dtype) - xr)
        finite = np.isfinite(xr)
        if not finite.all():
            nan = np.isnan(xr)
            self.nan += nan.sum(axis=(0, 2))
            self.inf += (~finite & ~nan).sum(axis=(0, 2))
            ax = np.where(finite, ax, 0)
            err = np.where(finite, err, 0)
        self.max_abs = np.maximum(self.max_abs, ax.max(axis=(0, 2)))
        self.max_abs_error = np.maximum(self.max_abs_error, err.max(axis=(0, 2)))
        rel = np.divide(err, ax, out=np.zeros_like(err), where=ax >= FLOAT16_TINY)
        self.max_rel_error = np.maximum(self.max_rel_error, rel.max(axis=(0, 2)))
        if overflow is not None:
            self.overflow += overflow
        if clipped is not None:
            self.clipped += clipped

    def update_float16_block(self, x16: np.ndarray) -> None:
        """Account a block [B, L, ...] that arrived as float16: no rounding; max |x| and NaN counts."""
        B, L = x16.shape[0], x16.shape[1]
        self.values += x16.size
        if x16.size == 0:
            return
        x = x16.reshape(B, L, -1).astype(np.float32)
        finite = np.isfinite(x)
        if not finite.all():
            nan = np.isnan(x)
            self.nan += nan.sum(axis=(0, 2))
            self.inf += (~finite & ~nan).sum(axis=(0, 2))
            x = np.where(finite, x, 0)
        self.max_abs = np.maximum(self.max_abs, np.abs(x).max(axis=(0, 2)))

    def update_float16_magnitudes(self, mag: np.ndarray) -> None:
        """Account a block [B, L, ...] of finite float16 values given as their bit patterns with the sign bit
        cleared (uint16): max |x| per layer without converting to float32."""
        B, L = mag.shape[0], mag.shape[1]
        self.values += mag.size
        if mag.size == 0:
            return
        top = mag.reshape(B, L, -1).max(axis=(0, 2)).view(np.float16).astype(np.float64)
        self.max_abs = np.maximum(self.max_abs, top)

    def update_float16_layer(self, layer: int, x16: np.ndarray) -> None:
        """Account values that arrived as float16 already: no rounding, only max |x| and NaN counts."""
        self.values += x16.size
        x = x16.astype(np.float32)
        finite = np.isfinite(x)
        if not finite.all():
            nan = np.isnan(x)
            self.nan[layer] += int(nan.sum())
            self.inf[layer] += int((~finite & ~nan).sum())
            x = np.where(finite, x, 0)
        if x.size:
            self.max_abs[layer] = max(self.max_abs[layer], float(np.abs(x).max()))

    def merge(self, other: Float16Report) -> None:
        if other.num_layers != self.num_layers:
            raise ValueError(f"cannot merge a float16 report of {other.num_layers} layers into one of {self.num_layers}")
        self.values += other.values
        for name in ("max_abs", "max_abs_error", "max_rel_error"):
            setattr(self, name, np.maximum(getattr(self, name), getattr(other, name)))
        for name in ("overflow", "clipped", "nan", "inf"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_dict(self) -> dict[str, Any]:
        return {
            "values": int(self.values),
            "float16_max": FLOAT16_MAX,
            "max_abs": [float(v) for v in self.max_abs],
            "max_abs_error": [float(v) for v in self.max_abs_error],
            "max_rel_error": [float(v) for v in self.max_rel_error],
            "overflow": [int(v) for v in self.overflow],
            "clipped": [int(v) for v in self.clipped],
            "nan": [int(v) for v in self.nan],
            "inf": [int(v) for v in self.inf],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Float16Report:
        L = len(d["max_abs"])
        return cls(num_layers=L, values=int(d.get("values", 0)), max_abs=d["max_abs"], max_abs_error=d["max_abs_error"],
                   max_rel_error=d["max_rel_error"], overflow=d["overflow"], clipped=d["clipped"], nan=d["nan"],
                   inf=d.get("inf", [0] * L))

    def summary(self) -> str:
        """A few lines for a terminal."""
        return (f"float16: max |x| {self.max_abs.max(initial=0):.6g}, max abs error {self.max_abs_error.max(initial=0):.3g}, "
                f"max rel error {self.max_rel_error.max(initial=0):.3g}, overflowed {int(self.overflow.sum())}, "
                f"clipped {int(self.clipped.sum())}, NaN {int(self.nan.sum())}, inf {int(self.inf.sum())} "
                f"(of {self.values} values)")
