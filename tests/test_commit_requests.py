"""Issue 22, item 6: what a commit costs on S3 grows with the number of parts, not with their objects. A commit
of 100 parts through the recording proxy: one LIST of parts/ (and none below it), a fixed handful of GETs per
part (its zarr.json and staging state to find it, its metadata and ids to check it) and one PUT (the manifest)."""

from __future__ import annotations

import collections
import re
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

import tracestore
from tracestore.store.remote import S3Location
from tracestore.store.writer import create
from tracestore.testing.s3 import FaultProxy, moto_s3
from tracestore.testing.synthetic import synthetic_ids, synthetic_sequences

PARTS, L, D = 100, 2, 8


@pytest.fixture(scope="module")
def s3():
    with moto_s3(process=True) as ep:
        yield ep


def _write_parts(s3, url: str) -> None:
    def one(k: int) -> None:
        loc = S3Location(f"{url}/parts/{k:05d}", s3.storage_options())
        with create(loc, num_layers=L, hidden_size=D) as w:
            w.append(synthetic_ids(2, 2 * k), synthetic_sequences(2, L, D, start=2 * k), np.array([0.1, 0.9]))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(PARTS)))


def test_a_commit_of_100_parts_lists_only_parts_and_reads_a_few_objects_per_part(s3) -> None:
    url = s3.url("many/store.zarr")
    _write_parts(s3, url)
    with FaultProxy(s3.endpoint) as proxy:
        res = tracestore.commit_parts(url, storage_options=s3.storage_options(endpoint=proxy.endpoint))
        sent = list(proxy.faults.sent)
    assert res.parts == list(range(PARTS)) and res.num_traces == 2 * PARTS
    counts = collections.Counter(m for m, _p, _n in sent)
    lists = [parse_qs(urlsplit(p).query) for m, p, _n in sent if m == "GET" and "list-type" in p]
    prefixes = [q.get("prefix", [""])[0] for q in lists]
    gets = counts["GET"] - len(lists)
    print(f"commit of {PARTS} parts: {dict(counts)}; LISTs {len(lists)} (prefixes {sorted(set(prefixes))}); "
          f"{gets / PARTS:.1f} GETs per part")
    # no LIST below parts/, and the store's own prefixes listed one level deep (a delimiter): the parts'
    # shard objects are never listed
    assert not [p for p in prefixes if re.search(r"parts/\d{5}/", p)], prefixes
    assert all("delimiter" in q for q, p in zip(lists, prefixes, strict=True) if p.startswith("many/store.zarr/")), lists
    assert len(lists) <= 4, prefixes  # constant: the store's top, parts/, and the overwrite sibling's
    assert gets <= 14 * PARTS, counts
    # one PUT of the manifest; the others are the lock's (create, a renewal every LOCK_RENEW_SECONDS and at
    # the fence, release)
    puts = [p for m, p, _n in sent if m == "PUT"]
    assert sum(1 for p in puts if urlsplit(p).path.endswith("/many/store.zarr/zarr.json")) == 1, puts
    assert all(".tracestore-lock/" in p for p in puts if not urlsplit(p).path.endswith("/many/store.zarr/zarr.json")), puts
    assert tracestore.open(url, storage_options=s3.storage_options()).ids.tolist() == [
        i for k in range(PARTS) for i in synthetic_ids(2, 2 * k)]
