"""The store benchmarks run end to end at tiny shapes (--smoke): they build their data, check that
tracestore and the references read the same bytes, and print a table. No timing is asserted."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize(("name", "columns"), [
    ("bench_random_access", ["one trace -> buffer", "64 random -> buffer", "one layer, all traces -> buffer",
                             "tracestore / memmap (p50)"]),
    ("bench_size", ["float32 .npy", "float16 .pt", "tracestore store", "/ float16 .pt"]),
    ("bench_shard_size", ["np.memmap (.npy, reference)", "write GB/s", "64 random warm ms"]),
    ("bench_parts", ["store[i].sequence", "sequences[idx], 64 random, unsorted", "select(30 random ids)",
                     "TraceLoader epoch, shuffled, 2 worker processes", "parts / one (p50 time)"]),
])
def test_bench_smoke(name: str, columns: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result.md"
    assert _load(name).main(["--smoke", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for c in columns:
        assert c in printed, c
    text = out.read_text()
    assert "--smoke" in text and "| ---" not in text and "|---|" in text
