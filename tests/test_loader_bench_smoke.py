"""benchmarks/bench_stream.py runs end to end at tiny shapes (--smoke): it builds its data, checks in a warm-up
epoch that every loader delivers every trace once with the source values, and prints its table. No timing is
asserted."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench(name: str) -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


def test_bench_stream_smoke(tmp_path: Path) -> None:
    mod = _bench("bench_stream")
    out = tmp_path / "stream.md"
    table = mod.main(["--smoke", "--out", str(out)])
    for row in ["ref A: np.memmap", "ref B: old .pt", "TraceLoader shuffled, 0 workers", "TraceLoader shuffled, 2 threads",
                "TraceLoader sequential, 0 workers", "TraceLoader sequential, 2 threads", "2 worker processes"]:
        assert row in table
    assert "benchmarks/bench_stream.py --smoke" in out.read_text()


def test_bench_stream_graphs_smoke(tmp_path: Path) -> None:
    body = _bench("bench_stream_graphs").main(["--smoke", "--out", str(tmp_path / "g.md")])
    for row in ["ref: memmap + Batch.from_data_list, layer 2", "TraceLoader graphs, layer 2, 0 workers",
                "TraceLoader graphs, every layer (hybrid), 0 workers", "format v2"]:
        assert row in body
