"""Issue 12: an epoch of TraceLoader off an object store fetches every byte once -- each shuffle chunk in one
ranged GET, held in a bounded window while its traces are served -- counted through the recording proxy (no
timings asserted). The plan (order, ranks x workers, resume) is the sampler's, unchanged."""

from __future__ import annotations

import re

import numpy as np
import pytest

import tracestore
from tracestore.errors import CorruptStoreError
from tracestore.loader import sampler
from tracestore.store.remote import S3Location
from tracestore.testing import write_synthetic_store
from tracestore.testing.s3 import FaultProxy, moto_s3

N, L, D = 96, 8, 128
ROW = L * D * 2  # 2 KiB a trace: obstore's 1 MiB coalescing gap would merge a whole shard
SHARD = ROW * 32  # 32 traces per shard, 3 shards
CHUNK, WINDOW, BATCH = 8, 2, 8  # 12 chunks of 8 traces, windows of 2 chunks


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as ep:
        yield ep


@pytest.fixture(scope="module")
def stores(s3, tmp_path_factory):
    local = write_synthetic_store(tmp_path_factory.mktemp("ref") / "ref.zarr", N, L, D, shard_bytes=SHARD)
    url = s3.url("epoch/store.zarr")
    write_synthetic_store(S3Location(url, s3.storage_options()), N, L, D, shard_bytes=SHARD)
    return url, local


@pytest.fixture()
def proxy(s3, stores):
    with FaultProxy(s3.endpoint) as p:
        yield p


def _loader(s3, url, endpoint=None, **kw):
    so = s3.storage_options(**({"endpoint": endpoint} if endpoint else {}), **kw.pop("so", {}))
    kw.setdefault("batch_size", BATCH)
    return tracestore.TraceLoader(url, shuffle=True, seed=5, device="cpu", chunk_rows=CHUNK, shuffle_window=WINDOW,
                                  storage_options=so, timeout=60, **kw)


def _range_bytes(seen, contains):
    """Bytes asked for by the GETs of paths containing `contains`, from their Range headers."""
    total = 0
    for line in seen:
        method, path, *rng = line.split(" ", 2)
        if method != "GET" or contains not in path:
            continue
        m = re.match(r"bytes=(\d*)-(\d*)", rng[0] if rng else "")
        assert m, f"a GET without a range: {line}"
        a, b = m.groups()
        total += int(b) if a == "" else int(b) - int(a) + 1
    return total


def test_one_epoch_fetches_every_byte_once(s3, stores, proxy):
    url, local = stores
    loader = _loader(s3, url, proxy.endpoint)
    proxy.faults.seen.clear()
    proxy.faults.sent.clear()
    seen = [i for b in loader for i in b.ids]
    assert sorted(seen) == sorted(local.ids.tolist())
    fetched = _range_bytes(proxy.faults.seen, "/sequences/c/")
    assert fetched / (N * ROW) <= 1.05, f"{fetched} bytes fetched for {N * ROW} bytes of traces"
    # one GET per shuffle chunk, plus one suffix GET per shard index (nothing was cached before the epoch)
    gets = [s for s in proxy.faults.seen if s.startswith("GET") and "/sequences/c/" in s]
    assert len(gets) == N // CHUNK + N * ROW // SHARD
    # the proxy's own count of what it sent agrees with the Range headers
    assert proxy.faults.bytes_sent("GET", "/sequences/c/") == fetched
    # a second epoch: the chunks again, once each; the indexes are kept
    proxy.faults.seen.clear()
    proxy.faults.sent.clear()
    assert len(list(loader)) == N // BATCH
    assert _range_bytes(proxy.faults.seen, "/sequences/c/") == N * (ROW + 4)
    assert proxy.faults.requests("GET", "/sequences/c/") == N // CHUNK


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_trace_once_across_ranks_and_workers(s3, stores, world, workers):
    url, local = stores
    ids = local.ids.tolist()
    got = []
    for rank in range(world):
        loader = _loader(s3, url, num_workers=workers, rank=rank, world_size=world)
        plan = sampler.plan_epoch(N, batch_size=BATCH, seed=5, rank=rank, world_size=world, chunk_rows=CHUNK,
                                  rows_per_shard=32, window=WINDOW)
        it = iter(loader)
        window = it.window
        batches = list(it)
        assert [b.positions.tolist() for b in batches] == [p.tolist() for p in plan]  # the sampler's plan
        # each chunk once; a padding repeat (world 5: 96 % 5 != 0) fetches its chunk again instead of holding it
        assert window.fetched <= N // CHUNK + (-N) % world
        for b in batches:
            rows = [ids.index(i) for i in b.ids]
            np.testing.assert_array_equal(b.sequences.numpy(), local.sequences[rows].astype(np.float32))
            got.extend(b.ids)
    assert sorted(set(got)) == sorted(ids)  # every trace
    assert len(got) == N + (-N) % world  # once, plus the padding repeats of the multi-rank rule


