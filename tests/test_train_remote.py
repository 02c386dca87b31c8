"""Issue 21, end to end: `torchrun --nproc_per_node=2 -m tracestore.train --store s3://...` (gloo, CPU) for one
epoch -- each rank its share of the training split, the validation split, then the test split -- fetches each
trace array's bytes once for the whole job: sequences for the lstm; for the gnn also the tokens' hidden states
and, of the edges, the inner chunks that hold its graph layer's edges. Every request of both ranks goes through
the recording proxy in this process, which the torchrun children reach through AWS_ENDPOINT_URL. The small
arrays (ids, scores, fields) are not counted."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tracestore
from tracestore import config
from tracestore.store.remote import S3Location
from tracestore.store.writer import create
from tracestore.testing.s3 import FaultProxy, moto_s3
from tracestore.testing.synthetic import (
    synthetic_graphs,
    synthetic_ids,
    synthetic_scores,
    synthetic_sequences,
)

N, L, D = 128, 4, 128
ROW = L * D * 2  # 1 KiB a trace (and a token)
SHARD = ROW * 32  # 4 shards of sequences: several shuffle chunks, a cut between the ranks inside one
TRACE_ARRAYS = ("sequences", "tokens/hidden", "graphs/edge_index", "graphs/edge_attr")
READS = {"lstm": ("sequences",), "gnn": TRACE_ARRAYS}
#: the whole job's fetched bytes of the arrays a model reads, over their stored bytes
BOUND = 1.05
RANKS = 2


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as ep:
        yield ep


@pytest.fixture(scope="module")
def store_url(s3):
    # every causal pair of 24-40 tokens an edge (the seed's v1 recipe): ~2,000 edges a trace over 4 layers, and
    # edge chunks of 256 edges (the format's least): a trace's edges span several inner chunks, as at
    # realistic shapes (~100,000 edges a trace, 32,768 per inner chunk). At the default 256 KiB this store's
    # edges would be a few inner chunks, fetched whole by every use of every split and rank
    url = s3.url("train/store.zarr")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "EDGE_CHUNK_BYTES", 2048)
        with create(S3Location(url, s3.storage_options()), num_layers=L, hidden_size=D, graphs=True,
                    shard_bytes=SHARD) as w:
            for a in range(0, N, 32):
                w.append(synthetic_ids(32, a), synthetic_sequences(32, L, D, start=a), synthetic_scores(N)[a:a + 32],
                         graphs=synthetic_graphs(32, L, D, start=a, min_tokens=24, max_tokens=40, top_k=40))
    return url


@pytest.fixture()
def proxy(s3, store_url):
    with FaultProxy(s3.endpoint) as p:
        yield p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stored_bytes(s3, url: str, array: str) -> int:
    """Bytes of an array's chunk objects (shards) in the bucket: what reading all of it once costs."""
    loc = S3Location(url, s3.storage_options())
    return sum(loc.size(k) or 0 for k in loc.list(f"{array}/c/"))


def _needed_edge_bytes(s3, url: str, array: str, layer: int) -> int:
    """Bytes of the inner chunks (with their crc32c) of a flat edge array that hold some trace's edges at
    `layer`, each counted once, and the index of each shard they lie in once per rank: what the gnn (one graph
    layer) must fetch of it. (Its tiny chunks here, 512 bytes of edge_attr, make the indexes, 16 bytes a
    chunk, a visible share; at realistic sizes, 64 KiB and more, they are not.)"""
    store = tracestore.open(url, storage_options=s3.storage_options())
    arr = (store._ei if array == "graphs/edge_index" else store._ea).direct
    ep = np.asarray(store.edge_ptr)
    a, b = ep[np.arange(N) * L + layer], ep[np.arange(N) * L + layer + 1]
    a, b = a[b > a], b[b > a]
    per = arr.meta.rows_per_chunk
    chunks = np.unique(np.concatenate([np.arange(x // per, (y - 1) // per + 1) for x, y in zip(a, b, strict=True)]))
    shards = np.unique(chunks // arr.meta.chunks_per_shard)
    return int(chunks.size * (arr.meta.chunk_nbytes + 4) + RANKS * shards.size * arr.meta.index_nbytes)


@pytest.mark.parametrize("model", ["lstm", "gnn"])
def test_two_rank_training_off_s3_fetches_each_trace_array_once(s3, store_url, proxy, tmp_path: Path,
                                                                 model: str) -> None:
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
               AWS_ENDPOINT_URL=proxy.endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_REGION="us-east-1", AWS_ALLOW_HTTP="true")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={RANKS}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "tracestore.train", "--store", store_url, "--model", model, "--epochs", "1", "--batch-size", "8",
           "--hidden", "8", "--out", str(run), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == RANKS and summary["epochs_done"] == 1
    assert summary["n_train"] + summary["n_val"] + summary["n_test"] == N and "test_auroc" in summary

    fetched = {a: proxy.faults.bytes_sent("GET", f"/{a}/c/") for a in TRACE_ARRAYS}
    stored = {a: _stored_bytes(s3, store_url, a) for a in TRACE_ARRAYS}
    ratios = {a: round(fetched[a] / stored[a], 3) for a in TRACE_ARRAYS}
    print(f"{model}: fetched/stored {ratios}; fetched {fetched}; stored {stored}")
    reads = READS[model]
    assert all(fetched[a] > 0 for a in reads)  # the counts see the children's requests
    assert all(fetched[a] == 0 for a in TRACE_ARRAYS if a not in reads), fetched
    # what the model must fetch: all of sequences (and tokens/hidden), and of the edges only the inner chunks
    # of the gnn's graph layer (the trainer's default, L // 2)
    needed = {a: (_needed_edge_bytes(s3, store_url, a, L // 2) if a.startswith("graphs/") else stored[a])
              for a in reads}
    print(f"{model}: fetched/needed {({a: round(fetched[a] / needed[a], 3) for a in reads})}")
    for a in reads:
        assert fetched[a] <= BOUND * needed[a], (f"{model}: the job fetched {fetched[a]} bytes of '{a}', "
                                                 f"{fetched[a] / needed[a]:.3f}x of the {needed[a]} it needs")
    total, whole = sum(fetched[a] for a in reads), sum(needed[a] for a in reads)
    assert total <= BOUND * whole, f"{model}: the job fetched {total} bytes of {whole} needed ({total / whole:.3f}x)"
