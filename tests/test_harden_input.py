"""Issue 11, items 15-18 and 20: hostile allocations in pickles, BUILD on a class, float64 rounded once to
float16, the scores CSV's empty cells and undecodable ids, and the edge_attr report under clipping."""

from __future__ import annotations

import collections
import io
import pickle
import pickletools

import numpy as np
import psutil
import pytest
import torch

import tracestore
from tracestore.cli import main
from tracestore.convert import convert
from tracestore.convert.pickle_stream import load_pickle
from tracestore.convert.safe_unpickle import SafeUnpickler, load_torch
from tracestore.convert.scores import read_scores
from tracestore.convert.verify import as_stored
from tracestore.errors import InputFormatError, InputTooLargeError, UnsafeInputError
from tracestore.format.cast import cast_edge_attr, cast_float16
from tracestore.format.report import Float16Report
from tracestore.testing.archives import (
    CLASS_BUILD_OPCODES,
    HOSTILE_KINDS,
    Reduce,
    make_records,
    write_hostile_archive,
    write_pickle,
    write_record_archive,
)

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


# -- items 15 and 16: allowed constructors asked to build big, uninitialised or patched things ---------------
NEW_KINDS = ("uninitialised_array", "ndarray_call", "short_object_array", "bytearray_bomb", "expanded_tensor",
             "expanded_tensor_pt", "shared_rows", "class_build")


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_hostile_constructors_give_one_clear_line_through_the_cli(tmp_path, capsys, kind) -> None:
    case = write_hostile_archive(tmp_path / "in" / f"bad_{kind}.pkl.gz", kind, num_layers=L, hidden_size=D)
    assert case.kind in HOSTILE_KINDS
    write_record_archive(tmp_path / "in" / "a_good.pkl.gz", 3, L, D, start=100)
    rss0 = psutil.Process().memory_info().rss
    rc = main(["convert", str(tmp_path / "in"), "-o", str(tmp_path / "s.zarr"), "--no-progress",
               "--max-archive-bytes", "8M", "--workers", "0"])
    assert psutil.Process().memory_info().rss - rss0 < 100 << 20  # refused in bounded memory
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("tracestore convert: error: ") and case.path.name in err[0]
    for word in case.mentions:
        assert word in err[0], (word, err[0])
    with pytest.raises((tracestore.IncompleteStoreError, tracestore.StoreNotFoundError)):
        tracestore.open(tmp_path / "s.zarr")
    from torch_geometric.data.data import DataEdgeAttr

    assert not hasattr(DataEdgeAttr, "tracestore_pwn")


@pytest.fixture(params=["whole", "streaming"])
def loads(request, tmp_path):
    """Both unpicklers: SafeUnpickler (whole objects) and the streaming one that archives are read with."""
    def load(data: bytes):
        if request.param == "whole":
            return SafeUnpickler(io.BytesIO(data), name="t.pkl", max_bytes=CAP).load()
        (tmp_path / "t.pkl").write_bytes(data)
        return load_pickle(tmp_path / "t.pkl", max_bytes=CAP)[0]
    return load


CAP = 64 << 20


def test_reconstruct_with_a_shape_and_no_data_is_refused(loads) -> None:
    from numpy._core.multiarray import _reconstruct

    data = pickle.dumps([{"id": "a", "x": Reduce(_reconstruct, (np.ndarray, (1000,), b"b"))}], protocol=4)
    with pytest.raises(UnsafeInputError, match=r"t\.pkl: .*_reconstruct .*shape \(1000,\).*uninitialised"):
        loads(data)
    with pytest.raises(UnsafeInputError, match=r"numpy\.ndarray\(\(1000,\),\) directly"):
        loads(pickle.dumps({"x": Reduce(np.ndarray, ((1000,),))}, protocol=2))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_honest_objects_still_load(loads, protocol) -> None:
    obj = {"o": np.array(["a", "bb", None], object), "b": bytearray(b"ab\x00"), "s": {1, 2}, "f": frozenset("x"),
           "e": np.zeros((0, 3), np.float32), "f64": np.arange(6.0).reshape(2, 3), "t": torch.arange(4.0),
           "small_expand": torch.zeros(1, 4).expand(3, 4), "shared": [[1.0, 2.0]] * 4}
    got = loads(pickle.dumps([obj], protocol=protocol))[0]
    assert got["o"].tolist() == ["a", "bb", None] and got["b"] == bytearray(b"ab\x00") and got["s"] == {1, 2}
    assert got["f"] == frozenset("x") and got["e"].shape == (0, 3) and got["f64"].tolist() == obj["f64"].tolist()
    assert torch.equal(got["t"], obj["t"]) and torch.equal(got["small_expand"], obj["small_expand"])
    assert got["shared"] == obj["shared"]