def test_resume_on_another_geometry_continues_with_the_rest(s3, stores):
    url, local = stores
    first = _loader(s3, url)
    it = iter(first)
    seen = [i for _ in range(5) for i in next(it).ids]
    state = first.state_dict()
    del it
    rest = []
    for rank in range(2):
        ld = _loader(s3, url, num_workers=2, rank=rank, world_size=2, batch_size=4)
        ld.load_state_dict(state)
        for b in ld:
            rows = [int(np.flatnonzero(local.ids == i)[0]) for i in b.ids]
            np.testing.assert_array_equal(b.sequences.numpy(), local.sequences[rows].astype(np.float32))
            rest.extend(b.ids)
    assert sorted(seen + rest) == sorted(local.ids.tolist())


def test_window_holds_at_most_two_windows_and_fetches_each_chunk_once(s3, stores, monkeypatch):
    url, _ = stores
    loader = _loader(s3, url)
    it = iter(loader)
    win = it.window
    assert win is not None and win.max_chunks == 2 * WINDOW
    assert len(list(it)) == N // BATCH
    assert win.fetched == N // CHUNK
    assert win.peak <= 2 * WINDOW
    # no read-ahead of the next window: half the memory, still every chunk once
    monkeypatch.setattr(tracestore.config, "REMOTE_PREFETCH_WINDOWS", 0)
    it = iter(_loader(s3, url))
    win = it.window
    assert len(list(it)) == N // BATCH
    assert win.fetched == N // CHUNK and win.peak <= WINDOW + 1


def test_disk_cache_keeps_whole_chunks(s3, stores, proxy, tmp_path):
    url, _ = stores
    loader = _loader(s3, url, proxy.endpoint, so={"cache_dir": str(tmp_path / "c")})
    list(loader)
    spans = [p for p in (tmp_path / "c").rglob("*.bin") if p.stat().st_size == CHUNK * (ROW + 4)]
    assert len(spans) == N // CHUNK  # one entry per chunk, not per trace or per coalesced range
    proxy.faults.seen.clear()
    list(loader)  # the next epoch reads the chunks from disk
    assert _range_bytes(proxy.faults.seen, "/sequences/c/") == 0


def test_a_damaged_chunk_is_fetched_again_then_refused(s3, stores, proxy):
    url, local = stores
    loader = _loader(s3, url, proxy.endpoint, so={"deadline": 3})
    next(iter(loader))  # the shard indexes are cached: what follows are chunk GETs
    proxy.faults.flip = 1
    ids = [i for b in loader for i in b.ids]
    assert proxy.faults.flip == 0 and sorted(ids) == sorted(local.ids.tolist())
    proxy.faults.always = "flip"
    with pytest.raises(CorruptStoreError, match=r"array 'sequences' chunk \d+ of sequences/c/\d/0/0 .*crc32c check "
                                                r"twice.*rebuild"):
        list(loader)


def test_local_stores_keep_the_mapped_path(stores):
    _, local = stores
    it = iter(tracestore.TraceLoader(local, batch_size=BATCH, device="cpu", chunk_rows=CHUNK))
    assert it.window is None
    assert len(list(it)) == N // BATCH


