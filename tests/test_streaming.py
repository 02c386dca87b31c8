"""Archives read one record at a time: the streaming unpickler (records handed over as each completes, their
memo entries released), the cap per record, hostile archives through the streaming path, and the converter's
peak memory on an archive many times larger than the bound it must keep."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

import tracestore
from tracestore.cli import main
from tracestore.convert.pickle_stream import PickleArchive, RecordStream
from tracestore.errors import InputFormatError, InputTooLargeError, UnsafeInputError
from tracestore.testing.archives import NotAllowed, write_pickle, write_record_archive
from tracestore.testing.seed import write_seed_raw_archive

CAP = 1 << 30


def _records(n: int, size: int = 1000) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "x": np.full(size, i, np.float32), "tags": [f"t{i}", "common"], "k": i} for i in range(n)]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("compresslevel", [None, 1])
def test_records_are_handed_over_one_at_a_time(tmp_path: Path, protocol: int, compresslevel: int | None) -> None:
    recs = _records(2300)  # three APPENDS batches of at most 1000
    p = write_pickle(tmp_path / "a.pkl", recs, compresslevel=compresslevel, protocol=protocol)
    with PickleArchive(p, max_bytes=CAP) as arch:
        assert isinstance(arch.content, RecordStream)
        seen, positions = [], []
        for rec in arch.content:
            seen.append(rec["id"])
            np.testing.assert_array_equal(rec["x"], recs[len(seen) - 1]["x"])
            assert rec["tags"] == recs[len(seen) - 1]["tags"] and rec["k"] == len(seen) - 1
            positions.append(arch._capped.pos)
        info = arch.finish()
    assert seen == [r["id"] for r in recs]
    # each record arrived when the stream had reached it, not after the whole archive was read
    assert positions[0] < info["decompressed_bytes"] / 100 and positions == sorted(positions)
    # the records' arrays and lists are released from the memo; only small shared things stay
    memo = arch._unpickler.memo
    assert sum(1 for v in memo.values() if isinstance(v, np.ndarray | list | dict)) <= 2


def test_other_layouts_load_whole(tmp_path: Path) -> None:
    batch = {"ids": ["a", "b"], "hidden_states": np.ones((2, 3, 4), np.float32)}
    with PickleArchive(write_pickle(tmp_path / "b.pkl.gz", batch), max_bytes=CAP) as arch:
        assert isinstance(arch.content, dict) and arch.content["ids"] == ["a", "b"]
        arch.finish()
    with PickleArchive(write_pickle(tmp_path / "t.pkl", (["x", "y"], 3)), max_bytes=CAP) as arch:
        assert arch.content == (["x", "y"], 3)  # a list first, but not the top-level object
    with PickleArchive(write_pickle(tmp_path / "e.pkl", []), max_bytes=CAP) as arch:
        assert list(arch.content) == []


def test_the_cap_holds_per_record_not_per_archive(tmp_path: Path) -> None:
    recs = _records(12, size=250_000)  # 1 MB of values each, 12 MB in all
    p = write_pickle(tmp_path / "a.pkl.gz", recs)
    with PickleArchive(p, max_bytes=3 << 20) as arch:
        assert len(list(arch.content)) == 12
        assert arch.finish()["decompressed_bytes"] > 12e6
    big = write_pickle(tmp_path / "big.pkl.gz", [*recs[:2], {"id": "huge", "x": np.zeros(1_000_000, np.float32)}])
    with PickleArchive(big, max_bytes=3 << 20) as arch, pytest.raises(InputTooLargeError, match=r"one record decompresses to more than 3,145,728 bytes"):
        list(arch.content)


def test_a_bomb_inside_a_list_is_stopped_before_it_is_allocated(tmp_path: Path) -> None:
    # a list of records whose third claims 4 GB of bytes in its 4-byte length field, followed by a few bytes
    n = 200_000  # past the 64 KiB frame: written on its own, as large arrays are
    data = pickle.dumps([{"id": "a"}, {"id": "b"}, {"id": "c", "x": b"A" * n}], protocol=4)
    at = data.index(b"B" + struct.pack("<I", n))
    body = data[:at] + b"B" + struct.pack("<I", 2**32 - 1) + b"A" * 64
    p = tmp_path / "bomb.pkl.gz"
    with open(p, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(body)
    rss0 = psutil.Process().memory_info().rss
    with PickleArchive(p, max_bytes=1 << 30) as arch, pytest.raises(InputTooLargeError, match="bomb"):
        list(arch.content)
    assert psutil.Process().memory_info().rss - rss0 < 200 << 20


def test_records_that_share_an_array_are_a_clear_error(tmp_path: Path) -> None:
    shared = np.ones(100)
    p = write_pickle(tmp_path / "s.pkl", [{"id": "a", "x": shared}, {"id": "b", "x": shared}])
    with PickleArchive(p, max_bytes=CAP) as arch, pytest.raises(InputFormatError, match=r"record 1 refers back to an object of an earlier record"):
        list(arch.content)


def test_hostile_records_through_the_streaming_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _records(3)
    bad = write_pickle(tmp_path / "in" / "x.pkl.gz", [*good, {"id": "z", "meta": NotAllowed()}])
    with PickleArchive(bad, max_bytes=CAP) as arch:
        it = iter(arch.content)
        assert [next(it)["id"] for _ in range(3)] == ["r0", "r1", "r2"]  # the good ones come first
        with pytest.raises(UnsafeInputError, match="NotAllowed"):
            next(it)
    # truncated in the middle of the records: some records were read, the conversion still fails cleanly
    write_seed_raw_archive(tmp_path / "t.pkl.gz", 30, 3, 64, num_heads=2, tokens=12)
    data = (tmp_path / "t.pkl.gz").read_bytes()
    (tmp_path / "in" / "x.pkl.gz").unlink()
    (tmp_path / "in" / "t.pkl.gz").write_bytes(data[: len(data) * 2 // 3])
    rc = main(["convert", str(tmp_path / "in"), "-o", str(tmp_path / "s.zarr"), "--no-progress", "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "t.pkl.gz" in err[0] and "truncated" in err[0]
    with pytest.raises((tracestore.IncompleteStoreError, tracestore.StoreNotFoundError)):
        tracestore.open(tmp_path / "s.zarr")


def _peak_rss_tree(cmd: list[str]) -> int:
    """Run cmd; the peak of the RSS summed over its process tree, sampled every 10 ms."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with proc:
        return _watch(proc)


