"""The store against a real S3 API (moto in server mode on 127.0.0.1), and the fault behaviour through a
fault-injecting proxy: 503 SlowDown, reset connections, truncated bodies and stalls are retried; a persistent
failure ends in a clear error within the deadline; secrets are never printed."""

from __future__ import annotations

import numpy as np
import pytest

import tracestore
from tracestore.config import parse_size
from tracestore.errors import IncompleteStoreError, RemoteStoreError
from tracestore.store.remote import S3Location
from tracestore.testing import synthetic_graphs, synthetic_ids, synthetic_sequences, write_synthetic_store
from tracestore.testing.s3 import FaultProxy, moto_s3

L, D = 4, 32
SHARD = L * D * 2 * 8  # 8 traces per shard: several shards at small sizes


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as ep:
        yield ep


@pytest.fixture(scope="module")
def remote_and_local(s3, tmp_path_factory):
    local = write_synthetic_store(tmp_path_factory.mktemp("ref") / "ref.zarr", 37, L, D, graphs=True, shard_bytes=SHARD)
    url = s3.url("suite/store.zarr")
    write_synthetic_store(S3Location(url, s3.storage_options()), 37, L, D, graphs=True, shard_bytes=SHARD)
    return tracestore.open(url, storage_options=s3.storage_options()), local


def test_remote_store_reads_what_a_local_store_reads(remote_and_local):
    remote, local = remote_and_local
    assert len(remote) == len(local) == 37
    assert list(remote.ids) == list(local.ids)
    np.testing.assert_array_equal(remote.scores, local.scores)
    np.testing.assert_array_equal(remote.sequences[:], local.sequences[:])
    rows = np.array([36, 0, 17, 9, 9, 20])
    np.testing.assert_array_equal(remote.sequences[rows], local.sequences[rows])
    np.testing.assert_array_equal(remote.layer(2), local.layer(2))
    for i in (0, 13, 36):
        a, b = remote[i], local[i]
        assert a.id == b.id
        np.testing.assert_array_equal(a.sequence, b.sequence)
        np.testing.assert_array_equal(a.graph.x, b.graph.x)
        for layer in range(L):
            np.testing.assert_array_equal(a.graph.edge_index[layer], b.graph.edge_index[layer])
            np.testing.assert_array_equal(a.graph.edge_attr[layer], b.graph.edge_attr[layer])


def test_remote_select_and_pickle(remote_and_local):
    import pickle

    remote, local = remote_and_local
    ids = [local.ids[5], local.ids[30]]
    view = pickle.loads(pickle.dumps(remote.select(ids)))
    np.testing.assert_array_equal(view.sequences[:], local.select(ids).sequences[:])


def test_remote_verify_checks_every_chunk(remote_and_local):
    remote, _ = remote_and_local
    assert remote._seq.direct.verify_all() == 37


def test_unfinished_remote_store_is_invisible_and_resumes(s3):
    url = s3.url("suite/unfinished.zarr")
    so = s3.storage_options()
    w = tracestore.create(url, num_layers=L, hidden_size=D, shard_bytes=SHARD, storage_options=so)
    w.append(synthetic_ids(10), synthetic_sequences(10, L, D))
    w.checkpoint({"done": 1})
    w.append(synthetic_ids(5, 10), synthetic_sequences(5, L, D, start=10))
    w.abort()  # an interrupted upload
    with pytest.raises(IncompleteStoreError, match="resume"):
        tracestore.open(url, storage_options=so)
    w = tracestore.create(url, num_layers=L, hidden_size=D, shard_bytes=SHARD, resume=True, storage_options=so)
    assert w.resume_state == {"done": 1} and w.num_traces == 10
    w.append(synthetic_ids(5, 10), synthetic_sequences(5, L, D, start=10))
    w.close()
    s = tracestore.open(url, storage_options=so)
    np.testing.assert_array_equal(s.sequences[:], synthetic_sequences(15, L, D).astype(np.float16))


