"""tracestore.convert: every input layout, the scores join, float16 honesty, bad input, overwrite, the
parallel workers' determinism and the converter's own verification."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np
import pytest

import tracestore
from tracestore.cli import main
from tracestore.convert import convert
from tracestore.errors import (
    DuplicateIdError,
    Float16OverflowError,
    IncompleteStoreError,
    InputFormatError,
    NonFiniteValueError,
    ShapeMismatchError,
    StoreExistsError,
    StoreNotFoundError,
)
from tracestore.format import schema
from tracestore.format.report import Float16Report
from tracestore.store.writer import cast_block_fast, cast_float16
from tracestore.testing import synthetic_scores, synthetic_sequences
from tracestore.testing.archives import (
    HOSTILE_KINDS,
    make_records,
    per_token_states,
    write_archive_set,
    write_batch_archive,
    write_hostile_archive,
    write_legacy_pt,
    write_pickle,
    write_record_archive,
    write_scores_csv,
)

L, D = 3, 16


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file's bytes, the root's `generation` (a fresh id per store) blanked."""
    return {str(p.relative_to(root)): re.sub(rb'"generation": "[0-9a-f]{32}"', b'"generation": "-"', p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_records_round_trip_with_an_honest_float16_report(tmp_path):
    paths, ids, _ = write_archive_set(tmp_path / "in", files=3, traces_per_file=7, num_layers=L, hidden_size=D,
                                      scores_csv=False)
    res = convert([tmp_path / "in"], tmp_path / "s.zarr", workers=0)
    store = tracestore.open(tmp_path / "s.zarr")
    assert store.ids.tolist() == ids and len(store) == res.num_traces == 21
    expect = synthetic_sequences(21, L, D)
    np.testing.assert_array_equal(store.sequences[:], expect.astype(np.float16))
    np.testing.assert_allclose(store.scores, synthetic_scores(21), rtol=0, atol=0)
    rep = store.report[schema.SEQUENCES]
    # the rounding was measured against the float32 source (the workers' reports reach the store)
    assert rep.values == 21 * L * D and 0 < rep.max_rel_error.max() <= 2.0**-11
    np.testing.assert_allclose(rep.max_abs, np.abs(expect).max(axis=(0, 2)), rtol=1e-6)
    prov = store.attrs["provenance"]
    assert [s["name"] for s in prov["sources"]] == [p.name for p in paths] and len(prov["sources"][0]["crc32c"]) == 8
    assert "verified: sample" in res.summary() and "layers 3, hidden size 16" in res.summary()


def test_batch_dicts_and_legacy_pt_files_mix(tmp_path):
    write_batch_archive(tmp_path / "a_batch.pkl", 5, L, D, start=0, compresslevel=None)
    write_legacy_pt(tmp_path / "b_legacy.pt", 4, L, D, start=5, score_key="labels")
    write_legacy_pt(tmp_path / "c_noids.pt", 2, L, D, start=9, with_ids=False)
    res = convert([tmp_path], tmp_path / "s.zarr", workers=0, verify="all")
    store = tracestore.open(tmp_path / "s.zarr")
    assert store.ids.tolist()[:9] == [f"q{i:06d}" for i in range(9)]
    assert store.ids.tolist()[9:] == ["c_noids.pt#0", "c_noids.pt#1"]
    np.testing.assert_array_equal(store.sequences[:], synthetic_sequences(11, L, D).astype(np.float16))
    np.testing.assert_allclose(store.scores[5:9], synthetic_scores(9)[5:9])
    assert res.verified.startswith("all 11 traces")


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_per_token_states_are_pooled_as_asked(tmp_path, pool):
    write_record_archive(tmp_path / "t.pkl.gz", 4, L, D, tokens=5)
    write_batch_archive(tmp_path / "u.pkl.gz", 3, L, D, tokens=5, start=4)
    convert([tmp_path], tmp_path / "s.zarr", pool=pool, workers=0, verify="all")
    states = np.stack(per_token_states(7, L, D, 5))
    want = states.mean(axis=2, dtype=np.float64) if pool == "mean" else states[:, :, -1]
    np.testing.assert_array_equal(tracestore.open(tmp_path / "s.zarr").sequences[:],
                                  want.astype(np.float32).astype(np.float16))


def test_per_token_states_default_to_the_last_token_and_are_kept(tmp_path):
    write_record_archive(tmp_path / "t.pkl.gz", 2, L, D, tokens=5)
    res = convert([tmp_path], tmp_path / "s.zarr", workers=0)
    store = tracestore.open(tmp_path / "s.zarr")
    states = np.stack(per_token_states(2, L, D, 5))  # [N, L, T, D]
    np.testing.assert_array_equal(store.sequences[:], states[:, :, -1].astype(np.float16))
    assert store.pool == "last" and res.pool == "last" and "last token" in res.summary()
    np.testing.assert_array_equal(store[1].tokens.hidden, states[1].transpose(1, 0, 2).astype(np.float16))
    assert store[1].tokens.ids is None and store[1].tokens.text is None


def test_graph_records_keep_their_graphs(tmp_path):
    write_record_archive(tmp_path / "g.pkl.gz", 4, L, D, graphs=True)
    convert([tmp_path / "g.pkl.gz"], tmp_path / "s.zarr", workers=0, verify="all")
    store = tracestore.open(tmp_path / "s.zarr")
    assert store.has_graphs
    src = make_records(4, L, D, graphs=True)
    g = store.graph(2)
    for layer in range(L):
        d = src[2]["graphs"][layer]
        np.testing.assert_array_equal(g.edge_index[layer], d.edge_index.numpy())
        np.testing.assert_array_equal(g.x[:, layer], d.x.numpy().astype(np.float16))
    assert store.report[schema.TOKEN_HIDDEN].max_rel_error.max() > 0


def test_graph_only_records_get_vectors_by_pooling_x(tmp_path):
    write_record_archive(tmp_path / "g.pkl.gz", 3, L, D, graphs=True, hidden_states=False)
    src = make_records(3, L, D, graphs=True)
    x = np.stack([d.x.numpy() for d in src[1]["graphs"]], axis=1)  # [T, L, D]
    convert([tmp_path], tmp_path / "s.zarr", workers=0)  # default: the last token
    store = tracestore.open(tmp_path / "s.zarr")
    np.testing.assert_array_equal(store[1].sequence, x[-1].astype(np.float16))
    np.testing.assert_array_equal(store[1].tokens.hidden, x.astype(np.float16))
    convert([tmp_path], tmp_path / "t.zarr", workers=0, pool="mean", graphs=False)
    store = tracestore.open(tmp_path / "t.zarr")
    np.testing.assert_array_equal(store[1].sequence, x.mean(axis=0, dtype=np.float64).astype(np.float32).astype(np.float16))
    assert not store.has_graphs and store.pool == "mean"


@pytest.mark.parametrize("kw,workers", [({"id_key": "question_id", "int_ids": True}, 0),
                                       ({"id_key": "trace_id", "tensors": True}, 0),
                                       ({"id_key": "trace_id", "tensors": True}, 1)])
def test_id_keys_int_ids_and_tensor_records(tmp_path, kw, workers):
    # torch tensors in a worker: the unpickler imports torch's classes while nothing else imports torch
    ids = write_record_archive(tmp_path / "a.pkl.gz", 3, L, D, **kw)
    convert([tmp_path], tmp_path / "s.zarr", workers=workers)
    store = tracestore.open(tmp_path / "s.zarr")
    assert store.ids.tolist() == ids
    np.testing.assert_array_equal(store.sequences[:], synthetic_sequences(3, L, D).astype(np.float16))


def test_scores_csv_joined_by_id_with_missing_and_unused_counted(tmp_path):
    ids = write_record_archive(tmp_path / "a.pkl.gz", 5, L, D, scores=False)
    write_scores_csv(tmp_path / "gt.csv", ids[:3], [0.5, 1.5, 2.5], header=("question_id", "ground_truth"),
                     delimiter=";", extra={"ghost1": 9.0, "ghost2": 8.0})
    res = convert([tmp_path / "a.pkl.gz"], tmp_path / "s.zarr", scores=tmp_path / "gt.csv", workers=0)
    store = tracestore.open(tmp_path / "s.zarr")
    np.testing.assert_array_equal(store.scores[:3], [0.5, 1.5, 2.5])
    assert np.isnan(store.scores[3:]).all()
    assert res.missing_scores == 2 and res.unused_scores == ["ghost1", "ghost2"]
    assert "2 without a score (NaN), 2 scores without a trace e.g. 'ghost1'" in res.summary()


def test_scores_csv_without_header_and_named_columns(tmp_path):
    ids = write_record_archive(tmp_path / "a.pkl.gz", 3, L, D)
    write_scores_csv(tmp_path / "plain.csv", ids, [1, 2, 3], header=None)
    convert([tmp_path / "a.pkl.gz"], tmp_path / "s.zarr", scores=tmp_path / "plain.csv", workers=0)
    np.testing.assert_array_equal(tracestore.open(tmp_path / "s.zarr").scores, [1, 2, 3])
    (tmp_path / "odd.csv").write_text("x,name,hallucination\n" + "".join(f"7,{i},{k}\n" for k, i in enumerate(ids)))
    convert([tmp_path / "a.pkl.gz"], tmp_path / "t.zarr", scores=tmp_path / "odd.csv", id_column="name",
            score_column="hallucination", workers=0)
    np.testing.assert_array_equal(tracestore.open(tmp_path / "t.zarr").scores, [0, 1, 2])
    with pytest.raises(InputFormatError, match=r"odd\.csv: no column 'nope'"):
        convert([tmp_path / "a.pkl.gz"], tmp_path / "u.zarr", scores=tmp_path / "odd.csv", id_column="nope",
                workers=0)


def test_output_is_the_same_whatever_the_number_of_workers(tmp_path):
    write_archive_set(tmp_path / "in", files=5, traces_per_file=6, num_layers=L, hidden_size=D)
    write_record_archive(tmp_path / "in" / "traces_0002b.pkl.gz", 0, L, D)  # an empty archive in the middle
    csv = tmp_path / "in" / "ground_truth_scores.csv"
    convert([tmp_path / "in"], tmp_path / "w0.zarr", scores=csv, workers=0, shard_bytes=4 * L * D * 2)
    convert([tmp_path / "in"], tmp_path / "w2.zarr", scores=csv, workers=2, shard_bytes=4 * L * D * 2)
    assert tree_bytes(tmp_path / "w0.zarr") == tree_bytes(tmp_path / "w2.zarr")


def test_an_existing_store_is_untouched_without_overwrite(tmp_path):
    write_record_archive(tmp_path / "a.pkl.gz", 3, L, D)
    write_record_archive(tmp_path / "b.pkl.gz", 4, L, D, start=3)
    convert([tmp_path / "a.pkl.gz"], tmp_path / "s.zarr", workers=0)
    before = tree_bytes(tmp_path / "s.zarr")
    with pytest.raises(StoreExistsError, match="--overwrite"):
        convert([tmp_path / "b.pkl.gz"], tmp_path / "s.zarr", workers=0)
    assert tree_bytes(tmp_path / "s.zarr") == before
    convert([tmp_path / "b.pkl.gz"], tmp_path / "s.zarr", workers=0, overwrite=True)
    assert tracestore.open(tmp_path / "s.zarr").ids.tolist() == [f"q{i:06d}" for i in range(3, 7)]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreExistsError, match="not a tracestore store"):
        convert([tmp_path / "a.pkl.gz"], tmp_path / "other", workers=0)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_overflow_clip_and_nan_allowed_are_counted(tmp_path):
    write_hostile_archive(tmp_path / "o.pkl.gz", "overflow", num_layers=L, hidden_size=D)
    res = convert([tmp_path / "o.pkl.gz"], tmp_path / "s.zarr", on_overflow="clip", workers=0)
    rep = res.reports[schema.SEQUENCES]
    assert rep.clipped.tolist() == [0, 0, 1] and rep.max_abs[2] == 1e6
    assert tracestore.open(tmp_path / "s.zarr").sequences[5, 2, 3] == np.float16(65504)
    write_hostile_archive(tmp_path / "n" / "n.pkl.gz", "nan", num_layers=L, hidden_size=D)
    res = convert([tmp_path / "n"], tmp_path / "t.zarr", allow_nan=True, workers=0)
    assert res.reports[schema.SEQUENCES].nan.tolist() == [0, 1, 0]


@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_bad_input_gives_one_clear_line_and_no_store(tmp_path, capsys, kind):
    case = write_hostile_archive(tmp_path / "in" / f"bad_{kind}.pkl.gz", kind, num_layers=L, hidden_size=D)
    write_record_archive(tmp_path / "in" / "a_good.pkl.gz", 3, L, D, start=100)  # converted before the bad one
    rc = main(["convert", str(tmp_path / "in"), "-o", str(tmp_path / "s.zarr"), "--no-progress",
               "--max-archive-bytes", "8M", "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("tracestore convert: error: ") and case.path.name in err[0]
    for word in case.mentions:
        assert word in err[0], (word, err[0])
    with pytest.raises((IncompleteStoreError, StoreNotFoundError)):
        tracestore.open(tmp_path / "s.zarr")
    if case.marker is not None:
        assert not case.marker.exists()


def test_shapes_and_ids_are_checked_across_archives(tmp_path):
    write_record_archive(tmp_path / "a.pkl.gz", 3, L, D)
    write_record_archive(tmp_path / "b.pkl.gz", 3, L, D + 1, start=3)
    with pytest.raises(ShapeMismatchError, match=r"b\.pkl\.gz: trace 'q000003': .*\(3, 17\); expected \(3, 16\).*a\.pkl\.gz"):
        convert([tmp_path], tmp_path / "s.zarr", workers=0)
    os.remove(tmp_path / "b.pkl.gz")
    write_record_archive(tmp_path / "c.pkl.gz", 3, L, D, start=2)
    with pytest.raises(DuplicateIdError, match=r"c\.pkl\.gz: trace 'q000002' is also in a\.pkl\.gz"):
        convert([tmp_path], tmp_path / "t.zarr", workers=0)


def test_a_failed_conversion_leaves_a_resumable_unfinished_store(tmp_path):
    write_record_archive(tmp_path / "a.pkl.gz", 3, L, D)
    write_record_archive(tmp_path / "b.pkl.gz", 3, L, D, start=3)
    recs = make_records(3, L, D, start=6)
    recs[1]["hidden_states"][0, 0] = np.nan
    write_pickle(tmp_path / "c.pkl.gz", recs)
    with pytest.raises(NonFiniteValueError, match=r"c\.pkl\.gz: trace 'q000007', layer 0, hidden 0"):
        convert([tmp_path], tmp_path / "s.zarr", workers=0)
    with pytest.raises(IncompleteStoreError):
        tracestore.open(tmp_path / "s.zarr")
    write_record_archive(tmp_path / "c.pkl.gz", 3, L, D, start=6)  # the user fixes the archive and reruns
    res = convert([tmp_path], tmp_path / "s.zarr", workers=0)
    assert res.resumed_sources == 2 and tracestore.open(tmp_path / "s.zarr").ids.tolist()[-1] == "q000008"
    with pytest.raises(Float16OverflowError):  # other arguments: a different store, not a resume
        write_hostile_archive(tmp_path / "x" / "o.pkl", "overflow", num_layers=L, hidden_size=D)
        convert([tmp_path / "x"], tmp_path / "x.zarr", workers=0)


def _cast_ref(x: np.ndarray) -> tuple[np.ndarray, Float16Report]:
    rep = Float16Report(x.shape[1])
    return cast_float16(x, functools.partial(str), on_overflow="error", allow_nan=False, report=rep), rep


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_fast_cast_matches_cast_float16_bit_for_bit(dtype):
    rng = np.random.default_rng(3)
    x = (rng.standard_t(3, size=(7, 4, 300)) * np.exp(rng.uniform(-25, 10, size=(7, 4, 300)))).astype(np.float32)
    x[0, 0, :6] = [0.0, -0.0, 65504.0, -65504.0, 2.0**-24, 3e-8]  # edges: zeros, the limits, subnormals
    x = x.clip(-65504, 65504).astype(dtype)
    out = np.empty(x.shape, np.float16)
    rep = Float16Report(4)
    assert cast_block_fast(x, out, rep)
    ref, ref_rep = _cast_ref(x)
    assert np.array_equal(out.view(np.uint16), ref.view(np.uint16))
    for field in ("max_abs", "max_abs_error", "max_rel_error"):
        np.testing.assert_allclose(getattr(rep, field), getattr(ref_rep, field), rtol=1e-6, err_msg=field)
    assert rep.values == ref_rep.values


@pytest.mark.parametrize("bad", [np.nan, np.inf, 70000.0])
def test_fast_cast_declines_what_cast_float16_must_judge(bad):
    x = np.ones((2, 3, 4), np.float32)
    x[1, 2, 3] = bad
    out = np.zeros(x.shape, np.float16)
    rep = Float16Report(3)
    assert not cast_block_fast(x, out, rep)
    assert rep.values == 0 and not out.any()


def test_no_traces_at_all_is_an_error(tmp_path):
    write_record_archive(tmp_path / "e.pkl.gz", 0, L, D)
    with pytest.raises(InputFormatError, match="hold no traces"):
        convert([tmp_path], tmp_path / "s.zarr", workers=0)


def test_sources_must_exist(tmp_path):
    with pytest.raises(InputFormatError, match="no such file"):
        convert([tmp_path / "missing.pkl"], tmp_path / "s.zarr", workers=0)
    with pytest.raises(InputFormatError, match="matches no archives"):
        convert([str(tmp_path / "*.pkl.gz")], tmp_path / "s.zarr", workers=0)


def test_progress_off_a_terminal_is_a_line_per_archive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # issue 11 item 22: under pytest stderr is not a terminal; a redrawn bar writes carriage returns there
    for k, name in enumerate(("a", "b")):
        write_record_archive(tmp_path / "in" / f"{name}.pkl.gz", 3, L, D, start=10 * k)
    rc = main(["convert", str(tmp_path / "in"), "-o", str(tmp_path / "s.zarr"), "--workers", "0"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("convert:")]
    assert [line.split(" (")[0] for line in lines[:2]] == ["convert: a.pkl.gz done", "convert: b.pkl.gz done"]
    assert "(2/2 archives, 6 traces)" in lines[1]
    assert len(lines) == 3 and re.match(r"convert: [\d.]+ [k]?B of [\d.]+ [k]?B in ", lines[2]), lines
