"""What is at a store's destination, and who may write it: the writer's lock, the kinds of things a
destination holds, and the swap by which an overwrite replaces a committed store (issue 11).

A writer holds the lock `DEST.tracestore-lock/lock.json` (pid, host, start time, a token, a lease it renews)
for its whole life;
an overwrite builds the new store in `DEST.tracestore-new` and swaps it in at commit, so that a failed or
killed overwrite leaves the old store readable (docs/format.md, "Commit marker and staging").
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .. import config
from ..errors import LeaseLostError, StoreLockedError
from ..format import schema
from .urls import LocalLocation, Location

#: Beside a store DEST (same parent, so that local renames are atomic): the writer's lock, the new store an
#: overwrite builds before it replaces DEST, and the old store while the two are swapped.
LOCK_SUFFIX = ".tracestore-lock"
LOCK_KEY = "lock.json"
NEW_SUFFIX = ".tracestore-new"
OLD_SUFFIX = ".tracestore-old"


# -- the destination: its lock, what it holds, the swap of an overwrite ------------------------------------
def host_name() -> str:
    """The host a writer's lock names: TRACESTORE_HOST where set (containers whose host names repeat, tests
    that play two hosts), else the machine's host name."""
    return os.environ.get("TRACESTORE_HOST") or socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _process_start(pid: int) -> str | None:
    """The kernel's start time of process `pid` (clock ticks since boot, /proc/<pid>/stat field 22), or None
    where /proc cannot tell: with the pid it names one process, even after the pid is reused."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # the name in parentheses may hold spaces
    return fields[19] if len(fields) > 19 else None


def _machine_id() -> str | None:
    """This boot of this kernel and this pid namespace (/proc): a pid means the same process only where both
    agree -- not in another container on the same host name, nor on another VM with the same default name."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _holder_alive(pid: int, proc_start: str | None) -> bool:
    """Whether the lock's holder still runs: its pid is alive and, where both are known, is the same process
    (a pid reused by another process since, common in containers, is not the holder)."""
    if not _pid_alive(pid):
        return False
    if proc_start is None:
        return True
    now = _process_start(pid)
    return now is None or now == proc_start


