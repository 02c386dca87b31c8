"""Issue 21, end to end: `torchrun --nproc_per_node=2 -m tracestore.train --store s3://...` (gloo, CPU) for one
epoch -- each rank its share of the training split, the validation split, then the test split -- fetches each
trace array's stored bytes once for the whole job: sequences for the lstm; for the gnn also the tokens' hidden
states and the edges (all layers' edges of a trace lie together, so the gnn's one layer still fetches all of
them). Every request of both ranks goes through the recording proxy in this process, which the torchrun
children reach through AWS_ENDPOINT_URL. The small arrays (ids, scores, fields) are not counted."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tracestore import config
from tracestore.store.remote import S3Location
from tracestore.testing import write_synthetic_store
from tracestore.testing.s3 import FaultProxy, moto_s3

N, L, D = 128, 4, 128
ROW = L * D * 2  # 1 KiB a trace (and a token)
SHARD = ROW * 32  # 4 shards of sequences: several shuffle chunks, a cut between the ranks inside one
TRACE_ARRAYS = ("sequences", "tokens/hidden", "graphs/edge_index", "graphs/edge_attr")
READS = {"lstm": ("sequences",), "gnn": TRACE_ARRAYS}
#: the whole job's fetched bytes of the arrays a model reads, over their stored bytes
BOUND = 1.05


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as ep:
        yield ep


@pytest.fixture(scope="module")
def store_url(s3):
    # edge chunks of 256 edges: a shuffle chunk's edges span several inner chunks, as at realistic shapes
    # (~100,000 edges a trace, 32,768 per inner chunk); at the default 256 KiB this store's edges would be one
    # inner chunk, fetched whole (crc-checked) by every use of every split and rank
    url = s3.url("train/store.zarr")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "EDGE_CHUNK_BYTES", 2048)
        write_synthetic_store(S3Location(url, s3.storage_options()), N, L, D, graphs=True, shard_bytes=SHARD)
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


@pytest.mark.parametrize("model", ["lstm", "gnn"])
def test_two_rank_training_off_s3_fetches_each_trace_array_once(s3, store_url, proxy, tmp_path: Path,
                                                                 model: str) -> None:
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
               AWS_ENDPOINT_URL=proxy.endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_REGION="us-east-1", AWS_ALLOW_HTTP="true")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "tracestore.train", "--store", store_url, "--model", model, "--epochs", "1", "--batch-size", "8",
           "--hidden", "8", "--out", str(run), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_done"] == 1
    assert summary["n_train"] + summary["n_val"] + summary["n_test"] == N and "test_auroc" in summary

    fetched = {a: proxy.faults.bytes_sent("GET", f"/{a}/c/") for a in TRACE_ARRAYS}
    stored = {a: _stored_bytes(s3, store_url, a) for a in TRACE_ARRAYS}
    ratios = {a: round(fetched[a] / stored[a], 3) for a in TRACE_ARRAYS}
    print(f"{model}: fetched/stored {ratios}; fetched {fetched}; stored {stored}")
    reads = READS[model]
    assert all(fetched[a] > 0 for a in reads)  # the counts see the children's requests
    assert all(fetched[a] == 0 for a in TRACE_ARRAYS if a not in reads), fetched
    total, whole = sum(fetched[a] for a in reads), sum(stored[a] for a in reads)
    assert total <= BOUND * whole, f"{model}: the job fetched {total} bytes of {whole} stored ({total / whole:.3f}x)"
