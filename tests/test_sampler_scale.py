"""The epoch plan at scale (issues 15 and 21): one rank's plan is computed from the chunk order and its own
portion only, in memory that does not grow with the number of traces; a resume on another geometry replays
the cursor over all traces once. The full-size figures are benchmarks/bench_scale.py's."""

from __future__ import annotations

import importlib.util
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tracestore.loader.sampler import Segment, plan_epoch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_rank_plan_memory_does_not_grow_with_the_store() -> None:
    # 400,000 traces over 256 ranks: a rank holds ~1,600 of them; the whole order alone is 3.2 MB of int64
    n, kw = 400_000, dict(batch_size=32, seed=1, epoch=2, world_size=256, chunk_rows=64, rows_per_shard=512,
                          window=16)
    plan_epoch(1000, **kw)  # type: ignore[arg-type]  # warm numpy's caches outside the measurement
    tracemalloc.start()
    try:
        plan = plan_epoch(n, rank=100, **kw)  # type: ignore[arg-type]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(b.size for b in plan) == -(-n // 256)
    assert peak < n * 8 / 4, f"peak {peak} bytes for a rank's plan of {n} traces"


def test_a_resume_at_scale_gives_the_rest_once() -> None:
    # 100,000 traces, 64 ranks took 10 batches of 32 each, resumed on 48 ranks: the rest, each once
    n, kw = 100_000, dict(seed=7, epoch=1, chunk_rows=64, rows_per_shard=512, window=16)
    head = np.concatenate([np.concatenate(plan_epoch(n, batch_size=32, rank=r, world_size=64, **kw)[:10])
                           for r in range(64)])
    cursor = [Segment(64, False, 320)]
    rest = np.concatenate([np.concatenate(plan_epoch(n, batch_size=50, rank=r, world_size=48, cursor=cursor, **kw))
                           for r in range(48)])
    c = np.bincount(head, minlength=n) + np.bincount(rest, minlength=n)
    assert c.min() == 1 and int(c.sum()) - n == (-(n - head.size)) % 48


def _bench() -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_scale", BENCH / "bench_scale.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_bench_scale_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scale.md"
    assert _bench().main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    for c in ["What all ranks together fetch", "bytes / store", "GETs per trace", "bytes per GET", "shard index GETs",
              "Spearman", "distinct chunks per batch", "plan time per rank", "peak memory per rank", "resumed plan",
              "every trace once", "each trace not consumed once"]:
        assert c in text, c
    assert "FAILED" not in text
