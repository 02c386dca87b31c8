"""Issue 11, items 15-18 and 20: hostile allocations in pickles, BUILD on a class, float64 rounded once to
float16, the scores CSV's empty cells and undecodable ids, and the edge_attr report under clipping."""

from __future__ import annotations

import numpy as np
import pytest

import tracestore
from tracestore.cli import main
from tracestore.convert import convert
from tracestore.convert.scores import read_scores
from tracestore.convert.verify import as_stored
from tracestore.errors import InputFormatError
from tracestore.format.cast import cast_edge_attr, cast_float16
from tracestore.format.report import Float16Report
from tracestore.testing.archives import make_records, write_pickle

L, D = 3, 8

#: just above the float16 halfway point between 1 and 1 + 2**-10: the nearest float16 is 1 + 2**-10, but
#: through float32 it first rounds to the halfway point itself, which rounds (to even) down to 1
ABOVE_HALFWAY = 1.0 + 2.0**-11 + 2.0**-40


def _describe(pos: tuple[int, ...]) -> str:
    return f"test {pos}"


# -- item 17: float64 is rounded to float16 once ------------------------------------------------------------
def test_the_value_rounds_differently_through_float32() -> None:
    assert np.float16(np.float32(ABOVE_HALFWAY)) == np.float16(1.0)
    assert np.float64(ABOVE_HALFWAY).astype(np.float16) == np.float16(1.0 + 2.0**-10)


def test_float64_blocks_are_rounded_to_the_nearest_float16() -> None:
    x = np.full((2, L, D), 0.5, np.float64)
    x[1, 2, 3] = ABOVE_HALFWAY
    rep = Float16Report(L)
    x16 = cast_float16(x, _describe, on_overflow="error", allow_nan=False, report=rep)
    assert x16[1, 2, 3] == np.float16(1.0 + 2.0**-10)
    # the report is measured against the float64 value: the error is 2**-11 - 2**-40, not 2**-11
    assert rep.max_abs_error[2] == pytest.approx(2.0**-11 - 2.0**-40, rel=0, abs=2.0**-50)
    assert rep.max_abs_error[2] < 2.0**-11
    assert as_stored(x)[1, 2, 3] == np.float16(1.0 + 2.0**-10)
    # clipping keeps float64 precision too
    x[0, 0, 0] = 1e300
    x16 = cast_float16(x, _describe, on_overflow="clip", allow_nan=False, report=Float16Report(L))
    assert x16[1, 2, 3] == np.float16(1.0 + 2.0**-10) and x16[0, 0, 0] == np.float16(65504)


def test_float64_edge_attr_is_rounded_to_the_nearest_float16() -> None:
    ea = np.full((4, 1), 0.25, np.float64)
    ea[2, 0] = ABOVE_HALFWAY
    rep = Float16Report(L)
    ea16 = cast_edge_attr(ea, _describe, layer=1, on_overflow="error", allow_nan=False, report=rep)
    assert ea16[2, 0] == np.float16(1.0 + 2.0**-10)
    assert rep.max_abs_error[1] < 2.0**-11


def test_a_float64_archive_converts_and_verifies_with_single_rounding(tmp_path) -> None:
    recs = make_records(3, L, D)
    for r in recs:
        r["hidden_states"] = r["hidden_states"].astype(np.float64)
    recs[1]["hidden_states"][2, 5] = ABOVE_HALFWAY
    write_pickle(tmp_path / "in" / "f64.pkl.gz", recs)
    convert([tmp_path / "in"], tmp_path / "s.zarr", workers=0)
    store = tracestore.open(tmp_path / "s.zarr")
    assert store.sequences[1, 2, 5] == np.float16(1.0 + 2.0**-10)
    np.testing.assert_array_equal(np.asarray(store.sequences[:]).view(np.uint16),
                                  np.stack([r["hidden_states"] for r in recs]).astype(np.float16).view(np.uint16))


