"""The seed-format test kit (tracestore.testing.seed): files in the seed pipeline's exact formats, loaded
back with plain pickle / torch.load and with tracestore's safe loader."""

from __future__ import annotations

import gzip
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tracestore.testing.seed import (
    head_mean,
    seed_bleurt_scores,
    seed_num_tokens,
    seed_pca_matrix,
    seed_records,
    seed_score_for_id,
    v1_edges,
    write_seed_gnn_pt,
    write_seed_lstm_pt,
    write_seed_raw_archive,
    write_seed_scores_csv,
)

L, D, H = 3, 8, 2
TOK = (3, 7)
RECORD_KEYS = {"hidden_states", "attentions", "tokens", "tokens_decoded", "generated_answer_clean", "question_id"}
DATA_KEYS = {"x", "edge_index", "edge_attr", "num_nodes", "num_possible_edges", "num_filtered_edges", "filter_ratio"}


def _records(n: int = 4, start: int = 0, seed: int = 0, tokens: Any = TOK) -> list[dict[str, Any]]:
    return seed_records(n, L, D, num_heads=H, tokens=tokens, seed=seed, start=start)


def _load_pt(path: Path) -> Any:
    # our own file: plain torch.load (PyG Data needs the full unpickler outside tracestore's safe loader)
    return torch.load(path, weights_only=False, map_location="cpu")


def _same_record(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["question_id"] == b["question_id"] and a["tokens_decoded"] == b["tokens_decoded"]
            and a["generated_answer_clean"] == b["generated_answer_clean"]
            and np.array_equal(a["tokens"], b["tokens"])
            and all(np.array_equal(x, y) for x, y in zip(a["hidden_states"], b["hidden_states"], strict=True))
            and all(np.array_equal(x, y) for x, y in zip(a["attentions"], b["attentions"], strict=True)))


def _double_loop_v1(att: np.ndarray, threshold: float) -> tuple[list[list[int]], list[float]]:
    """The v1 recipe written out: mean over heads in float32; for i, for j <= i with mean >= threshold, j -> i."""
    mean = att.astype(np.float32).mean(axis=0)
    src, dst, w = [], [], []
    for i in range(mean.shape[0]):
        for j in range(i + 1):
            if mean[i, j] >= threshold:
                src.append(j)
                dst.append(i)
                w.append(float(mean[i, j]))
    return [src, dst], w


# -- records -------------------------------------------------------------------------------------------------
def test_records_have_the_seed_keys_dtypes_and_shapes() -> None:
    recs = _records(5, start=4610)
    for k, rec in enumerate(recs):
        assert set(rec) == RECORD_KEYS
        T = len(rec["tokens"])
        assert TOK[0] <= T <= TOK[1] and T == seed_num_tokens(4610 + k, TOK)
        assert isinstance(rec["hidden_states"], list) and len(rec["hidden_states"]) == L
        assert all(isinstance(h, np.ndarray) and h.dtype == np.float16 and h.shape == (T, D)
                   for h in rec["hidden_states"])
        assert isinstance(rec["attentions"], list) and len(rec["attentions"]) == L
        assert all(isinstance(a, np.ndarray) and a.dtype == np.float16 and a.shape == (H, T, T)
                   for a in rec["attentions"])
        assert rec["tokens"].dtype == np.int64 and rec["tokens"].shape == (T,)
        assert ((rec["tokens"] >= 0) & (rec["tokens"] < 32000)).all() and rec["tokens"][0] == 1
        assert isinstance(rec["tokens_decoded"], list) and len(rec["tokens_decoded"]) == T
        assert all(isinstance(s, str) for s in rec["tokens_decoded"])
        assert isinstance(rec["generated_answer_clean"], str)
        assert rec["question_id"] == f"qb_{4610 + k}"
    assert seed_records(1, L, D, num_heads=H, tokens=5, id_prefix="truthfulqa_")[0]["question_id"] == "truthfulqa_0"


def test_tokens_include_non_ascii_and_fixed_vocabulary() -> None:
    recs = seed_records(30, 2, 4, num_heads=1, tokens=(20, 30))
    pieces = {s for r in recs for s in r["tokens_decoded"]}
    assert any(not s.isascii() for s in pieces) and "<s>" in pieces
    # one id per piece, whatever the trace
    seen: dict[str, int] = {}
    for r in recs:
        for s, t in zip(r["tokens_decoded"], r["tokens"].tolist(), strict=True):
            assert seen.setdefault(s, t) == t