def test_an_object_array_with_too_few_values_is_refused(loads) -> None:
    from numpy._core.multiarray import _reconstruct

    x = Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (10**9,), np.dtype(object), False, ["a"]))
    with pytest.raises(UnsafeInputError, match=r"object array of shape \(1000000000,\).*a list of 1 values"):
        loads(pickle.dumps([{"x": x}], protocol=4))
    y = Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (10**6,), np.dtype(np.float64), False, b"x" * 8))
    with pytest.raises(InputFormatError, match=r"declares 8,000,000 bytes of values but carries 8 bytes"):
        loads(pickle.dumps([{"x": y}], protocol=4))


def test_bytearray_of_a_size_is_refused_before_allocating(loads) -> None:
    rss0 = psutil.Process().memory_info().rss
    for proto in (2, 4):
        with pytest.raises(UnsafeInputError, match=r"bytearray\(1099511627776,\).*not in the file"):
            loads(pickle.dumps([{"x": Reduce(bytearray, (2**40,))}], protocol=proto))
    assert psutil.Process().memory_info().rss - rss0 < 50 << 20


def test_lists_of_shared_references_count_against_the_cap(loads) -> None:
    row = [0.5] * 256
    ok = [{"id": "a", "x": [row] * 16}]  # 32 KiB as an array: fine
    assert loads(pickle.dumps(ok, protocol=4))[0]["x"] == ok[0]["x"]
    bad = [{"id": "a", "x": [[row] * 256] * 256}]  # 128 MiB from a few KB
    with pytest.raises(InputTooLargeError, match=r"t\.pkl: (record 0, trace 'a': )?its lists and dicts refer to the same "
                                                 r"objects .*np\.asarray would materialise 134,217,7\d\d bytes"):
        loads(pickle.dumps(bad, protocol=4))
    a = [1.0]
    a.append(a)
    with pytest.raises(InputFormatError, match="contains itself"):
        loads(pickle.dumps([{"id": "a", "x": a}], protocol=4))


def test_expanded_and_out_of_range_tensors_are_refused(loads) -> None:
    big = torch.zeros(1, 100).expand(20_000, 100)
    with pytest.raises(InputFormatError, match=r"size \(20000, 100\) with stride \(0, 1\): 8,000,000 bytes of values "
                                               r"over 400 bytes.*\.contiguous\(\)"):
        loads(pickle.dumps([{"id": "a", "hidden_states": big}], protocol=4))
    from torch._utils import _rebuild_tensor_v2

    storage = torch.zeros(10).untyped_storage()
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
    far = Reduce(_rebuild_tensor_v2, (typed, 0, (100,), (1,), False, collections.OrderedDict()))
    with pytest.raises(InputFormatError, match=r"reaches element 99 of a storage of 10"):
        loads(pickle.dumps([{"x": far}], protocol=4))


