"""Issue 22: a writer's lock is a lease. A live lease is refused whatever host asks, an expired one is taken over
from any host; every takeover and renewal is a compare-and-swap (two takers: one wins, on S3 too); a writer
paused past its lease finds out before it commits (fencing) and stops, leaving the store to the writer that
took over; a part killed on one host resumes on another once the lease has expired."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import tracestore
from tracestore.errors import LeaseLostError, StoreLockedError
from tracestore.store import destination
from tracestore.store.destination import DestinationLock
from tracestore.store.remote import S3Location
from tracestore.store.urls import LocalLocation
from tracestore.testing.archives import write_archive_set
from tracestore.testing.s3 import moto_s3

L, D = 4, 32
LEASE, RENEW = 2.0, 0.25  # seconds, for the subprocesses (TRACESTORE_LOCK_*)

# The real command line in a subprocess, with blocks of 5 traces; after the n-th block appended it SIGKILLs
# or SIGSTOPs itself ("kill" / "stop"), or does nothing ("none").
HARNESS = r"""
import os, signal, sys
import tracestore.convert.records as records
import tracestore.convert.pipeline as pipeline

records.BLOCK_BYTES = 5 * 4 * 32 * 4
action, n = sys.argv[1], int(sys.argv[2])
count = [0]
orig_add = pipeline._Run.add_block
def add_block(self, src, blk):
    orig_add(self, src, blk)
    count[0] += 1
    if count[0] == n and action != "none":
        os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGSTOP)
pipeline._Run.add_block = add_block

from tracestore.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _env(host: str) -> dict[str, str]:
    return dict(os.environ, TRACESTORE_HOST=host, TRACESTORE_LOCK_LEASE_SECONDS=str(LEASE),
                TRACESTORE_LOCK_RENEW_SECONDS=str(RENEW))


def _cmd(action: str, n: int, args: list[str]) -> list[str]:
    return [sys.executable, "-c", HARNESS, action, str(n), *args]