def test_attentions_are_causal_softmaxes() -> None:
    for rec in _records(4, tokens=(1, 9)):
        for a in rec["attentions"]:
            T = a.shape[-1]
            upper = np.triu(np.ones((T, T), dtype=bool), k=1)
            assert (a[:, upper] == 0).all()
            assert (a[:, ~upper] >= 0).all()
            np.testing.assert_allclose(a.astype(np.float32).sum(-1), 1.0, atol=2e-3)


def test_hidden_states_are_heavy_tailed_and_float16_safe() -> None:
    hs = np.concatenate([np.stack(r["hidden_states"]).reshape(-1, 64) for r in seed_records(4, 6, 64, num_heads=1,
                                                                                                tokens=20)])
    assert np.isfinite(hs).all() and np.abs(hs).max() < 4000
    # massive activation dims: a few hundred in absolute value
    assert 200 < np.abs(hs.astype(np.float32)).max()


def test_trace_k_is_the_same_in_any_file() -> None:
    a = _records(5, start=0)
    b = _records(2, start=3)
    assert _same_record(a[3], b[0]) and _same_record(a[4], b[1])
    assert not _same_record(_records(1, seed=1)[0], a[0])
    assert len({len(r["tokens"]) for r in _records(12)}) > 1  # T varies with (min, max)


def test_bad_token_range_is_refused() -> None:
    for bad in (0, (5, 3), (0, 2)):
        with pytest.raises(ValueError, match="tokens must be"):
            seed_records(1, L, D, num_heads=H, tokens=bad)


# -- raw archives ----------------------------------------------------------------------------------------------
def test_raw_archive_is_a_gzipped_pickled_list(tmp_path: Path) -> None:
    p = tmp_path / "llama2_triviaqa_batch_0000.pkl.gz"
    ids = write_seed_raw_archive(p, 3, L, D, num_heads=H, tokens=TOK, start=7)
    raw = p.read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0"  # gzip, mtime 0
    with gzip.open(p, "rb") as f:
        body = f.read()
    assert body[:2] == bytes([0x80, pickle.DEFAULT_PROTOCOL])
    obj = pickle.loads(body)
    assert isinstance(obj, list) and ids == [r["question_id"] for r in obj] == ["qb_7", "qb_8", "qb_9"]
    assert all(_same_record(x, y) for x, y in zip(obj, _records(3, start=7), strict=True))
    write_seed_raw_archive(tmp_path / "again.pkl.gz", 3, L, D, num_heads=H, tokens=TOK, start=7)
    # same bytes but for the file name gzip.open puts in the header
    assert gzip.decompress((tmp_path / "again.pkl.gz").read_bytes()) == body


def test_raw_archive_plain_pickle_and_protocol(tmp_path: Path) -> None:
    p = tmp_path / "old_batch_0000.pkl"
    write_seed_raw_archive(p, 2, L, D, num_heads=H, tokens=4, compresslevel=None, protocol=2)
    raw = p.read_bytes()
    assert raw[:2] == b"\x80\x02"
    obj = pickle.loads(raw)
    assert all(_same_record(x, y) for x, y in zip(obj, _records(2, tokens=4), strict=True))


# -- scores ----------------------------------------------------------------------------------------------------
def test_scores_csv(tmp_path: Path) -> None:
    ids = [f"qb_{k}" for k in range(10, 15)]
    p = write_seed_scores_csv(tmp_path / "ground_truth_scores.csv", ids, extra=["qb_99"])
    lines = p.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "question_id,bleurt_score" and len(lines) == 7
    got = dict(line.split(",") for line in lines[1:])
    assert list(got) == [*ids, "qb_99"]
    expected = seed_bleurt_scores(5, start=10)
    np.testing.assert_array_equal(np.asarray([float(got[q]) for q in ids], np.float32), expected)
    assert float(got["qb_99"]) == seed_score_for_id("qb_99")
    assert all(0.0 <= float(v) <= 1.0 for v in got.values())

    p2 = write_seed_scores_csv(tmp_path / "s2.csv", ["a", "b"], [0.25, 1.0], extra={"c": 0.5})
    assert p2.read_text().splitlines()[1:] == ["a,0.25", "b,1.0", "c,0.5"]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        write_seed_scores_csv(tmp_path / "s3.csv", ["a"], [1.5])


