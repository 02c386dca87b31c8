"""Issue 22, item 7: what convert-part and --dask say in the cases an earlier review found wanting -- advice
that fits the command, a scheduler that does not answer within a shorter, documented wait (--dask-timeout),
and Ctrl-C during a local cluster's conversion as one line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tracestore.cli import main
from tracestore.convert.cluster import CONNECT_SECONDS, convert_on_cluster
from tracestore.errors import StoreExistsError
from tracestore.testing.archives import write_archive_set, write_record_archive

pytest.importorskip("distributed")
L, D = 2, 8

KILL_AFTER_CHECKPOINT = r"""
import os, signal, sys
import tracestore.convert.records as records
import tracestore.store.urls as urls
from tracestore.format import schema
records.BLOCK_BYTES = 2 * 2 * 8 * 4
orig = urls.LocalLocation.write_bytes
def write_bytes(self, key, data, **kw):
    orig(self, key, data, **kw)
    if key == schema.STAGING_STATE_KEY and b'"fingerprint"' in data:
        os.kill(os.getpid(), signal.SIGKILL)
urls.LocalLocation.write_bytes = write_bytes
from tracestore.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("advice")
    write_archive_set(root / "a", files=3, traces_per_file=6, num_layers=L, hidden_size=D)
    write_archive_set(root / "b", files=3, traces_per_file=6, num_layers=L, hidden_size=D, seed=5)
    (root / "c").mkdir()  # other traces (ids from 100): what an append adds
    write_record_archive(root / "c" / "more.pkl.gz", 6, L, D, seed=7, start=100)
    return root


def test_convert_part_into_an_unfinished_part_of_other_archives_gets_convert_parts_advice(sets, tmp_path, capsys):
    dest = tmp_path / "s.zarr"
    part = ["-o", str(dest), "--part", "1", "--workers", "0", "--no-progress", "-q"]
    r = subprocess.run([sys.executable, "-c", KILL_AFTER_CHECKPOINT, "convert-part", str(sets / "a"), *part],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert main(["convert-part", str(sets / "b"), *part]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the note of the lock taken over
    assert err.startswith("tracestore convert-part: error:") and "unfinished conversion of other inputs" in err, err
    assert "--overwrite" not in err and "this part's own archives" in err and f"delete {dest}/parts/00001" in err
    assert main(["convert-part", str(sets / "a"), *part]) == 0  # its own archives: resumed


def test_a_dask_rerun_after_an_append_says_the_conversion_is_done(sets, tmp_path):
    dest = tmp_path / "s.zarr"
    convert_on_cluster([sets / "a"], dest, "local:1", part_bytes=1)
    assert main(["append", str(dest), str(sets / "c"), "--no-progress", "-q"]) == 0
    with pytest.raises(StoreExistsError, match=r"holds the 3 part\(s\) of these archives, committed, and 1 more added "
                                               r"after them \(tracestore append\); this conversion is done"):
        convert_on_cluster([sets / "a"], dest, "local:1", part_bytes=1)


def test_an_unreachable_scheduler_fails_within_the_connect_timeout(sets, tmp_path, capsys):
    assert CONNECT_SECONDS <= 10
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    rc = main(["convert", str(sets / "a"), "-o", str(tmp_path / "x.zarr"), "--dask", f"tcp://127.0.0.1:{port}",
               "--dask-timeout", "1", "--no-progress"])
    # a bound on a hang, not a timing: distributed's own connect timeout is 30 s; importing distributed and
    # starting the client take a few seconds on a loaded machine, so the bound leaves them room
    assert rc == 2 and time.monotonic() - t < 25
    err = capsys.readouterr().err
    assert "no Dask scheduler answered within 1 s" in err and "--dask-timeout" in err
    assert main(["convert", str(sets / "a"), "-o", str(tmp_path / "x.zarr"), "--dask-timeout", "1"]) == 2
    assert "--dask-timeout goes with --dask" in capsys.readouterr().err


# a conversion on local:2 whose blocks are slow (a worker plugin), so that Ctrl-C lands in the middle of it
SLOW_CLI = r"""
import sys, time
import tracestore.convert.cluster as cluster

class SlowBlocks:
    name = "slow-blocks"
    def setup(self, worker):
        import time
        from tracestore.convert import pipeline, records
        records.BLOCK_BYTES = 2 * 2 * 8 * 4
        orig = pipeline._Run.add_block
        def add_block(run, src, blk):
            time.sleep(0.5)
            orig(run, src, blk)
        pipeline._Run.add_block = add_block

orig_connect = cluster._connect
import contextlib
@contextlib.contextmanager
def _connect(scheduler, timeout=None):
    from distributed import WorkerPlugin
    with orig_connect(scheduler, timeout) as client:
        client.register_plugin(type("P", (SlowBlocks, WorkerPlugin), {})())
        print("workers ready", file=sys.stderr, flush=True)
        yield client
cluster._connect = _connect
from tracestore.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="process groups and /proc")
def test_ctrl_c_during_a_local_cluster_conversion_prints_one_line(sets, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, "convert", str(sets / "a"), "-o",
                             str(tmp_path / "s.zarr"), "--dask", "local:2", "--part-size", "1", "--no-progress"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "workers ready" in line, line
    time.sleep(1.5)  # the parts are converting
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C on a terminal does: the whole foreground group
    err = proc.stderr.read()
    proc.wait(60)
    proc.stderr.close()
    assert proc.returncode == 130, (proc.returncode, err)
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines[-1] == "tracestore convert: interrupted", err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and len(lines) <= 2, err  # the plan's line
