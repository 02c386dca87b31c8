"""Conversion on a Dask cluster (issue 15, section 2): the plan of parts, and real conversions on a real
LocalCluster of 2 worker processes on 127.0.0.1 (no mock), to a local path and to the moto S3 endpoint,
each equal to a single-machine convert() of the same archives; a rerun on another cluster skips every part;
a worker SIGKILLed mid-part has its task rerun and the store is still equal; a bad archive is one clear
error naming it."""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tracestore
from tracestore.convert.cluster import (
    DEFAULT_PART_BYTES,
    ClusterConvertResult,
    _local_cluster,
    _PartsProgress,
    add_cluster_arguments,
    convert_on_cluster,
    parse_part_size,
    plan_parts,
    run_from_args,
    uses_cluster,
)
from tracestore.convert.pipeline import convert
from tracestore.errors import ClusterError, InputFormatError, StoreExistsError, TracestoreError
from tracestore.store.destination import inspect_destination
from tracestore.store.urls import LocalLocation
from tracestore.testing.seed import write_seed_raw_archive, write_seed_scores_csv

L, D, H = 3, 8, 2
TOK = (3, 7)
#: traces per archive: the third archive is larger, so that the plan has parts of one and of two archives
TRACES = [3, 4, 9, 3, 4, 3]


def _write_archives(folder: Path, traces: list[int] = TRACES) -> tuple[list[Path], list[str], Path]:
    paths, ids, start = [], [], 0
    for f, n in enumerate(traces):
        p = folder / f"traces_{f:04d}.pkl.gz"
        ids += write_seed_raw_archive(p, n, L, D, num_heads=H, tokens=TOK, start=start)
        paths.append(p)
        start += n
    csv = write_seed_scores_csv(folder.parent / f"{folder.name}_scores.csv", ids[:-2], extra=["qb_999"])
    return paths, ids, csv


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def assert_same_store(got: Any, ref: Any) -> None:
    """Ids in order, scores, sequences bit-equal, per-token data, graphs, fields and the float16 report."""
    assert got.ids.tolist() == ref.ids.tolist()
    np.testing.assert_array_equal(got.scores, ref.scores)
    np.testing.assert_array_equal(got.sequences[:], ref.sequences[:], strict=True)
    assert (got.pool, got.has_graphs, got.graph_recipe) == (ref.pool, ref.has_graphs, ref.graph_recipe)
    assert got.has_graphs and got.has_token_hidden
    assert {k: v.tolist() for k, v in got.fields.items()} == {k: v.tolist() for k, v in ref.fields.items()}
    for i in range(len(ref)):
        a, b = got[i], ref[i]
        assert (a.id, a.fields) == (b.id, b.fields)
        np.testing.assert_array_equal(a.tokens.hidden, b.tokens.hidden, strict=True)
        np.testing.assert_array_equal(a.tokens.ids, b.tokens.ids, strict=True)
        assert a.tokens.text == b.tokens.text
        for layer in range(L):
            np.testing.assert_array_equal(a.graph.edge_index[layer], b.graph.edge_index[layer], strict=True)
            np.testing.assert_array_equal(a.graph.edge_attr[layer], b.graph.edge_attr[layer], strict=True)
    assert {k: r.to_dict() for k, r in got.report.items()} == {k: r.to_dict() for k, r in ref.report.items()}


