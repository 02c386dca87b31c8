"""Data-parallel training: 2 processes on CPU with gloo, started by torchrun on 127.0.0.1. Each rank streams its
own shard: within an epoch the ranks' traces are disjoint and together cover the training split; the
validation metrics are computed on the whole validation set; the loss ends finite and lower."""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

from test_trainer import learnable_store
from tracestore.train.split import Split


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_ranks_disjoint_shards_and_improving_loss(tmp_path: Path) -> None:
    store = learnable_store(tmp_path / "s.zarr", n=64)
    run = tmp_path / "run"
    epochs = 4
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "tracestore.train", "--store", store, "--model", "lstm", "--epochs", str(epochs), "--batch-size", "8",
           "--lr", "0.01", "--hidden", "16", "--out", str(run), "--record-ids", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    split = Split.load(run)
    train_ids = set(split.train_ids)
    assert len(train_ids) % 2 == 0  # so the loader needs no padding repeats and shards can be disjoint
    for e in range(epochs):
        r0 = (run / "ids" / f"epoch{e:03d}.rank0.txt").read_text().split()
        r1 = (run / "ids" / f"epoch{e:03d}.rank1.txt").read_text().split()
        assert len(r0) == len(set(r0)) and len(r1) == len(set(r1))
        assert set(r0).isdisjoint(r1)
        assert set(r0) | set(r1) == train_ids
        assert len(r0) == len(r1)  # equal shards: DDP steps in lockstep

    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    losses = [float(r["train_loss"]) for r in rows]
    assert len(losses) == epochs and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    # validation gathered from both ranks: every validation trace counted once
    assert all(int(float(r["val_traces"])) == len(split.val_ids) for r in rows)


def test_torchrun_with_one_process_takes_the_distributed_path(tmp_path: Path) -> None:
    # issue 14 asks `torchrun --nproc_per_node=1` to exercise the DDP code path: one process, a process group
    store = learnable_store(tmp_path / "s.zarr", n=32)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "tracestore.train", "--store", store, "--model", "lstm", "--epochs", "1", "--batch-size", "8",
           "--hidden", "8", "--out", str(run), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["distributed"] is True
