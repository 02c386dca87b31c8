"""Issue 11, reader side: a replaced store is detected (StaleStoreError), mapped shards are bounded (an LRU,
close(), a context manager), numpy's rules for several integer arrays, read-only metadata arrays, and damaged
stores named as CorruptStoreError at open and by `tracestore verify`."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tracestore
from conftest import SHARD_BYTES, D, L, expected_f16, synthetic_batch
from tracestore.errors import CorruptStoreError, StaleStoreError


def write_store(url: Any, n: int = 9, *, graphs: bool = False, fields: bool = False, seed: int = 0,
                **kw: Any) -> tracestore.TraceStore:
    """n synthetic traces (4 per shard) in batches of 5, with a str and a float field if asked; opened."""
    kw.setdefault("shard_bytes", SHARD_BYTES)
    with tracestore.create(url, num_layers=L, hidden_size=D, graphs=graphs, **kw) as w:
        for a in range(0, n, 5):
            b = min(n, a + 5)
            extra = {"lang": [f"l{i % 2}" for i in range(a, b)], "len": [float(i) for i in range(a, b)]}
            batch = synthetic_batch(b - a, a, graphs=graphs, seed=seed)
            if kw.get("tokens") == "all":  # token ids and text beside the graphs' node features
                batch["tokens"] = [{"ids": np.arange(g.num_nodes), "text": [f"t{a + k}.{j}" for j in range(g.num_nodes)]}
                                   for k, g in enumerate(batch["graphs"])]
            w.append(**batch, fields=extra if fields else None)
    return tracestore.open(url)


# -- item 8: metadata arrays are read-only ---------------------------------------------------------------
def test_ids_scores_fields_and_pointers_are_read_only(tmp_path: Any) -> None:
    s = write_store(tmp_path / "s.zarr", graphs=True, fields=True)
    before_ids, before_scores = s.ids.copy(), s.scores.copy()
    for arr in (s.ids, s.scores, s.token_ptr, s.edge_ptr, s.rows, *s.fields.values()):
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = arr[1]
    sel = s.select(["q000003", "q000001"])
    for arr in (sel.ids, sel.scores, sel.rows, *sel.fields.values()):
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = arr[1]
    np.testing.assert_array_equal(s.ids, before_ids)
    np.testing.assert_array_equal(s.scores, before_scores, strict=True)
    assert s[0].id == "q000000" and s.fields["lang"][0] == "l0"


# -- item 7: several integer arrays follow numpy (broadcast together), not outer indexing -------------------
@pytest.mark.parametrize("key", [
    (slice(None), [0, 1], [2, 3]), (slice(None), [0, 2], [3, 5]), (slice(None), [[0], [2]], [1, 4, 7]),
    ([0, 1], [1, 2]), ([1, 8], slice(None), [3, 4]), (0, slice(None), [1, 2]), ([3, 5], 1, [0, 7]),
    (np.array([[0, 1], [2, 3]]),), (np.array([[0, 1], [2, 3]]), slice(None), 2), ([2, 2, 7], [0, 1, 2], 5),
    (4, [0, 2], [1, 1]), (Ellipsis, [0, 2], [1, 1]), (slice(1, 8, 2), [True, False, True], [2, 3]),
    (np.arange(9) % 2 == 0, [0, 1, 2, 0, 1]), ([-1, 0], [-1, 0], [-1, 0]),
    # single advanced index, or ints only: the fast paths, pinned against numpy too
    (slice(None), [0, 2]), (slice(None), 1, [2, 3]), (slice(2, 7), [2, 1], 3), ([4, 1], 2), (3, [1, 2]),
])
def test_several_integer_arrays_broadcast_like_numpy(tmp_path: Any, key: tuple[Any, ...]) -> None:
    s = write_store(tmp_path / "s.zarr")
    want = expected_f16(9)
    np.testing.assert_array_equal(s.sequences[key], want[key], strict=True)


def test_index_arrays_that_do_not_broadcast_raise_indexerror(tmp_path: Any) -> None:
    s = write_store(tmp_path / "s.zarr")
    with pytest.raises(IndexError, match=r"sequences\[.*\]: shape mismatch"):
        s.sequences[[0, 1], [0, 1, 2]]
    with pytest.raises(IndexError, match=r"trace index out of range for a store of 9 traces"):
        s.sequences[[0, 9], [0, 1]]


# -- helpers: a store's generation, and a replacement by rename ----------------------------------------------
def set_generation(url: Any, gen: str | None) -> None:
    """Rewrite the root zarr.json's generation (what a writer of issue 11 writes with `committed: true`)."""
    p = Path(url) / "zarr.json"
    meta = json.loads(p.read_text())
    attrs = meta["attributes"]["tracestore"]
    if gen is None:
        attrs.pop("generation", None)
    else:
        attrs["generation"] = gen
    p.write_text(json.dumps(meta))