class DestinationLock:
    """One writer at a time per destination: a lock object beside it (`DEST.tracestore-lock/lock.json`) that is
    a lease. Created only if absent (O_EXCL locally, a conditional PUT on object storage); it names the holder
    (pid, host, start time, a token) and an expiry, which a thread of the holder moves forward every
    config.LOCK_RENEW_SECONDS to config.LOCK_LEASE_SECONDS from now. Every change of it is a compare-and-swap
    (Location.replace_if: If-Match on object storage), so of two writers taking over the same lock one wins.

    Who may take a lock that exists: anyone, once its lease has expired (its holder stopped renewing: killed,
    or paused); on the same host, at once, when its pid is gone. A live lease is never taken, whatever host
    asks. A lock without a lease (tracestore before 0.3) from another host is refused, as before.

    Fencing: a holder that was paused past its lease while another writer took the lock over learns it at its
    next renewal, or at `fence()` -- a renewal the writer calls before its commit marker and a manifest are
    written -- and raises LeaseLostError instead of committing over the new holder's work. The check is made
    by the writer before each write, not enforced by the storage: a holder frozen between a check and its
    write still makes that write on waking (a known limit; storage-side fencing would need every object
    written under its holder's token).

    Released by `release()` (the writer's close() and abort()), and at interpreter exit."""

    def __init__(self, dest: Location, holder: dict[str, Any], tag: str, *, lease: float, renew: float) -> None:
        self.dest = dest
        self.location = dest.sibling(LOCK_SUFFIX)
        self.holder = holder
        self.held = True
        self.lease, self.renew_every = lease, renew
        self._tag = tag
        self._lost: str | None = None  # why the lease was lost, once it was
        self._guard = threading.Lock()  # one renewal at a time (the thread's, fence()'s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name=f"tracestore-lease {dest.url}", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    @property
    def where(self) -> str:
        return f"{self.location.url}/{LOCK_KEY}"

    @classmethod
    def acquire(cls, dest: Location, *, lease: float | None = None, renew: float | None = None) -> DestinationLock:
        """Take the lock on `dest` or raise StoreLockedError naming the holder and, for a lease, when it expires
        (at once: no waiting)."""
        lease = float(config.LOCK_LEASE_SECONDS if lease is None else lease)
        renew = float(config.LOCK_RENEW_SECONDS if renew is None else renew)
        if not 0 < renew < lease:
            raise ValueError(f"lock lease {lease} s, renewed every {renew} s: renew more often than the lease lasts")
        loc = dest.sibling(LOCK_SUFFIX)
        where = f"{loc.url}/{LOCK_KEY}"
        me: dict[str, Any] = {
            "pid": os.getpid(), "host": host_name(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "token": uuid.uuid4().hex, "process_start": _process_start(os.getpid()), "machine": _machine_id(),
            "lease_seconds": lease}
        for _ in range(5):
            me["expires"] = time.time() + lease
            mine = json.dumps(me).encode()
            if loc.create_exclusive(LOCK_KEY, mine):
                _, tag = loc.read_tagged(LOCK_KEY)
                if tag is not None:
                    return cls(dest, me, tag, lease=lease, renew=renew)
                continue  # released at once by someone else (cannot be ours): try again
            raw, tag = loc.read_tagged(LOCK_KEY)
            if raw is None or tag is None:
                continue  # released in between: try again
            released = raw == b""  # released on object storage: replaced by nothing, then (maybe) deleted
            try:
                other = {} if released else json.loads(raw)
                pid, host, started = (0, "", "") if released else (
                    int(other["pid"]), str(other["host"]), str(other.get("started", "?")))
                if not 0 <= pid < 2**31:
                    raise ValueError(pid)
                proc_start = other.get("process_start")
                proc_start = None if proc_start is None else str(proc_start)
                expires = None if other.get("expires") is None else float(other["expires"])
                if expires is not None and not math.isfinite(expires):
                    raise ValueError(expires)
                if expires is not None:  # a dead writer's clock far ahead blocks no longer than its lease
                    expires = min(expires, time.time() + float(other.get("lease_seconds") or lease))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise StoreLockedError(f"{dest.url} is locked by {where}, which cannot be read; if no writer is "
                                       f"running on {dest.url}, delete {where} and retry") from None
            if other.get("token") == me["token"]:  # our own PUT, retried after a lost response
                return cls(dest, me, tag, lease=lease, renew=renew)
            who = f"pid {pid} on host {host!r}, started {started}" if not released else "released"
            now = time.time()
            # (a lock without the machine field, written before it existed: the host name alone, as then)
            same_machine = host == me["host"] and (other.get("machine") is None or me["machine"] is None
                                                   or other.get("machine") == me["machine"])
            if released:
                why = "it was released"
            elif expires is not None and now >= expires:
                why = f"its lease expired {now - expires:.0f} s ago"
            elif same_machine and pid != me["pid"] and not _holder_alive(pid, proc_start):
                why = "it is gone"
            elif expires is None and host != me["host"]:
                raise StoreLockedError(f"{dest.url} is being written by another writer ({who}; lock {where}); "
                                       f"wait for it to finish, or if that writer is gone, delete {where} and retry")
            else:
                same = " (this process: another writer on the same destination is still open)" \
                    if pid == me["pid"] and same_machine else ""
                left = f"; its lease runs {expires - now:.0f} s more unless renewed, a retry after that takes it " \
                       f"over if that writer is gone" if expires is not None else ""
                raise StoreLockedError(f"{dest.url} is being written by another writer ({who}{same}; lock "
                                       f"{where}{left}); wait for it to finish or write to another destination; "
                                       f"if you are sure no writer runs on it, delete {where} and retry",
                                       expires_in=None if expires is None else max(0.0, expires - now))
            me["expires"] = time.time() + lease
            mine = json.dumps(me).encode()
            new_tag = loc.replace_if(LOCK_KEY, mine, tag)
            if new_tag is not None:
                if not released:
                    print(f"tracestore: note: {dest.url}: taking over the lock of a writer that is gone ({who}; "
                          f"{why})", file=sys.stderr)
                return cls(dest, me, new_tag, lease=lease, renew=renew)
            # another writer changed it first (took it over, or its holder renewed): look again
        raise StoreLockedError(f"{dest.url}: could not take the lock {where} (other writers keep taking it)")

    # -- the lease ------------------------------------------------------------------------------------
    def _renew(self) -> None:
        """Move the lease's expiry forward (compare-and-swap on the version we wrote last); on a mismatch the
        lock is not ours any more: remember why."""
        with self._guard:
            if self._lost is not None or not self.held:
                return
            record = dict(self.holder, expires=time.time() + self.lease)
            data = json.dumps(record).encode()
            tag = self.location.replace_if(LOCK_KEY, data, self._tag)
            if tag is not None:
                self._tag, self.holder = tag, record
                return
            raw, now_tag = self.location.read_tagged(LOCK_KEY)
            try:
                other = json.loads(raw) if raw else None
            except ValueError:
                other = None
            if isinstance(other, dict) and other.get("token") == self.holder["token"] and now_tag is not None:
                # ours after all (a PUT that landed while its answer was lost): go on from that version
                self._tag, self.holder = now_tag, other
                return
            now_held = (f"pid {other.get('pid')} on host {other.get('host')!r} holds it now"
                        if isinstance(other, dict) else "it was removed")
            self._lost = (f"this writer lost its lock on {self.dest.url} ({self.where}: {now_held}); it was not renewed "
                          f"for over {self.lease:.0f} s (the process was paused or cut off), so another writer took "
                          f"it over")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                self._renew()
            except Exception:  # noqa: BLE001 - an unreachable store: try again; fence() finds out for sure
                pass
            if self._lost is not None:
                return

    def fence(self, what: str = "commit") -> None:
        """Before `what` (the commit marker, a manifest): renew the lease now and raise LeaseLostError if the lock
        is no longer ours. A successful renewal leaves a whole lease for what follows."""
        if self.held and self._lost is None and os.getpid() == self.holder["pid"]:
            self._renew()
        if self._lost is not None:
            self.check(what)

    @property
    def lost(self) -> bool:
        """Whether this writer has lost the lock to another (found by a renewal)."""
        return self._lost is not None

    def check(self, what: str = "write") -> None:
        """Before a write into the destination: raise LeaseLostError if the lock is no longer ours. No request
        while the lease we last wrote is live by this host's clock (nobody may take it before it expires);
        past that (this process was paused, or its renewals failed), a renewal first: fence()."""
        if (self._lost is None and self.held and os.getpid() == self.holder["pid"]
                and time.time() > float(self.holder["expires"]) - self.renew_every):
            with contextlib.suppress(Exception):  # an unreachable store: what the next write finds out
                self._renew()
        if self._lost is not None:
            raise LeaseLostError(f"{self._lost}; stopping before the {what}, leaving {self.dest.url} to the new "
                                 f"holder")

    def release(self) -> None:
        """Give the lock up (idempotent); only if it is still ours."""
        if not self.held or os.getpid() != self.holder["pid"]:  # a forked child never releases its parent's
            return
        self._stop.set()
        with self._guard:
            self.held = False
        atexit.unregister(self.release)
        if self._lost is not None:
            return
        try:
            # the lock object only, and only the version we wrote last: another writer may be writing its own
            # into the same directory now
            if self.location.delete_if(LOCK_KEY, self._tag) and isinstance(self.location, LocalLocation):
                with contextlib.suppress(OSError):  # not empty: another writer is taking it now
                    os.rmdir(self.location.path)
        except Exception:  # noqa: BLE001 - a lock we cannot remove is reported by the next writer
            pass


def writable_location(loc: Location) -> Location:
    """The location a writer writes for `loc`: a local symlink is followed to its target (a dangling one
    too), so that the store, the new store an overwrite builds beside it and the lock all sit on the
    target's file system and the link keeps pointing at the store."""
    if isinstance(loc, LocalLocation):
        above = next((p for p in loc.path.parents if p.exists() and not p.is_dir()), None)
        if above is not None:
            from ..errors import StoreExistsError

            raise StoreExistsError(f"{loc.url}: {above} is a file, so no store can be written below it; choose "
                                   f"another destination")
        if loc.path.is_symlink():
            return LocalLocation(os.path.realpath(loc.path))
    return loc


def inspect_destination(loc: Location) -> tuple[str, dict[str, Any], bytes | None]:
    """What `loc` holds: ("empty" | "committed" | "unfinished" | "foreign", its tracestore attributes, its
    staging state or None). "foreign": files or a zarr store that tracestore did not write, or a file."""
    if isinstance(loc, LocalLocation) and loc.path.exists() and not loc.path.is_dir():
        return "foreign", {}, None
    raw_root = loc.read_bytes("zarr.json")
    raw_state = loc.read_bytes(schema.STAGING_STATE_KEY)
    if raw_root is None:
        if raw_state is not None:
            return "unfinished", {}, raw_state
        return ("empty" if loc.is_empty() else "foreign"), {}, None
    try:
        attrs = json.loads(raw_root).get("attributes", {}).get(schema.ATTRS_KEY)
    except ValueError:
        attrs = None
    if not isinstance(attrs, dict):
        return "foreign", {}, raw_state
    return ("committed" if attrs.get(schema.ATTR_COMMITTED) else "unfinished"), attrs, raw_state


def foreign_message(loc: Location) -> str:
    """The one refusal for a destination that tracestore did not write, with or without overwrite."""
    if isinstance(loc, LocalLocation) and loc.path.exists() and not loc.path.is_dir():
        return (f"{loc.url} is a file, not a directory; a store is a directory: choose another destination, or "
                f"remove the file yourself")
    if not loc.exists("zarr.json") and any(loc.exists(f"{k}/zarr.json") for k in loc.list_dir(schema.PARTS_DIR)[:3]):
        return (f"{loc.url} holds the parts of a store whose manifest is not written yet (a cluster conversion or "
                f"convert-part tasks that have not been committed): finish them and run `tracestore commit "
                f"{loc.url}`, or rerun the same `tools/convert --dask` command; tracestore does not write another "
                f"store over them")
    what = "a zarr store that tracestore did not write" if loc.exists("zarr.json") else \
        "files that are not a tracestore store"
    return (f"{loc.url} holds {what}; tracestore never replaces what it did not write, with or without "
            f"overwrite (--overwrite): choose another destination, or remove it yourself")


def _committed_generation(loc: Location) -> str | None:
    kind, attrs, _ = inspect_destination(loc)
    return str(attrs.get(schema.ATTR_GENERATION)) if kind == "committed" else None


SWAP_KEY = "swap.json"


def swap_in(dest: Location, new: Location) -> None:
    """Replace `dest` by the committed store `new` built beside it, so that at every moment a committed copy
    of the old or of the new store exists, and `settle_destination` finishes the swap after a crash.
    Locally: where the kernel can (Linux renameat2 RENAME_EXCHANGE) DEST and the new store trade places in
    one atomic step, so that DEST is never missing for a reader; the new store's generation is recorded
    beside the lock first (`swap.json`), so that after a crash the old store, now in DEST.tracestore-new, is
    not mistaken for a new one. Elsewhere: rename DEST -> DEST.tracestore-old, new -> DEST, delete the old.
    On object storage (no rename): DEST's root zarr.json is rewritten uncommitted, DEST's objects are
    replaced by copies of the new ones, DEST's root zarr.json is written committed last, and the copy beside
    it is deleted."""
    if isinstance(dest, LocalLocation) and isinstance(new, LocalLocation):
        old = dest.sibling(OLD_SUFFIX)
        intent = dest.sibling(LOCK_SUFFIX)
        if dest.path.is_dir():
            generation = _committed_generation(new)
            intent.write_bytes(SWAP_KEY, json.dumps({"new_generation": generation}).encode())
            if _exchange(new, dest):
                # DEST is the new store now; DEST.tracestore-new holds the old one
                new.delete_all()
                intent.delete(SWAP_KEY)
                return
            intent.delete(SWAP_KEY)
        if dest.path.exists():
            old.delete_all()
            _rename(dest, old)
        _rename(new, dest)
        old.delete_all()
        return
    root = new.read_bytes("zarr.json")
    assert root is not None
    meta = json.loads(root)
    meta["attributes"][schema.ATTRS_KEY][schema.ATTR_COMMITTED] = False
    dest.write_bytes("zarr.json", json.dumps(meta, indent=2).encode())
    keys = [k for k in new.list() if k != "zarr.json"]
    dest.delete_keys(sorted(set(dest.list()) - set(keys) - {"zarr.json"}))
    dest.map_parallel(lambda k: dest.copy_from(new, k), keys)
    dest.write_bytes("zarr.json", root)
    new.delete("zarr.json")  # first: a copy half deleted must not look committed to the next writer
    new.delete_all()


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: LocalLocation, b: LocalLocation) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where the kernel, the C
    library or the file system cannot (the caller renames in two steps instead). A seam for the tests."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a.path), _AT_FDCWD, os.fsencode(b.path), _RENAME_EXCHANGE) == 0:
        return True
    return False  # EINVAL / ENOSYS / EXDEV...: not on this file system


