"""Stores made of parts (issue 15, section 1): parts written as plain stores, committed by a manifest, read
as one store by every reader (random access, select, layer, xarray, the loader, pickled copies), grown by
`tracestore append`, and refused clearly where parts do not fit together."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tracestore
from tracestore.cli import main
from tracestore.convert.part_writer import write_part
from tracestore.convert.verify import verify_store
from tracestore.errors import (
    CorruptStoreError,
    DuplicateIdError,
    IncompleteStoreError,
    PartMismatchError,
    StaleStoreError,
    StoreExistsError,
    TracestoreError,
)
from tracestore.format import schema
from tracestore.loader.loader import TraceLoader
from tracestore.store.parts import commit_parts, part_url
from tracestore.store.remote import S3Location
from tracestore.testing import synthetic_graphs, synthetic_ids, synthetic_scores, synthetic_sequences
from tracestore.testing.s3 import moto_s3
from tracestore.testing.seed import write_seed_raw_archive

L, D = 3, 8
SHARD_BYTES = 4 * L * D * 2  # 4 traces per shard: part boundaries fall inside shards
SIZES = [7, 9, 2, 6]  # unequal parts, one smaller than a shard


def _write(url: Any, start: int, n: int, *, graphs: bool = True, **kw: Any) -> None:
    """Traces start..start+n of the synthetic set (ids q<start+i>) as one plain store."""
    scores = synthetic_scores(start + n, 0)
    with tracestore.create(url, num_layers=L, hidden_size=D, graphs=graphs, shard_bytes=SHARD_BYTES, **kw) as w:
        for a in range(start, start + n, 5):
            b = min(start + n, a + 5)
            w.append(synthetic_ids(b - a, a), synthetic_sequences(b - a, L, D, 0, start=a), scores[a:b],
                     graphs=synthetic_graphs(b - a, L, D, 0, start=a) if graphs else None,
                     fields={"topic": [f"t{i % 3}" for i in range(a, b)]})


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[tracestore.TraceStore, tracestore.TraceStore]:
    """The same traces as one store and as a store of 4 parts."""
    d = tmp_path_factory.mktemp("parts")
    n = sum(SIZES)
    _write(d / "one", 0, n)
    start = 0
    for k, size in enumerate(SIZES):
        _write(part_url(str(d / "multi"), k), start, size)
        start += size
    res = commit_parts(str(d / "multi"))
    assert res.parts == [0, 1, 2, 3] and res.num_traces == n
    return tracestore.open(d / "one"), tracestore.open(d / "multi")


def test_parts_read_as_the_concatenation(pair):
    one, multi = pair
    assert multi.num_parts == 4 and one.num_parts == 1 and len(multi) == len(one) == sum(SIZES)
    np.testing.assert_array_equal(multi.ids, one.ids)
    np.testing.assert_array_equal(multi.scores, one.scores)
    np.testing.assert_array_equal(multi.fields["topic"], one.fields["topic"])
    np.testing.assert_array_equal(multi.sequences[:], one.sequences[:])
    rng = np.random.default_rng(0)
    for idx in (rng.permutation(len(one)), np.sort(rng.choice(len(one), 9, replace=False)), [3, 3, 20, 0]):
        np.testing.assert_array_equal(multi.sequences[idx], one.sequences[idx])
        np.testing.assert_array_equal(multi.sequences[idx, 1], one.sequences[idx, 1])
        pick = np.asarray(idx)[:2]  # two index arrays broadcast in pairs, as numpy's
        np.testing.assert_array_equal(multi.sequences[pick, [0, 2]], one.sequences[pick, [0, 2]])
    np.testing.assert_array_equal(multi.sequences[5:19:3, :, 2:5], one.sequences[5:19:3, :, 2:5])
    buf = np.empty((4, L, D), np.float16)
    multi.read_sequences([20, 1, 8, 16], out=buf)
    np.testing.assert_array_equal(buf, one.sequences[[20, 1, 8, 16]])
    for layer in range(L):
        np.testing.assert_array_equal(multi.layer(layer), one.layer(layer))
    for i in range(len(one)):
        a, b = one[i], multi[i]
        assert (a.id, a.fields) == (b.id, b.fields)
        np.testing.assert_array_equal(a.sequence, b.sequence)
        np.testing.assert_array_equal(a.tokens.hidden, b.tokens.hidden)
        for k in range(L):
            np.testing.assert_array_equal(a.graph.edge_index[k], b.graph.edge_index[k])
            np.testing.assert_array_equal(a.graph.edge_attr[k], b.graph.edge_attr[k])
    assert multi.report["sequences"].to_dict() == one.report["sequences"].to_dict()
    assert multi.info()["parts"] == 4 and multi.info()["num_edges"] == one.info()["num_edges"]


def test_select_xarray_and_pickled_copies_of_a_store_of_parts(pair):
    one, multi = pair
    ids = ["q000022", "q000001", "q000016", "q000007"]  # from parts 3, 0, 2, 1
    np.testing.assert_array_equal(multi.select(ids).sequences[:], one.select(ids).sequences[:])
    np.testing.assert_array_equal(multi.select(ids)[2].tokens.hidden, one.select(ids)[2].tokens.hidden)
    xa, xb = one.to_xarray(), multi.to_xarray()
    np.testing.assert_array_equal(xa.sequences.isel(trace=[4, 17, 9]).values, xb.sequences.isel(trace=[4, 17, 9]).values)
    np.testing.assert_array_equal(xb["topic"].values, xa["topic"].values)
    copy = pickle.loads(pickle.dumps(multi.select(ids)))
    assert copy.num_parts == 4
    np.testing.assert_array_equal(copy.sequences[:], one.select(ids).sequences[:])


@pytest.mark.parametrize(("workers", "mode"), [(0, "thread"), (2, "process")])
@pytest.mark.parametrize("graphs", [False, True])
def test_the_loader_streams_every_trace_of_every_part_once(pair, workers, mode, graphs):
    one, multi = pair
    ref = {str(i): one[k].sequence.astype(np.float32) for k, i in enumerate(one.ids)}
    seen: list[str] = []
    loader = TraceLoader(multi, batch_size=4, shuffle=True, seed=3, num_workers=workers, worker_mode=mode,
                         with_graphs=graphs)
    for b in loader:
        for i, trace_id in enumerate(b.ids):
            np.testing.assert_array_equal(b.sequences[i].numpy(), ref[trace_id])
        if graphs:
            g = b.graph.to_data_list()[L * (len(b.ids) - 1)]  # the batch's last trace at layer 0
            want = one.select([b.ids[-1]])[0].graph.to_pyg(0)
            torch.testing.assert_close(g.edge_index, want.edge_index.long())
            torch.testing.assert_close(g.x, want.x.float())
        seen += list(b.ids)
    assert sorted(seen) == sorted(map(str, one.ids))


def test_chunks_never_cross_a_part(pair):
    _one, multi = pair
    loader = TraceLoader(multi, batch_size=4, shuffle=True, chunk_rows=3)
    bounds = loader._store_bounds
    part_starts = np.cumsum([0] + SIZES)[:-1]
    assert set(part_starts.tolist()) <= set(bounds.tolist())
    assert (np.diff(bounds) <= 3).all() and bounds[-1] == len(multi)


def _archives(d: Path, n_files: int, per: int = 4) -> list[str]:
    out = []
    for k in range(n_files):
        p = d / f"a{k}.pkl.gz"
        write_seed_raw_archive(p, per, L, D, num_heads=2, tokens=(3, 6), seed=0, start=per * k)
        out.append(str(p))
    return out


def _same(a: tracestore.TraceStore, b: tracestore.TraceStore) -> None:
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.sequences[:], b.sequences[:])
    for name in a.fields:
        np.testing.assert_array_equal(a.fields[name], b.fields[name])
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i].tokens.hidden, b[i].tokens.hidden)
        assert a[i].tokens.text == b[i].tokens.text
        for k in range(L):
            np.testing.assert_array_equal(a[i].graph.edge_index[k], b[i].graph.edge_index[k])
    assert {k: r.to_dict() for k, r in a.report.items()} == {k: r.to_dict() for k, r in b.report.items()}


def test_append_grows_a_store_and_readers_opened_before_keep_their_view(tmp_path, capsys):
    srcs = _archives(tmp_path, 3)
    ref, store = str(tmp_path / "ref"), str(tmp_path / "store")
    assert main(["convert", *srcs, "-o", ref, "-q", "--workers", "0"]) == 0
    assert main(["convert", srcs[0], "-o", store, "-q", "--workers", "0"]) == 0
    before = tracestore.open(store)
    pickled = pickle.dumps(before)
    assert main(["append", store, srcs[1], "-q", "--workers", "0"]) == 0
    assert main(["append", store, srcs[2], "--workers", "0", "--no-progress"]) == 0
    assert "committed" in capsys.readouterr().out
    _same(tracestore.open(ref), tracestore.open(store))
    assert tracestore.open(store).num_parts == 3
    assert sorted(p.name for p in (tmp_path / "store" / "parts").iterdir()) == ["00001", "00002"]
    # opened before: the first part only, still read right, and so is a copy of it made before the appends
    assert len(before) == 4 and before.num_parts == 1
    np.testing.assert_array_equal(before.sequences[:], tracestore.open(ref).sequences[:4])
    assert len(pickle.loads(pickled)) == 4
    assert main(["verify", store]) == 0
    assert "made of 3 parts" in (capsys.readouterr(), main(["info", store]), capsys.readouterr().out)[2]


def test_append_of_archives_the_store_holds_is_refused_and_changes_nothing(tmp_path, capsys):
    srcs = _archives(tmp_path, 2)
    store = str(tmp_path / "store")
    assert main(["convert", srcs[0], "-o", store, "-q", "--workers", "0"]) == 0
    assert main(["append", store, srcs[1], "-q", "--workers", "0"]) == 0
    root = (tmp_path / "store" / "zarr.json").read_bytes()
    assert main(["append", store, srcs[1], "-q", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "qb_4" in err and "parts/00001" in err and "parts/00002" in err
    assert "removed" in err
    assert (tmp_path / "store" / "zarr.json").read_bytes() == root
    assert not (tmp_path / "store" / "parts" / "00002").exists()
    assert len(tracestore.open(store)) == 8


def test_append_with_other_options_is_refused_naming_what_differs(tmp_path, capsys):
    srcs = _archives(tmp_path, 2)
    store = str(tmp_path / "store")
    assert main(["convert", srcs[0], "-o", store, "-q", "--workers", "0"]) == 0
    assert main(["append", store, srcs[1], "-q", "--workers", "0", "--tokens", "none"]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "token hidden states" in err
    # left out, the options are the store's: the same append then fits
    assert main(["append", store, srcs[1], "-q", "--workers", "0"]) == 0
    assert len(tracestore.open(store)) == 8


def test_append_takes_the_stores_options_when_not_given(tmp_path):
    srcs = _archives(tmp_path, 2)
    store = str(tmp_path / "store")
    assert main(["convert", srcs[0], "-o", store, "-q", "--workers", "0", "--pool", "mean",
                 "--graph-topk-frac", "0.5"]) == 0
    assert main(["append", store, srcs[1], "-q", "--workers", "0"]) == 0
    s = tracestore.open(store)
    assert s.num_parts == 2 and s.pool == "mean" and s.graph_recipe["name"] == "causal-topk-frac"


def test_a_killed_append_is_finished_by_the_same_command(tmp_path):
    srcs = _archives(tmp_path, 2)
    store = str(tmp_path / "store")
    tracestore.convert.convert([srcs[0]], store, workers=0)
    # the kill came after the part was written, before the manifest: the rerun finds the part up to date
    res = write_part([srcs[1]], store, 1, workers=0)
    assert res.num_traces == 4 and not res.up_to_date
    assert tracestore.open(store).num_parts == 1
    out = tracestore.append(store, [srcs[1]], workers=0)
    assert out.convert.up_to_date and out.part == 1 and out.commit.added == [1]
    assert len(tracestore.open(store)) == 8


def test_commit_refuses_unfinished_missing_and_misnumbered_parts(tmp_path):
    dest = str(tmp_path / "multi")
    _write(part_url(dest, 0), 0, 5)
    _write(part_url(dest, 2), 10, 5)
    w = tracestore.create(part_url(dest, 1), num_layers=L, hidden_size=D, graphs=True, shard_bytes=SHARD_BYTES)
    w.append(synthetic_ids(3, 5), synthetic_sequences(3, L, D, 0, start=5), synthetic_scores(3),
             graphs=synthetic_graphs(3, L, D, 0, start=5), fields={"topic": ["a", "b", "c"]})
    w.checkpoint()
    w.abort()
    with pytest.raises(IncompleteStoreError, match="tracestore commit"):
        tracestore.open(dest)  # nothing committed yet: parts, and what to do
    with pytest.raises(IncompleteStoreError, match=r"parts/00001 .*unfinished"):
        commit_parts(dest)
    with pytest.raises(IncompleteStoreError, match=r"parts/00005 \(missing\)"):
        commit_parts(dest, parts=[0, 5])
    assert commit_parts(dest, parts=[2]).parts == [2]
    with pytest.raises(TracestoreError, match="number order"):
        commit_parts(dest, parts=[0])
    assert commit_parts(dest, parts=[2]).up_to_date
    assert len(tracestore.open(dest)) == 5


def test_parts_that_disagree_or_repeat_ids_are_refused_at_commit(tmp_path):
    dest = str(tmp_path / "multi")
    _write(part_url(dest, 0), 0, 5)
    _write(part_url(dest, 1), 5, 5, graphs=False)
    with pytest.raises(PartMismatchError, match=r"parts/00001 does not match .*parts/00000 \(graphs"):
        commit_parts(dest)
    other = str(tmp_path / "dup")
    _write(part_url(other, 0), 0, 5)
    _write(part_url(other, 1), 3, 5)
    with pytest.raises(DuplicateIdError, match=r"'q000003' is in .*parts/00000 and in .*parts/00001"):
        commit_parts(other)
    assert not (tmp_path / "dup" / "zarr.json").exists()


def test_a_damaged_store_of_parts_is_corrupt_naming_the_part(tmp_path):
    dest = tmp_path / "multi"
    for k in range(2):
        _write(part_url(str(dest), k), 5 * k, 5)
    commit_parts(str(dest))
    doc = json.loads((dest / "zarr.json").read_text())
    doc["attributes"]["tracestore"]["manifest"]["parts"][1]["num_traces"] = 6
    (dest / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptStoreError, match="part parts/00001 holds 5 traces, its manifest says 6"):
        tracestore.open(dest)
    doc["attributes"]["tracestore"]["manifest"]["parts"][1]["num_traces"] = 5
    (dest / "zarr.json").write_text(json.dumps(doc))
    verify_store(str(dest))
    chunk = next(p for p in (dest / "parts" / "00001" / "sequences").rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[3] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError, match="parts/00001"):
        verify_store(str(dest))
    import shutil

    shutil.rmtree(dest / "parts" / "00001")
    with pytest.raises(CorruptStoreError, match="lists part parts/00001, which cannot be opened"):
        tracestore.open(dest)


def test_a_store_of_parts_replaced_under_a_pickled_copy_is_stale(tmp_path):
    dest = str(tmp_path / "multi")
    for k in range(2):
        _write(part_url(dest, k), 5 * k, 5)
    commit_parts(dest)
    copy = pickle.dumps(tracestore.open(dest))
    import shutil

    shutil.rmtree(dest)
    for k in range(2):
        _write(part_url(dest, k), 5 * k, 5)
    commit_parts(dest)
    with pytest.raises(StaleStoreError, match="replaced"):
        pickle.loads(copy)


def test_plain_convert_over_uncommitted_parts_points_at_commit(tmp_path):
    srcs = _archives(tmp_path, 1)
    dest = str(tmp_path / "multi")
    write_part(srcs, dest, 0, workers=0)
    with pytest.raises(StoreExistsError, match="tracestore commit"):
        tracestore.convert.convert(srcs, dest, workers=0)
    assert commit_parts(dest).parts == [0]


def test_a_part_is_plain_zarr(pair):
    import zarr

    _one, multi = pair
    part = zarr.open_group(str(Path(multi.url) / "parts" / "00001"), mode="r")
    np.testing.assert_array_equal(np.asarray(part["sequences"][:]), multi.sequences[7:16])
    root = json.loads((Path(multi.url) / "zarr.json").read_text())
    m = root["attributes"][schema.ATTRS_KEY][schema.ATTR_MANIFEST]
    assert [e["path"] for e in m["parts"]] == [f"parts/0000{k}" for k in range(4)]
    assert [e["num_traces"] for e in m["parts"]] == SIZES


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as ep:
        yield ep


def test_append_and_stream_a_store_of_parts_on_s3(s3, tmp_path):
    so = s3.storage_options()
    url = s3.url("parts/store")
    _write(S3Location(url, so), 0, 9)
    _write(S3Location(part_url(url, 1), so), 9, 7)
    res = commit_parts(url, storage_options=so)
    assert res.parts == [0, 1] and res.num_traces == 16
    local = str(tmp_path / "one")
    _write(local, 0, 16)
    remote, one = tracestore.open(url, storage_options=so), tracestore.open(local)
    assert remote.num_parts == 2
    np.testing.assert_array_equal(remote.sequences[:], one.sequences[:])
    np.testing.assert_array_equal(remote[12].tokens.hidden, one[12].tokens.hidden)
    loader = TraceLoader(remote, batch_size=4, shuffle=True, num_workers=2)
    assert loader._windowed
    seen = []
    for b in loader:
        for i, trace_id in enumerate(b.ids):
            np.testing.assert_array_equal(b.sequences[i].numpy(), one.select([trace_id])[0].sequence.astype(np.float32))
        seen += list(b.ids)
    assert sorted(seen) == sorted(map(str, one.ids))
    assert verify_store(S3Location(url, so))["num_traces"] == 16


def test_the_root_of_a_store_of_parts_is_version_3_and_a_v1_store_is_not_extended(pair, tmp_path):
    import shutil

    _one, multi = pair
    root = json.loads((Path(multi.url) / "zarr.json").read_text())["attributes"][schema.ATTRS_KEY]
    assert root["format_version"] == schema.PARTS_FORMAT_VERSION == 3 and multi.format_version == 3
    part = json.loads((Path(multi.url) / "parts" / "00000" / "zarr.json").read_text())["attributes"][schema.ATTRS_KEY]
    assert part["format_version"] == 2
    v1 = tmp_path / "v1"
    shutil.copytree(Path(__file__).parent / "data" / "golden_v1", v1)
    srcs = _archives(tmp_path, 1)
    with pytest.raises(TracestoreError, match="version 1 store"):
        tracestore.append(str(v1), srcs, workers=0)
    assert not (v1 / "parts").exists()  # refused before anything was converted


# -- what the hostile review of the parts found (each failed before its fix) -----------------------------------
def test_commit_waits_for_a_part_being_written_and_refuses_gaps(tmp_path):
    dest = tmp_path / "multi"
    _write(part_url(str(dest), 0), 0, 5)
    _write(part_url(str(dest), 2), 10, 5)
    lock = dest / "parts" / "00001.tracestore-lock"
    lock.mkdir(parents=True)
    (lock / "lock.json").write_text("{}")  # a convert-part task in its first archive: only its lock exists
    with pytest.raises(IncompleteStoreError, match=r"parts/00001 are unfinished \(being written"):
        commit_parts(str(dest))
    (lock / "lock.json").unlink()
    lock.rmdir()
    with pytest.raises(IncompleteStoreError, match=r"parts/00001 are missing .* before parts/00002"):
        commit_parts(str(dest))  # part 1 not written (a pending or failed task): not skipped for good
    assert commit_parts(str(dest), parts=[0, 2]).parts == [0, 2]  # on purpose


def test_a_lock_folder_left_without_its_lock_does_not_block_the_commit(tmp_path):
    """The advice for a stale lock is to delete it; deleting lock.json and leaving its folder behind (what a
    hand-run `rm` of the file does) must not make its part count as being written."""
    dest = tmp_path / "multi"
    _write(part_url(str(dest), 0), 0, 5)
    _write(part_url(str(dest), 1), 5, 5)
    (dest / "parts" / "00002.tracestore-lock").mkdir()
    assert commit_parts(str(dest)).parts == [0, 1]
    assert len(tracestore.open(str(dest))) == 10


def test_part_0_cannot_join_a_single_store_whose_own_traces_are_part_0(tmp_path, capsys):
    store = str(tmp_path / "single")
    _write(store, 0, 5)
    srcs = _archives(tmp_path, 1)
    assert main(["convert-part", "--part", "0", *srcs, "-o", store, "-q", "--workers", "0"]) == 2
    assert "own traces are its part 0" in capsys.readouterr().err
    _write(part_url(store, 0), 5, 5)  # written behind the tools' back
    with pytest.raises(PartMismatchError, match="parts are numbered from 1"):
        commit_parts(store)


def test_a_part_is_not_a_store_to_append_or_commit_to(tmp_path):
    srcs = _archives(tmp_path, 2)
    store = str(tmp_path / "store")
    tracestore.convert.convert([srcs[0]], store, workers=0)
    tracestore.append(store, [srcs[1]], workers=0)
    with pytest.raises(TracestoreError, match="is a part of the store"):
        tracestore.append(part_url(store, 1), [srcs[0]], workers=0)
    with pytest.raises(TracestoreError, match="is a part of the store"):
        commit_parts(part_url(store, 1))


def test_parts_of_another_model_are_refused(tmp_path):
    dest = str(tmp_path / "multi")
    _write(part_url(dest, 0), 0, 5, model_name="llama-2-7b")
    _write(part_url(dest, 1), 5, 5, model_name="mistral-7b")
    with pytest.raises(PartMismatchError, match="model name: 'llama-2-7b' there, 'mistral-7b' here"):
        commit_parts(dest)


@pytest.mark.parametrize("path", ["/elsewhere", "../other", "parts/00000", "parts/1"])
def test_a_manifest_with_a_path_that_is_not_a_part_is_corrupt(tmp_path, path):
    dest = tmp_path / "multi"
    for k in range(2):
        _write(part_url(str(dest), k), 5 * k, 5)
    commit_parts(str(dest))
    doc = json.loads((dest / "zarr.json").read_text())
    doc["attributes"]["tracestore"]["manifest"]["parts"][1]["path"] = path
    (dest / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptStoreError, match="manifest of its parts is damaged"):
        tracestore.open(dest)
    with pytest.raises(CorruptStoreError, match="manifest of its parts is damaged"):
        verify_store(str(dest))


def test_mapped_shards_are_bounded_for_the_whole_store_not_per_part(pair, monkeypatch):
    from tracestore import config

    _one, multi = pair
    monkeypatch.setattr(config, "MAX_MAPPED_SHARDS", 3)
    store = tracestore.open(multi.url)
    store.sequences[:]
    for i in range(len(store)):
        store[i].tokens  # noqa: B018 - tokens/hidden shards too
    assert sum(len(p._cache) for p in store._parts) <= 3


def test_the_whole_stores_provenance_counts_every_parts_labels_and_sources(tmp_path):
    srcs = _archives(tmp_path, 2)
    store = str(tmp_path / "store")
    tracestore.convert.convert([srcs[0]], store, workers=0)
    tracestore.append(store, [srcs[1]], workers=0)
    prov = tracestore.open(store).attrs["provenance"]
    assert [s["name"] for s in prov["sources"]] == ["a0.pkl.gz", "a1.pkl.gz"]
    assert set(prov["parts"]) == {".", "parts/00001"} and "label_scores" in prov


def test_an_append_to_a_cluster_built_store_updates_its_root_counts(tmp_path):
    srcs = _archives(tmp_path, 3)
    dest = str(tmp_path / "multi")
    for k in range(2):
        write_part([srcs[k]], dest, k, workers=0)
    commit_parts(dest)
    tracestore.append(dest, [srcs[2]], workers=0)
    root = json.loads((Path(dest) / "zarr.json").read_text())["attributes"][schema.ATTRS_KEY]
    assert root["num_traces"] == root["manifest"]["num_traces"] == 12 == len(tracestore.open(dest))


def test_the_parts_of_an_s3_store_share_its_disk_cache(s3, tmp_path):
    so = s3.storage_options()
    url = s3.url("parts/cached")
    _write(S3Location(url, so), 0, 5)
    _write(S3Location(part_url(url, 1), so), 5, 5)
    commit_parts(url, storage_options=so)
    store = tracestore.open(url, storage_options=so, cache_dir=tmp_path / "cache", cache_limit="1MB")
    caches = {id(p.location.cache) for p in store._parts}
    assert len(caches) == 1 and store._parts[0].location.cache is not None