def replace_by(url: Any, other: Any) -> None:
    """Put the store at `other` where `url` is, as a converter's --overwrite swap does (old -> new)."""
    os.rename(url, f"{url}.old")
    os.rename(other, url)


# -- item 5: a replaced store raises StaleStoreError instead of mixing two stores --------------------------
@pytest.mark.parametrize("old_gen", ["a" * 32, None])
def test_reader_of_a_replaced_store_raises_stale_instead_of_mixing(tmp_path: Path, old_gen: str | None) -> None:
    url, other = tmp_path / "s.zarr", tmp_path / "new.zarr"
    write_store(url, 9, graphs=True, tokens="all")
    set_generation(url, old_gen)
    write_store(other, 9, graphs=True, tokens="all", seed=1)
    set_generation(other, "b" * 32)
    s = tracestore.open(url)
    assert s.generation == old_gen
    want = expected_f16(9)
    first = s.sequences[0:4]  # shard 0 mapped before the swap
    replace_by(url, other)
    shutil.rmtree(f"{url}.old")  # even deleted: the map keeps the old bytes
    np.testing.assert_array_equal(s.sequences[1], want[1])  # mapped before: still the old store's bytes
    np.testing.assert_array_equal(first, want[0:4])
    with pytest.raises(StaleStoreError, match=r"s\.zarr: the store was replaced since it was opened .*reopen it"):
        s.sequences[5]  # shard 1: never mapped before the swap
    with pytest.raises(StaleStoreError):
        s.tokens(0)
    with pytest.raises(StaleStoreError):
        s.graph(8)
    with pytest.raises(StaleStoreError, match=r"pickled"):
        pickle.loads(pickle.dumps(s))  # a loader worker's copy
    assert isinstance(StaleStoreError("x"), OSError)


def test_pickled_array_of_a_replaced_store_raises_stale(tmp_path: Path) -> None:
    """What a spawned loader worker gets (loader/dataset.py pickles the store's arrays with the source)."""
    url, other = tmp_path / "s.zarr", tmp_path / "new.zarr"
    write_store(url, 9)
    set_generation(url, "a" * 32)
    write_store(other, 9, seed=1)
    set_generation(other, "b" * 32)
    s = tracestore.open(url)
    blob = pickle.dumps(s._seq)
    replace_by(url, other)
    arr = pickle.loads(blob)
    with pytest.raises(StaleStoreError, match=r"generation a{32} when opened, b{32} now"):
        arr.take(np.array([0, 1]))


def test_store_being_replaced_reads_no_zeros(tmp_path: Path) -> None:
    """The files of the old store are deleted before the new one is there: no zeros, a clear error."""
    url = tmp_path / "s.zarr"
    write_store(url, 9)
    s = tracestore.open(url)
    shutil.rmtree(url)
    with pytest.raises(StaleStoreError, match=r"removed or is being replaced .*root zarr.json is missing"):
        s.sequences[8]


def test_same_generation_reads_on(tmp_path: Path) -> None:
    url = tmp_path / "s.zarr"
    write_store(url, 9, graphs=True, tokens="all")
    set_generation(url, "c" * 32)
    s = tracestore.open(url)
    np.testing.assert_array_equal(s.sequences[:], expected_f16(9))
    assert s.tokens(3).text is not None and pickle.loads(pickle.dumps(s)).generation == "c" * 32