def _watch(proc: subprocess.Popen[str]) -> int:
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = 0
            for p in [ps, *ps.children(recursive=True)]:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.01)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    return peak


def _seed_like_archive(path: Path, n: int, L: int, D: int, H: int, T: int) -> Path:
    """n records in the seed's raw layout with cheap values (random states, uniform causal attention): the
    memory test needs the shapes and sizes, not realistic values. A plain pickle: quick to write."""
    rng = np.random.default_rng(0)
    att = np.tril(np.ones((T, T), np.float32))
    att = (att / att.sum(axis=1, keepdims=True)).astype(np.float16)
    recs = [{"hidden_states": [rng.random((T, D), np.float32).astype(np.float16) for _ in range(L)],
             "attentions": [np.broadcast_to(att, (H, T, T)).copy() for _ in range(L)],
             "tokens": np.arange(T, dtype=np.int64), "tokens_decoded": [f"t{t}" for t in range(T)],
             "generated_answer_clean": f"answer {k}", "question_id": f"qb_{k}"} for k in range(n)]
    return write_pickle(path, recs, compresslevel=None)


def test_peak_memory_is_bounded_on_an_archive_many_times_larger(tmp_path: Path) -> None:
    """An archive of ~690 MB in the seed's raw layout converts with the converter's process tree (main and one
    worker) growing by less than 150 MB over a conversion of 10 traces of the same shape: memory holds a
    record, a few blocks and the writer's shards (8 MiB here), not the archive."""
    L, D, H, T = 8, 512, 8, 48  # 0.39 MB of states + 0.29 MB of attentions per trace
    big = _seed_like_archive(tmp_path / "big" / "batch_0000.pkl", 1000, L, D, H, T)
    _seed_like_archive(tmp_path / "small" / "batch_0000.pkl", 10, L, D, H, T)
    bound = 150 << 20
    assert big.stat().st_size > 4 * bound

    def convert(name: str) -> int:
        return _peak_rss_tree([sys.executable, "-m", "tracestore.cli", "convert", str(tmp_path / name), "-o",
                               str(tmp_path / f"{name}.zarr"), "--workers", "1", "--shard-bytes", "8M",
                               "--no-progress", "-q"])

    small, peak = convert("small"), convert("big")
    assert peak - small < bound, (f"peak RSS {peak / 2**20:.0f} MiB on a {big.stat().st_size / 2**20:.0f} MiB "
                                  f"archive; {small / 2**20:.0f} MiB on 10 traces")
    store = tracestore.open(tmp_path / "big.zarr")
    assert len(store) == 1000 and store.has_graphs and store[999].fields["generated_answer_clean"] == "answer 999"