def _run(host: str, action: str, n: int, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cmd(action, n, args), capture_output=True, text=True, timeout=300, env=_env(host))


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file's bytes, the root's `generation` (a fresh id per store) blanked."""
    return {str(p.relative_to(root)): re.sub(rb'"generation": "[0-9a-f]{32}"', b'"generation": "-"', p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def _siblings(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(dest.name + "."))


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    root = tmp_path_factory.mktemp("leases")
    write_archive_set(root / "in", files=4, traces_per_file=12, num_layers=L, hidden_size=D)
    return root


def _convert_args(root: Path, dest: Path) -> list[str]:
    return ["convert", str(root / "in"), "-o", str(dest), "--scores", str(root / "in" / "ground_truth_scores.csv"),
            "--shard-bytes", str(7 * L * D * 2), "--workers", "0", "--no-progress", "-q"]


@pytest.fixture(scope="module")
def reference(archives):
    ref = archives / "ref.zarr"
    r = _run("host-ref", "none", 0, _convert_args(archives, ref))
    assert r.returncode == 0, r.stderr
    return tree_bytes(ref)


def _write_lock(dest: Path, **record) -> None:
    lock = dest.parent / (dest.name + destination.LOCK_SUFFIX)
    lock.mkdir(exist_ok=True)
    (lock / destination.LOCK_KEY).write_text(json.dumps(record))


# -- the lease -------------------------------------------------------------------------------------------------
def test_the_holder_renews_its_lease_and_releases_it(tmp_path):
    dest = LocalLocation(tmp_path / "s.zarr")
    lock = DestinationLock.acquire(dest, lease=1.0, renew=0.1)
    path = tmp_path / "s.zarr.tracestore-lock" / "lock.json"
    first = json.loads(path.read_text())
    assert first["host"] and first["lease_seconds"] == 1.0 and first["expires"] > time.time()
    time.sleep(0.5)
    assert json.loads(path.read_text())["expires"] > first["expires"]  # renewed in the background
    lock.fence()  # still ours
    lock.release()
    assert not path.parent.exists()
    with pytest.raises(ValueError, match="renew more often"):
        DestinationLock.acquire(dest, lease=1.0, renew=2.0)


def test_a_live_lease_is_refused_from_any_host_an_expired_one_taken_from_any_host(tmp_path, capsys, monkeypatch):
    dest = tmp_path / "s.zarr"
    # another host, a live lease: refused, saying when it expires
    _write_lock(dest, pid=1, host="elsewhere", started="x", token="t", expires=time.time() + 30, lease_seconds=60)
    with pytest.raises(StoreLockedError, match=r"pid 1 on host 'elsewhere'.*lease runs 3\d s more") as e:
        tracestore.create(dest, num_layers=L, hidden_size=D)
    assert 25 < e.value.expires_in <= 30
    # the same host, whatever the pid says, with its lease live: refused too (a live holder may be paused)
    monkeypatch.setenv("TRACESTORE_HOST", "elsewhere")
    with pytest.raises(StoreLockedError, match="lease runs"):
        tracestore.create(dest, num_layers=L, hidden_size=D)
    monkeypatch.delenv("TRACESTORE_HOST")
    # another host, the lease expired: taken over, with a note
    _write_lock(dest, pid=1, host="elsewhere", started="x", token="t", expires=time.time() - 1, lease_seconds=60)
    with tracestore.create(dest, num_layers=L, hidden_size=D) as w:
        w.append(["a"], np.zeros((1, L, D), "float32"))
    err = capsys.readouterr().err
    assert "taking over the lock of a writer that is gone (pid 1 on host 'elsewhere'" in err
    assert "its lease expired" in err
    # this host, a live pid (our parent), but its lease expired: taken over (it stopped renewing: paused)
    dest2 = tmp_path / "t.zarr"
    _write_lock(dest2, pid=os.getppid(), host=destination.host_name(), started="x", token="t",
                process_start=destination._process_start(os.getppid()), expires=time.time() - 1)
    DestinationLock.acquire(LocalLocation(dest2)).release()
    assert "its lease expired" in capsys.readouterr().err


def test_two_writers_taking_over_one_expired_lease_on_s3_never_both_win():
    with moto_s3() as ep:
        dest = S3Location(ep.url("cas/store.zarr"), ep.storage_options())
        lock_loc = dest.sibling(destination.LOCK_SUFFIX)
        stale = json.dumps({"pid": 1, "host": "gone", "started": "x", "token": "old", "expires": time.time() - 5})
        assert lock_loc.create_exclusive(destination.LOCK_KEY, stale.encode())
        # the endpoint honours If-Match: a PUT on a stale ETag is refused
        raw, tag = lock_loc.read_tagged(destination.LOCK_KEY)
        assert raw == stale.encode() and tag
        new_tag = lock_loc.replace_if(destination.LOCK_KEY, stale.encode() + b" ", tag)
        assert new_tag not in (None, tag)
        assert lock_loc.replace_if(destination.LOCK_KEY, b"{}", tag) is None  # the version read before: refused
        assert lock_loc.replace_if(destination.LOCK_KEY, stale.encode(), new_tag) is not None

        barrier = threading.Barrier(6)
        won: list[DestinationLock] = []
        refused: list[BaseException] = []

        def take() -> None:
            barrier.wait()
            try:
                won.append(DestinationLock.acquire(dest, lease=30, renew=10))
            except StoreLockedError as e:
                refused.append(e)

        threads = [threading.Thread(target=take) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(won) == 1 and len(refused) == 5, (won, refused)
        assert json.loads(lock_loc.read_bytes(destination.LOCK_KEY))["token"] == won[0].holder["token"]
        # the winner's renewals and fence still work; a loser's stale view can never replace it
        won[0].fence()
        won[0].release()
        assert lock_loc.read_bytes(destination.LOCK_KEY) is None


def test_a_holder_whose_lock_was_taken_over_stops_before_its_commit(tmp_path):
    dest = LocalLocation(tmp_path / "s.zarr")
    lock = DestinationLock.acquire(dest, lease=30, renew=10)
    path = tmp_path / "s.zarr.tracestore-lock" / "lock.json"
    path.write_text(json.dumps({"pid": 1, "host": "other", "token": "theirs", "expires": time.time() + 30}))
    with pytest.raises(LeaseLostError, match=r"lost its lock.*pid 1 on host 'other' holds it now.*stopping before "
                                             r"the commit"):
        lock.fence("commit")
    lock.release()  # not ours: left alone
    assert json.loads(path.read_text())["token"] == "theirs"


# -- fencing, end to end -----------------------------------------------------------------------------------------
def _wait_stopped(pid: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.02)
    raise AssertionError("the conversion never paused")


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process states from /proc")
def test_a_writer_paused_past_its_lease_fails_cleanly_and_the_store_equals_one_conversion(archives, reference):
    dest = archives / "paused.zarr"
    args = _convert_args(archives, dest)
    first = subprocess.Popen(_cmd("stop", 3, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env("host-a"))
    try:
        _wait_stopped(first.pid)
        # while its lease is live, another host is refused; once it expired, the other host takes over and
        # finishes the conversion (resuming from the paused writer's checkpoint)
        r = _run("host-b", "none", 0, args)
        assert r.returncode != 0 and "lease runs" in r.stderr, r.stderr
        time.sleep(LEASE + 0.5)
        r = _run("host-b", "none", 0, args)
        assert r.returncode == 0, r.stderr
        assert "taking over the lock of a writer that is gone" in r.stderr and "lease expired" in r.stderr
        committed = tree_bytes(dest)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    assert first.returncode != 0, (out, err)
    assert "lost its lock" in err and "stopping before" in err, err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert tree_bytes(dest) == committed == reference  # the paused writer changed nothing
    assert _siblings(dest) == []  # no lock left behind


# -- a retry on another host ------------------------------------------------------------------------------------
def test_a_part_killed_on_one_host_resumes_on_another_once_its_lease_expired(archives, reference, tmp_path):
    dest = tmp_path / "store.zarr"
    part_args = ["convert-part", str(archives / "in"), "-o", str(dest), "--part", "1", "--scores",
                 str(archives / "in" / "ground_truth_scores.csv"), "--shard-bytes", str(7 * L * D * 2), "--workers",
                 "0", "--no-progress", "-q"]
    r = _run("host-a", "kill", 4, part_args)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    lock = json.loads((dest / "parts" / "00001.tracestore-lock" / "lock.json").read_text())
    assert lock["host"] == "host-a"
    r = _run("host-b", "none", 0, part_args)  # at once: the lease is live, the host cannot tell the pid is gone
    assert r.returncode == 2 and "lease runs" in r.stderr, r.stderr
    time.sleep(max(0.0, lock["expires"] - time.time()) + 0.2)
    r = _run("host-b", "none", 0, part_args)
    assert r.returncode == 0, r.stderr
    assert "its lease expired" in r.stderr
    assert _siblings(dest / "parts" / "00001") == []
    # the part, once committed, is the same store as one conversion (its own traces: part 1 of the store)
    r = _run("host-b", "none", 0, ["commit", str(dest), "--parts", "1"])
    assert r.returncode == 0, r.stderr
    ref = tracestore.open(archives / "ref.zarr")
    got = tracestore.open(dest)
    assert got.ids.tolist() == ref.ids.tolist()
    np.testing.assert_array_equal(got.sequences[:], ref.sequences[:], strict=True)
    assert tree_bytes(dest / "parts" / "00001") == reference


# -- from the hostile review ------------------------------------------------------------------------------------
def test_a_dead_pid_in_another_pid_namespace_is_not_taken_at_once(tmp_path):
    # the same host name but another container (pid namespace) or another VM: its pid says nothing here
    dest = tmp_path / "s.zarr"
    _write_lock(dest, pid=2**30, host=destination.host_name(), started="x", token="t", machine="other-boot:1",
                expires=time.time() + 30, lease_seconds=60)
    with pytest.raises(StoreLockedError, match="lease runs"):
        DestinationLock.acquire(LocalLocation(dest))
    # the same machine, the pid gone: taken at once, as before
    _write_lock(dest, pid=2**30, host=destination.host_name(), started="x", token="t",
                machine=destination._machine_id(), expires=time.time() + 30, lease_seconds=60)
    DestinationLock.acquire(LocalLocation(dest)).release()


def test_damaged_released_and_far_future_locks(tmp_path):
    dest = tmp_path / "s.zarr"
    for bad in ({"pid": 10**20, "host": "h", "expires": time.time() + 5}, {"pid": 1, "host": "h", "expires": "nan"},
                {"pid": 1, "host": "h", "expires": float("nan")}):
        (tmp_path / "s.zarr.tracestore-lock").mkdir(exist_ok=True)
        (tmp_path / "s.zarr.tracestore-lock" / "lock.json").write_text(json.dumps(bad))
        with pytest.raises(StoreLockedError, match=r"cannot be read; .*delete .*lock\.json and retry"):
            DestinationLock.acquire(LocalLocation(dest))
    # released (empty, what an interrupted release on S3 leaves): free
    (tmp_path / "s.zarr.tracestore-lock" / "lock.json").write_bytes(b"")
    DestinationLock.acquire(LocalLocation(dest)).release()
    # a dead writer whose clock ran a year ahead blocks for its lease at most, not a year
    _write_lock(dest, pid=1, host="elsewhere", started="x", token="t", expires=time.time() + 3e7, lease_seconds=60)
    with pytest.raises(StoreLockedError) as e:
        DestinationLock.acquire(LocalLocation(dest))
    assert e.value.expires_in is not None and e.value.expires_in <= 60


def test_a_commit_whose_manifest_changed_under_it_writes_nothing(tmp_path, monkeypatch):
    from tracestore.store import parts
    from tracestore.store.writer import create as create_store
    from tracestore.testing.synthetic import synthetic_ids, synthetic_sequences

    dest = tmp_path / "s.zarr"
    for k in range(2):
        with create_store(dest / "parts" / f"{k:05d}", num_layers=L, hidden_size=D) as w:
            w.append(synthetic_ids(2, 2 * k), synthetic_sequences(2, L, D, start=2 * k))
    parts.commit_parts(dest, parts=[0])
    before = (dest / "zarr.json").read_bytes()
    found = parts._found_parts

    def meanwhile(loc):  # another commit, which took the lock over from this paused one, commits first
        out = found(loc)
        (dest / "zarr.json").write_bytes(before.replace(b'"num_traces"', b'"num_traces" ', 1))
        return out

    monkeypatch.setattr(parts, "_found_parts", meanwhile)
    with pytest.raises(LeaseLostError, match="its manifest changed while this commit ran"):
        parts.commit_parts(dest)
    assert (dest / "zarr.json").read_bytes() == before.replace(b'"num_traces"', b'"num_traces" ', 1)
    assert not list(dest.glob("*.mutex"))
