"""The epoch plan at scale (issue 15, section 3): one rank's plan is computed from the chunk order and only the
shuffle windows that hold its traces (sampler.order_at), bit for bit the batches cut from the whole epoch order,
in memory that does not grow with the number of traces. The full-size figures are benchmarks/bench_scale.py's."""

from __future__ import annotations

import importlib.util
import itertools
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tracestore.loader import sampler
from tracestore.loader.sampler import epoch_order, order_at, plan_epoch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("run_gap", [0, sampler._RUN_GAP])
def test_rank_plan_is_bit_identical_to_the_whole_order(run_gap: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # run_gap 0: every needed window is its own run (its own advanced generator), as at a thousand ranks
    monkeypatch.setattr(sampler, "_RUN_GAP", run_gap)
    whole_order_plan = _bench().whole_order_plan  # the plan as it was cut before issue 15
    for n, world, bs, cr, rps, win, drop_last, start, seed in itertools.product(
            [0, 1, 13, 600], [1, 3, 16], [1, 4, 9], [1, 5], [None, 24], [1, 3], [False, True], [0, 7],
            [0, 2**40 + 3]):
        if start > n:
            continue
        order_kw = dict(seed=seed, epoch=seed % 5 + 1, chunk_rows=cr, rows_per_shard=rps, window=win)
        for rank in range(world):
            got = plan_epoch(n, batch_size=bs, rank=rank, world_size=world, drop_last=drop_last, start=start,
                             **order_kw)  # type: ignore[arg-type]
            want = whole_order_plan(n, batch_size=bs, rank=rank, world_size=world, drop_last=drop_last,
                                    start=start, **order_kw)
            assert len(got) == len(want), (n, world, bs, rank)
            for g, w in zip(got, want, strict=True):
                assert g.dtype == np.int64 and np.array_equal(g, w), (n, world, bs, cr, rps, win, drop_last, start)


def test_order_at_is_the_epoch_order_at_those_slots() -> None:
    n = 5000
    kw: dict[str, Any] = dict(seed=11, epoch=4, chunk_rows=64, rows_per_shard=512, window=4)
    order = epoch_order(n, **kw)
    slots = np.random.default_rng(0).integers(0, n, 700)  # unsorted, with repeats
    assert np.array_equal(order_at(slots, n, **kw), order[slots])
    assert np.array_equal(order_at(slots, n, shuffle=False), slots)
    assert order_at(np.zeros(0, np.int64), n, **kw).size == 0
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 5000\)"):
        order_at(np.array([n]), n, **kw)


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
    for c in ["plan time per rank", "peak memory per rank", "every trace exactly once", "GETs per trace",
              "bytes per GET", "shard index GETs"]:
        assert c in text, c
    assert "FAILED" not in text
