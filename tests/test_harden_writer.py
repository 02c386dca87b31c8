"""Issue 11, the writer's side: an overwrite builds the new store beside the old one and swaps it in at commit
(a failed or killed overwrite leaves the old store as it was), --overwrite starts over, one writer at a time
per destination (a lock), a rerun of a finished conversion is up to date, the generation id, and one rule for
a destination that tracestore did not write."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tracestore
import tracestore.store.destination as destination_mod
import tracestore.store.writer as writer_mod
from tracestore.cli import main
from tracestore.convert import convert
from tracestore.errors import (
    IncompleteStoreError,
    NonFiniteValueError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
)
from tracestore.format import schema
from tracestore.testing import synthetic_ids, synthetic_sequences
from tracestore.testing.archives import make_records, write_pickle, write_record_archive

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
def test_failed_overwrite_leaves_the_old_store_untouched(tmp_path):
    dest = tmp_path / "s.zarr"
    convert([archives(tmp_path / "old", 2)], dest, workers=0)
    before = tree(dest)
    bad = archives(tmp_path / "new", 3, nan_in_last=True)  # a NaN in a later archive
    with pytest.raises(NonFiniteValueError, match=r"t2\.pkl\.gz"):
        convert([bad], dest, workers=0, overwrite=True)
    assert tree(dest) == before and len(tracestore.open(dest)) == 6
    assert siblings(dest) == []  # neither the half-built new store nor the lock is left


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


@pytest.mark.parametrize("crash_at", [1, 2])  # before the first rename, between the two
def test_a_crash_during_the_swap_is_finished_by_the_next_writer(tmp_path, monkeypatch, crash_at):
    # the two-rename swap, where the kernel cannot exchange two directories atomically
    monkeypatch.setattr(destination_mod, "_exchange", lambda a, b: False)
    dest = tmp_path / "s.zarr"
    convert([archives(tmp_path / "old", 1)], dest, workers=0)
    calls = [0]
    orig = destination_mod._rename

    def rename(a, b):
        calls[0] += 1
        if calls[0] == crash_at:
            raise OSError("simulated crash")
        orig(a, b)

    monkeypatch.setattr(destination_mod, "_rename", rename)
    new = archives(tmp_path / "new", 2)
    with pytest.raises(OSError, match="simulated crash"):
        convert([new], dest, workers=0, overwrite=True)
    monkeypatch.setattr(destination_mod, "_rename", orig)
    if crash_at == 2:  # DEST missing, the new store committed beside it: a reader is told to retry
        with pytest.raises(IncompleteStoreError, match="being replaced .* open it again in a moment"):
            tracestore.open(dest)
    # a committed copy of the old or the new store exists at every moment
    committed = [p for p in (dest, *(dest.parent / s for s in siblings(dest)))
                 if (p / "zarr.json").exists() and json.loads((p / "zarr.json").read_text())
                 ["attributes"]["tracestore"]["committed"]]
    assert committed
    # the next run finds the committed new store and finishes the swap: the same conversion is then up to date
    res = convert([new], dest, workers=0)
    assert res.up_to_date and len(tracestore.open(dest)) == 6 and siblings(dest) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 RENAME_EXCHANGE is Linux's")
def test_the_swap_is_one_atomic_exchange_dest_is_never_missing(tmp_path, monkeypatch):
    dest = tmp_path / "s.zarr"
    convert([archives(tmp_path / "old", 1)], dest, workers=0)
    renames = []
    monkeypatch.setattr(destination_mod, "_rename", lambda a, b: renames.append((a, b)))
    seen = []
    orig = destination_mod._exchange

    def exchange(a, b):
        ok = orig(a, b)
        seen.append(ok)
        assert (dest / "zarr.json").exists()
        return ok

    monkeypatch.setattr(destination_mod, "_exchange", exchange)
    convert([archives(tmp_path / "new", 2)], dest, workers=0, overwrite=True)
    if seen != [True]:
        pytest.skip("this file system cannot exchange two directories")
    assert renames == [] and len(tracestore.open(dest)) == 6 and siblings(dest) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 RENAME_EXCHANGE is Linux's")
def test_a_crash_right_after_the_exchange_keeps_the_new_store(tmp_path, monkeypatch):
    # the old store now sits in DEST.tracestore-new, committed: the swap record says it is the old one
    dest = tmp_path / "s.zarr"
    convert([archives(tmp_path / "old", 1)], dest, workers=0)
    orig = destination_mod._exchange

    def exchange_then_crash(a, b):
        if not orig(a, b):
            pytest.skip("this file system cannot exchange two directories")
        raise OSError("simulated crash")

    monkeypatch.setattr(destination_mod, "_exchange", exchange_then_crash)
    new = archives(tmp_path / "new", 2)
    with pytest.raises(OSError, match="simulated crash"):
        convert([new], dest, workers=0, overwrite=True)
    monkeypatch.setattr(destination_mod, "_exchange", orig)
    assert len(tracestore.open(dest)) == 6  # the new store, readable at once
    res = convert([new], dest, workers=0)  # settles: the old store beside it is deleted, not swapped back
    assert res.up_to_date and len(tracestore.open(dest)) == 6 and siblings(dest) == []


# -- item 2: --overwrite starts over -------------------------------------------------------------------------
def test_overwrite_of_an_unfinished_conversion_starts_over(tmp_path):
    d = archives(tmp_path / "in", 3, nan_in_last=True)
    dest = tmp_path / "s.zarr"
    with pytest.raises(NonFiniteValueError):
        convert([d], dest, workers=0)
    write_record_archive(d / "t2.pkl.gz", 3, L, D, start=6)  # fixed
    res = convert([d], dest, workers=0, overwrite=True)
    assert res.resumed_sources == 0 and "(0 done by an earlier run)" in res.summary()
    assert tracestore.open(dest).ids.tolist() == [f"q{i:06d}" for i in range(9)]


def test_resume_checks_the_finished_archives_by_their_crc32c(tmp_path):
    # a review found: an archive changed after it was converted, keeping its size and mtime, was trusted
    d = tmp_path / "in"
    recs = make_records(3, L, D, start=0)
    write_pickle(d / "t0.pkl", recs, compresslevel=None)  # plain: one value can change in place
    write_pickle(d / "t1.pkl.gz", make_records(3, L, D, start=3))
    bad = make_records(3, L, D, start=6)
    bad[1]["hidden_states"][0, 0] = np.nan
    write_pickle(d / "t2.pkl.gz", bad)
    dest = tmp_path / "s.zarr"
    with pytest.raises(NonFiniteValueError):
        convert([d], dest, workers=0)  # t0, t1 done and checkpointed, t2 refused
    write_pickle(d / "t2.pkl.gz", make_records(3, L, D, start=6))
    t0 = d / "t0.pkl"
    st, raw = t0.stat(), bytearray(t0.read_bytes())
    at = bytes(raw).index(np.ascontiguousarray(recs[0]["hidden_states"]).tobytes())
    raw[at] ^= 1  # the lowest mantissa bit of the first value: same size, still a valid archive
    t0.write_bytes(bytes(raw))
    os.utime(t0, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(IncompleteStoreError, match=r"t0\.pkl has changed since it was converted"):
        convert([d], dest, workers=0)
    res = convert([d], dest, workers=0, overwrite=True)
    assert res.resumed_sources == 0 and len(tracestore.open(dest)) == 9


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


HOLDER = r"""
import sys, time
import tracestore
w = tracestore.create(sys.argv[1], num_layers=3, hidden_size=16)
print("holding", flush=True)
time.sleep(120)
"""


def test_convert_refuses_a_destination_another_process_writes_and_takes_over_a_dead_ones_lock(tmp_path, capsys):
    dest = tmp_path / "s.zarr"
    d = archives(tmp_path / "in", 2)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(dest)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        assert main(["convert", str(d), "-o", str(dest), "--workers", "0", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {holder.pid} on host" in err[0] and "being written by another writer" in err[0]
    finally:
        holder.kill()  # kill -9: no clean-up, the lock stays behind
        holder.wait()
        holder.stdout.close()
    assert (tmp_path / "s.zarr.tracestore-lock" / "lock.json").exists()
    assert main(["convert", str(d), "-o", str(dest), "--workers", "0", "--no-progress"]) == 0
    assert f"taking over the lock of a writer that is gone (pid {holder.pid}" in capsys.readouterr().err
    assert len(tracestore.open(dest)) == 6 and siblings(dest) == []


def test_a_lock_from_another_host_is_refused_naming_it(tmp_path):
    lock = tmp_path / "s.zarr.tracestore-lock"
    lock.mkdir()
    (lock / "lock.json").write_text(json.dumps({"pid": 1, "host": "elsewhere-7", "started": "2026-01-01T00:00:00"}))
    with pytest.raises(StoreLockedError, match=r"pid 1 on host 'elsewhere-7'.*delete .*lock\.json"):
        tracestore.create(tmp_path / "s.zarr", num_layers=L, hidden_size=D)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process start times from /proc")
def test_a_lock_whose_pid_is_now_another_process_is_taken_over(tmp_path, capsys):
    # containers reuse small pids: pid 1 is alive here, but it is not the process that took the lock
    import socket

    lock = tmp_path / "s.zarr.tracestore-lock"
    lock.mkdir()
    (lock / "lock.json").write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "started": "x",
                                                "token": "t", "process_start": "999999999999"}))
    with tracestore.create(tmp_path / "s.zarr", num_layers=L, hidden_size=D) as w:
        w.append(synthetic_ids(2), synthetic_sequences(2, L, D))
    assert "taking over the lock of a writer that is gone (pid 1" in capsys.readouterr().err
    # the same pid with its real start time is a live holder: refused, saying how to clear a stale lock
    lock.mkdir()
    parent = os.getppid()  # alive, and the process it was when the lock was "taken"
    (lock / "lock.json").write_text(json.dumps({"pid": parent, "host": socket.gethostname(), "started": "x",
                                                "token": "t", "process_start": destination_mod._process_start(parent)}))
    with pytest.raises(StoreLockedError, match=r"if you are sure no writer runs on it, delete .*lock\.json"):
        destination_mod.DestinationLock.acquire(writer_mod.LocalLocation(tmp_path / "s.zarr"))


def test_release_leaves_another_writers_lock_directory_alone(tmp_path):
    # releasing used to delete the whole lock directory, racing with a writer creating its lock in it
    dest = writer_mod.LocalLocation(tmp_path / "s.zarr")
    a = destination_mod.DestinationLock.acquire(dest)
    partial = tmp_path / "s.zarr.tracestore-lock" / "lock.json.other.partial"
    partial.write_bytes(b"another writer's lock, being written")
    a.release()
    assert partial.exists() and not (tmp_path / "s.zarr.tracestore-lock" / "lock.json").exists()
    partial.unlink()
    b = destination_mod.DestinationLock.acquire(dest)
    b.release()
    assert not (tmp_path / "s.zarr.tracestore-lock").exists()


def test_a_symlinked_destination_is_written_at_its_target(tmp_path):
    target = tmp_path / "disk" / "s.zarr"
    target.parent.mkdir()
    link = tmp_path / "s.zarr"
    link.symlink_to(target)  # dangling until the first conversion
    convert([archives(tmp_path / "old", 1)], link, workers=0)
    assert link.is_symlink() and (target / "zarr.json").exists() and len(tracestore.open(link)) == 3
    convert([archives(tmp_path / "new", 2)], link, workers=0, overwrite=True)
    assert link.is_symlink() and len(tracestore.open(link)) == 6
    assert siblings(link) == [] and siblings(target) == []


def test_a_destination_that_is_a_file_is_one_clear_refusal(tmp_path):
    dest = tmp_path / "s.zarr"
    dest.write_text("not a store")
    for overwrite in (False, True):
        with pytest.raises(StoreExistsError, match=r"s\.zarr is a file, not a directory"):
            convert([archives(tmp_path / "in", 1)], dest, workers=0, overwrite=overwrite)
    assert dest.read_text() == "not a store"


def test_the_lock_is_released_when_the_writer_fails(tmp_path):
    dest = tmp_path / "s.zarr"
    with pytest.raises(NonFiniteValueError):
        convert([archives(tmp_path / "in", 2, nan_in_last=True)], dest, workers=0)
    assert not (tmp_path / "s.zarr.tracestore-lock").exists()


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


# -- item 4: a rerun of a finished conversion is up to date ----------------------------------------------------
def test_rerunning_a_finished_conversion_is_up_to_date_and_writes_nothing(tmp_path, capsys):
    d = archives(tmp_path / "in", 2)
    dest = tmp_path / "s.zarr"
    args = ["convert", str(d), "-o", str(dest), "--workers", "0", "--no-progress"]
    assert main(args) == 0
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in dest.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(args) == 0
    assert f"{dest} is up to date (6 traces from 2 archives)" in capsys.readouterr().out
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in dest.rglob("*") if p.is_file()} == before

    # a kill between the commit marker and the clean-up left the staging state: still up to date, litter gone
    (dest / "_tracestore").mkdir()
    (dest / schema.STAGING_STATE_KEY).write_text("{}")
    assert main(args) == 0 and not (dest / "_tracestore").exists()

    # other options: refused
    assert main([*args, "--allow-nan"]) == 2
    assert "other archives, scores or options" in capsys.readouterr().err
    # the same names, sizes and times but other bytes: the checksums tell
    p = d / "t1.pkl.gz"
    st = p.stat()
    raw = bytearray(p.read_bytes())
    write_pickle(p, make_records(3, L, D, start=50))
    if len(p.read_bytes()) == len(raw):
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert len(tracestore.open(dest)) == 6


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


# -- item 19: one rule for what tracestore did not write ------------------------------------------------------
@pytest.mark.parametrize("what", ["files", "zarr"])
def test_a_destination_tracestore_did_not_write_is_refused_with_or_without_overwrite(tmp_path, capsys, what):
    import zarr

    dest = tmp_path / "mine"
    if what == "files":
        dest.mkdir()
        (dest / "notes.txt").write_text("mine")
    else:
        zarr.create_group(str(dest))
    before = tree(dest)
    d = archives(tmp_path / "in", 1)
    msgs = []
    for extra in ([], ["--overwrite"]):
        assert main(["convert", str(d), "-o", str(dest), "--workers", "0", "--no-progress", *extra]) == 2
        msgs.append(capsys.readouterr().err.strip())
    assert msgs[0] == msgs[1] and "never replaces what it did not write" in msgs[0]
    assert "pass --overwrite" not in msgs[0]
    for overwrite in (False, True):
        with pytest.raises(StoreExistsError, match="never replaces what it did not write"):
            tracestore.create(dest, num_layers=L, hidden_size=D, overwrite=overwrite)
    assert tree(dest) == before and siblings(dest) == []
    with pytest.raises((StoreNotFoundError, Exception)):
        tracestore.open(dest)


# -- item 20 (docs half): close() does what docs/format.md says, in that order ----------------------------
def test_close_writes_in_the_documented_order(tmp_path, monkeypatch):
    import zarr.storage

    url = tmp_path / "s.zarr"
    write_store(url, 2)
    log: list[str] = []
    orig_set, orig_delete, orig_rename = zarr.storage.LocalStore.set, writer_mod.LocalLocation.delete, destination_mod._rename

    async def set_(self, key, value):
        if key == "zarr.json":
            committed = json.loads(value.to_bytes())["attributes"]["tracestore"]["committed"]
            log.append("commit" if committed else "root")
        elif key.endswith("zarr.json") and key.split("/")[0] in ("ids", "scores"):
            log.append(key.split("/")[0])
        await orig_set(self, key, value)

    def delete(self, key):
        if key.startswith("_tracestore"):
            log.append("delete staging")
        orig_delete(self, key)

    def rename(a, b):
        log.append(f"rename {a.path.name} -> {b.path.name}")
        orig_rename(a, b)

    orig_exchange = destination_mod._exchange

    def exchange(a, b):
        ok = orig_exchange(a, b)
        if ok:
            log.append(f"exchange {a.path.name} <-> {b.path.name}")
        return ok

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set_)
    monkeypatch.setattr(writer_mod.LocalLocation, "delete", delete)
    monkeypatch.setattr(destination_mod, "_rename", rename)
    monkeypatch.setattr(destination_mod, "_exchange", exchange)
    w = tracestore.create(url, num_layers=L, hidden_size=D, overwrite=True)
    w.append(synthetic_ids(3), synthetic_sequences(3, L, D))
    log.clear()
    w.close()
    swap = (["exchange s.zarr.tracestore-new <-> s.zarr"] if any(e.startswith("exchange") for e in log) else
            ["rename s.zarr -> s.zarr.tracestore-old", "rename s.zarr.tracestore-new -> s.zarr"])
    assert log == ["ids", "scores", "commit", "delete staging", *swap]
    assert siblings(url) == [] and len(tracestore.open(url)) == 3


def test_two_writers_taking_over_one_dead_lock_do_not_both_win(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "x"}).encode()
    lock = tmp_path / "s.zarr.tracestore-lock"
    lock.mkdir()
    (lock / "lock.json").write_bytes(stale)
    # the first writer takes over; a second one that read the same stale lock (its tag) must not replace the
    # new one: the takeover is a compare-and-swap
    tag = writer_mod.LocalLocation(lock).read_tagged("lock.json")[1]
    w = tracestore.create(tmp_path / "s.zarr", num_layers=L, hidden_size=D)
    assert writer_mod.LocalLocation(lock).replace_if("lock.json", b"{}", tag) is None
    assert json.loads((lock / "lock.json").read_text())["pid"] == os.getpid()
    with pytest.raises(StoreLockedError, match=rf"pid {os.getpid()}"):
        tracestore.create(tmp_path / "s.zarr", num_layers=L, hidden_size=D)
    w.abort()
    assert not lock.exists()


def test_a_crash_during_the_s3_swap_is_finished_by_the_next_writer(monkeypatch):
    from tracestore.store.remote import S3Location
    from tracestore.testing.s3 import moto_s3

    with moto_s3() as s3:
        url, so = s3.url("swap/s.zarr"), s3.storage_options()
        write_store(url, 5, storage_options=so, shard_bytes=L * D * 2 * 2)
        calls = [0]
        orig = S3Location.copy_from

        def copy_from(self, src, key):
            calls[0] += 1
            if calls[0] == 3:
                raise OSError("simulated crash")
            orig(self, src, key)

        monkeypatch.setattr(S3Location, "copy_from", copy_from)
        with pytest.raises(OSError, match="simulated crash"):
            write_store(url, 4, 20, overwrite=True, storage_options=so, shard_bytes=L * D * 2 * 2)
        monkeypatch.setattr(S3Location, "copy_from", orig)
        with pytest.raises(IncompleteStoreError):  # DEST mid-swap; the committed new store is beside it
            tracestore.open(url, storage_options=so)
        assert len(tracestore.open(url + ".tracestore-new", storage_options=so)) == 4
        with pytest.raises(StoreExistsError, match=r"already holds a store \(4 traces\)"):  # settled first
            tracestore.create(url, num_layers=L, hidden_size=D, storage_options=so)
        s = tracestore.open(url, storage_options=so)
        assert s.ids.tolist() == synthetic_ids(4, 20)
        np.testing.assert_array_equal(s.sequences[:], synthetic_sequences(4, L, D, start=20).astype(np.float16))
        assert list(tracestore.store.urls.resolve(url + ".tracestore-new", so).list()) == []