def test_bleurt_scores_are_per_trace() -> None:
    s = seed_bleurt_scores(20, seed=3)
    assert s.dtype == np.float32 and ((s >= 0) & (s <= 1)).all()
    np.testing.assert_array_equal(seed_bleurt_scores(5, seed=3, start=15), s[15:])
    assert 0 < (s < 0.5).sum() < 20


# -- .pt files -------------------------------------------------------------------------------------------------
def test_lstm_pt_is_the_last_token_of_the_raw_records(tmp_path: Path) -> None:
    p = tmp_path / "preprocessed_batch_0000.pt"
    ids = write_seed_lstm_pt(p, 5, L, D, tokens=TOK, start=2)
    obj = torch.load(p, weights_only=True)
    assert set(obj) == {"sequences", "labels", "question_ids"}
    assert obj["sequences"].dtype == torch.float16 and obj["sequences"].shape == (5, L, D)
    assert obj["labels"].dtype == torch.float32 and obj["labels"].shape == (5,)
    assert obj["question_ids"] == ids == [f"qb_{k}" for k in range(2, 7)]
    recs = _records(5, start=2)
    last = np.stack([np.stack([h[-1] for h in r["hidden_states"]]) for r in recs])
    np.testing.assert_array_equal(obj["sequences"].numpy(), last)
    np.testing.assert_array_equal(obj["labels"].numpy(),
                                  (seed_bleurt_scores(5, start=2) < 0.5).astype(np.float32))


@pytest.mark.parametrize("threshold", [0.0, 0.08])
def test_gnn_pt_is_the_v1_recipe_of_the_raw_records(tmp_path: Path, threshold: float) -> None:
    p = tmp_path / "preprocessed_batch_0000.pt"
    ids = write_seed_gnn_pt(p, 3, L, D, num_heads=H, tokens=TOK, start=5, threshold=threshold)
    obj = _load_pt(p)
    assert set(obj) == {"graphs", "labels", "question_ids"} and obj["question_ids"] == ids
    assert obj["labels"].dtype == torch.float32 and obj["labels"].shape == (3,)
    np.testing.assert_array_equal(obj["labels"].numpy(), (seed_bleurt_scores(3, start=5) < 0.5).astype(np.float32))
    assert len(obj["graphs"]) == 3
    for rec, layers in zip(_records(3, start=5), obj["graphs"], strict=True):
        T = len(rec["tokens"])
        assert len(layers) == L
        for layer, g in enumerate(layers):
            assert set(g.keys()) == DATA_KEYS
            assert g.x.dtype == torch.float16 and g.x.shape == (T, D)
            np.testing.assert_array_equal(g.x.numpy(), rec["hidden_states"][layer])
            ei, w = _double_loop_v1(rec["attentions"][layer], threshold)
            assert g.edge_index.dtype == torch.int64 and g.edge_index.tolist() == ei
            assert g.edge_attr.dtype == torch.float16 and g.edge_attr.shape == (len(w),)
            np.testing.assert_array_equal(g.edge_attr.numpy(), np.asarray(w, np.float32).astype(np.float16))
            assert g.num_nodes == T
            assert g.num_possible_edges == T * (T + 1) // 2 and type(g.num_possible_edges) is int
            assert g.num_filtered_edges == len(w) and type(g.num_filtered_edges) is int
            assert g.filter_ratio == len(w) / (T * (T + 1) // 2) and type(g.filter_ratio) is float
            if threshold == 0.0:
                assert len(w) == T * (T + 1) // 2


def test_head_mean_and_v1_edges() -> None:
    att = _records(1, tokens=6)[0]["attentions"][1]
    m = head_mean(att)
    assert m.dtype == np.float32 and m.shape == (6, 6)
    np.testing.assert_array_equal(m, att.astype(np.float32).mean(axis=0))
    ei, w = v1_edges(m, 0.1)
    ref, rw = _double_loop_v1(att, 0.1)
    assert ei.tolist() == ref and w.tolist() == rw


def test_gnn_pt_later_shard_format(tmp_path: Path) -> None:
    p = tmp_path / "sharded_data_part_0.pt"
    write_seed_gnn_pt(p, 2, L, D, num_heads=H, tokens=TOK, labels=False, edge_attr_2d=True, pca_dim=4)
    obj = _load_pt(p)
    assert set(obj) == {"graphs", "question_ids"}
    W = seed_pca_matrix(D, 4)
    np.testing.assert_allclose(W.T @ W, np.eye(4), atol=1e-5)
    for rec, layers in zip(_records(2), obj["graphs"], strict=True):
        for layer, g in enumerate(layers):
            E = g.edge_index.shape[1]
            assert g.edge_attr.dtype == torch.float32 and g.edge_attr.shape == (E, 1)
            assert g.x.dtype == torch.float32 and g.x.shape == (len(rec["tokens"]), 4)
            np.testing.assert_array_equal(g.x.numpy(), rec["hidden_states"][layer].astype(np.float32) @ W)
            mean = rec["attentions"][layer].astype(np.float32).mean(axis=0)
            np.testing.assert_array_equal(g.edge_attr[:, 0].numpy(), mean[np.tril_indices(mean.shape[0])])
    with pytest.raises(ValueError, match="pca_dim"):
        write_seed_gnn_pt(tmp_path / "bad.pt", 1, L, D, num_heads=H, tokens=3, pca_dim=D + 1)


def test_gnn_pt_x_dtype(tmp_path: Path) -> None:
    p = tmp_path / "g32.pt"
    write_seed_gnn_pt(p, 1, L, D, num_heads=H, tokens=4, x_dtype="float32")
    g = _load_pt(p)["graphs"][0][2]
    assert g.x.dtype == torch.float32
    np.testing.assert_array_equal(g.x.numpy(), _records(1, tokens=4)[0]["hidden_states"][2].astype(np.float32))


def _mapped_file(t: torch.Tensor) -> str | None:
    """The file whose mapping holds t's storage (Linux /proc/self/maps), or None for anonymous memory."""
    ptr = t.untyped_storage().data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5] if len(parts) > 5 else None
    return None


