"""The seed pipeline's own files (../shared/notes/seed-pipeline.md) through tools/convert with default options:
raw per-token archives with full attention matrices, lstm_solo and gnn .pt files, the later PCA shards, the
question_id,bleurt_score CSV. Ids, scores, the pooled sequence (= the last token), per-token states bit-equal to
the source, token ids, answer text, and graph edges and weights equal to the recipe computed here independently
(plain loops), for the v1 and v2 recipes and --edge-attr heads."""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tracestore
from tracestore.cli import main
from tracestore.testing.seed import (
    seed_bleurt_scores,
    seed_labels,
    seed_records,
    write_seed_gnn_pt,
    write_seed_lstm_pt,
    write_seed_raw_archive,
    write_seed_scores_csv,
)

L, D, H = 4, 16, 3
TOK = (3, 9)


def _convert(*args: str) -> int:
    return main(["convert", *args, "--no-progress", "--workers", "0"])


def _mean_loop(att: np.ndarray) -> np.ndarray:
    """Head mean by a plain loop: float32 sum in head order, then / H."""
    acc = np.zeros(att.shape[1:], np.float32)
    for h in range(att.shape[0]):
        acc += att[h].astype(np.float32)
    return acc / np.float32(att.shape[0])


def v1_reference(att: np.ndarray, threshold: float = 0.0, heads: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The seed's v1 recipe by loops: for every i, every j <= i with mean >= threshold: edge j -> i."""
    mean = _mean_loop(att)
    src, dst, w = [], [], []
    for i in range(att.shape[1]):
        for j in range(i + 1):
            if mean[i, j] >= threshold:
                src.append(j)
                dst.append(i)
                w.append(att[:, i, j].astype(np.float32) if heads else [mean[i, j]])
    return np.array([src, dst], np.int64).reshape(2, -1), np.array(w, np.float32).reshape(len(src), -1)


def v2_reference(att: np.ndarray, frac: float) -> tuple[np.ndarray, np.ndarray]:
    """The seed's v2 recipe by loops: for i >= 1 the top max(1, int(i * frac)) j < i, ties to the lower j."""
    mean = _mean_loop(att)
    src, dst, w = [], [], []
    for i in range(1, att.shape[1]):
        k = max(1, int(i * frac))
        order = sorted(range(i), key=lambda j: (-float(mean[i, j]), j))[:k]
        for j in sorted(order):
            src.append(j)
            dst.append(i)
            w.append([mean[i, j]])
    return np.array([src, dst], np.int64).reshape(2, -1), np.array(w, np.float32).reshape(len(src), -1)


@pytest.fixture
def raw(tmp_path: Path) -> tuple[Path, list[str], Path]:
    """Two raw archives as the seed wrote them (gzip level 6, default protocol; a plain .pkl too) and the CSV."""
    d = tmp_path / "traces_data"
    ids = write_seed_raw_archive(d / "llama_triviaqa_batch_0000.pkl.gz", 5, L, D, num_heads=H, tokens=TOK)
    ids += write_seed_raw_archive(d / "llama_triviaqa_batch_0001_sub0000.pkl", 4, L, D, num_heads=H, tokens=TOK,
                                  start=5, compresslevel=None)
    csv = write_seed_scores_csv(tmp_path / "ground_truth_scores.csv", ids, extra=["qb_999"])
    return d, ids, csv


def _check_graph(g: Any, rec: dict[str, Any], ref: Any, layers: Any = range(L)) -> None:
    for layer in layers:
        ei, ea = ref(np.asarray(rec["attentions"][layer]))
        np.testing.assert_array_equal(g.edge_index[layer], ei)
        got = g.edge_attr[layer]
        got = got[:, None] if got.ndim == 1 else got
        np.testing.assert_array_equal(got, ea.astype(np.float16))


def test_raw_archives_convert_with_default_options(raw: tuple[Path, list[str], Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    d, ids, csv = raw
    out = tmp_path / "s.zarr"
    assert _convert(str(d), "-o", str(out), "--scores", str(csv)) == 0
    summary = capsys.readouterr().out
    s = tracestore.open(out)
    assert s.ids.tolist() == ids
    np.testing.assert_array_equal(s.scores, seed_bleurt_scores(9))
    assert s.pool == "last" and s.has_graphs and s.has_token_hidden
    assert s.graph_recipe is not None and s.graph_recipe["name"] == "causal-threshold"
    assert set(s.fields) == {"generated_answer_clean"}
    recs = seed_records(9, L, D, num_heads=H, tokens=TOK)
    for i, rec in enumerate(recs):
        t = s[i]
        hs = np.stack(rec["hidden_states"], axis=1)  # [T, L, D] float16
        np.testing.assert_array_equal(t.tokens.hidden, hs, strict=True)  # bit-equal: float16 in, float16 stored
        np.testing.assert_array_equal(t.sequence, hs[-1], strict=True)  # the last token of prompt + answer
        np.testing.assert_array_equal(t.tokens.ids, rec["tokens"], strict=True)
        assert t.tokens.text == rec["tokens_decoded"]
        assert t.fields == {"generated_answer_clean": rec["generated_answer_clean"]}
        T = hs.shape[0]
        assert all(t.graph.num_edges(layer) == T * (T + 1) // 2 for layer in range(L))
        _check_graph(t.graph, rec, v1_reference)
    assert "1 scores without a trace e.g. 'qb_999'" in summary
    assert "sequences: pooled from the tokens: last token" in summary and "causal-threshold (seed v1)" in summary
    assert "tokens: " in summary and "hidden states, token ids, text" in summary
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "pooled from the tokens: last token" in info and "causal-threshold (seed v1)" in info
    assert "fields: generated_answer_clean (str)" in info
    assert main(["verify", str(out)]) == 0
    ds = s.to_xarray()
    assert ds["generated_answer_clean"].values.tolist() == [r["generated_answer_clean"] for r in recs]


@pytest.mark.parametrize("opts,ref", [
    (["--graph-threshold", "0.05"], lambda a: v1_reference(a, 0.05)),
    (["--graph-topk-frac", "0.35"], lambda a: v2_reference(a, 0.35)),
    (["--graph-topk-frac", "0.6"], lambda a: v2_reference(a, 0.6)),
    (["--edge-attr", "heads"], lambda a: v1_reference(a, heads=True)),
])
def test_graph_recipes_match_an_independent_build(raw: tuple[Path, list[str], Path], tmp_path: Path,
                                                  opts: list[str], ref: Any) -> None:
    d, _ids, csv = raw
    out = tmp_path / "s.zarr"
    assert _convert(str(d), "-o", str(out), "--scores", str(csv), "--verify", "all", *opts) == 0
    s = tracestore.open(out)
    recs = seed_records(9, L, D, num_heads=H, tokens=TOK)
    for i in (0, 4, 8):
        _check_graph(s[i].graph, recs[i], ref)
    recipe = s.graph_recipe
    assert recipe is not None and recipe["edge_attr"] == ("heads" if "heads" in opts else "mean")
    assert s.info()["edge_attr_size"] == (H if "heads" in opts else 1)
    if "--graph-topk-frac" in opts:
        assert recipe["name"] == "causal-topk-frac" and math.isclose(recipe["topk_frac"], float(opts[1]))


def test_tokens_pool_and_graph_options(raw: tuple[Path, list[str], Path], tmp_path: Path) -> None:
    d, _ids, csv = raw
    recs = seed_records(9, L, D, num_heads=H, tokens=TOK)
    assert _convert(str(d), "-o", str(tmp_path / "ids.zarr"), "--tokens", "ids") == 0
    s = tracestore.open(tmp_path / "ids.zarr")
    t = s[2]
    assert not s.has_token_hidden and t.tokens.hidden is None and t.graph.x is None
    np.testing.assert_array_equal(t.tokens.ids, recs[2]["tokens"])
    assert t.graph.num_nodes == len(recs[2]["tokens"])
    with pytest.raises(ValueError, match=r"--tokens all"):
        tracestore.TraceLoader(s, batch_size=2, with_graphs=True, device="cpu")
    assert _convert(str(d), "-o", str(tmp_path / "none.zarr"), "--tokens", "none", "--no-graphs") == 0
    s = tracestore.open(tmp_path / "none.zarr")
    assert s[0].tokens is None and s[0].graph is None and s.token_ptr is None
    np.testing.assert_array_equal(s[0].sequence, np.stack(recs[0]["hidden_states"], axis=1)[-1])
    assert _convert(str(d), "-o", str(tmp_path / "mean.zarr"), "--pool", "mean", "--no-graphs") == 0
    s = tracestore.open(tmp_path / "mean.zarr")
    hs = np.stack(recs[3]["hidden_states"], axis=1).astype(np.float32)
    np.testing.assert_array_equal(s[3].sequence, hs.mean(axis=0, dtype=np.float64).astype(np.float32).astype(np.float16))
    assert s.pool == "mean" and not s.has_graphs and s.has_token_hidden


def test_lstm_solo_pt_ids_labels_and_the_csv_wins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "preprocessed_data" / "lstm_solo" / "preprocessed_llama_batch_0000.pt"
    ids = write_seed_lstm_pt(p, 6, L, D, tokens=TOK)
    assert _convert(str(p), "-o", str(tmp_path / "s.zarr")) == 0
    s = tracestore.open(tmp_path / "s.zarr")
    assert s.ids.tolist() == ids == [f"qb_{k}" for k in range(6)]
    np.testing.assert_array_equal(s.scores, seed_labels(6))
    recs = seed_records(6, L, D, num_heads=H, tokens=TOK)
    np.testing.assert_array_equal(s.sequences[:], np.stack([np.stack(r["hidden_states"], axis=1)[-1] for r in recs]))
    assert s.pool is None and s[0].tokens is None
    # a scores CSV given as well wins per id; the summary counts what it replaced
    csv = write_seed_scores_csv(tmp_path / "gt.csv", ids[:4])
    capsys.readouterr()
    assert _convert(str(p), "-o", str(tmp_path / "t.zarr"), "--scores", str(csv)) == 0
    summary = capsys.readouterr().out
    s = tracestore.open(tmp_path / "t.zarr")
    np.testing.assert_array_equal(s.scores[:4], seed_bleurt_scores(4))
    np.testing.assert_array_equal(s.scores[4:], seed_labels(6)[4:])
    assert "4 archive scores replaced by the file's (4 of them different)" in summary


@pytest.mark.parametrize("edge_attr_2d", [False, True])
def test_gnn_pt_graphs_as_given_and_tokens_from_x(tmp_path: Path, edge_attr_2d: bool) -> None:
    p = tmp_path / "gnn" / "preprocessed_llama_batch_0000.pt"
    ids = write_seed_gnn_pt(p, 5, L, D, num_heads=H, tokens=TOK, edge_attr_2d=edge_attr_2d)
    assert _convert(str(p), "-o", str(tmp_path / "s.zarr"), "--verify", "all") == 0
    s = tracestore.open(tmp_path / "s.zarr")
    assert s.ids.tolist() == ids
    np.testing.assert_array_equal(s.scores, seed_labels(5))
    obj = torch.load(p, weights_only=False)
    for b in range(5):
        t = s[b]
        x = np.stack([g.x.numpy() for g in obj["graphs"][b]], axis=1)  # [T, L, D]
        np.testing.assert_array_equal(t.tokens.hidden, x.astype(np.float16), strict=True)
        np.testing.assert_array_equal(t.sequence, x[-1].astype(np.float16))
        for layer, g in enumerate(obj["graphs"][b]):
            np.testing.assert_array_equal(t.graph.edge_index[layer], g.edge_index.numpy())
            np.testing.assert_array_equal(t.graph.edge_attr[layer][:, 0], g.edge_attr.numpy().reshape(-1).astype(np.float16))
    assert s.graph_recipe == {"name": "given"} and s.pool == "last"
    # the raw archive of the same traces gives the same store contents (the seed built these .pt from it)
    write_seed_raw_archive(tmp_path / "raw" / "batch_0000.pkl.gz", 5, L, D, num_heads=H, tokens=TOK)
    assert _convert(str(tmp_path / "raw"), "-o", str(tmp_path / "r.zarr")) == 0
    r = tracestore.open(tmp_path / "r.zarr")
    np.testing.assert_array_equal(r.sequences[:], s.sequences[:])
    for b in range(5):
        np.testing.assert_array_equal(r[b].tokens.hidden, s[b].tokens.hidden)
        for layer in range(L):
            np.testing.assert_array_equal(r[b].graph.edge_index[layer], s[b].graph.edge_index[layer])
            np.testing.assert_array_equal(r[b].graph.edge_attr[layer], s[b].graph.edge_attr[layer])


def test_later_shards_without_labels_take_scores_from_the_csv(tmp_path: Path) -> None:
    d = tmp_path / "shards"
    ids = write_seed_gnn_pt(d / "sharded_data_part_0.pt", 3, L, D, num_heads=H, tokens=TOK, labels=False,
                            edge_attr_2d=True, pca_dim=8)
    ids += write_seed_gnn_pt(d / "sharded_data_part_1.pt", 2, L, D, num_heads=H, tokens=TOK, labels=False,
                             edge_attr_2d=True, pca_dim=8, start=3)
    assert _convert(str(d), "-o", str(tmp_path / "nolabels.zarr")) == 0
    assert np.isnan(tracestore.open(tmp_path / "nolabels.zarr").scores).all()
    csv = write_seed_scores_csv(tmp_path / "gt.csv", ids[:4])
    assert _convert(str(d), "-o", str(tmp_path / "s.zarr"), "--scores", str(csv)) == 0
    s = tracestore.open(tmp_path / "s.zarr")
    assert s.hidden_size == 8 and s.ids.tolist() == ids
    np.testing.assert_array_equal(s.scores[:4], seed_bleurt_scores(4))
    assert np.isnan(s.scores[4])


def test_workers_give_the_same_bytes(raw: tuple[Path, list[str], Path], tmp_path: Path) -> None:
    d, _ids, csv = raw
    a, b = tmp_path / "w0.zarr", tmp_path / "w2.zarr"
    assert main(["convert", str(d), "-o", str(a), "--scores", str(csv), "--workers", "0", "--no-progress"]) == 0
    assert main(["convert", str(d), "-o", str(b), "--scores", str(csv), "--workers", "2", "--no-progress"]) == 0
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    gen = functools.partial(re.sub, rb'"generation": "[0-9a-f]{32}"', b"")  # a fresh id per store
    assert all(gen((a / f).read_bytes()) == gen((b / f).read_bytes()) for f in files)


def test_archives_of_different_kinds_are_refused(raw: tuple[Path, list[str], Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    d, _ids, _csv = raw
    write_seed_lstm_pt(d / "zz_preprocessed.pt", 2, L, D, tokens=TOK, start=50)
    capsys.readouterr()
    assert _convert(str(d), "-o", str(tmp_path / "s.zarr")) == 2
    err = capsys.readouterr().err
    assert "zz_preprocessed.pt" in err and "graphs" in err and "--no-graphs" in err


@pytest.mark.slow
def test_a_seed_archive_at_llama_2_7b_shape(tmp_path: Path) -> None:
    """3 traces of 32 layers x 80 tokens x 4096 with 32 heads' attention (~100 MB decompressed), with
    default options, through the command line with a worker process."""
    Lr, Dr, Hr, Tr = 32, 4096, 32, 80
    ids = write_seed_raw_archive(tmp_path / "raw" / "llama_batch_0000.pkl.gz", 3, Lr, Dr, num_heads=Hr, tokens=Tr)
    assert main(["convert", str(tmp_path / "raw"), "-o", str(tmp_path / "s.zarr"), "--workers", "1",
                 "--no-progress", "-q"]) == 0
    s = tracestore.open(tmp_path / "s.zarr")
    assert s.ids.tolist() == ids and s.num_layers == Lr and s.hidden_size == Dr
    rec = seed_records(3, Lr, Dr, num_heads=Hr, tokens=Tr)[2]
    t = s[2]
    np.testing.assert_array_equal(t.tokens.hidden, np.stack(rec["hidden_states"], axis=1), strict=True)
    np.testing.assert_array_equal(t.sequence, np.stack([h[-1] for h in rec["hidden_states"]]), strict=True)
    assert t.graph.num_edges(31) == Tr * (Tr + 1) // 2
    _check_graph(t.graph, rec, v1_reference, (0, 31))
    assert main(["verify", str(tmp_path / "s.zarr")]) == 0



def test_labels_are_recorded_and_positive_below_refuses_them(tmp_path: Path) -> None:
    from tracestore.errors import TrainConfigError
    from tracestore.train import TrainConfig, train

    p = tmp_path / "lstm_solo" / "preprocessed_a.pt"
    ids = write_seed_lstm_pt(p, 8, L, D, tokens=TOK)
    assert _convert(str(p), "-o", str(tmp_path / "s.zarr")) == 0
    s = tracestore.open(tmp_path / "s.zarr")
    prov = s.attrs["provenance"]
    assert prov["label_scores"] == 8 and prov["sources"][0]["scores_from"] == "labels"
    cfg = TrainConfig(store=str(tmp_path / "s.zarr"), out=str(tmp_path / "run"), epochs=1, batch_size=4, hidden=8,
                      progress=False, positive_below=0.5)
    with pytest.raises(TrainConfigError, match=r"8 of its scores are the archives' 0/1 labels.*--threshold 0.5"):
        train(cfg)
    from tracestore.probe import probe_layers  # the probe keeps the same rule (a review found it did not)

    with pytest.raises(TrainConfigError, match=r"8 of its scores are the archives' 0/1 labels"):
        probe_layers(s, positive_below=0.5)
    with pytest.raises(TrainConfigError, match=r"--positive-below sets classification labels"):
        probe_layers(s, positive_below=0.5, task="regression")
    # with the BLEURT scores joined from the CSV, --positive-below is the right rule
    csv = write_seed_scores_csv(tmp_path / "gt.csv", ids)
    assert _convert(str(p), "-o", str(tmp_path / "t.zarr"), "--scores", str(csv)) == 0
    assert tracestore.open(tmp_path / "t.zarr").attrs["provenance"]["label_scores"] == 0
    cfg.store, cfg.out = str(tmp_path / "t.zarr"), str(tmp_path / "run2")
    assert train(cfg)["label_rule"] == "score < 0.5"
