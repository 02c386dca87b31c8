"""benchmarks/bench_convert.py --smoke runs end to end, in both layouts (timings are not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _smoke(*args: str) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_convert.py"), "--smoke", *args],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_bench_convert_smoke():
    out = _smoke()
    assert "| convert --workers 2 --verify sample |" in out and "| read (gunzip + unpickle), 1 process |" in out
    assert "GB/s of float32" in out and "--no-graphs" not in out and "trace_edges" not in out


def test_bench_convert_seed_smoke():
    out = _smoke("--layout", "seed")
    rows = ["| read (gunzip + unpickle), 1 process |", "| read (gunzip + unpickle), 2 processes |",
            "| convert --workers 1 --verify none |", "| convert --workers 1 --verify sample |",
            "| convert --workers 1 --no-graphs --verify none |", "| convert --workers 2 --verify none |",
            "| convert --workers 2 --verify sample |",
            # the graph table: end to end, then trace_edges alone per recipe at the smoke's [L, H, T, T]
            "| convert --workers 1: with graphs - --no-graphs (",
            "| trace_edges default (--graph-threshold 0.0, --edge-attr mean) at [4, 4, 12, 12]:",
            "| trace_edges --edge-attr heads at [4, 4, 12, 12]:", "| trace_edges --graph-topk-frac 0.35 at [4, 4, 12, 12]:"]
    assert [r for r in rows if r not in out] == [], out
    assert "GB/s of decompressed pickle" in out and "edge_attr [E, 4]" in out