def test_many_small_records_cannot_fill_memory_through_the_memo(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from tracestore.convert import pickle_stream

    monkeypatch.setattr(pickle_stream, "KEPT_MEMO_BYTES", 1 << 20)
    recs = [{"id": f"r{i}", "tokens_decoded": [f"tok{i}_{k}" for k in range(100)]} for i in range(400)]
    with PickleArchive(write_pickle(tmp_path / "s.pkl.gz", recs), max_bytes=1 << 20) as arch, \
            pytest.raises(InputTooLargeError, match="records share more than 1 MiB of memoised strings"):
        list(arch.content)


def test_the_memo_counts_its_entries_and_follows_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """10,000 distinct short strings: ~0.55 MB of str objects, ~1.5 MB with what each memo entry costs beside
    its object. A real archive past the limit is not called a bomb, and a larger cap lets it through."""
    from tracestore.convert import pickle_stream

    monkeypatch.setattr(pickle_stream, "KEPT_MEMO_BYTES", 1 << 20)
    recs = [{"id": f"r{i}", "tokens_decoded": [f"t{i}_{k}" for k in range(100)]} for i in range(100)]
    p = write_pickle(tmp_path / "s.pkl", recs, compresslevel=None)
    with pytest.raises(InputTooLargeError) as e, PickleArchive(p, max_bytes=1 << 20) as arch:
        list(arch.content)
    msg = str(e.value)
    assert msg.startswith("s.pkl: past record ") and "the archive's records share more than 1 MiB of memoised" in msg
    assert "--max-archive-bytes" in msg and "bomb" not in msg and "do not use it" not in msg
    with PickleArchive(p, max_bytes=8 << 20) as arch:  # a quarter of the cap: 2 MiB
        assert len(list(arch.content)) == 100
        assert 10_000 * 100 < arch._unpickler._kept_bytes < 2 << 20


# -- issue 11 (review 3) -------------------------------------------------------------------------------------
def test_records_with_pyg_graphs_are_let_go_of(tmp_path: Path) -> None:
    """PyG's Data defines __call__: it is callable, but an instance, not a class or function of the allow-list:
    it goes with its record, like the record's arrays."""
    import gc
    import weakref

    pytest.importorskip("torch_geometric")
    p = tmp_path / "g.pkl"
    write_record_archive(p, 20, 2, 8, graphs=True, compresslevel=None)
    with PickleArchive(p, max_bytes=CAP) as arch:
        refs = []
        for rec in arch.content:
            refs.extend(weakref.ref(g) for g in rec["graphs"])
            del rec
        arch.finish()
        gc.collect()
        assert [type(v).__name__ for v in arch._unpickler.memo.values() if type(v).__name__ == "Data"] == []
        assert sum(r() is not None for r in refs) == 0


@pytest.mark.parametrize("compresslevel", [None, 1])
def test_a_line_that_never_ends_is_stopped_at_once(tmp_path: Path, compresslevel: int | None) -> None:
    """A GLOBAL opcode's text argument followed by 48 MiB with no newline: refused once the line passes
    MAX_LINE_BYTES, having read little more than that, not after gathering (and re-joining) all of it."""
    import tracemalloc

    from tracestore.convert.pickle_stream import MAX_LINE_BYTES

    body = b"\x80\x02]q\x00(}q\x01c" + b"A" * (48 << 20)
    p = tmp_path / ("line.pkl.gz" if compresslevel else "line.pkl")
    p.write_bytes(gzip.compress(body, compresslevel=compresslevel, mtime=0) if compresslevel else body)
    del body
    tracemalloc.start()
    try:
        with pytest.raises(InputFormatError, match=rf"line.pkl(.gz)?: a line of the pickle at offset 10 runs past "
                                                   rf"{MAX_LINE_BYTES:,} bytes without ending"), \
                PickleArchive(p, max_bytes=CAP) as arch:
            list(arch.content)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 24 << 20


@pytest.mark.parametrize("compressed", [False, True])
def test_source_readline_across_chunks(monkeypatch: pytest.MonkeyPatch, compressed: bool) -> None:
    from tracestore.convert.pickle_stream import _Source

    monkeypatch.setattr(_Source, "_IN", 7)
    monkeypatch.setattr(_Source, "_OUT", 5)
    data = b"ab\ncdefghijklmnopqrstu\n\nvwxyz0123456789" * 3
    for size in (-1, 0, 1, 4, 12, 30, 200):
        src = _Source(io.BytesIO(gzip.compress(data, mtime=0) if compressed else data), compressed=compressed)
        ref = io.BytesIO(data)
        while True:
            want = ref.readline(size)
            assert src.readline(size) == want
            if not want:
                assert src.read() == ref.read()
                break
            if size == 0:
                ref.read(1)
                src.read(1)


@pytest.mark.parametrize("opcode", [b"\x96", b"\x8e", b"\x8d"])  # BYTEARRAY8, BINBYTES8, BINUNICODE8
@pytest.mark.parametrize("declared", [64 << 20, 1 << 40])
def test_a_declared_length_is_checked_before_it_is_allocated(tmp_path: Path, opcode: bytes, declared: int) -> None:
    import tracemalloc

    from tracestore.convert.safe_unpickle import SafeUnpickler

    body = b"\x80\x05](}" + opcode + struct.pack("<Q", declared) + b"x" * 100
    gz = tmp_path / "b.pkl.gz"
    gz.write_bytes(gzip.compress(body, mtime=0))
    plain = tmp_path / "b.pkl"
    plain.write_bytes(body)
    tracemalloc.start()
    try:
        with pytest.raises(InputTooLargeError, match=rf"b.pkl.gz: decompresses to more than 1,048,576 bytes .*asks for "
                                                     rf"{declared:,} more"):
            PickleArchive(gz, max_bytes=1 << 20)
        with pytest.raises(InputFormatError, match=rf"b.pkl: the pickle asks for {declared:,} bytes at offset 14 but "
                                                   rf"the file holds 114"):
            PickleArchive(plain, max_bytes=CAP)
        with pytest.raises(InputTooLargeError, match=r"w.pkl: decompresses to more than 1,048,576 bytes"):
            SafeUnpickler(io.BytesIO(body), name="w.pkl", max_bytes=1 << 20).load()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_a_bytearray8_inside_a_frame_must_fit_the_frame() -> None:
    from tracestore.convert.safe_unpickle import SafeUnpickler

    data = pickle.dumps([bytearray(b"abc")], protocol=5)
    assert SafeUnpickler(io.BytesIO(data), name="f.pkl").load() == [bytearray(b"abc")]
    at = data.index(b"\x96" + struct.pack("<Q", 3))
    bad = data[:at] + b"\x96" + struct.pack("<Q", 1 << 40) + data[at + 9:]
    with pytest.raises(InputFormatError, match=r"f.pkl: a BYTEARRAY8 opcode declares 1,099,511,627,776 bytes, more than"):
        SafeUnpickler(io.BytesIO(bad), name="f.pkl").load()


@pytest.mark.parametrize("compresslevel", [None, 1])
def test_bytes_after_the_pickle_are_refused_plain_or_gzip(tmp_path: Path, compresslevel: int | None) -> None:
    from tracestore.convert.pickle_stream import load_pickle

    a, b = _records(5, size=4), _records(7, size=4)
    one = pickle.dumps(a, protocol=4)
    batch = pickle.dumps({"ids": ["x"]}, protocol=4)
    two = one + pickle.dumps(b, protocol=4)
    for name, data, end, what in [("two.pkl", two, len(one), "another pickle follows"),
                                  ("garbage.pkl", one + b"GARBAGE", len(one), "the file is not one pickled object"),
                                  ("batch.pkl", batch + b"\0", len(batch), "the file is not one pickled object")]:
        p = tmp_path / (name + (".gz" if compresslevel else ""))
        p.write_bytes(gzip.compress(data, compresslevel=compresslevel, mtime=0) if compresslevel else data)
        with pytest.raises(InputFormatError, match=rf"{p.name}: {len(data) - end:,} bytes after the end of the pickle, "
                                                   rf"at decompressed offset {end:,}; {what}"):
            load_pickle(p, max_bytes=CAP)
    # the pickle's last frame may not hold bytes past its STOP either
    framed = pickle.dumps(a[:1], protocol=4)
    assert framed[2:3] == pickle.FRAME
    size = int.from_bytes(framed[3:11], "little")
    p = tmp_path / "frame.pkl"
    p.write_bytes(framed[:3] + (size + 3).to_bytes(8, "little") + framed[11:] + b"xyz")
    with pytest.raises(InputFormatError, match=r"frame.pkl: 3 bytes after the end of the pickle"):
        load_pickle(p, max_bytes=CAP)
    p.write_bytes(one)
    assert len(load_pickle(p, max_bytes=CAP)[0]) == 5


@pytest.mark.parametrize("n", [1, 2, 1001, 2001])
def test_the_pure_python_picklers_last_single_append_is_a_record(tmp_path: Path, n: int) -> None:
    """pickle._Pickler (which dill and joblib subclass) ends a list of N = 1 (mod 1000) items with a bare
    APPEND (no MARK); the C pickler does so for a list of one."""
    recs = _records(n, size=4)
    for pickler in (pickle._Pickler, pickle.Pickler):  # type: ignore[attr-defined]
        buf = io.BytesIO()
        pickler(buf, protocol=4).dump(recs)
        p = tmp_path / "py.pkl"
        p.write_bytes(buf.getvalue())
        with PickleArchive(p, max_bytes=CAP) as arch:
            assert isinstance(arch.content, RecordStream)
            got = [r["id"] for r in arch.content]
            arch.finish()
        assert got == [r["id"] for r in recs]


def test_lists_of_tuples_and_records_inside_a_tuple_name_the_layout(tmp_path: Path) -> None:
    pairs = [({"id": "a"}, {"id": "b"}), ({"id": "c"}, {"id": "d"})]
    triples = [({"id": "a"}, {"id": "b"}, {"id": "x"}), ({"id": "c"}, {"id": "d"}, {"id": "y"})]
    cases = [("pairs.pkl", pairs, r"item 0 of the archive's list is a tuple of 2 objects, not a record"),
             ("triples.pkl", triples, r"item 0 of the archive's list is a tuple of 3 objects, not a record"),
             ("late.pkl", [{"id": "r0"}, {"id": "r1"}, *pairs], r"item 2 of the archive's list is a tuple of 2"),
             ("beside.pkl", (_records(3, size=4), 5), r".*its list of records sits inside another object, beside a value of type int"),
             ("inside.pkl", (_records(3, size=4), {"n": 3}), r".*its list of records sits inside a tuple")]
    for name, obj, what in cases:
        p = write_pickle(tmp_path / name, obj, compresslevel=None)
        with pytest.raises(InputFormatError, match=rf"{name}: {what}") as e, PickleArchive(p, max_bytes=CAP) as arch:
            list(arch.content)
        assert "damaged" not in str(e.value) and "copy it again" not in str(e.value)


@pytest.mark.parametrize("protocol", [0, 1])
@pytest.mark.parametrize("compresslevel", [None, 1])
def test_protocol_0_and_1_pickles_are_read_whole(tmp_path: Path, protocol: int, compresslevel: int | None) -> None:
    from tracestore.convert.pickle_stream import load_pickle

    recs = _records(3, size=70_000)  # an array's bytes are one text line of ~280 KB at protocol 0
    p = write_pickle(tmp_path / "old.pkl", recs, compresslevel=compresslevel, protocol=protocol)
    got, info = load_pickle(p, max_bytes=CAP)
    assert [r["id"] for r in got] == ["r0", "r1", "r2"] and info["decompressed_bytes"] > 3 * 280_000
    np.testing.assert_array_equal(got[2]["x"], recs[2]["x"])
    with pytest.raises(InputTooLargeError, match=r"old.pkl: decompresses to more than 100,000 bytes"):
        load_pickle(p, max_bytes=100_000)  # the cap holds for the whole file
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"cos\nsystem\n(S'true'\ntR." if protocol == 0 else pickle.dumps(NotAllowed(), protocol=protocol))
    with pytest.raises(UnsafeInputError, match=r"bad.pkl: the pickle asks for (os.system|copy_reg._reconstructor)"):
        load_pickle(bad, max_bytes=CAP)
    (tmp_path / "two.pkl").write_bytes(pickle.dumps(recs[:1], protocol=protocol) * 2)
    with pytest.raises(InputFormatError, match=r"two.pkl: [\d,]+ bytes after the end of the pickle"):
        load_pickle(tmp_path / "two.pkl", max_bytes=CAP)


