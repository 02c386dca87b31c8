"""kill -9 a real conversion subprocess at several points; rerunning the same command must resume and give a
store byte-identical to an uninterrupted run, and no reader may see the store before it is committed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tracestore
from tracestore.errors import IncompleteStoreError, StoreNotFoundError
from tracestore.testing.archives import write_archive_set

L, D = 4, 32
TRACES = 12  # per archive
FILES = 4

# The harness is the real command line (tracestore.cli.main) in a subprocess; it only shrinks the blocks so
# that an archive spans several, and SIGKILLs itself at a chosen point: after the n-th block appended, inside
# the n-th checkpoint (after the tails are written, before the state that makes them count), or while close()
# writes the ids array (after the last shards, before the commit marker).
HARNESS = r"""
import os, signal, sys
import tracestore.convert.records as records
import tracestore.convert.pipeline as pipeline
import tracestore.store.urls as urls
import zarr.storage
from tracestore.format import schema

records.BLOCK_BYTES = 5 * 4 * 32 * 4  # 5 traces per block
where, n = sys.argv[1], int(sys.argv[2])
count = [0]

def hit():
    count[0] += 1
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)

if where == "block":
    orig_add = pipeline._Run.add_block
    def add_block(self, src, blk):
        orig_add(self, src, blk)
        hit()
    pipeline._Run.add_block = add_block
elif where == "checkpoint":
    orig_write = urls.LocalLocation.write_bytes
    def write_bytes(self, key, data, **kw):
        if key == schema.STAGING_STATE_KEY and b'"fingerprint"' in data:
            hit()
        orig_write(self, key, data, **kw)
    urls.LocalLocation.write_bytes = write_bytes
elif where == "close":
    orig_set = zarr.storage.LocalStore.set
    async def set_(self, key, value):
        if key == "ids/zarr.json":
            hit()
        await orig_set(self, key, value)
    zarr.storage.LocalStore.set = set_

from tracestore.cli import main
sys.exit(main(sys.argv[3:]))
"""


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file's bytes, the root's `generation` (a fresh id per store) blanked."""
    return {str(p.relative_to(root)): re.sub(rb'"generation": "[0-9a-f]{32}"', b'"generation": "-"', p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def convert_args(src: Path, dest: Path, workers: int = 0) -> list[str]:
    return ["convert", str(src), "-o", str(dest), "--scores", str(src / "ground_truth_scores.csv"),
            "--shard-bytes", str(7 * L * D * 2), "--workers", str(workers), "--no-progress", "-q"]


def run(where: str, n: int, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", HARNESS, where, str(n), *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    write_archive_set(root / "in", files=FILES, traces_per_file=TRACES, num_layers=L, hidden_size=D)
    ref = root / "ref.zarr"
    r = run("none", 0, convert_args(root / "in", ref))
    assert r.returncode == 0, r.stderr
    return root, tree_bytes(ref)


def kill_then_rerun(root: Path, ref: dict[str, bytes], where: str, n: int) -> Path:
    """SIGKILL the conversion at (where, n), check that no reader sees the store, rerun the same command, and
    check that the result is byte-identical to the uninterrupted run."""
    dest = root / f"killed_{where}_{n}.zarr"
    args = convert_args(root / "in", dest)
    r = run(where, n, args)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    with pytest.raises((IncompleteStoreError, StoreNotFoundError)):  # a reader never sees a half-written store
        tracestore.open(dest)
    r = run("none", 0, args)  # the same command again
    assert r.returncode == 0, r.stderr
    assert not [p for p in dest.rglob("*.partial")]
    assert tree_bytes(dest) == ref
    return dest


@pytest.mark.parametrize("where,n", [("block", 1), ("block", 4), ("checkpoint", 2), ("block", 10), ("close", 1)])
def test_kill_9_then_rerun_gives_the_same_store(reference, where, n):
    kill_then_rerun(*reference, where, n)


def test_external_kill_9_with_a_worker_process(reference):
    root, ref = reference
    dest = root / "killed_external.zarr"
    args = convert_args(root / "in", dest, workers=1)
    proc = subprocess.Popen([sys.executable, "-c", HARNESS, "none", "0", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = dest / "_tracestore" / "staging.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = json.loads(state.read_text()).get("user_state", {}).get("done", [])
        except (OSError, ValueError):
            done = []
        if len(done) >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the conversion finished before it could be killed"
    r = run("none", 0, args)
    assert r.returncode == 0, r.stderr
    assert tree_bytes(dest) == ref


@pytest.mark.parametrize("where,n", [("block", 4), ("close", 1)])
def test_kill_9_during_overwrite_leaves_the_old_store_readable(reference, where, n):
    """kill -9 during a --overwrite run: the old store stays readable and byte-identical; a rerun without
    --overwrite finds it up to date (the half-built new store is cleared away); --overwrite then replaces it."""
    root, ref = reference
    dest = root / f"overwrite_killed_{where}_{n}.zarr"
    args = convert_args(root / "in", dest)
    assert run("none", 0, args).returncode == 0
    r = run(where, n, [*args, "--overwrite"])
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    assert len(tracestore.open(dest)) == TRACES * FILES and tree_bytes(dest) == ref
    r = run("none", 0, [*args[:-1]])  # not quiet: it says so
    assert r.returncode == 0 and "is up to date" in r.stdout, r.stderr
    assert "taking over the lock of a writer that is gone" in r.stderr
    assert tree_bytes(dest) == ref and not list(root.glob(f"{dest.name}.tracestore-*"))
    assert run("none", 0, [*args, "--overwrite"]).returncode == 0
    assert tree_bytes(dest) == ref and not list(root.glob(f"{dest.name}.tracestore-*"))


@pytest.fixture(scope="module")
def seed_reference(tmp_path_factory):
    """The seed's raw archives (per-token states, attentions -> graphs at conversion, token ids and text, an
    answer field), converted uninterrupted."""
    from tracestore.testing.seed import write_seed_raw_archive, write_seed_scores_csv

    root = tmp_path_factory.mktemp("kill_seed")
    ids = []
    for f in range(3):
        ids += write_seed_raw_archive(root / "in" / f"batch_{f:04d}.pkl.gz", 6, L, D, num_heads=2, tokens=(2, 7),
                                      start=6 * f)
    write_seed_scores_csv(root / "in" / "ground_truth_scores.csv", ids)
    ref = root / "ref.zarr"
    r = run("none", 0, convert_args(root / "in", ref))
    assert r.returncode == 0, r.stderr
    return root, tree_bytes(ref)


@pytest.mark.parametrize("where,n", [("block", 8), ("checkpoint", 1), ("close", 1)])
def test_kill_9_then_rerun_gives_the_same_store_from_seed_archives(seed_reference, where, n):
    s = tracestore.open(kill_then_rerun(*seed_reference, where, n))
    assert s.has_graphs and s.has_token_hidden and s[17].tokens.text is not None