# -- item 6: a bounded number of mapped shards (file descriptors), close(), with ----------------------------
_FD_SCRIPT = """
import os, resource, sys
import numpy as np
import tracestore
from tracestore.testing import synthetic_sequences
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
s = tracestore.open(sys.argv[1])
held = s[0].sequence
for epoch in range(2):
    for i in range(len(s)):
        t = s[i]
        t.tokens, t.graph
    for a in range(0, len(s), 7):
        s.sequences[a:a + 7]
assert len(s._cache) <= 16, len(s._cache)
want = synthetic_sequences(len(s), 3, 8, 0).astype(np.float16)
np.testing.assert_array_equal(held, want[0])  # a view handed out before its shard was dropped
np.testing.assert_array_equal(s.sequences[::-1], want[::-1])
print("ok", len(os.listdir("/proc/self/fd")))
"""


def test_many_shards_read_under_a_low_open_file_limit(tmp_path: Path) -> None:
    url = tmp_path / "s.zarr"
    write_store(url, 120, graphs=True)  # 30 shards of sequences, ~250 of tokens/hidden, a few of edges
    assert len(list((url / "tokens/hidden/c").iterdir())) > 100
    env = {**os.environ, "TRACESTORE_MAX_MAPPED_SHARDS": "16"}
    r = subprocess.run([sys.executable, "-c", _FD_SCRIPT, str(url), "48"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ok")


def test_mapped_shards_are_bounded_by_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tracestore import config

    assert config.MAX_MAPPED_SHARDS == 64
    monkeypatch.setattr(config, "MAX_MAPPED_SHARDS", 3)
    s = write_store(tmp_path / "s.zarr", 40)
    np.testing.assert_array_equal(s.sequences[:], expected_f16(40))
    assert len(s._cache) == 3


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
def test_close_and_context_manager_release_the_maps(tmp_path: Path) -> None:
    url = tmp_path / "s.zarr"
    write_store(url, 20)
    base = _fds()
    with tracestore.open(url) as s:
        kept = s.sequences[3]  # a copy
        view = s[5].sequence  # a view into shard 1's map
        s.sequences[:]
        assert _fds() >= base + 5
    assert s.closed
    assert _fds() == base + 1  # only the map `view` keeps alive
    np.testing.assert_array_equal(view, expected_f16(20)[5])
    np.testing.assert_array_equal(kept, expected_f16(20)[3])
    with pytest.raises(ValueError, match=r"s\.zarr: the store is closed; reopen it"):
        s.sequences[0]
    assert s.ids[0] == "q000000"  # metadata stays
    del view
    assert _fds() == base
    s.close()  # idempotent


# -- item 9: damaged stores are CorruptStoreError naming the store and the array, at open and in verify ------
def _damage(url: Path, case: str) -> None:
    if case == "ids chunk":
        (url / "ids/c/0").unlink()
    elif case == "scores chunk":
        set_generation(url, "d" * 32)  # a store that stores every chunk (written with a generation)
        (url / "scores/c/0").unlink()
    elif case == "root json":
        (url / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {"tracestore": ')
    elif case == "ids dir":
        shutil.rmtree(url / "ids")
    elif case == "ids zarr.json":
        (url / "ids/zarr.json").write_text("{nope")


_DAMAGE = {
    "ids chunk": r"array 'ids' chunk 0 \(rows 0\.\.8\) is missing",
    "scores chunk": r"array 'scores' chunk 0 \(rows 0\.\.8\) is missing",
    "root json": r"the root zarr\.json is not valid group metadata",
    "ids dir": r"array 'ids' (is missing|has no zarr\.json)",
    "ids zarr.json": r"array 'ids' cannot be opened",
}


@pytest.mark.parametrize("case", list(_DAMAGE))
def test_damaged_store_is_corrupt_at_open_and_in_verify(tmp_path: Path, case: str) -> None:
    from tracestore.cli import main
    from tracestore.convert.verify import verify_store

    url = tmp_path / "s.zarr"
    write_store(url)
    _damage(url, case)
    with pytest.raises(CorruptStoreError, match=rf"^{url}: .*{_DAMAGE[case]}"):
        tracestore.open(url)
    with pytest.raises(CorruptStoreError, match=rf"^{url}: .*{_DAMAGE[case]}"):
        verify_store(str(url))
    assert main(["verify", str(url)]) != 0


def test_unknown_scores_without_a_chunk_still_open(tmp_path: Path) -> None:
    """Stores written before the generation (v1, older v2) skip a chunk of nothing but fill values: every
    score unknown is no damage there. Today's writer writes that chunk, so its stores open too."""
    from tracestore.convert.verify import verify_store

    url = tmp_path / "s.zarr"
    with tracestore.create(url, num_layers=L, hidden_size=D) as w:
        w.append(ids=["a", "b"], sequences=np.zeros((2, L, D), np.float32))
    assert (url / "scores/c/0").exists()
    assert np.isnan(tracestore.open(url).scores).all()
    # an older store: no generation, and no chunk of fill values
    meta = json.loads((url / "zarr.json").read_text())
    del meta["attributes"]["tracestore"]["generation"]
    (url / "zarr.json").write_text(json.dumps(meta))
    (url / "scores/c/0").unlink()
    s = tracestore.open(url)
    assert np.isnan(s.scores).all()
    assert verify_store(str(url))["num_traces"] == 2


def test_a_deleted_shard_is_damage_not_zeros(tmp_path: Path) -> None:
    # a review found: a deleted sequences shard of a store with a generation read as rows of zeros
    url = tmp_path / "s.zarr"
    write_store(url, 12)
    shards = sorted(p for p in (url / "sequences" / "c").rglob("*") if p.is_file())
    assert len(shards) >= 2
    shards[1].unlink()
    s = tracestore.open(url)
    with pytest.raises(CorruptStoreError, match=r"array 'sequences': shard .* is missing"):
        s.sequences[:]
    with pytest.raises(CorruptStoreError, match=r"array 'sequences': shard .* is missing"):
        _ = s[5].sequence
    loader = tracestore.TraceLoader(s, batch_size=4, shuffle=False)
    with pytest.raises(Exception, match=r"shard .* is missing"):
        list(loader)
    from tracestore.convert.verify import verify_store

    with pytest.raises(CorruptStoreError):
        verify_store(str(url))


def test_a_shard_that_is_a_directory_is_damage(tmp_path: Path) -> None:
    url = tmp_path / "s.zarr"
    write_store(url, 12)
    shard = sorted(p for p in (url / "sequences" / "c").rglob("*") if p.is_file())[0]
    shard.unlink()
    shard.mkdir()
    with pytest.raises(CorruptStoreError, match=r"cannot be read \(IsADirectoryError"):
        tracestore.open(url).sequences[:]


def test_a_commit_marker_that_disagrees_with_the_ids_and_an_edited_dtype_are_damage(tmp_path: Path) -> None:
    from tracestore.convert.verify import verify_store

    url = tmp_path / "s.zarr"
    write_store(url, 6)
    root = json.loads((url / "zarr.json").read_text())
    root["attributes"]["tracestore"]["num_traces"] = 10
    (url / "zarr.json").write_text(json.dumps(root))
    for check in (tracestore.open, lambda u: verify_store(str(u))):
        with pytest.raises(CorruptStoreError, match=r"the commit marker says 10 traces but there are 6 ids"):
            check(url)
    root["attributes"]["tracestore"]["num_traces"] = 6
    (url / "zarr.json").write_text(json.dumps(root))
    meta = json.loads((url / "sequences" / "zarr.json").read_text())
    meta["data_type"] = "int16"
    (url / "sequences" / "zarr.json").write_text(json.dumps(meta))
    for check in (tracestore.open, lambda u: verify_store(str(u))):
        with pytest.raises(CorruptStoreError, match=r"sequences is int16; the format stores it as float16"):
            check(url)
