"""Issue 11, items 10-12: batches the caller keeps are never overwritten, a new iterator starts the epoch over
(as torch's DataLoader does) except right after load_state_dict(), and worker processes die with their parent."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import tracestore

MODES = [(0, None), (2, "thread"), (2, "process")]


def _expected(store: tracestore.TraceStore) -> np.ndarray:
    return np.stack([store[i].sequence for i in range(len(store))]).astype(np.float32)


def _positions(batches: Any) -> list[int]:
    return [int(p) for b in batches for p in b.positions]


# -- item 10: kept batches stay intact ----------------------------------------------------------------------


@pytest.mark.parametrize("num_workers, mode", MODES)
def test_list_of_the_loader_keeps_every_batch_intact(make_store: Callable[..., Any], num_workers: int,
                                                     mode: str | None) -> None:
    store = make_store(37)
    exp = _expected(store)
    loader = tracestore.TraceLoader(store, 3, seed=1, device="cpu", num_workers=num_workers, worker_mode=mode)
    batches = list(loader)
    assert sorted(_positions(batches)) == list(range(37))
    bad = [i for i, b in enumerate(batches) if not np.array_equal(b.sequences.numpy(), exp[b.positions])]
    assert not bad, f"{len(bad)} of {len(batches)} kept batches were overwritten"
    # a second epoch into the same loader: the kept batches of the first are still theirs
    second = list(loader)
    assert all(np.array_equal(b.sequences.numpy(), exp[b.positions]) for b in batches + second)


@pytest.mark.parametrize("num_workers, mode", MODES)
def test_list_of_a_graph_loader_keeps_every_batch_intact(make_store: Callable[..., Any], num_workers: int,
                                                         mode: str | None) -> None:
    pytest.importorskip("torch_geometric")
    store = make_store(25, graphs=True)  # 9 batches: more than the 6 slots of 2 workers
    exp = _expected(store)
    loader = tracestore.TraceLoader(store, 3, seed=1, device="cpu", num_workers=num_workers, worker_mode=mode,
                                    with_graphs=True, graph_layer=1)
    batches = list(loader)
    again = [next(iter(tracestore.TraceLoader(store, 3, seed=1, with_graphs=True, graph_layer=1)))]
    assert all(np.array_equal(b.sequences.numpy(), exp[b.positions]) for b in batches)
    assert torch.equal(batches[0].graph.x, again[0].graph.x)  # graphs are fresh tensors every batch


@pytest.mark.parametrize("num_workers, mode", MODES)
@pytest.mark.parametrize("keep", ["view", "slice", "numpy", "autograd"])
def test_a_kept_view_slice_or_array_is_never_overwritten(make_store: Callable[..., Any], num_workers: int,
                                                        mode: str | None, keep: str) -> None:
    store = make_store(30)
    exp = _expected(store)
    loader = tracestore.TraceLoader(store, 2, seed=0, device="cpu", num_workers=num_workers, worker_mode=mode)
    kept: list[tuple[Any, np.ndarray]] = []
    for i, b in enumerate(loader):
        if i % 3:
            continue  # dropped: its buffer may be reused
        if keep == "view":
            kept.append((b.sequences[0], exp[b.positions[0]]))
        elif keep == "slice":
            kept.append((b.sequences[:, 1:], exp[b.positions][:, 1:]))
        elif keep == "numpy":
            kept.append((b.sequences.numpy(), exp[b.positions]))
        else:  # what a model keeps until backward: a graph that saved the input
            w = torch.ones((), requires_grad=True)
            kept.append(((w, (b.sequences * w).sum()), exp[b.positions].sum(dtype=np.float64)))
    assert len(kept) == 5
    for got, want in kept:
        if keep == "autograd":
            w, loss = got
            loss.backward()  # reads the saved input now, after the loader went on
            assert np.isclose(float(w.grad), want, rtol=1e-5)
        else:
            assert np.array_equal(np.asarray(got), want)


@pytest.mark.parametrize("num_workers, mode", MODES)
def test_a_loop_that_drops_each_batch_reuses_the_ring(make_store: Callable[..., Any], num_workers: int,
                                                      mode: str | None) -> None:
    store = make_store(40)
    exp = _expected(store)
    loader = tracestore.TraceLoader(store, 2, seed=0, device="cpu", num_workers=num_workers, worker_mode=mode)
    ptrs = set()
    for _ in range(2):
        it = iter(loader)
        for b in it:
            assert np.array_equal(b.sequences.numpy(), exp[b.positions])
            ptrs.add(b.sequences.data_ptr())
        assert it.ring.renewed == 0  # no fresh buffer: the fast path
    assert len(ptrs) <= len(it.ring)


# -- item 11: a new iterator starts the epoch over, except right after load_state_dict() ----------------------


@pytest.mark.parametrize("num_workers, mode", MODES)
def test_peeking_does_not_take_traces_out_of_the_epoch(make_store: Callable[..., Any], num_workers: int,
                                                       mode: str | None) -> None:
    store = make_store(14)
    loader = tracestore.TraceLoader(store, 4, seed=5, num_workers=num_workers, worker_mode=mode)
    full = _positions(tracestore.TraceLoader(store, 4, seed=5))
    peek = next(iter(loader))  # e.g. to look at a batch's shape before training
    assert peek.positions.tolist() == full[:4]
    assert _positions(loader) == full  # the whole epoch 0, peeked traces included
    assert loader.epoch == 1
    it = iter(loader)
    next(it), next(it)
    st = loader.state_dict()
    assert (st["epoch"], st["consumed"]) == (1, 8)
    assert sorted(_positions(loader)) == list(range(14))  # epoch 1 again from its start, not its remainder
    assert loader.epoch == 2


def test_only_the_first_iteration_after_load_state_dict_resumes(make_store: Callable[..., Any]) -> None:
    store = make_store(14)
    full = _positions(tracestore.TraceLoader(store, 4, seed=5))
    saved = tracestore.TraceLoader(store, 4, seed=5)
    it = iter(saved)
    next(it)
    state = saved.state_dict()
    loader = tracestore.TraceLoader(store, 4, seed=5)
    loader.load_state_dict(state)
    loader.set_epoch(0)  # a trainer's epoch loop: keeps the resume
    it = iter(loader)
    assert next(it).positions.tolist() == full[4:8]
    assert _positions(loader) == full  # a second iterator in the same epoch starts it over
    loader.load_state_dict(state)
    assert _positions(loader) == full[4:]  # a full resumed pass ends the epoch
    assert loader.epoch == 1 and loader.state_dict()["consumed"] == 0


# -- item 12: worker processes die with their parent ------------------------------------------------------------


def _running(pid: int) -> bool:
    """True while pid is a live process (a zombie waiting to be reaped by PID 1 has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


_PARENT = textwrap.dedent("""
    import os, signal, sys
    import tracestore
    loader = tracestore.TraceLoader(sys.argv[1], 2, num_workers=2, worker_mode="process", device="cpu")
    it = iter(loader)
    next(it)
    print(" ".join(str(p.pid) for p in loader._pool.procs), flush=True)
    if sys.argv[2] == "SIGKILL":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(3)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["SIGKILL", "os._exit"])
def test_workers_exit_when_their_parent_is_killed(make_store: Callable[..., Any], how: str) -> None:
    store = make_store(40)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # not subprocess.run: orphaned workers would hold its output pipes open, and it waits for their EOF
    proc = subprocess.Popen([sys.executable, "-c", _PARENT, store.url, how], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert proc.wait(timeout=60) == (-9 if how == "SIGKILL" else 3)
    proc.stdout.close()
    assert len(pids) == 2
    deadline = time.monotonic() + 5.0
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [p for p in pids if _running(p)]
    for p in alive:  # do not leave them behind when the test fails
        os.kill(p, 9)
    assert not alive, f"loader workers {alive} outlived their killed parent"


def test_a_state_saved_after_the_epochs_last_batch_resumes_as_an_empty_pass(make_store: Callable[..., Any]) -> None:
    store = make_store(12)
    saved = tracestore.TraceLoader(store, 4, seed=2)
    saved.set_epoch(1)
    it = iter(saved)
    for _ in range(3):
        next(it)  # a run that stopped on the last step of epoch 1, before StopIteration
    state = saved.state_dict()
    assert (state["epoch"], state["consumed"]) == (1, 12)
    ref = tracestore.TraceLoader(store, 4, seed=2)
    want = {}
    for e in range(4):
        ref.set_epoch(e)
        want[e] = _positions(ref)
    loader = tracestore.TraceLoader(store, 4, seed=2)
    loader.load_state_dict(state)
    got = {}
    for e in range(1, 4):  # the documented loop, resumed at the saved epoch
        loader.set_epoch(e)
        got[e] = _positions(loader)
    assert got == {1: [], 2: want[2], 3: want[3]}  # epoch 1 had nothing left; 2 and 3 each once, in step


_LOADER_FD_SCRIPT = """
import os, resource, sys
import tracestore
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
s = tracestore.open(sys.argv[1])
loader = tracestore.TraceLoader(s, batch_size=8, shuffle=True, num_workers=0, with_graphs=True, graph_layer=1)
seen = 0
for epoch in range(2):
    loader.set_epoch(epoch)
    for b in loader:
        seen += len(b.ids)
print("ok", seen, len(os.listdir("/proc/self/fd")))
"""


def test_a_loader_epoch_over_many_shards_fits_a_low_open_file_limit(tmp_path) -> None:
    # issue 11 item 6, the loader's side: its per-shard torch views used to keep every shard's map (and file) open
    import os
    import subprocess
    import sys

    from test_harden_reader import write_store

    url = tmp_path / "s.zarr"
    write_store(url, 120, graphs=True)  # ~30 shards of sequences, ~250 of tokens/hidden
    assert len(list((url / "tokens/hidden/c").iterdir())) > 100
    env = {**os.environ, "TRACESTORE_MAX_MAPPED_SHARDS": "16"}
    r = subprocess.run([sys.executable, "-c", _LOADER_FD_SCRIPT, str(url), "64"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ok 240"), r.stdout