# -- item 20: the edge_attr report under clipping agrees with sequences' and docs/format.md ------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_edge_attr_report_under_clipping_matches_the_sequences_report(dtype) -> None:
    vals = np.array([1.0, 70000.0, np.inf, -2.0, -1e5], dtype)
    ea_rep, seq_rep = Float16Report(L), Float16Report(L)
    ea16 = cast_edge_attr(vals.reshape(-1, 1), _describe, layer=1, on_overflow="clip", allow_nan=False,
                          report=ea_rep)
    block = np.zeros((1, L, vals.size), dtype)
    block[0, 1] = vals
    seq16 = cast_float16(block, _describe, on_overflow="clip", allow_nan=False, report=seq_rep)
    np.testing.assert_array_equal(ea16[:, 0], seq16[0, 1])
    # docs/format.md: max_abs is the largest finite |x| given, before clipping; inf counts infinities clipped
    assert ea_rep.max_abs[1] == 1e5 and ea_rep.inf[1] == 1
    assert ea_rep.clipped[1] == 3 and ea_rep.overflow[1] == 3
    for f in ("max_abs", "max_abs_error", "max_rel_error", "clipped", "overflow", "inf", "nan"):
        assert getattr(ea_rep, f)[1] == getattr(seq_rep, f)[1], f


def test_edge_attr_clipped_infinity_alone_counts_as_65504() -> None:
    rep = Float16Report(L)
    cast_edge_attr(np.array([[np.inf], [1.0]], np.float32), _describe, layer=0, on_overflow="clip",
                   allow_nan=False, report=rep)
    assert rep.max_abs[0] == 65504.0 and rep.inf[0] == 1 and rep.clipped[0] == 1


# -- item 18: the scores CSV ----------------------------------------------------------------------------------
def test_an_empty_score_cell_keeps_the_archive_score(tmp_path) -> None:
    recs = make_records(4, L, D)  # each record carries its own score
    write_pickle(tmp_path / "a.pkl.gz", recs)
    (tmp_path / "gt.csv").write_text(f"id,score\n{recs[0]['id']},\n{recs[1]['id']},0.5\n{recs[2]['id']},nan\n")
    table = read_scores(tmp_path / "gt.csv")
    assert table.scores == {recs[1]["id"]: 0.5}
    res = convert([tmp_path / "a.pkl.gz"], tmp_path / "s.zarr", scores=tmp_path / "gt.csv", workers=0)
    got = tracestore.open(tmp_path / "s.zarr").scores[:]
    want = np.array([recs[0]["score"], 0.5, recs[2]["score"], recs[3]["score"]], np.float32)
    np.testing.assert_array_equal(got, want)
    assert res.missing_scores == 0 and res.unused_scores == []


def test_an_empty_cell_beside_a_score_for_the_same_id_is_not_a_conflict(tmp_path) -> None:
    (tmp_path / "gt.csv").write_text("id,score\nq1,\nq1,0.25\nq2,0.5\n")
    assert read_scores(tmp_path / "gt.csv").scores == {"q1": 0.25, "q2": 0.5}


def test_undecodable_ids_are_a_clear_error(tmp_path, capsys) -> None:
    # latin-1 'qé' and 'qè' would both decode to 'q\ufffd' with replacement: two ids made one
    (tmp_path / "gt.csv").write_bytes(b"id,score\nq1,0.5\nq\xe9,1.0\nq\xe8,2.0\n")
    with pytest.raises(InputFormatError, match=r"gt\.csv: line 3 holds bytes that are not UTF-8 .*save the file as UTF-8"):
        read_scores(tmp_path / "gt.csv")
    write_pickle(tmp_path / "in" / "a.pkl.gz", make_records(2, L, D))
    rc = main(["convert", str(tmp_path / "in"), "-o", str(tmp_path / "s.zarr"), "--scores", str(tmp_path / "gt.csv"),
               "--no-progress", "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "gt.csv: line 3" in err[0] and "UTF-8" in err[0]