# -- the plan ---------------------------------------------------------------------------------------------------
def _sized(folder: Path, sizes: list[int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, n in enumerate(sizes):
        p = folder / f"a_{i:03d}.pkl"
        p.write_bytes(bytes([i]) * n)  # distinct bytes: equal ones would be the same archive twice (refused)
        out.append(p)
    return out


def test_plan_covers_every_archive_once_in_order_and_honours_the_part_size(tmp_path: Path) -> None:
    sizes = [5, 1, 7, 2, 2, 9, 1, 1, 1, 4, 30, 3]
    paths = _sized(tmp_path / "in", sizes)
    size_of = {os.path.abspath(p): n for p, n in zip(paths, sizes, strict=True)}
    for part_bytes in (1, 4, 6, 10, 25, 1000):
        plan = plan_parts([tmp_path / "in"], part_bytes=part_bytes)
        assert [p for g in plan for p in g] == sorted(size_of)  # every archive once, in sorted path order
        assert all(g for g in plan)
        for g in plan[:-1]:  # every part but the last reaches the size, and would not without its last archive
            total = sum(size_of[p] for p in g)
            assert total >= part_bytes and total - size_of[g[-1]] < part_bytes
        assert sum(size_of[p] for p in plan[-1][:-1]) < part_bytes
    assert plan_parts([tmp_path / "in"], part_bytes=1) == [[p] for p in sorted(size_of)]
    assert plan_parts([tmp_path / "in"], part_bytes=1000) == [sorted(size_of)]
    # a big archive is a part of its own, or closes the part it joins
    assert [len(g) for g in plan_parts([tmp_path / "in"], part_bytes=10)] == [3, 3, 5, 1]


def test_plan_is_deterministic_whatever_the_order_and_form_of_the_sources(tmp_path: Path) -> None:
    paths = _sized(tmp_path / "in", [3, 8, 1, 6, 2, 2, 5])
    ref = plan_parts([tmp_path / "in"], part_bytes=7)
    assert plan_parts(list(reversed(paths)), part_bytes=7) == ref
    assert plan_parts([str(tmp_path / "in" / "*.pkl")], part_bytes=7) == ref
    assert plan_parts([paths[4], tmp_path / "in", paths[0]], part_bytes=7) == ref
    # nothing in it depends on the machine or the cluster: only the archives and the size
    assert plan_parts.__kwdefaults__ == {"part_bytes": DEFAULT_PART_BYTES}


def test_plan_refuses_a_size_that_is_not_positive_and_sources_that_are_not_archives(tmp_path: Path) -> None:
    _sized(tmp_path / "in", [1])
    with pytest.raises(ValueError, match="part_bytes must be a positive"):
        plan_parts([tmp_path / "in"], part_bytes=0)
    with pytest.raises(InputFormatError, match="no such file"):
        plan_parts([tmp_path / "missing"], part_bytes=10)


def test_dask_is_imported_only_when_a_conversion_runs_on_a_cluster() -> None:
    import subprocess
    import sys

    code = ("import sys, tracestore, tracestore.convert.cluster, tracestore.cli; tracestore.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the command line's pieces ----------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("sources", nargs="+")
    p.add_argument("-o", "--output", required=True)
    add_cluster_arguments(p)
    return p


def test_part_size_accepts_units_and_bytes() -> None:
    assert parse_part_size("2GB") == 2 * 10**9
    assert parse_part_size("512MB") == 512 * 10**6
    assert parse_part_size("64MiB") == 64 * 2**20
    assert parse_part_size("123456") == 123456
    for bad in ("lots", "0", "-5MB"):
        with pytest.raises(argparse.ArgumentTypeError, match="--part-size"):
            parse_part_size(bad)
    a = _parser().parse_args(["in", "-o", "out", "--dask", "local:2", "--part-size", "512MB"])
    assert (a.dask, a.part_size) == ("local:2", 512 * 10**6)
    assert uses_cluster(a)
    assert not uses_cluster(_parser().parse_args(["in", "-o", "out"]))
    with pytest.raises(ClusterError, match="--part-size goes with --dask"):
        uses_cluster(_parser().parse_args(["in", "-o", "out", "--part-size", "1GB"]))


def test_options_that_do_not_go_with_dask_are_refused_before_any_work(tmp_path: Path) -> None:
    _sized(tmp_path / "in", [1])
    a = _parser().parse_args([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--dask", "local:2"])
    with pytest.raises(ClusterError, match="--overwrite does not go with --dask.*delete the destination"):
        run_from_args(a, {"overwrite": True})
    with pytest.raises(ClusterError, match="--workers 4 does not go with --dask"):
        run_from_args(a, {"workers": 4})
    for bad in ("local:0", "local:x", "local:"):
        with pytest.raises(ClusterError, match="local:N takes a number of worker processes"):
            convert_on_cluster([tmp_path / "in"], tmp_path / "out", bad)
    assert not (tmp_path / "out").exists()


def test_an_address_without_a_scheduler_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import tracestore.convert.cluster as cluster

    monkeypatch.setattr(cluster, "CONNECT_SECONDS", 1)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _sized(tmp_path / "in", [1])
    with pytest.raises(ClusterError, match=f"tcp://127.0.0.1:{port}: no Dask scheduler answered"):
        convert_on_cluster([tmp_path / "in"], tmp_path / "out", f"tcp://127.0.0.1:{port}")


def test_the_bar_counts_each_part_once_whatever_its_attempts_report() -> None:
    from tracestore.convert.part_writer import PartResult

    bar = _PartsProgress(True, [100, 50])
    shown = []
    bar.bar.update = lambda n: shown.append(n)  # what the bar is told, nothing else
    bar.event({"part": 0, "bytes": 40})
    bar.event({"part": 0, "bytes": 70})
    bar.event({"part": 0, "bytes": 20})  # a retried attempt starts again: the bar does not go back
    bar.event({"part": 0, "bytes": 90})
    bar.event({"part": 1, "bytes": 500})  # never past the part's size
    bar.event({"part": 7, "bytes": 5})  # not a part of this run: ignored
    bar.part_done(PartResult(part=0, url="u", num_traces=3, up_to_date=False, seconds=0.0, summary=""))
    bar.close()
    assert shown == [40, 30, 20, 50, 10] and sum(shown) == 150


def _wait_until_idle(client: Any, timeout: float = 120) -> None:
    def _executing(dask_worker: Any) -> int:  # nested: sent to the workers by value
        return int(dask_worker.state.executing_count)  # cancelled tasks still running included

    deadline = time.monotonic() + timeout
    while any(client.run(_executing).values()):
        assert time.monotonic() < deadline, "the workers are still running tasks"
        time.sleep(0.05)


class _Finished:
    """What _outcome reads of a distributed.Future: its status, its result or its exception."""

    def __init__(self, status: str, value: Any = None) -> None:
        self.status, self.value = status, value

    def result(self) -> Any:
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value

    def exception(self) -> BaseException | None:
        return self.value if isinstance(self.value, BaseException) else None


def test_each_way_a_task_ends_is_a_result_or_one_clear_error() -> None:
    from distributed import KilledWorker

    from tracestore.convert.cluster import _outcome, _PartFailure
    from tracestore.convert.part_writer import PartResult
    from tracestore.errors import StoreLockedError, WorkerCrashedError

    ok = PartResult(part=2, url="D/parts/00002", num_traces=5, up_to_date=False, seconds=1.0, summary="")
    assert _outcome(_Finished("finished", ok), 2, "D/parts/00002") is ok
    bad = _PartFailure(2, InputFormatError("a.pkl.gz: truncated; re-create it"))
    with pytest.raises(InputFormatError, match=r"^part 00002 \(D/parts/00002\): a.pkl.gz: truncated; re-create it; "
                                               r"fix it, then rerun the same command \(the parts done are kept\)$"):
        _outcome(_Finished("finished", bad), 2, "D/parts/00002")
    with pytest.raises(ClusterError, match="part 00002 .*the Dask scheduler dropped its task"):
        _outcome(_Finished("cancelled"), 2, "D/parts/00002")
    with pytest.raises(WorkerCrashedError, match="part 00002 .*kept dying.*smaller --part-size"):
        _outcome(_Finished("error", KilledWorker("convert-part-00002-x", "tcp://w:1", 3)), 2, "D/parts/00002")
    with pytest.raises(StoreLockedError, match="^part 00002 .*: D is being written"):  # after its retries
        _outcome(_Finished("error", StoreLockedError("D is being written by another writer")), 2, "D/parts/00002")
    with pytest.raises(KeyError):  # a bug keeps its own exception and traceback
        _outcome(_Finished("error", KeyError("x")), 2, "D/parts/00002")


# -- on a real cluster ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster() -> Any:
    """A LocalCluster of 2 worker processes on 127.0.0.1, and a client of it for the tests' own looks."""
    from distributed import Client

    with _local_cluster(2) as c, Client(c) as client:
        yield c, client


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Six seed archives (tokens, attentions: graphs, a text field), a scores CSV, a part size that plans
    them into 4 parts, and the single-machine conversion of them all."""
    root = tmp_path_factory.mktemp("archives")
    paths, ids, csv = _write_archives(root / "in")
    sizes = [p.stat().st_size for p in paths]
    part_bytes = sizes[0] + sizes[1]  # [0, 1], [2], [3, 4], [5]
    plan = plan_parts([root / "in"], part_bytes=part_bytes)
    assert [len(g) for g in plan] == [2, 1, 2, 1], sizes
    ref = root / "single.zarr"
    convert([root / "in"], ref, scores=csv, workers=0)
    return {"dir": root / "in", "paths": paths, "ids": ids, "csv": csv, "part_bytes": part_bytes,
            "num_parts": len(plan), "ref": tracestore.open(ref)}


def test_a_cluster_conversion_equals_a_single_machine_one_and_a_rerun_skips_every_part(
        cluster: Any, archives: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import tracestore.convert.cluster as cluster_mod

    events: list[dict[str, Any]] = []
    orig = cluster_mod._PartsProgress.event
    monkeypatch.setattr(cluster_mod._PartsProgress, "event", lambda self, msg: (events.append(msg), orig(self, msg)))
    dest = tmp_path / "cluster.zarr"
    lines: list[str] = []
    res = convert_on_cluster([archives["dir"]], dest, cluster[0].scheduler_address, part_bytes=archives["part_bytes"],
                             scores=archives["csv"], progress=True, log=lines.append)
    assert isinstance(res, ClusterConvertResult)
    assert (res.num_parts, res.parts_up_to_date, res.num_traces) == (4, 0, len(archives["ids"]))
    assert [p.part for p in res.parts] == [0, 1, 2, 3] and not res.up_to_date
    assert sorted(os.listdir(dest / "parts")) == ["00000", "00001", "00002", "00003"]
    assert_same_store(tracestore.open(dest), archives["ref"])
    # one bar in this process, fed by the workers: their events reached it, the last of each part its size
    err = capsys.readouterr().err
    total = sum(p.stat().st_size for p in archives["paths"])
    assert f"convert: {total / 1e3:.2f} kB of {total / 1e3:.2f} kB" in err
    assert all(f"part {k:05d} done" in err for k in range(4))
    last = {e["part"]: e["bytes"] for e in events}
    plan = plan_parts([archives["dir"]], part_bytes=archives["part_bytes"])
    assert last == {k: sum(os.path.getsize(p) for p in g) for k, g in enumerate(plan)}
    assert "converted 6 archive(s) into 4 part(s)" in res.summary() and any("committing" in s for s in lines)

    # the same command on another cluster (one worker: the plan does not depend on it): nothing is written
    before = _snapshot(dest)
    again = convert_on_cluster([archives["dir"]], dest, "local:1", part_bytes=archives["part_bytes"],
                               scores=archives["csv"])
    assert again.up_to_date and again.parts_up_to_date == 4 and again.num_workers == 1
    assert f"is up to date ({len(archives['ids'])} traces in 4 part(s) from 6 archives)" in again.summary()
    assert _snapshot(dest) == before
    # another part size makes other parts: refused before any work, naming the first part that differs
    with pytest.raises(StoreExistsError, match=r"parts/00000 was converted from other archives \(traces_0000.pkl.gz, "
                                               r"traces_0001.pkl.gz\) than this plan puts in it \(traces_0000.pkl.gz\)"
                                               r".*--part-size"):
        convert_on_cluster([archives["dir"]], dest, "local:1", part_bytes=1, scores=archives["csv"])
    with pytest.raises(StoreExistsError, match="lists 4 parts, but these archives make 1"):
        convert_on_cluster([archives["dir"]], dest, "local:1", part_bytes=10**9, scores=archives["csv"])
    assert _snapshot(dest) == before


def test_a_cluster_conversion_to_s3_equals_a_single_machine_one(cluster: Any, archives: dict[str, Any]) -> None:
    from tracestore.testing.s3 import moto_s3

    with moto_s3() as ep:
        url = ep.url("cluster/traces.zarr")
        res = convert_on_cluster([archives["dir"]], url, cluster[0].scheduler_address,
                                 part_bytes=archives["part_bytes"], storage_options=ep.storage_options(),
                                 scores=archives["csv"])
        assert res.num_parts == 4 and res.url == url
        assert_same_store(tracestore.open(url, storage_options=ep.storage_options()), archives["ref"])


def test_a_worker_killed_mid_part_has_its_task_rerun_and_the_store_is_still_equal(
        cluster: Any, archives: dict[str, Any], tmp_path: Path) -> None:
    import threading

    _local, client = cluster
    gate = tmp_path / "gate"
    gate.mkdir()
    slow = "traces_0002.pkl.gz"  # part 1, alone in its part

    def hold(gate: str, name: str) -> None:
        """On a worker: the first block of `name` is appended, then the part waits until gate/go exists."""
        from tracestore.convert import pipeline

        orig = pipeline._Run.add_block

        def add_block(self: Any, src: Any, blk: Any) -> None:
            orig(self, src, blk)
            if os.path.basename(src.path) == name and not os.path.exists(os.path.join(gate, "go")):
                Path(gate, f"begun-{os.getpid()}").touch()
                deadline = time.monotonic() + 300
                while not os.path.exists(os.path.join(gate, "go")) and time.monotonic() < deadline:
                    time.sleep(0.02)

        add_block.orig = orig  # type: ignore[attr-defined]
        pipeline._Run.add_block = add_block

    def release() -> None:
        from tracestore.convert import pipeline

        pipeline._Run.add_block = getattr(pipeline._Run.add_block, "orig", pipeline._Run.add_block)

    pids_before = set(client.run(os.getpid).values())
    client.run(hold, str(gate), slow)
    dest = tmp_path / "killed.zarr"
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = convert_on_cluster([archives["dir"]], dest, cluster[0].scheduler_address,
                                               part_bytes=archives["part_bytes"], scores=archives["csv"])
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    try:
        deadline = time.monotonic() + 120
        while not list(gate.glob("begun-*")):
            assert time.monotonic() < deadline and t.is_alive(), "the slow part never began"
            time.sleep(0.02)
        pid = int(next(gate.glob("begun-*")).name.split("-")[1])
        assert pid in pids_before
        # the part has begun and cannot finish: it is there, unfinished
        assert inspect_destination(LocalLocation(dest / "parts" / "00001"))[0] == "unfinished"
        os.kill(pid, signal.SIGKILL)
        (gate / "go").touch()
        t.join(240)
        assert not t.is_alive(), "the conversion did not finish after the kill"
    finally:
        (gate / "go").touch()
        client.run(release)
        t.join(60)
    assert "error" not in out, out.get("error")
    res = out["result"]
    assert res.num_parts == 4 and res.num_traces == len(archives["ids"])
    assert_same_store(tracestore.open(dest), archives["ref"])
    # the nanny restarted the killed worker: two workers again, the killed pid not among them
    client.wait_for_workers(2, timeout=60)
    assert pid not in set(client.run(os.getpid).values())


def test_a_bad_archive_is_one_clear_error_naming_it_and_a_rerun_keeps_the_parts_done(
        cluster: Any, archives: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the convert command's own options (cli._convert_options), as cli.py wires --dask in; with
    relative paths, which the workers (in another working directory) must get absolute."""
    from tracestore import cli

    monkeypatch.chdir(tmp_path)

    folder = tmp_path / "in"
    folder.mkdir()
    for p in archives["paths"]:
        (folder / p.name).write_bytes(p.read_bytes())
    bad = folder / "traces_0003.pkl.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00 this is not a gzip stream")
    dest = tmp_path / "bad.zarr"
    parser = argparse.ArgumentParser()
    cli._configure_convert(parser)  # with the cluster arguments, as `tracestore convert` has them
    a = parser.parse_args(["in", "-o", "bad.zarr", "--scores", os.path.relpath(archives["csv"]), "--no-progress",
                           "--dask", cluster[0].scheduler_address, "--part-size", "1"])  # a part per archive
    assert os.getcwd() not in cluster[1].run(os.getcwd).values()

    def run() -> ClusterConvertResult:
        return run_from_args(a, {**cli._convert_options(a), "overwrite": a.overwrite, "log": cli._logger(a)})

    with pytest.raises(InputFormatError) as info:
        run()
    msg = str(info.value)
    assert msg.startswith(f"part 00003 ({dest}/parts/00003): traces_0003.pkl.gz: ")
    assert msg.endswith("fix it, then rerun the same command (the parts done are kept)")
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no Dask traceback chained to it
    assert not (dest / "zarr.json").exists()  # nothing committed
    # the tasks that were running when the error came finish on their workers (Dask cannot stop a running
    # task; they commit their parts): wait for them, or the rerun would find their parts locked
    _wait_until_idle(cluster[1])
    # the archive fixed, the same command: the parts done before the error are not done again
    done = [k for k in range(6) if inspect_destination(LocalLocation(dest / "parts" / f"{k:05d}"))[0] == "committed"]
    assert 3 not in done and done  # parts 0 and 1 went to the two workers before part 3: one was running
    bad.write_bytes(archives["paths"][3].read_bytes())
    res = run()
    assert res.num_parts == 6 and [p.part for p in res.parts if p.up_to_date] == done
    assert_same_store(tracestore.open(dest), archives["ref"])


def test_a_store_converted_without_dask_is_refused(archives: dict[str, Any], tmp_path: Path) -> None:
    dest = tmp_path / "single.zarr"
    convert([archives["paths"][0]], dest, workers=0)
    with pytest.raises(StoreExistsError, match="converted without --dask.*tracestore append"):
        convert_on_cluster([archives["dir"]], dest, "local:1")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StoreExistsError, match="never replaces what it did not write"):
        convert_on_cluster([archives["dir"]], other, "local:1")


def test_the_convert_command_runs_on_the_cluster(cluster: Any, archives: dict[str, Any], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from tracestore.cli import main

    dest = tmp_path / "cli.zarr"
    assert main(["convert", str(archives["dir"]), "-o", str(dest), "--scores", str(archives["csv"]),
                 "--dask", cluster[0].scheduler_address, "--part-size", "1", "--no-progress"]) == 0
    assert "part(s)" in capsys.readouterr().out
    assert_same_store(tracestore.open(dest), archives["ref"])
    assert main(["convert", str(archives["dir"]), "-o", str(tmp_path / "x"), "--part-size", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--part-size goes with --dask" in err


def test_a_folder_with_other_files_under_parts_is_not_written_into(archives: dict[str, Any], tmp_path: Path) -> None:
    """Review finding: any file under parts/ used to pass for a cluster run's leftovers."""
    dest = tmp_path / "mine"
    (dest / "parts").mkdir(parents=True)
    (dest / "parts" / "notes.txt").write_text("mine")
    with pytest.raises(StoreExistsError, match="never replaces what it did not write"):
        convert_on_cluster([archives["dir"]], dest, "local:1")
    assert sorted(p.name for p in dest.rglob("*")) == ["notes.txt", "parts"]


def test_no_destination_inside_a_file_or_a_part(archives: dict[str, Any], tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("hi")
    with pytest.raises(StoreExistsError, match="is a file, so no store can be written below it"):
        convert([archives["paths"][0]], afile / "sub", workers=0)
    store = tmp_path / "single.zarr"
    convert([archives["paths"][0]], store, workers=0)
    tracestore.append(str(store), [archives["paths"][1]], workers=0)
    with pytest.raises(TracestoreError, match="is a part of the store"):
        convert_on_cluster([archives["dir"]], store / "parts" / "00001", "local:1")


def test_the_plan_refuses_an_archive_given_twice_before_any_conversion(tmp_path: Path) -> None:
    # issue 22: the same file under a second name, and a copy of another's bytes, are found when the plan is
    # made (same inode; same size and crc32c), naming both and their parts -- not after every part converted,
    # when the commit finds the duplicate ids
    folder = tmp_path / "in"
    folder.mkdir()
    paths, _ids, _csv = _write_archives(folder)
    os.link(paths[1], folder / "zz_link.pkl.gz")
    (folder / "zz_copy.pkl.gz").write_bytes(paths[3].read_bytes())
    with pytest.raises(InputFormatError, match=r"2 archive\(s\) given twice: .*zz_copy\.pkl\.gz \(part \d+\) is the "
                                               r"same content .* as .*traces_0003\.pkl\.gz.*zz_link\.pkl\.gz \(part \d+\) "
                                               r"is the same file as .*traces_0001\.pkl\.gz"):
        plan_parts([folder], part_bytes=1)
    # archives of one size but other bytes are not duplicates
    (folder / "zz_copy.pkl.gz").unlink()
    (folder / "zz_link.pkl.gz").unlink()
    data = bytearray(paths[3].read_bytes())
    data[-10] ^= 0xFF
    (folder / "zz_other.pkl.gz").write_bytes(bytes(data))
    assert len(plan_parts([folder], part_bytes=1)) == len(paths) + 1
