"""Issue 11, the writer's side: an overwrite builds the new store beside the old one and swaps it in at commit
(a failed or killed overwrite leaves the old store as it was), --overwrite starts over, one writer at a time
per destination (a lock), a rerun of a finished conversion is up to date, the generation id, and one rule for
a destination that tracestore did not write."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest

import tracestore
from tracestore.errors import (
    IncompleteStoreError,
    StoreLockedError,
)
from tracestore.format import schema
from tracestore.testing import synthetic_ids, synthetic_sequences
from tracestore.testing.archives import make_records, write_pickle

L, D = 3, 16


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def siblings(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(dest.name + ".tracestore-"))


def archives(d: Path, n: int = 3, nan_in_last: bool = False) -> Path:
    for i in range(n):
        recs = make_records(3, L, D, start=3 * i)
        if nan_in_last and i == n - 1:
            recs[1]["hidden_states"][0, 0] = np.nan
        write_pickle(d / f"t{i}.pkl.gz", recs)
    return d


def write_store(url: Path | str, n: int, start: int = 0, **kw) -> None:
    with tracestore.create(url, num_layers=L, hidden_size=D, **kw) as w:
        w.append(synthetic_ids(n, start), synthetic_sequences(n, L, D, start=start))


# -- item 1: a failed --overwrite leaves the old store untouched ------------------------------------------------
def test_aborted_writer_overwrite_leaves_the_old_store_readable(tmp_path):
    url = tmp_path / "s.zarr"
    write_store(url, 5)
    w = tracestore.create(url, num_layers=L, hidden_size=D, overwrite=True)
    w.append(synthetic_ids(3, 100), synthetic_sequences(3, L, D))
    assert len(tracestore.open(url)) == 5  # building beside: the old store is readable meanwhile
    w.abort()
    assert tracestore.open(url).ids.tolist() == synthetic_ids(5)
    with tracestore.create(url, num_layers=L, hidden_size=D, overwrite=True) as w:
        w.append(synthetic_ids(2, 100), synthetic_sequences(2, L, D))
    assert tracestore.open(url).ids.tolist() == synthetic_ids(2, 100) and siblings(url) == []


# -- item 2: --overwrite starts over -------------------------------------------------------------------------
def test_writer_overwrite_starts_over_even_with_resume(tmp_path):
    url = tmp_path / "s.zarr"
    w = tracestore.create(url, num_layers=L, hidden_size=D)
    w.append(synthetic_ids(4), synthetic_sequences(4, L, D))
    w.checkpoint({"done": 1})
    w.abort()
    w = tracestore.create(url, num_layers=L, hidden_size=D, overwrite=True, resume=True)
    assert w.num_traces == 0 and w.resume_state is None
    with pytest.raises(IncompleteStoreError):  # the unfinished store is left as it was until the commit
        tracestore.open(url)
    w.append(synthetic_ids(2, 50), synthetic_sequences(2, L, D))
    w.close()
    assert tracestore.open(url).ids.tolist() == synthetic_ids(2, 50)


# -- item 3: one writer at a time --------------------------------------------------------------------------
def test_a_second_writer_on_one_destination_fails_at_once_naming_the_holder(tmp_path):
    url = tmp_path / "s.zarr"
    w = tracestore.create(url, num_layers=L, hidden_size=D)
    t = time.monotonic()
    with pytest.raises(StoreLockedError, match=rf"pid {os.getpid()} on host '{re.escape(socket.gethostname())}'"):
        tracestore.create(url, num_layers=L, hidden_size=D, overwrite=True)
    assert time.monotonic() - t < 5
    w.append(synthetic_ids(2), synthetic_sequences(2, L, D))
    w.close()  # the lock goes with the commit
    assert not (tmp_path / "s.zarr.tracestore-lock").exists()
    write_store(url, 3, overwrite=True)
    assert len(tracestore.open(url)) == 3


def test_a_lock_from_another_host_is_refused_naming_it(tmp_path):
    lock = tmp_path / "s.zarr.tracestore-lock"
    lock.mkdir()
    (lock / "lock.json").write_text(json.dumps({"pid": 1, "host": "elsewhere-7", "started": "2026-01-01T00:00:00"}))
    with pytest.raises(StoreLockedError, match=r"pid 1 on host 'elsewhere-7'.*delete .*lock\.json"):
        tracestore.create(tmp_path / "s.zarr", num_layers=L, hidden_size=D)


def test_two_writers_on_one_s3_destination(tmp_path):
    from tracestore.testing.s3 import moto_s3

    with moto_s3() as s3:
        url, so = s3.url("locks/s.zarr"), s3.storage_options()
        w = tracestore.create(url, num_layers=L, hidden_size=D, storage_options=so)
        with pytest.raises(StoreLockedError, match=rf"pid {os.getpid()}"):
            tracestore.create(url, num_layers=L, hidden_size=D, storage_options=so)
        w.append(synthetic_ids(2), synthetic_sequences(2, L, D))
        w.close()
        # an overwrite that fails leaves the old store readable; one that succeeds replaces it
        w = tracestore.create(url, num_layers=L, hidden_size=D, overwrite=True, storage_options=so)
        w.append(synthetic_ids(3, 10), synthetic_sequences(3, L, D))
        w.abort()
        assert tracestore.open(url, storage_options=so).ids.tolist() == synthetic_ids(2)
        write_store(url, 4, 20, overwrite=True, storage_options=so)
        s = tracestore.open(url, storage_options=so)
        assert s.ids.tolist() == synthetic_ids(4, 20)
        np.testing.assert_array_equal(s.sequences[:], synthetic_sequences(4, L, D, start=20).astype(np.float16))
        loc = tracestore.store.urls.resolve(url, so)
        assert list(loc.sibling(".tracestore-new").list()) == [] == list(loc.sibling(".tracestore-lock").list())


# -- item 5 (writer half): the generation id --------------------------------------------------------------
def test_a_fresh_generation_is_written_with_the_commit_marker(tmp_path):
    url = tmp_path / "s.zarr"
    w = tracestore.create(url, num_layers=L, hidden_size=D)
    w.append(synthetic_ids(2), synthetic_sequences(2, L, D))
    w.checkpoint()
    assert schema.ATTR_GENERATION not in json.loads((url / "zarr.json").read_text())["attributes"]["tracestore"]
    w.close()
    a = json.loads((url / "zarr.json").read_text())["attributes"]["tracestore"]
    assert a["committed"] is True and re.fullmatch(r"[0-9a-f]{32}", a[schema.ATTR_GENERATION])
    write_store(url, 2, overwrite=True)
    b = tracestore.open(url).attrs
    assert re.fullmatch(r"[0-9a-f]{32}", b[schema.ATTR_GENERATION]) and b[schema.ATTR_GENERATION] != a["generation"]