def test_credentials_from_the_standard_environment(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    url = s3.url("suite/env.zarr")
    write_synthetic_store(url, 5, L, D)
    s = tracestore.open(url)
    assert len(s) == 5
    assert "very-secret-value" not in repr(s.location) and "very-secret-value" not in repr(s)


@pytest.fixture()
def proxied(s3, remote_and_local):
    with FaultProxy(s3.endpoint) as proxy:
        yield proxy


def _open_through(proxy, s3, **opts):
    so = s3.storage_options(endpoint=proxy.endpoint, deadline=3, timeout=1, **opts)
    return tracestore.open(s3.url("suite/store.zarr"), storage_options=so)


@pytest.mark.parametrize("fault", ["slowdown", "reset", "truncate", "stall"])
def test_transient_faults_are_retried_and_data_is_right(fault, proxied, s3, remote_and_local):
    _, local = remote_and_local
    store = _open_through(proxied, s3)
    proxied.faults.stall_seconds = 1.5
    setattr(proxied.faults, fault, 2)
    np.testing.assert_array_equal(store.sequences[[3, 30]], local.sequences[[3, 30]])
    assert getattr(proxied.faults, fault) == 0  # both faults were injected, and recovered from


class _FakeClock:
    """Stands in for the retry layer's clock: sleeping advances it, nothing waits for real."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_persistent_failure_is_a_clear_error_at_the_deadline(proxied, s3, monkeypatch):
    import tracestore.store.remote as remote

    store = _open_through(proxied, s3)  # deadline=3 s
    store.sequences[[3]]  # the shard index is cached: what follows is the one ranged GET, failing
    clock = _FakeClock()
    monkeypatch.setattr(remote, "time", clock)
    proxied.faults.seen.clear()
    proxied.faults.always = "slowdown"
    with pytest.raises(RemoteStoreError) as err:
        store.sequences[[5]]
    msg = str(err.value)
    assert "s3://tracestore-test/suite/store.zarr/sequences/c/" in msg  # bucket and key
    assert "bytes " in msg and "SlowDown" in msg and "deadline" in msg
    assert "testing" not in msg.replace("tracestore-test", "")  # no credentials
    # backoff grows and stops at the deadline: every request but the last was followed by one sleep, and the
    # sleeps add up to the deadline exactly (the last one is cut to what was left)
    assert clock.now == pytest.approx(3.0)
    assert len(proxied.faults.seen) == len(clock.sleeps) + 1
    assert f"failed {len(proxied.faults.seen)} time(s) in 3.0 s" in msg
    assert len(clock.sleeps) >= 4  # backed off several times, not one long wait


def test_local_cache_serves_repeated_reads(proxied, s3, tmp_path, remote_and_local):
    _, local = remote_and_local
    store = _open_through(proxied, s3, cache_dir=str(tmp_path / "cache"), cache_limit="10MB")
    rows = [1, 2, 25]
    np.testing.assert_array_equal(store.sequences[rows], local.sequences[rows])
    n_first = len(proxied.faults.seen)
    np.testing.assert_array_equal(store.sequences[rows], local.sequences[rows])
    assert len(proxied.faults.seen) == n_first  # the second read went to no server
    assert store.location.cache.total_bytes > 0


def test_cache_evicts_least_recently_used(tmp_path):
    from tracestore.store.remote import RangeCache

    c = RangeCache(tmp_path, limit=250)
    for i in range(4):
        c.put("s3://b/k", i * 100, 100, bytes([i]) * 100)
    assert c.total_bytes <= 250
    assert c.get("s3://b/k", 0, 100) is None  # the oldest went first
    assert c.get("s3://b/k", 300, 100) == bytes([3]) * 100


def test_parse_size():
    assert parse_size("10GB") == 10**10
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size(123) == 123
    assert parse_size("512M") == 512 * 10**6 and parse_size("64KiB") == 64 * 2**10
    with pytest.raises(ValueError, match="cache_limit='lots' is not a size"):
        parse_size("lots", what="cache_limit")


def test_remote_graph_store_round_trip_with_pyg(remote_and_local):
    remote, _ = remote_and_local
    g = synthetic_graphs(1, L, D, start=4)[0]
    d = remote[4].graph.to_pyg(1)
    np.testing.assert_array_equal(d.edge_index.numpy(), g.edge_index[1])


def test_trace_loader_refuses_forked_workers_on_an_object_store(s3, remote_and_local):
    with pytest.raises(ValueError, match="worker_mode='thread'"):
        tracestore.TraceLoader(remote_and_local[0], batch_size=8, device="cpu", num_workers=2, worker_mode="process")


@pytest.mark.parametrize("num_workers,mode", [(0, None), (2, None)])
def test_trace_loader_streams_a_remote_store(s3, remote_and_local, num_workers, mode):
    # mode=None: reader threads, the default for object stores
    remote, local = remote_and_local
    loader = tracestore.TraceLoader(s3.url("suite/store.zarr"), batch_size=8, shuffle=True, seed=3, device="cpu",
                                    num_workers=num_workers, worker_mode=mode, timeout=60,
                                    storage_options=s3.storage_options())
    seen = []
    for batch in loader:
        rows = [int(np.flatnonzero(local.ids == i)[0]) for i in batch.ids]
        np.testing.assert_array_equal(batch.sequences.numpy(), local.sequences[rows].astype(np.float32))
        seen.extend(batch.ids)
    assert sorted(seen) == sorted(local.ids.tolist())


def test_open_takes_cache_dir_and_limit(s3, remote_and_local, tmp_path):
    _, local = remote_and_local
    store = tracestore.open(s3.url("suite/store.zarr"), storage_options=s3.storage_options(),
                            cache_dir=tmp_path / "c", cache_limit="1MB")
    np.testing.assert_array_equal(store.sequences[[0, 5]], local.sequences[[0, 5]])
    assert 0 < store.location.cache.total_bytes <= 10**6
    with pytest.raises(ValueError, match="apply to object stores"):
        tracestore.open(local.url, cache_dir=tmp_path / "c")


def test_remote_store_replaced_under_a_reader_raises_stale(s3):
    """Issue 11 item 5 on an object store: the generation is checked when a shard's index is fetched."""
    import json

    from tracestore.errors import StaleStoreError

    loc = S3Location(s3.url("stale/store.zarr"), s3.storage_options())
    write_synthetic_store(loc, 20, L, D, shard_bytes=SHARD)
    meta = json.loads(loc.read_bytes("zarr.json"))
    meta["attributes"]["tracestore"]["generation"] = "a" * 32
    loc.write_bytes("zarr.json", json.dumps(meta).encode())
    store = tracestore.open(loc.url, storage_options=s3.storage_options())
    first = store.sequences[0]  # shard 0's index fetched
    meta["attributes"]["tracestore"]["generation"] = "b" * 32  # another store committed in its place
    loc.write_bytes("zarr.json", json.dumps(meta).encode())
    np.testing.assert_array_equal(store.sequences[1], synthetic_sequences(20, L, D)[1].astype(np.float16))
    assert first.shape == (L, D)
    with pytest.raises(StaleStoreError, match=r"generation a{32} when opened, b{32} now"):
        store.sequences[19]  # shard 2: its index is fetched now


@pytest.mark.parametrize("cached", [False, True])
def test_remote_reader_of_a_store_overwritten_in_place_raises_stale(s3, tmp_path, cached):
    """A review found: the S3 swap copies the new store's objects over the old keys, and a reader whose shard
    indexes were already fetched read the new bytes at the old offsets (the new rows under the old ids). Range
    reads are conditional on the ETag seen with the index (and the disk cache is keyed by it)."""
    from tracestore.errors import StaleStoreError

    url, so = s3.url(f"inplace{int(cached)}/store.zarr"), s3.storage_options()
    write_synthetic_store(S3Location(url, so), 20, L, D, shard_bytes=SHARD)
    opts = dict(so, cache_dir=str(tmp_path / "cache")) if cached else so
    store = tracestore.open(url, storage_options=opts)
    want = synthetic_sequences(20, L, D).astype(np.float16)
    np.testing.assert_array_equal(store.sequences[:], want)  # every shard index fetched, ranges cached
    w = tracestore.create(url, num_layers=L, hidden_size=D, overwrite=True, storage_options=so,
                          shard_bytes=SHARD)
    w.append(ids=[f"other{i}" for i in range(20)], sequences=want[::-1].copy())
    w.close()  # the S3 swap: the same keys, other bytes
    for read, rows in ((lambda: store.sequences[:], slice(None)), (lambda: store.sequences[[3, 17]], [3, 17]),
                       (lambda: store[5].sequence, 5)):
        if not cached:
            with pytest.raises(StaleStoreError, match=r"changed since its shard index was read .* reopen"):
                read()
        else:  # ranges cached under the old ETag are the old store's: consistent with the old index
            np.testing.assert_array_equal(read(), want[rows])
    # a new reader, with the same disk cache: the new store's bytes, not the old ones cached for the same ranges
    np.testing.assert_array_equal(tracestore.open(url, storage_options=opts).sequences[:], want[::-1])
