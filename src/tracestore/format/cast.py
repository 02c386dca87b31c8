"""The float16 casts: validate values and cast them to float16, accounting what the rounding did in a
Float16Report. Pure functions (no I/O), used by the writer and by the converter's worker processes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from ..errors import DTypeError, Float16OverflowError, NonFiniteValueError
from ..threads import import_torch
from . import schema
from .report import FLOAT16_TINY, Float16Report
from .schema import FLOAT16_MAX

OnOverflow = Literal["error", "clip"]


def cast_float16(x: np.ndarray, describe: Callable[[tuple[int, ...]], str], *, on_overflow: OnOverflow,
                 allow_nan: bool, report: Float16Report | None = None) -> np.ndarray:
    """Validate and cast a float block [B, L, ...] to float16, accounting it in `report` (layer axis 1).

    NaN raises NonFiniteValueError unless allow_nan; |x| > 65504 or inf raises Float16OverflowError unless
    on_overflow == "clip" (then it is clipped to +-65504 and counted). `describe(position)` names the
    position of a bad value for the message (trace, layer, ...)."""
    if not np.issubdtype(x.dtype, np.floating):
        raise DTypeError(f"{describe(())}: values have dtype {x.dtype}; expected float16, float32 or float64")
    L = x.shape[1] if x.ndim > 1 else 1
    if x.dtype == np.float16:
        # on the bit patterns: numpy's float16 isnan/isinf/abs convert every value to float32 first. With the
        # sign bit masked, a pattern >= 0x7C00 is inf (== 0x7C00) or NaN (above), and finite magnitudes order
        # like their patterns.
        mag = np.ascontiguousarray(x).view(np.uint16) & np.uint16(0x7FFF)
        if (mag >= 0x7C00).any():
            nan = mag > 0x7C00
            if nan.any() and not allow_nan:
                pos = tuple(int(i) for i in np.argwhere(nan)[0])
                raise NonFiniteValueError(f"{describe(pos)}: value is NaN; clean the input, or pass allow_nan=True (--allow-nan) "
                                          f"to store NaN (it is counted in the float16 report)")
        else:
            if report is not None:
                report.update_float16_magnitudes(mag)
            return x
        inf = mag == 0x7C00
        if inf.any():
            pos = tuple(int(i) for i in np.argwhere(inf)[0])
            raise Float16OverflowError(f"{describe(pos)}: value is {float(x[pos])} in float16 input: it overflowed "
                                       f"before it reached tracestore; export float32 or bfloat16 instead")
        if report is not None:
            report.update_float16_block(x)
        return x
    # float64 is rounded to float16 directly (through float32 it would be rounded twice, and a value just off
    # a float16 halfway point can land on the wrong side); the report is measured against the values given
    x = x.astype(_wide_dtype(x.dtype), copy=False)
    nan = np.isnan(x)
    if not allow_nan and nan.any():
        pos = tuple(int(i) for i in np.argwhere(nan)[0])
        raise NonFiniteValueError(f"{describe(pos)}: value is NaN; clean the input, or pass allow_nan=True (--allow-nan) to "
                                  f"store NaN (it is counted in the float16 report)")
    over = np.abs(x) > schema.FLOAT16_MAX
    n_over = None
    if over.any():
        if on_overflow != "clip":
            pos = tuple(int(i) for i in np.argwhere(over)[0])
            raise Float16OverflowError(
                f"{describe(pos)}: value {float(x[pos]):.6g} is beyond the float16 range (+-65504) and would be "
                f"stored as inf; pass on_overflow='clip' (--on-overflow clip) to clip such values and count them "
                f"in the report")
        n_over = over.reshape(x.shape[0], L, -1).sum(axis=(0, 2))
        x_src = x
        x = np.clip(x, -schema.FLOAT16_MAX, schema.FLOAT16_MAX)
    x16 = x.astype(np.float16)
    if report is not None:
        # errors are measured against the clipped values; the clipping itself is in `clipped`
        report.update_block(x, x16, overflow=n_over, clipped=n_over)
        if n_over is not None:
            # max |x| as given, over finite values (an inf would make the report unprintable as JSON);
            # infinities that were clipped are counted in `inf`
            a = np.abs(x_src).reshape(x.shape[0], L, -1)
            fin = np.isfinite(a)
            report.max_abs = np.maximum(report.max_abs, np.where(fin, a, 0).max(axis=(0, 2)))
            report.inf += np.isinf(a).sum(axis=(0, 2))
    return x16


def _wide_dtype(dt: np.dtype) -> type[np.floating]:
    """The dtype a float block is validated and rounded in: float64 for float64 (and wider) input, so that it
    is rounded once, to the nearest float16; float32 otherwise (float16 and bfloat16 widen to it exactly)."""
    return np.float64 if dt.itemsize >= 8 else np.float32


#: Bytes per step of the fast cast: temporaries that stay in the CPU cache, few enough calls per block.
_FAST_STEP_BYTES = 1 << 19


def measure_float16(x: np.ndarray, report: Float16Report) -> bool:
    """Account float16 values [k, L, ...] in `report` (they are stored as they are: no rounding) when all are
    finite; False, leaving the report untouched, when some are NaN or inf (cast_float16 then names them).

    Per layer max and min in two passes over the values, with no temporary (|x| of a trace's tokens would
    be a fresh 20 MB array at Llama-2-7B shape): NaN propagates through both, inf shows past +-65504."""
    torch = import_torch()

    if x.dtype != np.float16 or x.ndim < 2 or x.size == 0:
        return False
    k, L = x.shape[0], x.shape[1]
    t = torch.from_numpy(np.ascontiguousarray(x)).reshape(k, L, -1)
    amax = torch.maximum(t.amax(dim=(0, 2)), -t.amin(dim=(0, 2))).double().numpy()
    if not (amax <= FLOAT16_MAX).all():
        return False
    report.values += x.size
    report.max_abs = np.maximum(report.max_abs, amax)
    return True


def cast_block_fast(x: np.ndarray, out: np.ndarray, report: Float16Report) -> bool:
    """Cast a block [k, L, D] into `out` (float16) and account it in `report`, as `cast_float16` would, for
    the common case: float32 or float16 values, all finite and within +-65504. Returns False, leaving the
    report untouched, when the block is not that case; the caller then uses `cast_float16` (which raises or
    clips) and overwrites `out`.

    Why a second path: numpy converts float32 <-> float16 element by element (5.8 and 3.7 ns per value
    here, measured), torch with F16C vector instructions (0.15 ns), and the conversion is most of the
    workers' time; and NaN, inf and overflow all show in the per-layer max |x| computed anyway, so the
    common case needs no separate scans. Same rounding (IEEE round-to-nearest-even): tests check that
    both paths give the same bits and the same report."""
    torch = import_torch()

    if x.dtype not in (np.float32, np.float16) or x.ndim != 3 or x.size == 0 or out.shape != x.shape:
        return False
    k, L = x.shape[0], x.shape[1]
    x = np.ascontiguousarray(x)
    if x.dtype == np.float16:
        if not measure_float16(x, report):
            return False
        out[...] = x
        return True
    step = max(1, _FAST_STEP_BYTES // x[0].nbytes)
    amax = np.zeros(L, np.float32)
    errmax = np.zeros(L, np.float32)
    relmax = np.zeros(L, np.float32)
    n0 = min(step, k)
    absbuf = np.empty((n0, *x.shape[1:]), np.float32)
    errbuf = np.empty((n0, *x.shape[1:]), np.float32)
    t_out = torch.from_numpy(out) if out.flags.c_contiguous else None
    for a in range(0, k, step):
        b = min(k, a + step)
        xs, ax, err = x[a:b], absbuf[:b - a], errbuf[:b - a]
        np.abs(xs, out=ax)
        m = ax.reshape(b - a, L, -1).max(axis=(0, 2))
        if not (m <= FLOAT16_MAX).all():  # NaN propagates: one reduction finds NaN, inf and overflow
            return False
        amax = np.maximum(amax, m)
        if t_out is not None:
            t_out[a:b].copy_(torch.from_numpy(xs))
            torch.from_numpy(err).copy_(t_out[a:b])
        else:
            out[a:b] = xs
            err[...] = out[a:b]
        np.subtract(err, xs, out=err)
        np.abs(err, out=err)
        errmax = np.maximum(errmax, err.reshape(b - a, L, -1).max(axis=(0, 2)))
        # relative error only where |x| is a normal float16 (as Float16Report.update_block)
        np.multiply(err, ax >= FLOAT16_TINY, out=err)
        np.maximum(ax, FLOAT16_TINY, out=ax)
        np.divide(err, ax, out=err)
        relmax = np.maximum(relmax, err.reshape(b - a, L, -1).max(axis=(0, 2)))
    report.values += x.size
    report.max_abs = np.maximum(report.max_abs, amax)
    report.max_abs_error = np.maximum(report.max_abs_error, errmax)
    report.max_rel_error = np.maximum(report.max_rel_error, relmax)
    return True


def cast_edge_attr(ea: np.ndarray, describe: Callable[[tuple[int, ...]], str], *, layer: int,
                   on_overflow: OnOverflow, allow_nan: bool, report: Float16Report) -> np.ndarray:
    """Validate and cast one layer's edge attributes [E, H] to float16 (rules of cast_float16), accounting
    them in `report` under `layer` as cast_float16 accounts a block: clipped values are counted in
    `clipped` (infinities among them also in `inf`), errors are measured after the clip, and `max_abs` is
    the largest finite |x| given, before the clip (a clipped infinity counts as 65504)."""
    ea16 = cast_float16(ea[None, None], describe, on_overflow=on_overflow, allow_nan=allow_nan)[0, 0]
    if ea.size:
        if ea.dtype == np.float16:
            report.update_float16_layer(layer, ea)
        else:
            ea_w = ea.astype(_wide_dtype(ea.dtype), copy=False)
            a = np.abs(ea_w)
            over = a > schema.FLOAT16_MAX  # NaN compares False
            n_over = int(over.sum())
            if n_over:
                # reached only with on_overflow="clip" (cast_float16 raised otherwise)
                n_inf = int(np.isinf(a).sum())
                given_max = float(np.where(np.isfinite(a), a, 0).max())
                ea_w = np.clip(ea_w, -schema.FLOAT16_MAX, schema.FLOAT16_MAX)
                report.update_layer(layer, ea_w, ea16, overflow=n_over, clipped=n_over)
                report.max_abs[layer] = max(report.max_abs[layer], given_max)
                report.inf[layer] += n_inf
            else:
                report.update_layer(layer, ea_w, ea16)
    return ea16
