"""StoreWriter: validation (every error and its message), float16 report, commit marker, overwrite,
checkpoint/resume, integrity errors (corrupt chunk, truncated shard)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import zarr

import tracestore
from conftest import SHARD_BYTES, D, L, synthetic_batch
from tracestore.errors import (
    ClosedWriterError,
    CorruptStoreError,
    DTypeError,
    DuplicateIdError,
    Float16OverflowError,
    FormatVersionError,
    IncompleteStoreError,
    NonFiniteValueError,
    ShapeMismatchError,
    StoreExistsError,
    StoreNotFoundError,
)
from tracestore.format import schema
from tracestore.testing import synthetic_sequences


def _writer(url: str, **kw: object) -> tracestore.StoreWriter:
    kw.setdefault("shard_bytes", SHARD_BYTES)
    return tracestore.create(url, num_layers=L, hidden_size=D, **kw)  # type: ignore[arg-type]


# -- validation --------------------------------------------------------------------------------------------
def test_shape_mismatch_names_trace_and_expected_shape(store_url: str) -> None:
    w = _writer(store_url)
    with pytest.raises(ShapeMismatchError, match=r"trace 'a': sequence has shape \(4, 8\); expected \(3, 8\)"):
        w.append(["a", "b"], np.zeros((2, 4, D), np.float32), [0.0, 1.0])
    with pytest.raises(ShapeMismatchError, match=r"sequences has shape \(3, 3, 8\) for 2 ids; expected \(2, 3, 8\)"):
        w.append(["a", "b"], np.zeros((3, L, D), np.float32), [0.0, 1.0])
    with pytest.raises(ShapeMismatchError, match=r"scores has 3 values for 2 ids"):
        w.append(["a", "b"], np.zeros((2, L, D), np.float32), [0.0, 1.0, 2.0])
    assert w.num_traces == 0  # nothing was buffered by a failed append


def test_nan_is_refused_unless_allowed(store_url: str, tmp_path: Path) -> None:
    x = np.zeros((2, L, D), np.float32)
    x[1, 2, 5] = np.nan
    w = _writer(store_url)
    with pytest.raises(NonFiniteValueError, match=r"trace 'b', layer 2, hidden 5: value is NaN; .*allow_nan=True"):
        w.append(["a", "b"], x, [0.0, 1.0])
    # float16 input goes through its own check
    with pytest.raises(NonFiniteValueError, match=r"trace 'b', layer 2, hidden 5: value is NaN"):
        w.append(["a", "b"], x.astype(np.float16), [0.0, 1.0])
    w.abort()

    url2 = str(tmp_path / "nan_ok.zarr")
    with _writer(url2, allow_nan=True) as w2:
        w2.append(["a", "b"], x, [0.0, 1.0])
    s = tracestore.open(url2)
    assert np.isnan(s[1].sequence[2, 5])
    assert s.report["sequences"].nan.tolist() == [0, 0, 1]


def test_overflow_raises_float16overflowerror(store_url: str) -> None:
    x = np.zeros((3, L, D), np.float32)
    x[2, 1, 3] = -70000.0
    w = _writer(store_url)
    with pytest.raises(Float16OverflowError, match=r"trace 'c', layer 1, hidden 3: value -70000 is beyond the "
                                                   r"float16 range \(\+-65504\).*on_overflow='clip'"):
        w.append(["a", "b", "c"], x, None)
    x[2, 1, 3] = np.inf
    with pytest.raises(Float16OverflowError, match=r"trace 'c', layer 1, hidden 3: value inf"):
        w.append(["a", "b", "c"], x, None)
    with pytest.raises(Float16OverflowError, match=r"value is inf in float16 input"):
        w.append(["a", "b", "c"], x.astype(np.float16), None)


def test_clip_is_recorded_in_the_report(store_url: str) -> None:
    x = synthetic_sequences(3, L, D)
    x[0, 2, 1] = 1e6
    x[1, 2, 4] = -7e4
    x[2, 0, 0] = 65504.0  # at the limit: not clipped
    with _writer(store_url, on_overflow="clip") as w:
        w.append(["a", "b", "c"], x, None)
    s = tracestore.open(store_url)
    rep = s.report["sequences"]
    assert rep.clipped.tolist() == [0, 0, 2]
    assert rep.overflow.tolist() == [0, 0, 2]
    assert rep.max_abs[2] == pytest.approx(1e6)
    assert s[0].sequence[2, 1] == np.float16(65504) and s[1].sequence[2, 4] == np.float16(-65504)
    assert s.attrs[schema.ATTR_REPORT]["sequences"]["clipped"] == [0, 0, 2]


def test_clipped_infinity_is_counted_and_report_stays_json(store_url: str) -> None:
    x = np.zeros((2, L, D), np.float32)
    x[1, 0, 2] = -np.inf
    x[0, 1, 1] = 7e4
    with _writer(store_url, on_overflow="clip") as w:
        w.append(["a", "b"], x, None)
    rep = json.loads((Path(store_url) / "zarr.json").read_text())["attributes"]["tracestore"]["float16_report"]
    seq = rep["sequences"]
    assert seq["clipped"] == [1, 1, 0] and seq["inf"] == [1, 0, 0]
    assert seq["max_abs"] == [65504.0, 70000.0, 0.0]  # a clipped infinity counts as the clip value
    assert tracestore.open(store_url)[1].sequence[0, 2] == np.float16(-65504)


def test_duplicate_ids_within_and_across_batches(store_url: str) -> None:
    w = _writer(store_url)
    with pytest.raises(DuplicateIdError, match=r"trace id 'x' appears twice in one batch \(positions 0 and 2\)"):
        w.append(["x", "y", "x"], np.zeros((3, L, D), np.float32))
    w.append(["x", "y"], np.zeros((2, L, D), np.float32))
    with pytest.raises(DuplicateIdError, match=r"trace id 'y' was already appended \(trace 1\)"):
        w.append(["z", "y"], np.zeros((2, L, D), np.float32))
    # int ids are ids too: 7 and "7" are the same trace
    w.append([7], np.zeros((1, L, D), np.float32))
    with pytest.raises(DuplicateIdError, match=r"trace id '7'"):
        w.append(["7"], np.zeros((1, L, D), np.float32))
    assert w.num_traces == 3


def test_non_float_dtype(store_url: str) -> None:
    w = _writer(store_url)
    with pytest.raises(DTypeError, match=r"values have dtype int64; expected float16, float32 or float64"):
        w.append(["a"], np.zeros((1, L, D), np.int64))


def test_torch_and_float16_inputs_are_taken(store_url: str) -> None:
    import torch

    x = synthetic_sequences(4, L, D)
    with _writer(store_url) as w:
        w.append(["a", "b"], torch.from_numpy(x[:2]).to(torch.bfloat16), torch.tensor([1.0, 2.0]))
        w.append(["c", "d"], x[2:].astype(np.float16), np.array([3.0, 4.0]))
    s = tracestore.open(store_url)
    np.testing.assert_array_equal(s.sequences[2:], x[2:].astype(np.float16))
    bf = torch.from_numpy(x[:2]).to(torch.bfloat16).float().numpy().astype(np.float16)
    np.testing.assert_array_equal(s.sequences[:2], bf)
    assert s.scores.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_graphs_required_iff_created_with_graphs(store_url: str, tmp_path: Path) -> None:
    w = _writer(store_url)
    b = synthetic_batch(2, graphs=True)
    with pytest.raises(ShapeMismatchError, match=r"created with graphs=False but append\(\) got graphs"):
        w.append(**b)
    w2 = _writer(str(tmp_path / "g.zarr"), graphs=True)
    b["graphs"] = None
    with pytest.raises(ShapeMismatchError, match=r"created with graphs=True but append\(\) got no graphs"):
        w2.append(**b)


def test_bad_create_arguments(store_url: str) -> None:
    with pytest.raises(ValueError, match=r"num_layers must be a positive integer, got 0"):
        tracestore.create(store_url, num_layers=0, hidden_size=D)
    with pytest.raises(ValueError, match=r"on_overflow must be 'error' or 'clip', got 'wrap'"):
        tracestore.create(store_url, num_layers=L, hidden_size=D, on_overflow="wrap")  # type: ignore[arg-type]


# -- commit, visibility, overwrite -------------------------------------------------------------------------
def test_unfinished_store_raises_incomplete_with_resume_hint(store_url: str) -> None:
    w = _writer(store_url)
    w.append(**synthetic_batch(9))  # two whole shards are on disk already
    with pytest.raises(IncompleteStoreError, match=r"unfinished \(no commit marker\).*resume=True"):
        tracestore.open(store_url)
    w.close()
    assert len(tracestore.open(store_url)) == 9


def test_context_manager_commits_only_on_success(store_url: str) -> None:
    with pytest.raises(RuntimeError, match="boom"), _writer(store_url) as w:
        w.append(**synthetic_batch(5))
        raise RuntimeError("boom")
    with pytest.raises(IncompleteStoreError):
        tracestore.open(store_url)
    with pytest.raises(ClosedWriterError, match=r"the writer is closed"):
        w.append(**synthetic_batch(1, 10))


def test_store_exists_and_overwrite(store_url: str, tmp_path: Path) -> None:
    with _writer(store_url) as w:
        w.append(**synthetic_batch(3))
    with pytest.raises(StoreExistsError, match=r"already holds a store \(3 traces\); pass overwrite=True"):
        _writer(store_url)
    with _writer(store_url, overwrite=True) as w:
        w.append(**synthetic_batch(2, 100))
    s = tracestore.open(store_url)
    assert s.ids.tolist() == ["q000100", "q000101"]

    other = tmp_path / "not_a_store"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StoreExistsError, match=r"holds files that are not a tracestore store; tracestore never replaces"):
        _writer(str(other))
    assert (other / "notes.txt").exists()

    plain = str(tmp_path / "plain.zarr")
    zarr.create_group(plain)
    with pytest.raises(StoreExistsError, match=r"holds a zarr store that tracestore did not write"):
        _writer(plain)

    unfinished = str(tmp_path / "unfinished.zarr")
    _writer(unfinished).append(**synthetic_batch(2))
    with pytest.raises(StoreExistsError, match=r"holds an unfinished store .*pass resume=True"):
        _writer(unfinished)


def test_open_missing_and_foreign(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match=r"no store here \(no zarr.json\)"):
        tracestore.open(str(tmp_path / "nothing"))
    plain = str(tmp_path / "plain.zarr")
    zarr.create_group(plain)
    with pytest.raises(FormatVersionError, match=r"not a tracestore store"):
        tracestore.open(plain)


def test_format_version_error(store_url: str) -> None:
    with _writer(store_url) as w:
        w.append(**synthetic_batch(2))
    p = Path(store_url) / "zarr.json"
    meta = json.loads(p.read_text())
    meta["attributes"]["tracestore"]["format_version"] = 99
    p.write_text(json.dumps(meta))
    with pytest.raises(FormatVersionError, match=r"store format version 99; this tracestore reads versions 1, 2"):
        tracestore.open(store_url)


# -- integrity ---------------------------------------------------------------------------------------------
def _flip_byte(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0xFF
    path.write_bytes(bytes(b))


def test_corrupt_chunk_is_detected_by_verify(store_url: str) -> None:
    with _writer(store_url) as w:
        w.append(**synthetic_batch(6))
    shard = Path(store_url) / "sequences" / "c" / "1" / "0" / "0"  # rows 4..5
    row_bytes = L * D * 2 + 4
    _flip_byte(shard, row_bytes + 10)  # inside the second chunk (row 5)
    s = tracestore.open(store_url)
    assert s[5].sequence.shape == (L, D)  # unverified reads serve the bytes as they are
    with pytest.raises(CorruptStoreError, match=r"'sequences' chunk 1 of sequences/c/1/0/0 \(rows from 5\) fails "
                                                r"its crc32c check"):
        s._seq.direct.verify_all()  # type: ignore[union-attr]
    sv = tracestore.open(store_url, verify=True)
    np.testing.assert_array_equal(sv[4].sequence, s[4].sequence)
    with pytest.raises(CorruptStoreError, match=r"fails its crc32c check"):
        sv[5]
    with pytest.raises(CorruptStoreError, match=r"fails its crc32c check"):
        sv.sequences[[0, 5]]


def test_corrupt_and_truncated_shard_index(store_url: str) -> None:
    with _writer(store_url) as w:
        w.append(**synthetic_batch(6))
    shard = Path(store_url) / "sequences" / "c" / "0" / "0" / "0"
    size = shard.stat().st_size
    _flip_byte(shard, size - 10)  # inside the index
    with pytest.raises(CorruptStoreError, match=r"shard index of sequences/c/0/0/0 fails its crc32c check"):
        tracestore.open(store_url)[0]
    with open(shard, "r+b") as f:
        f.truncate(40)
    with pytest.raises(CorruptStoreError, match=r"sequences/c/0/0/0 is 40 bytes, shorter than its 68-byte shard "
                                                r"index; the shard is truncated"):
        tracestore.open(store_url)[0]


def test_truncated_shard_with_intact_tail_is_caught(store_url: str) -> None:
    # a shard cut in the middle and ending with a valid-looking index: chunk offsets run past the end
    with _writer(store_url) as w:
        w.append(**synthetic_batch(4))
    shard = Path(store_url) / "sequences" / "c" / "0" / "0" / "0"
    raw = shard.read_bytes()
    idx = raw[-68:]
    shard.write_bytes(raw[: (L * D * 2 + 4) * 2] + idx)
    s = tracestore.open(store_url)
    # chunk 2 now reads the index bytes (crc fails); chunk 3 lies past the end
    with pytest.raises(CorruptStoreError, match=r"chunk 2 of sequences/c/0/0/0 \(rows from 2\) fails its crc32c"):
        s._seq.direct.verify_all()  # type: ignore[union-attr]
    np.testing.assert_array_equal(s[1].sequence, synthetic_sequences(2, L, D)[1].astype(np.float16))
    with pytest.raises(CorruptStoreError, match=r"chunk 3 runs past the end of the shard; the shard is truncated"):
        s[3]


# -- checkpoint / resume -----------------------------------------------------------------------------------
def _tree(url: str) -> dict[str, bytes]:
    """Every file's bytes, the root's `generation` (a fresh id per store) blanked."""
    root = Path(url)
    return {str(p.relative_to(root)): re.sub(rb'"generation": "[0-9a-f]{32}"', b'"generation": "-"', p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("graphs", [False, True])
def test_resume_after_crash_equals_uninterrupted_write(tmp_path: Path, graphs: bool) -> None:
    batches = [(0, 3), (3, 5), (8, 6), (14, 2), (16, 7)]
    ref = str(tmp_path / "ref.zarr")
    with _writer(ref, graphs=graphs) as w:
        for a, n in batches:
            w.append(**synthetic_batch(n, a, graphs=graphs))

    url = str(tmp_path / "crashed.zarr")
    w = _writer(url, graphs=graphs)
    for a, n in batches[:2]:
        w.append(**synthetic_batch(n, a, graphs=graphs))
    w.checkpoint({"done": ["batch0", "batch1"]})
    w.append(**synthetic_batch(*batches[2][::-1], graphs=graphs))  # flushes shards past the checkpoint
    w.abort()
    # a killed writer leaves zarr's temporary files behind
    (Path(url) / "sequences" / "c" / "junk.partial").write_bytes(b"x")
    with pytest.raises(IncompleteStoreError):
        tracestore.open(url)

    w = _writer(url, graphs=graphs, resume=True)
    assert w.resume_state == {"done": ["batch0", "batch1"]}
    assert w.num_traces == 8
    for a, n in batches[2:]:
        w.append(**synthetic_batch(n, a, graphs=graphs))
    w.close()

    got, want = _tree(url), _tree(ref)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == want[k], k
    s = tracestore.open(url)
    assert len(s) == 23 and s.ids[-1] == "q000022"


def test_resume_twice_and_resume_with_other_settings(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    w = _writer(url)
    w.append(**synthetic_batch(5))
    w.checkpoint({"n": 1})
    w.abort()
    w = _writer(url, resume=True)
    w.append(**synthetic_batch(5, 5))
    w.checkpoint({"n": 2})
    w.abort()
    with pytest.raises(IncompleteStoreError, match=r"written with other settings.*overwrite=True"):
        tracestore.create(url, num_layers=L, hidden_size=D + 1, shard_bytes=SHARD_BYTES, resume=True)
    w = _writer(url, resume=True)
    assert w.resume_state == {"n": 2} and w.num_traces == 10
    with pytest.raises(DuplicateIdError):
        w.append(**synthetic_batch(1, 9))  # ids survive the checkpoint
    w.close()
    s = tracestore.open(url)
    np.testing.assert_array_equal(s.sequences[:], synthetic_sequences(10, L, D).astype(np.float16))
    assert not (Path(url) / "_tracestore").exists()


def test_resume_without_checkpoint_starts_empty(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    w = _writer(url)
    w.append(**synthetic_batch(9))  # two shards flushed but never checkpointed
    w.abort()
    w = _writer(url, resume=True)
    assert w.num_traces == 0 and w.resume_state == {}
    w.append(**synthetic_batch(2, 50))
    w.close()
    s = tracestore.open(url)
    assert s.ids.tolist() == ["q000050", "q000051"]
    # shard files flushed after the last checkpoint are deleted (zarr leaves their empty directories)
    files = [p.relative_to(Path(url)).as_posix() for p in (Path(url) / "sequences").rglob("*") if p.is_file()]
    assert sorted(files) == ["sequences/c/0/0/0", "sequences/zarr.json"]


def test_empty_store(store_url: str) -> None:
    _writer(store_url).close()
    s = tracestore.open(store_url)
    assert len(s) == 0 and s.sequences[:].shape == (0, L, D) and s.layer(1).shape == (0, D)
    assert s.info()["num_traces"] == 0


def test_float64_tokens_pool_to_the_nearest_float16_beside_float32_ones(tmp_path: Path) -> None:
    # issue 11 item 17: traces of mixed dtypes in one append used to go through float32 (rounded twice)
    x = np.float64(1.0) + np.float64(2**-11) + np.float64(2**-40)  # just above a float16 halfway point
    assert np.float16(np.float32(x)) != np.float16(x)
    url = tmp_path / "s.zarr"
    with tracestore.create(url, num_layers=1, hidden_size=2, pool="last", tokens=("hidden",)) as w:
        w.append(ids=["a", "b"], tokens=[tracestore.TraceTokens(hidden=np.full((3, 1, 2), x, np.float64)),
                                         tracestore.TraceTokens(hidden=np.ones((2, 1, 2), np.float32))])
    s = tracestore.open(url)
    assert s.sequences[0][0, 0] == np.float16(x)
    assert s[0].tokens.hidden[0, 0, 0] == np.float16(x)