def test_a_shared_object_names_the_record_that_refers_back_to_it(tmp_path: Path) -> None:
    d, e = {"id": "a", "x": np.ones(3)}, {"id": "b"}
    pair = (np.ones(2), "t")
    cases = [("whole.pkl", [d, e, d], 2), ("value.pkl", [{"id": "a", "p": pair}, {"id": "b"}, {"id": "c", "p": pair}], 2),
             ("next.pkl", [{"id": "a", "p": pair}, {"id": "b", "p": pair}], 1)]
    for name, obj, record in cases:
        p = write_pickle(tmp_path / name, obj, compresslevel=None)
        with pytest.raises(InputFormatError, match=rf"{name}: record {record} refers back to an object of an earlier "
                                                   rf"record \(an array, list, dict, tuple or other object"), \
                PickleArchive(p, max_bytes=CAP) as arch:
            list(arch.content)


def test_a_small_gzip_with_a_bad_crc_is_a_clear_error_at_open(tmp_path: Path) -> None:
    """A small file is inflated whole when its first byte is looked at (to tell the protocol), trailer
    included: a bad CRC there is the same clear error as later in the stream."""
    g = gzip.compress(pickle.dumps(_records(3, size=4), protocol=4), mtime=0)
    p = tmp_path / "crc.pkl.gz"
    p.write_bytes(g[:-8] + b"\0\0\0\0" + g[-4:])
    with pytest.raises(InputFormatError, match=r"crc.pkl.gz: not a valid gzip stream .*incorrect data check.*damaged"):
        PickleArchive(p, max_bytes=CAP)