def test_proxy_delays_the_first_byte_and_caps_bandwidth(s3, stores, proxy, monkeypatch):
    import tracestore.testing.s3 as s3mod

    class Clock:
        def __init__(self):
            self.now, self.sleeps = 0.0, []

        def monotonic(self):
            return self.now

        def sleep(self, s):
            self.sleeps.append(s)
            self.now += s

    clock = Clock()
    monkeypatch.setattr(s3mod, "time", clock)
    proxy.faults.latency, proxy.faults.bandwidth = 0.03, 1e6
    loc = S3Location(stores[0], s3.storage_options(endpoint=proxy.endpoint))
    data = loc.read_range("sequences/c/0/0/0", 0, 60_000)
    assert len(data) == 60_000
    assert clock.sleeps[0] == pytest.approx(0.03)
    assert clock.now == pytest.approx(0.03 + 0.06)  # first byte after 30 ms, then 60 kB at 1 MB/s


def _values_wrong(loader, local) -> int:
    index = {i: k for k, i in enumerate(local.ids.tolist())}
    bad = 0
    for b in loader:
        ref = local.sequences[[index[i] for i in b.ids]].astype(np.float32)
        bad += int((b.sequences.numpy() != ref).any(axis=(1, 2)).sum())
    return bad


@pytest.mark.parametrize("cached", [False, True])
def test_a_chunk_damaged_on_the_wire_is_served_repaired_and_not_cached_damaged(s3, stores, proxy, tmp_path, cached):
    # a review found: the repaired chunk was fetched again, then the damaged bytes served anyway (and cached)
    url, local = stores
    so = {"cache_dir": str(tmp_path / "cache")} if cached else {}
    loader = _loader(s3, url, proxy.endpoint, so=so)
    d = loader.store._seq.direct
    for shard in range(N // 32):
        d.index(shard)  # the indexes first: the flip lands in a chunk GET
    proxy.faults.flip = 1
    assert _values_wrong(loader, local) == 0 and proxy.faults.flip == 0
    loader.set_epoch(1)
    assert _values_wrong(loader, local) == 0  # from the disk cache where there is one: repaired there too


def test_a_flipped_index_or_chunk_with_a_disk_cache_is_fetched_again_past_the_cache(s3, stores, proxy, tmp_path):
    # a review found: a damaged answer written to the disk cache made the second try read it back, and the
    # store was called corrupt ("rebuild the store") until the cache was deleted by hand
    url, local = stores
    so = s3.storage_options(endpoint=proxy.endpoint, cache_dir=str(tmp_path / "cache"))
    st = tracestore.open(url, storage_options=so)
    proxy.faults.flip = 1  # the next GET: shard 0's index
    np.testing.assert_array_equal(st.sequences[3], local.sequences[3])
    proxy.faults.flip = 1  # shard 0's index is held: now a chunk of a random read
    np.testing.assert_array_equal(st.sequences[5], local.sequences[5])
    assert proxy.faults.flip == 0
    fresh = tracestore.open(url, storage_options=s3.storage_options(cache_dir=str(tmp_path / "cache")))
    np.testing.assert_array_equal(fresh.sequences[:], local.sequences[:])  # the cache holds good bytes only


@pytest.mark.parametrize("env, match", [("TRACESTORE_REMOTE_PREFETCH_WINDOWS=one", "not a whole number"),
                                        ("TRACESTORE_REMOTE_FETCH_CONCURRENCY=one", "not a whole number"),
                                        ("TRACESTORE_REMOTE_FETCH_CONCURRENCY=0", "must be at least 1")])
def test_bad_remote_counts_in_the_environment_are_one_clear_error(env, match):
    import os
    import subprocess
    import sys

    name, value = env.split("=")
    r = subprocess.run([sys.executable, "-c", "import tracestore.config"], capture_output=True, text=True,
                       env={**os.environ, name: value}, timeout=60)
    assert r.returncode != 0 and f"environment variable {name}={value!r}: {match}" in r.stderr