def test_seed_pt_files_load_through_load_torch(tmp_path: Path) -> None:
    from tracestore.convert.safe_unpickle import load_torch

    gp, lp = tmp_path / "gnn.pt", tmp_path / "lstm.pt"
    write_seed_gnn_pt(gp, 2, L, D, num_heads=H, tokens=TOK)
    write_seed_lstm_pt(lp, 2, L, D, tokens=TOK)
    sp = tmp_path / "sharded_data_part_1.pt"
    write_seed_gnn_pt(sp, 2, L, D, num_heads=H, tokens=TOK, labels=False, edge_attr_2d=True, pca_dim=4)
    for path in (gp, lp, sp):  # warnings are errors in this suite
        obj, info = load_torch(path, max_bytes=1 << 34)
        ref = _load_pt(path)
        assert set(obj) == set(ref) and info["bytes"] == os.path.getsize(path)
        assert obj["question_ids"] == ref["question_ids"]
        if "graphs" in obj:
            for la, lb in zip(obj["graphs"], ref["graphs"], strict=True):
                for a, b in zip(la, lb, strict=True):
                    assert type(a) is type(b) and set(a.keys()) == set(b.keys()) == DATA_KEYS
                    assert a.x.dtype == b.x.dtype and torch.equal(a.x, b.x)
                    assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.edge_attr, b.edge_attr)
                    assert (a.num_possible_edges, a.num_filtered_edges, a.filter_ratio) == \
                        (b.num_possible_edges, b.num_filtered_edges, b.filter_ratio)
            first = obj["graphs"][0][0].x
        else:
            assert torch.equal(obj["sequences"], ref["sequences"]) and torch.equal(obj["labels"], ref["labels"])
            first = obj["sequences"]
        if sys.platform.startswith("linux"):
            # torch.load(mmap=True): the tensors are pages of the file, not a copy
            assert _mapped_file(first) == str(path)
