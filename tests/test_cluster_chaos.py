"""Issue 22 on a real Dask LocalCluster: a part task killed on one "host" is rerun on another, waits for the dead
writer's lease and resumes the part; and chaos -- workers SIGKILLed every few seconds while 12 parts convert --
still ends in the store one plain conversion gives, with no lock or staging left."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tracestore
from tracestore.convert.cluster import convert_on_cluster
from tracestore.convert.pipeline import convert
from tracestore.testing.archives import write_archive_set

pytest.importorskip("distributed")

L, D = 4, 32
FILES, TRACES = 12, 12


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("chaos")
    paths, ids, csv = write_archive_set(root / "in", files=FILES, traces_per_file=TRACES, num_layers=L, hidden_size=D)
    ref = root / "ref.zarr"
    convert([str(root / "in")], ref, scores=csv, workers=0, progress=False)
    sizes = sorted(p.stat().st_size for p in paths)
    # each archive its own part: a part reaches part_bytes with its first archive
    return {"dir": root / "in", "csv": csv, "ids": ids, "ref": tracestore.open(ref), "part_bytes": sizes[0]}


def _same(got: Any, ref: Any) -> None:
    assert got.ids.tolist() == ref.ids.tolist()
    np.testing.assert_array_equal(got.scores, ref.scores)
    np.testing.assert_array_equal(got.sequences[:], ref.sequences[:], strict=True)


def _leftovers(dest: Path) -> list[str]:
    """Locks, staging and partial files anywhere in or beside the store."""
    found = [p for p in dest.parent.rglob("*") if p.name.endswith((".tracestore-lock", ".partial", ".mutex"))
             or p.name == "_tracestore"]
    return sorted(str(p.relative_to(dest.parent)) for p in found)


def _cluster(n: int, **config: Any) -> Any:
    import logging

    import dask
    from distributed import LocalCluster

    with dask.config.set(config):
        return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                            dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                            silence_logs=logging.CRITICAL)


def _play_host(name: str, lease: float, renew: float) -> None:
    """On a worker: name the host its locks record, and shorten its leases."""
    from tracestore import config

    os.environ["TRACESTORE_HOST"] = name
    config.LOCK_LEASE_SECONDS, config.LOCK_RENEW_SECONDS = lease, renew


def _hold(gate: str, name: str) -> None:
    """On a worker: after the first block of archive `name`, the part waits until gate/go exists."""
    from tracestore.convert import pipeline

    orig = pipeline._Run.add_block

    def add_block(self: Any, src: Any, blk: Any) -> None:
        orig(self, src, blk)
        if os.path.basename(src.path) == name and not os.path.exists(os.path.join(gate, "go")):
            Path(gate, f"begun-{os.getpid()}").touch()
            deadline = time.monotonic() + 120
            while not os.path.exists(os.path.join(gate, "go")) and time.monotonic() < deadline:
                time.sleep(0.02)

    pipeline._Run.add_block = add_block


def test_a_part_killed_on_one_host_is_rerun_on_another_and_resumes_after_the_lease(archives, tmp_path: Path) -> None:
    import json

    from distributed import Client

    with _cluster(2) as cluster, Client(cluster) as client:
        workers = sorted(client.scheduler_info()["workers"])
        for k, addr in enumerate(workers):
            client.run(_play_host, f"host-{'ab'[k]}", 3.0, 0.5, workers=[addr])
        gate = tmp_path / "gate"
        gate.mkdir()
        slow = "traces_0003.pkl.gz"
        client.run(_hold, str(gate), slow)
        dest = tmp_path / "store.zarr"
        out: dict[str, Any] = {}

        def run() -> None:
            try:
                out["result"] = convert_on_cluster([archives["dir"]], dest, cluster.scheduler_address,
                                                   part_bytes=archives["part_bytes"], scores=archives["csv"])
            except BaseException as e:  # noqa: BLE001 - reported below
                out["error"] = e

        t = threading.Thread(target=run)
        t.start()
        try:
            deadline = time.monotonic() + 120
            while not list(gate.glob("begun-*")):
                assert time.monotonic() < deadline and t.is_alive(), "the slow part never began"
                time.sleep(0.02)
            pid = int(next(gate.glob("begun-*")).name.split("-")[1])
            lock = json.loads((dest / "parts" / "00003.tracestore-lock" / "lock.json").read_text())
            assert lock["host"] in ("host-a", "host-b") and lock["pid"] == pid and lock["lease_seconds"] == 3.0
            os.kill(pid, signal.SIGKILL)  # the part's writer dies mid-part: its lock stays, with its lease
            (gate / "go").touch()
            t.join(240)
            assert not t.is_alive(), "the conversion did not finish after the kill"
        finally:
            (gate / "go").touch()
            t.join(60)
    assert "error" not in out, out.get("error")
    assert out["result"].num_parts == FILES
    _same(tracestore.open(dest), archives["ref"])
    assert _leftovers(dest) == []


class _SlowBlocks:
    """A worker plugin (applied again to every worker the nanny restarts): blocks of 3 traces, each taking
    0.2 s more, so that a part spans a few seconds and the kills land inside parts."""

    name = "tracestore-slow-blocks"

    def setup(self, worker: Any) -> None:
        from tracestore.convert import pipeline, records

        records.BLOCK_BYTES = 3 * L * D * 4
        orig = pipeline._Run.add_block

        def add_block(run: Any, src: Any, blk: Any) -> None:
            time.sleep(0.2)
            orig(run, src, blk)

        pipeline._Run.add_block = add_block


def test_chaos_workers_killed_every_few_seconds_the_store_is_still_one_conversion(archives, tmp_path: Path) -> None:
    from distributed import Client, WorkerPlugin

    dest = tmp_path / "chaos.zarr"
    kills: list[int] = []
    stop = threading.Event()
    t0 = time.monotonic()
    # a killed worker's tasks are rerun by the scheduler; enough reruns that random kills cannot exhaust them
    with _cluster(3, **{"distributed.scheduler.allowed-failures": 100}) as cluster, Client(cluster) as client:
        client.register_plugin(type("SlowBlocks", (_SlowBlocks, WorkerPlugin), {})())
        rng = random.Random(22)

        def killer() -> None:
            while not stop.wait(rng.uniform(1.5, 3.0)):
                try:
                    pids = list(client.run(os.getpid, on_error="ignore").values())
                except Exception:  # noqa: BLE001 - the scheduler between two states: next time
                    continue
                if pids:
                    pid = rng.choice(pids)
                    try:
                        os.kill(pid, signal.SIGKILL)
                        kills.append(pid)
                    except ProcessLookupError:
                        pass

        k = threading.Thread(target=killer, daemon=True)
        k.start()
        try:
            res = convert_on_cluster([archives["dir"]], dest, cluster.scheduler_address,
                                     part_bytes=archives["part_bytes"], scores=archives["csv"])
        finally:
            stop.set()
            k.join(10)
    assert res.num_parts == FILES and res.num_traces == FILES * TRACES
    assert kills, "no worker was killed: the test proved nothing"
    _same(tracestore.open(dest), archives["ref"])
    assert _leftovers(dest) == []
    assert time.monotonic() - t0 < 90
    print(f"{len(kills)} workers killed; {time.monotonic() - t0:.1f} s")