def test_pt_files_with_expanded_tensors_or_bytearray_calls_are_refused(tmp_path) -> None:
    torch.save({"sequences": torch.zeros(1, 3, 8).expand(20_000, 3, 8)}, tmp_path / "e.pt")
    with pytest.raises(InputFormatError, match=r"e\.pt: a torch tensor declares size \(20000, 3, 8\) with stride \(0, 8, 1\)"):
        load_torch(tmp_path / "e.pt", max_bytes=CAP)
    torch.save({"sequences": torch.zeros(2, 3, 8), "x": Reduce(bytearray, (2**40,))}, tmp_path / "b.pt")
    with pytest.raises(UnsafeInputError, match=r"b\.pt: the file's pickle calls builtins\.bytearray"):
        load_torch(tmp_path / "b.pt", max_bytes=CAP)
    torch.save({"sequences": torch.zeros(1, 3, 8).expand(2, 3, 8)}, tmp_path / "ok.pt")  # tiny: fine
    assert load_torch(tmp_path / "ok.pt", max_bytes=CAP)[0]["sequences"].shape == (2, 3, 8)


def test_build_on_a_class_or_function_is_refused(loads) -> None:
    from torch_geometric.data.data import DataEdgeAttr

    data = pickle.dumps([{"id": "a", "x": "__TRACESTORE_HOSTILE_PLACEHOLDER__"}], protocol=2)
    marker = b"X\x22\x00\x00\x00__TRACESTORE_HOSTILE_PLACEHOLDER__"
    with pytest.raises(UnsafeInputError, match=r"t\.pkl: .*DataEdgeAttr itself \(BUILD on a class"):
        loads(data.replace(marker, CLASS_BUILD_OPCODES))
    assert not hasattr(DataEdgeAttr, "tracestore_pwn")
    fn = b"ctorch._utils\n_rebuild_tensor_v2\nN}X\x0e\x00\x00\x00__kwdefaults__}s\x86b"
    with pytest.raises(UnsafeInputError, match=r"BUILD on a function"):
        loads(data.replace(marker, fn))
    # a tensor's BUILD is torch's legacy set_: it could point the tensor anywhere in a storage
    t = b"ctorch._utils\n_rebuild_tensor_v2\n"
    legacy = pickle.dumps(torch.zeros(2), protocol=2)
    assert legacy.startswith(b"\x80\x02" + t)
    assert "BUILD" not in {op.name for op, _, _ in pickletools.genops(legacy)}  # torch's own: no BUILD
    with pytest.raises(UnsafeInputError, match=r"sets the state of a Tensor"):
        loads(legacy[:-1] + b"(K\x00K\x00tb.")


def test_shared_references_count_per_record_and_distinct_arrays_are_not_counted_twice(tmp_path) -> None:
    from tracestore.convert.pickle_stream import PickleArchive

    # each record: 4 distinct arrays of 1 MB in a list (np.stack copies them once: nothing beyond the stream)
    recs = [{"id": f"r{i}", "hidden_states": [np.full(250_000, i + k, np.float32) for k in range(4)]}
            for i in range(6)]
    with PickleArchive(write_pickle(tmp_path / "a.pkl", recs, compresslevel=None), max_bytes=5 << 20) as arch:
        assert [r["id"] for r in arch.content] == [f"r{i}" for i in range(6)]
    # each record repeats one 256 KiB array 8 times: 2 MiB beyond its bytes, under the cap per record of 3 MiB,
    # though the archive repeats 12 MiB in all; a record repeating it 16 times is refused, naming it
    ok = [{"id": f"s{i}", "hidden_states": [np.zeros(65_536, np.float32)] * 8} for i in range(6)]
    bad = [*ok[:2], {"id": "big", "hidden_states": [np.zeros(65_536, np.float32)] * 16}]
    with PickleArchive(write_pickle(tmp_path / "b.pkl", ok, compresslevel=None), max_bytes=3 << 20) as arch:
        assert len([r for r in arch.content if len(r["hidden_states"]) == 8]) == 6
    with PickleArchive(write_pickle(tmp_path / "c.pkl", bad, compresslevel=None), max_bytes=3 << 20) as arch, \
            pytest.raises(InputTooLargeError, match=r"c\.pkl: record 2, trace 'big': its lists and dicts refer to the "
                                                    r"same objects .*passes the cap per record of 3,145,728 bytes"):
        list(arch.content)
