"""TraceLoader: exactly-once epochs, values, layers, ranks, resume, buffer reuse, failures, fork safety.

Every test runs on the CPU; tests taking `device` also run on cuda:0 when a GPU is present (PyG's withCUDA)."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import tracestore
from tracestore.errors import CorruptStoreError, LoaderError, TracestoreError
from tracestore.loader.pinned import BufferRing

DEVICES = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])


def _expected(store: tracestore.TraceStore) -> np.ndarray:
    return np.stack([store[i].sequence for i in range(len(store))]).astype(np.float32)


def _epoch(loader: tracestore.TraceLoader) -> list[tracestore.Batch]:
    return [tracestore.Batch(b.sequences.cpu().clone(), b.scores.cpu(), b.ids, b.graph, b.positions) for b in loader]


def _positions(batches: list[Any]) -> list[int]:
    return [int(p) for b in batches for p in b.positions]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_workers, mode", [(0, None), (2, "thread"), (2, "process")])
@pytest.mark.parametrize("shuffle", [True, False])
def test_one_epoch_delivers_every_trace_once_with_its_values(make_store: Callable[..., Any], device: str,
                                                            num_workers: int, mode: str | None,
                                                            shuffle: bool) -> None:
    if device != "cpu" and mode == "process":
        pytest.skip("process workers are CPU-only")
    store = make_store(23)
    exp = _expected(store)
    loader = tracestore.TraceLoader(store, 4, shuffle=shuffle, seed=3, device=device, num_workers=num_workers,
                                    worker_mode=mode)
    batches = _epoch(loader)
    assert len(batches) == len(loader) == 6
    assert sorted(_positions(batches)) == list(range(23))
    if not shuffle:
        assert _positions(batches) == list(range(23))
    for b in batches:
        assert b.sequences.dtype == torch.float32 and b.scores.dtype == torch.float32
        assert np.array_equal(b.sequences.numpy(), exp[b.positions])  # float16 -> float32 is exact
        assert np.array_equal(b.scores.numpy(), store.scores[b.positions])
        assert b.ids == [store.ids[p] for p in b.positions]


def test_device_of_batches(make_store: Callable[..., Any]) -> None:
    store = make_store(5)
    b = next(iter(tracestore.TraceLoader(store, 2, device="cpu")))
    assert b.sequences.device.type == "cpu" and b.scores.device.type == "cpu"
    default = tracestore.TraceLoader(store, 2)
    assert default.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_same_order_for_any_worker_count_and_seeded(make_store: Callable[..., Any]) -> None:
    store = make_store(30)
    runs = [_positions(_epoch(tracestore.TraceLoader(store, 4, seed=5, num_workers=w, prefetch=p, worker_mode=m)))
            for w, p, m in [(0, None, None), (1, None, "thread"), (3, 1, "thread"), (2, 5, "process"),
                            (3, 0, "process")]]
    assert all(r == runs[0] for r in runs)
    assert runs[0] != _positions(_epoch(tracestore.TraceLoader(store, 4, seed=6)))


def test_epochs_advance_and_set_epoch(make_store: Callable[..., Any]) -> None:
    store = make_store(40)
    loader = tracestore.TraceLoader(store, 8, seed=1)
    e0 = _positions(_epoch(loader))
    assert loader.epoch == 1
    e1 = _positions(_epoch(loader))
    assert e0 != e1 and sorted(e0) == sorted(e1)
    loader.set_epoch(0)
    assert _positions(_epoch(loader)) == e0
    other = tracestore.TraceLoader(store, 8, seed=1)
    other.set_epoch(1)
    assert _positions(_epoch(other)) == e1


def test_shuffle_mixes_across_shards(make_store: Callable[..., Any]) -> None:
    store = make_store(64)  # 4 traces per shard: 16 shards
    b = next(iter(tracestore.TraceLoader(store, 16, seed=0)))
    assert len({int(p) // 4 for p in b.positions}) > 3


@pytest.mark.parametrize("layers", [[2, 0], [1], slice(1, 3), [-1, 0, 1]])
def test_layers_reads_only_those_layers(make_store: Callable[..., Any], layers: Any) -> None:
    store = make_store(9)
    exp = _expected(store)
    want = np.arange(3)[layers] if isinstance(layers, slice) else np.asarray(layers) % 3
    for workers in (0, 2):
        for b in _epoch(tracestore.TraceLoader(store, 4, layers=layers, num_workers=workers)):
            assert b.sequences.shape[1:] == (len(want), 8)
            assert np.array_equal(b.sequences.numpy(), exp[b.positions][:, want])


def test_bad_layers_name_the_range(make_store: Callable[..., Any]) -> None:
    with pytest.raises(IndexError, match=r"layer 3 is out of range for a store of 3 layers"):
        tracestore.TraceLoader(make_store(3), 2, layers=[0, 3])


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_split_the_epoch_evenly(make_store: Callable[..., Any], drop_last: bool) -> None:
    store = make_store(23)
    world = 3
    per_rank = [_epoch(tracestore.TraceLoader(store, 4, rank=r, world_size=world, drop_last=drop_last, seed=2))
                for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1  # DDP needs the same number of batches on every rank
    assert all(len(per_rank[0][k]) == len(p[k]) for p in per_rank for k in range(len(p)))
    seen = np.bincount([i for p in per_rank for i in _positions(p)], minlength=23)
    if drop_last:
        assert seen.max() <= 1 and seen.sum() == 3 * 4 * (23 // 3 // 4)
    else:
        assert seen.min() == 1 and seen.sum() == 24  # one padding repeat: 23 -> 24 = 3 x 8


def test_distributed_defaults_and_argument_errors(make_store: Callable[..., Any]) -> None:
    store = make_store(4)
    loader = tracestore.TraceLoader(store, 2)
    assert (loader.rank, loader.world_size) == (0, 1)  # no process group
    with pytest.raises(ValueError, match="give both, or neither"):
        tracestore.TraceLoader(store, 2, rank=1)
    with pytest.raises(ValueError, match="rank=2 is out of range for world_size=2"):
        tracestore.TraceLoader(store, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size=0"):
        tracestore.TraceLoader(store, 0)
    with pytest.raises(ValueError, match="has no graphs"):
        tracestore.TraceLoader(store, 2, with_graphs=True)
    with pytest.raises(ValueError, match="without with_graphs=True"):
        tracestore.TraceLoader(store, 2, graph_layer=0)
    with pytest.raises(ValueError, match="worker_mode='fiber'; pass 'process' or 'thread'"):
        tracestore.TraceLoader(store, 2, worker_mode="fiber")
    if not torch.cuda.is_available():
        with pytest.raises(TracestoreError, match="sees no CUDA device; pass device='cpu'"):
            tracestore.TraceLoader(store, 2, device="cuda")


def test_open_from_url_and_selection(make_store: Callable[..., Any]) -> None:
    store = make_store(12)
    by_url = tracestore.TraceLoader(store.url, 5, shuffle=False)
    assert [i for b in by_url for i in b.ids] == list(store.ids)
    view = store.select(["q000007", "q000002", "q000011", "q000003"])
    exp = _expected(view)
    got = _epoch(tracestore.TraceLoader(view, 3, seed=0))
    assert sorted(i for b in got for i in b.ids) == sorted(view.ids)
    for b in got:
        assert np.array_equal(b.sequences.numpy(), exp[b.positions])


def test_verified_reads_take_the_checked_path(make_store: Callable[..., Any]) -> None:
    store = make_store(10)
    checked = tracestore.open(store.url, verify=True)  # every chunk's crc is checked: no raw shard views
    assert checked._seq.direct.shard_rows_view(0) is None
    exp = _expected(store)
    for workers in (0, 2):
        for b in _epoch(tracestore.TraceLoader(checked, 3, num_workers=workers, layers=[2, 1])):
            assert np.array_equal(b.sequences.numpy(), exp[b.positions][:, [2, 1]])


def test_cpu_buffers_are_reused_and_held_batches_stay_valid(make_store: Callable[..., Any]) -> None:
    store = make_store(20)
    exp = _expected(store)
    for workers in (0, 2):
        it = iter(tracestore.TraceLoader(store, 4, device="cpu", num_workers=workers))
        held = [next(it), next(it)]
        ptrs = {held[0].sequences.data_ptr(), held[1].sequences.data_ptr()}
        ptrs |= {next(it).sequences.data_ptr() for _ in range(3)}
        assert len(ptrs) <= it.ring.__len__() + len(held)  # no fresh buffer per batch, only for the held ones
        # held batches are never overwritten (test_harden_loader.py has views, slices and arrays too)
        assert all(np.array_equal(h.sequences.numpy(), exp[h.positions]) for h in held)


@pytest.mark.parametrize("workers_after", [0, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_resume_mid_epoch_with_other_worker_count(make_store: Callable[..., Any], workers_after: int,
                                                  device: str) -> None:
    store = make_store(27)
    full = _positions(_epoch(tracestore.TraceLoader(store, 4, seed=8, device=device)))
    first = tracestore.TraceLoader(store, 4, seed=8, num_workers=2, device=device)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    assert state["consumed"] == 12 and state["epoch"] == 0
    state = pickle.loads(pickle.dumps(state))
    second = tracestore.TraceLoader(store, 4, seed=8, num_workers=workers_after, device=device)
    second.load_state_dict(state)
    second.set_epoch(0)  # what a trainer's epoch loop does after resuming: keeps the position
    rest = _positions(_epoch(second))
    assert _positions(head) + rest == full  # none repeated, none skipped, same order
    assert second.epoch == 1 and second.state_dict()["consumed"] == 0


@pytest.mark.parametrize("world_before, world_after", [(2, 3), (3, 1), (1, 2)])
def test_resume_on_a_different_number_of_ranks(make_store: Callable[..., Any], world_before: int,
                                               world_after: int) -> None:
    n, bs = 37, 3
    store = make_store(n)
    states, head = [], []
    for r in range(world_before):
        ld = tracestore.TraceLoader(store, bs, seed=4, rank=r, world_size=world_before)
        it = iter(ld)
        head += _positions([next(it) for _ in range(2)])
        states.append(ld.state_dict())
    assert all(s == states[0] for s in states)  # ranks in lockstep agree on the state
    rest = []
    for r in range(world_after):
        ld = tracestore.TraceLoader(store, bs + 1, seed=4, rank=r, world_size=world_after, num_workers=r)
        ld.load_state_dict(states[0])
        rest += _positions(_epoch(ld))
    counts = np.bincount(head + rest, minlength=n)
    consumed = states[0]["consumed"]
    pad = (-(n - consumed)) % world_after
    assert counts.min() == 1, "a trace was skipped"
    assert int(counts.sum()) == n + pad  # repeats only from the documented padding rule
    # the padding repeats are traces of the resumed part of the epoch (each short rank repeats its own first
    # trace in chunk order), never one delivered before the resume
    repeated = np.repeat(np.arange(n), counts - 1)
    assert not set(repeated.tolist()) & set(head)


def test_state_is_checked_against_the_loader(make_store: Callable[..., Any]) -> None:
    store = make_store(10)
    state = tracestore.TraceLoader(store, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"saved with seed=1, this loader has seed=2.*Create the loader with seed=1"):
        tracestore.TraceLoader(store, 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="not a TraceLoader state"):
        tracestore.TraceLoader(store, 2).load_state_dict({"epoch": 0})


def test_breaking_out_keeps_the_position_for_state_dict(make_store: Callable[..., Any]) -> None:
    store = make_store(16)
    full = _positions(_epoch(tracestore.TraceLoader(store, 4, seed=0)))
    loader = tracestore.TraceLoader(store, 4, seed=0, num_workers=2)
    head = []
    for b in loader:
        head += [int(p) for p in b.positions]
        break
    state = loader.state_dict()  # what a trainer that stops mid-epoch checkpoints
    assert state["consumed"] == 4
    other = tracestore.TraceLoader(store, 4, seed=0)
    other.load_state_dict(state)
    assert head + _positions(_epoch(other)) == full
    assert _positions(_epoch(loader)) == full  # a new iteration starts the epoch over (as DataLoader does)


def test_drop_last_does_not_leave_an_empty_epoch(make_store: Callable[..., Any]) -> None:
    store = make_store(10)
    loader = tracestore.TraceLoader(store, 4, drop_last=True)
    it = iter(loader)
    got = [next(it) for _ in range(len(loader))]  # a trainer that stops after len(loader) batches
    assert len(got) == 2 and loader.state_dict()["consumed"] == 8
    assert len(_epoch(loader)) == 2 and loader.epoch == 2


@pytest.mark.parametrize("workers, mode", [(0, "thread"), (2, "thread"), (2, "process")])
def test_a_failing_reader_raises_a_clear_error(make_store: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
                                               workers: int, mode: str) -> None:
    store = make_store(20)
    loader = tracestore.TraceLoader(store, 4, num_workers=workers, worker_mode=mode, timeout=60)
    bad = loader._plan()[1]
    real = loader._source.read_sequences

    def flaky(pos: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        if np.array_equal(pos, bad):
            raise OSError("disk went away")
        return real(pos, out)

    monkeypatch.setattr(loader._source, "read_sequences", flaky)  # before the first iteration forks workers
    it = iter(loader)
    next(it)
    with pytest.raises(LoaderError, match=r"reading batch 1 of epoch 0 .* failed with OSError: disk went away"):
        next(it)
    with pytest.raises(StopIteration):  # stopped, not hung
        next(it)
    assert loader.state_dict()["consumed"] == 4  # a resume retries the failed batch


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_stalled_reader_times_out(make_store: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
                                    mode: str) -> None:
    store = make_store(8)
    loader = tracestore.TraceLoader(store, 4, num_workers=1, timeout=0.2, worker_mode=mode)
    real = loader._source.read_sequences

    def slow(pos: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        time.sleep(1.0)
        return real(pos, out)

    monkeypatch.setattr(loader._source, "read_sequences", slow)
    with pytest.raises(LoaderError, match="was not read within timeout=0.2 s"):
        next(iter(loader))
    monkeypatch.setattr(loader._source, "read_sequences", real)
    loader.timeout = 60
    assert len(_epoch(loader)) == 2  # a fresh ring (and fresh workers) afterwards


def test_a_dead_worker_raises_instead_of_hanging(make_store: Callable[..., Any]) -> None:
    import os
    import signal

    store = make_store(40)
    loader = tracestore.TraceLoader(store, 4, num_workers=2, worker_mode="process", prefetch=1)
    it = iter(loader)
    next(it)
    os.kill(loader._pool.procs[1].pid, signal.SIGKILL)
    with pytest.raises(LoaderError, match=r"loader worker tracestore-loader-1 \(pid \d+\) died with exit code -9"):
        for _ in range(20):
            next(it)
    rest = _epoch(loader)  # new workers; the epoch starts over
    assert len(rest) >= 1


def test_a_corrupt_shard_raises_the_store_error(make_store: Callable[..., Any]) -> None:
    store = make_store(12)
    shard = store.location.path / "sequences" / "c" / "1" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF  # break the shard index's crc
    shard.write_bytes(bytes(raw))
    fresh = tracestore.open(store.url)
    for workers, mode in [(0, "thread"), (2, "thread"), (2, "process")]:
        with pytest.raises(CorruptStoreError, match="fails its crc32c check"):
            _epoch(tracestore.TraceLoader(fresh, 4, shuffle=False, num_workers=workers, worker_mode=mode))


def _child(loader: tracestore.TraceLoader, stale: Any, q: Any) -> None:
    try:
        try:
            next(stale)
            q.put(("error", "the parent's iterator worked in the child"))
            return
        except LoaderError as exc:
            if "after a fork" not in str(exc):
                raise
        q.put(("ok", [int(p) for b in loader for p in b.positions]))
    except BaseException as exc:  # noqa: BLE001 - report anything to the parent
        q.put(("error", repr(exc)))


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="no fork on this platform")
def test_fork_safe(make_store: Callable[..., Any]) -> None:
    store = make_store(16)
    full = _positions(_epoch(tracestore.TraceLoader(store, 4, seed=0)))
    loader = tracestore.TraceLoader(store, 4, seed=0, num_workers=2)
    it = iter(loader)
    next(it)  # the parent is mid-epoch, with reader threads running
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(loader, it, q))
    p.start()
    status, got = q.get(timeout=60)
    p.join(timeout=60)
    assert status == "ok", got
    assert got == full[4:]  # the child continues from the parent's position with its own threads
    # the parent's own iteration is unaffected
    assert _positions([next(it) for _ in range(3)]) == full[4:]


def test_pickled_loader_works(make_store: Callable[..., Any]) -> None:
    store = make_store(9)
    loader = tracestore.TraceLoader(store, 4, seed=2, num_workers=1)
    next(iter(loader))
    clone = pickle.loads(pickle.dumps(loader))
    assert clone.state_dict() == loader.state_dict()
    # the copy continues where the original was (as if loaded from its state_dict); the original starts over
    full = _positions(_epoch(loader))
    assert _positions(_epoch(clone)) == full[4:]
    assert _positions(_epoch(clone)) == _positions(_epoch(loader))  # both in epoch 1 now


def test_ring_never_pins_without_cuda() -> None:
    ring = BufferRing(2, (2, 3), torch.float16, pin=True)
    assert ring.pinned == torch.cuda.is_available()
    assert ring.acquire(5, 1).shape == (1, 3)
    ring.release(5, None)
    assert ring.acquire(7, 2).data_ptr() == ring.acquire(1, 2).data_ptr()  # slot 1 both times


@pytest.mark.slow
def test_realistic_shape_epoch(tmp_path: Any) -> None:
    """[300, 32, 4096] in shards of 128 traces: whole-shard views, runs across shard ends, the real layer count."""
    store = tracestore.testing.write_synthetic_store(str(tmp_path / "big.zarr"), 300, 32, 4096,
                                                     shard_bytes=128 * 32 * 4096 * 2, batch=100)
    mm = store.sequences[:]
    for shuffle, workers, layers in [(True, 0, None), (False, 2, None), (True, 2, [0, 15, 16, 31])]:
        seen = []
        for b in tracestore.TraceLoader(store, 64, shuffle=shuffle, num_workers=workers, layers=layers):
            want = mm[b.positions] if layers is None else mm[b.positions][:, layers]
            assert np.array_equal(b.sequences.numpy(), want.astype(np.float32))
            seen += b.positions.tolist()
        assert sorted(seen) == list(range(300))