def _rename(a: LocalLocation, b: LocalLocation) -> None:  # a seam for the tests of a crash mid-swap
    a.rename_to(b)


def settle_destination(dest: Location) -> None:
    """Finish what a writer killed during an overwrite left beside `dest` (call with its lock held): a
    committed new store is swapped in (the kill came after its commit) unless the swap record shows the
    exchange happened (then DEST.tracestore-new holds the old store: deleted); an unfinished one is deleted
    (an overwrite starts over); an old store left after the swap is deleted, or renamed back where `dest` is
    missing and there is nothing to swap in."""
    new = dest.sibling(NEW_SUFFIX)
    intent = dest.sibling(LOCK_SUFFIX)
    raw = intent.read_bytes(SWAP_KEY) if isinstance(dest, LocalLocation) else None
    if raw is not None:
        try:
            swapped_to = json.loads(raw).get("new_generation")
        except ValueError:
            swapped_to = None
        if swapped_to is not None and _committed_generation(dest) == swapped_to:
            new.delete_all()  # the old store, exchanged out of DEST before the crash
        intent.delete(SWAP_KEY)
    if _committed_generation(new) is not None:
        swap_in(dest, new)
    elif not new.is_empty():
        new.delete_all()
    if isinstance(dest, LocalLocation):
        old = dest.sibling(OLD_SUFFIX)
        if old.path.exists():
            if dest.path.exists():
                old.delete_all()
            else:
                _rename(old, dest)
