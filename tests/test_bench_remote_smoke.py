"""benchmarks/bench_remote.py runs end to end at tiny size (no timings are asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def test_bench_remote_smoke(capsys):
    path = Path(__file__).parents[1] / "benchmarks" / "bench_remote.py"
    spec = importlib.util.spec_from_file_location("bench_remote", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "| stream every trace" in out and "| one random trace, p50" in out
