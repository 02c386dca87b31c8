"""benchmarks/gpu_check.py, the GPU check of issue 14, on the CPU: its arguments, its table, and every part at
tiny shapes through the CPU fallbacks (`--cpu-dry-run`), each GPU row marked "skipped: no CUDA". No timing is
asserted."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU dry run and its refusal")


@pytest.fixture(scope="module")
def gc() -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = mod  # its dataclasses look their module up while it loads
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


def _rows(text: str) -> dict[str, list[list[str]]]:
    """{part: [[check, measured, goal, result], ...]} from the written table."""
    out: dict[str, list[list[str]]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] != "part":
            out.setdefault(cells[0], []).append(cells[1:])
    return out


def test_parts_argument(gc: Any) -> None:
    assert gc.parse_parts("all") == list(gc.PARTS)
    assert gc.parse_parts("train, h2d") == ["h2d", "train"]  # the table's order, whatever the order given
    with pytest.raises(argparse.ArgumentTypeError, match=r"unknown part\(s\) \['gpu'\]; pick from tests, h2d"):
        gc.parse_parts("h2d,gpu")
    with pytest.raises(SystemExit):
        gc.build_parser().parse_args(["--parts", ""])
    args = gc.build_parser().parse_args(["--cpu-dry-run", "--parts", "step", "--rounds", "2"])
    assert args.parts == ["step"] and args.out is None  # main(): results/gpu.md on CUDA, /tmp for a dry run
    assert gc.shapes_for(args) == gc.Shapes(**{**gc.DRY.__dict__, "rounds": 2})
    assert gc.shapes_for(gc.build_parser().parse_args([])) == gc.FULL
    with pytest.raises(SystemExit, match="--n 3: the store needs at least one batch"):
        gc.shapes_for(gc.build_parser().parse_args(["--n", "3"]))
    with pytest.raises(SystemExit, match="--rounds 0"):
        gc.shapes_for(gc.build_parser().parse_args(["--rounds", "0"]))


@needs_no_cuda
def test_refuses_to_run_without_cuda_unless_dry_run(gc: Any, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="sees no CUDA device; run it on the GPU machine .* --cpu-dry-run"):
        gc.main(["--out", str(tmp_path / "gpu.md")])
    assert not (tmp_path / "gpu.md").exists()


def test_cuda_test_files_and_junit_outcomes(gc: Any, tmp_path: Path) -> None:
    files = gc.cuda_test_files()
    assert {"tests/test_trainer.py", "tests/test_loader.py"} <= set(files)
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_trainer" name="test_cuda_bf16_autocast[lstm]"><skipped/></testcase>'
        '<testcase classname="tests.test_loader" name="test_x[cuda:0]"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_loader" name="test_y"/>'
        '<testcase classname="tests.test_loader" name="test_y"><error message="teardown"/></testcase>'
        "</testsuite></testsuites>")
    assert gc.junit_outcomes(xml) == {"tests/test_trainer.py::test_cuda_bf16_autocast[lstm]": "skipped",
                                      "tests/test_loader.py::test_x[cuda:0]": "failed",
                                      "tests/test_loader.py::test_y": "error"}


def test_time_budget_and_a_failing_part_still_write_the_table(gc: Any, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "gpu.md"
    gc.main(["--cpu-dry-run", "--parts", "h2d,train", "--budget-s", "-1", "--out", str(out), "--note", "a note"])
    text = out.read_text()
    rows = _rows(text)
    assert all("not run:" in r[3] and "--budget-s -1" in r[3] for p in ("h2d", "train") for r in rows[p])
    assert "a note" in text and "Versions: zarr " in text and "Device: none: CPU dry run" in text
    # without --out a dry run writes its own file, never benchmarks/results/gpu.md
    monkeypatch.setattr(gc, "DRY_RUN_OUT", str(tmp_path / "dry.md"))
    before = gc.DEFAULT_OUT.read_text() if gc.DEFAULT_OUT.exists() else None
    gc.main(["--cpu-dry-run", "--parts", "h2d", "--budget-s", "-1"])
    assert "not run:" in (tmp_path / "dry.md").read_text()
    assert (gc.DEFAULT_OUT.read_text() if gc.DEFAULT_OUT.exists() else None) == before

    def broken(ctx: Any, report: Any) -> None:
        raise RuntimeError("the pinned ring\nbroke")

    monkeypatch.setitem(gc.RUNNERS, "tests", broken)
    monkeypatch.setitem(gc.RUNNERS, "train", lambda ctx, report: report.rows.append(
        gc.Row("5 train", "stub", "ran", "", "ok")))
    gc.main(["--cpu-dry-run", "--parts", "tests,train", "--out", str(out)])
    rows = _rows(out.read_text())
    assert rows["tests"] == [["(raised)", "", "", "FAILED: RuntimeError: the pinned ring broke"]]
    assert rows["5 train"] == [["stub", "ran", "", "ok"]]
    assert "pending" not in out.read_text()


@needs_no_cuda
def test_dry_run_of_the_measurements(gc: Any, tmp_path: Path) -> None:
    """Parts 2-4 in process: the loader to the CPU, the host copy, the .pt pipeline, the lstm steps."""
    out = tmp_path / "gpu.md"
    text = gc.main(["--cpu-dry-run", "--parts", "h2d,old,step", "--out", str(out)])
    assert out.read_text() == text
    rows = _rows(text)
    h2d = rows["2 h2d"]
    assert h2d[0][0].startswith("bare (CPU fallback: pageable) float16 copy, 16 x [4, 64] (0.5 KiB each)")
    assert [r[0].split(",")[0] for r in h2d[1:-1]] == ["TraceLoader shuffled"] * len(gc.DRY.workers)
    assert h2d[-1][0].startswith("best TraceLoader (")
    assert rows["2 h2d"][-1][2] == ">= 0.8x" and rows["2 h2d"][-1][3].startswith("skipped: no CUDA (CPU fallback")
    assert "GB/s" in rows["3 old"][0][1] and rows["3 old"][1][3].startswith("skipped: no CUDA")
    steps = rows["4 step"]
    assert len(steps) == 2 and "float32" in steps[0][0] and "bf16 autocast (off without CUDA" in steps[1][0]
    assert all(r[2] == "<= 1.05x" and r[3].startswith("skipped: no CUDA") and "ms per step" in r[1] for r in steps)


@needs_no_cuda
def test_dry_run_of_the_tests_and_the_trainer(gc: Any, tmp_path: Path) -> None:
    """Parts 1 and 5 as subprocesses: pytest over the CUDA tests (which skip here), `tracestore train`, and the
    trainer's DDP path under torchrun with gloo."""
    out = tmp_path / "gpu.md"
    rows = _rows(gc.main(["--cpu-dry-run", "--parts", "tests,train", "--out", str(out)]))
    (tests,) = rows["1 tests"]
    assert "2 skipped" in tests[1] and tests[3] == "skipped: no CUDA (2 CUDA tests skipped as expected)"
    train, ddp = rows["5 train"]
    assert train[0].startswith("tracestore train --store <store> --model lstm --epochs 1") and "--device cpu" in train[0]
    assert "1 epoch, train_loss" in train[1] and train[3] == "skipped: no CUDA (CPU fallback ran)"
    assert "backend gloo, world size 1, DistributedDataParallel: True" in ddp[1]
    assert ddp[3] == "skipped: no CUDA (CPU fallback ran)"
