"""Streaming graph batches (the gnn and hybrid probes' input): TraceLoader(with_graphs=True) against building the
same PyG batches by hand from np.memmap arrays of the same bytes, in the same run.

Data: N traces of T tokens, [L, D] float16 per token, and per layer the seed's default graph (every causal pair
j <= i, E = T(T+1)/2 per layer, one weight per edge), written through the public writer API (so the same script
measures a format-v1 store when run on an older tracestore: `PYTHONPATH=<old checkout>/src`). Warm page cache,
one checked warm-up epoch, then `--rounds` timed epochs, interleaved; medians.

- ref: the node rows of each batch gathered from an np.memmap of the token states (one layer: `x[n0:n1, l]` per
  trace; all layers: per trace and layer), edges from in-memory arrays, one `torch_geometric.data.Data` per
  graph and `Batch.from_data_list` (what a user of PyG writes without tracestore);
- TraceLoader, one layer (`graph_layer`, the gnn) and every layer (the hybrid), 0 workers and 2 worker
  processes; and the same loader without graphs (the sequences alone), for scale.

    .venv/bin/python benchmarks/bench_stream_graphs.py --out benchmarks/results/stream_graphs.md
    .venv/bin/python benchmarks/bench_stream_graphs.py --smoke
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, markdown_table, scratch_dir, write_result  # noqa: E402

Epoch = Callable[[int], Iterator[tuple[np.ndarray, Any]]]  # epoch -> (positions, PyG batch or sequences)


def causal_edges(T: int) -> np.ndarray:
    """Every causal pair j <= i, ordered by target then source: [2, T(T+1)/2] int64."""
    tgt, src = np.nonzero(np.tril(np.ones((T, T), bool)))
    return np.stack([src, tgt]).astype(np.int64)


def write_data(url: str, npy: str, n: int, L: int, D: int, T: int, *, shard_bytes: int | None) -> np.ndarray:
    """The store (through tracestore.create) and an .npy of the same token states [n * T, L, D]; returns the
    per-layer edge weights [n, L, E] float16 (the reference keeps them in memory)."""
    import tracestore
    from tracestore.store.graphs import TraceGraph

    ei = causal_edges(T)
    E = ei.shape[1]
    rng = np.random.default_rng(0)
    weights = rng.random((n, L, E), dtype=np.float32).astype(np.float16)
    mm = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float16, shape=(n * T, L, D))
    step = 16
    with tracestore.create(url, num_layers=L, hidden_size=D, graphs=True, shard_bytes=shard_bytes,
                           overwrite=True) as w:
        for a in range(0, n, step):
            b = min(n, a + step)
            x = rng.standard_normal(((b - a) * T, L, D), dtype=np.float32).astype(np.float16)
            mm[a * T:b * T] = x
            graphs = [TraceGraph(x[(k - a) * T:(k - a + 1) * T], [ei] * L, [weights[k, layer] for layer in range(L)])
                      for k in range(a, b)]
            w.append([f"t{k}" for k in range(a, b)], x[T - 1::T], np.zeros(b - a, np.float32), graphs=graphs)
    mm.flush()
    return weights


def ref_epochs(npy: str, weights: np.ndarray, T: int, batch: int, layers: list[int]) -> Epoch:
    from torch_geometric.data import Batch, Data

    mm = np.load(npy, mmap_mode="r")
    n = weights.shape[0]
    ei = torch.from_numpy(causal_edges(T))

    def epoch(e: int) -> Iterator[tuple[np.ndarray, Any]]:
        perm = np.random.default_rng([7, e]).permutation(n)
        for a in range(0, n, batch):
            pos = np.sort(perm[a:a + batch])
            graphs = []
            for i in pos.tolist():
                for layer in layers:
                    x = torch.from_numpy(np.ascontiguousarray(mm[i * T:(i + 1) * T, layer])).float()
                    graphs.append(Data(x=x, edge_index=ei, edge_attr=torch.from_numpy(weights[i, layer]).float(),
                                       num_nodes=T))
            yield pos, Batch.from_data_list(graphs)

    return epoch


def loader_epochs(store: Any, batch: int, *, graph_layer: int | None, graphs: bool, workers: int) -> Epoch:
    import tracestore

    loader = tracestore.TraceLoader(store, batch, shuffle=True, seed=0, device="cpu", num_workers=workers,
                                    with_graphs=graphs, graph_layer=graph_layer if graphs else None)

    def epoch(e: int) -> Iterator[tuple[np.ndarray, Any]]:
        loader.set_epoch(e)
        for b in loader:
            yield b.positions, (b.graph if graphs else b.sequences)

    return epoch


def _check(name: str, epoch: Epoch, mm: np.ndarray, T: int, layers: list[int], n: int, graphs: bool) -> None:
    """The warm-up epoch: every trace once; node features equal to the source bytes."""
    seen = np.zeros(n, np.int64)
    for pos, b in epoch(0):
        seen[pos] += 1
        if graphs:
            want = np.concatenate([mm[i * T:(i + 1) * T, layer] for i in pos.tolist() for layer in layers])
            if not np.array_equal(b.x.numpy(), want.astype(np.float32)):
                raise AssertionError(f"{name}: node features differ from the source")
    if not (seen == 1).all():
        raise AssertionError(f"{name}: traces not delivered exactly once")


def run(n: int, L: int, D: int, T: int, *, batch: int, hybrid_batch: int, rounds: int, keep: str | None,
        shard_bytes: int | None) -> str:
    import tracestore

    with scratch_dir(keep) as tmp:
        url, npy = str(tmp / "graphs.zarr"), str(tmp / "tokens.npy")
        t0 = time.perf_counter()
        weights = write_data(url, npy, n, L, D, T, shard_bytes=shard_bytes)
        setup = time.perf_counter() - t0
        store = tracestore.open(url)
        mm = np.load(npy, mmap_mode="r")
        for a in range(0, mm.shape[0], 1024):  # warm the page cache for both layouts
            mm[a:a + 1024].max()
        for i in range(n):
            store[i]
        mid = L // 2
        cases: dict[str, tuple[Epoch, list[int], bool, int]] = {
            f"ref: memmap + Batch.from_data_list, layer {mid}": (ref_epochs(npy, weights, T, batch, [mid]), [mid],
                                                                 True, batch),
            f"TraceLoader graphs, layer {mid}, 0 workers": (
                loader_epochs(store, batch, graph_layer=mid, graphs=True, workers=0), [mid], True, batch),
            f"TraceLoader graphs, layer {mid}, 2 worker processes": (
                loader_epochs(store, batch, graph_layer=mid, graphs=True, workers=2), [mid], True, batch),
            "ref: memmap + Batch.from_data_list, every layer": (
                ref_epochs(npy, weights, T, hybrid_batch, list(range(L))), list(range(L)), True, hybrid_batch),
            "TraceLoader graphs, every layer (hybrid), 0 workers": (
                loader_epochs(store, hybrid_batch, graph_layer=None, graphs=True, workers=0), list(range(L)), True,
                hybrid_batch),
            "TraceLoader sequences only, 0 workers": (
                loader_epochs(store, batch, graph_layer=None, graphs=False, workers=0), [], False, batch),
        }
        for name, (ep, layers, graphs, _b) in cases.items():
            _check(name, ep, mm, T, layers, n, graphs)
        times: dict[str, list[float]] = {k: [] for k in cases}
        for r in range(rounds):
            for name, (ep, *_rest) in cases.items():
                t0 = time.perf_counter()
                for _ in ep(r + 1):
                    pass
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows = []
        for name, (_ep, layers, graphs, b) in cases.items():
            ref_name = next((k for k in cases if k.startswith("ref") and cases[k][1] == layers), None)
            nbytes = n * T * len(layers) * D * 2 if graphs else n * L * D * 2
            ratio = f"{med[ref_name] / med[name]:.2f}x" if ref_name and graphs else "-"
            rows.append([name, b, f"{n / med[name]:,.0f}", f"{nbytes / med[name] / 1e6:,.0f}", ratio])
        table = markdown_table(["reader", "batch", "traces/s (median)", "MB/s of float16 features", "vs ref"], rows)
        E = T * (T + 1) // 2
        return (f"Data: {n} traces of T={T} tokens x [{L}, {D}] float16 ({n * T * L * D * 2 / 2**30:.2f} GiB of "
                f"token states), every causal edge per layer (E = {E} per layer, {n * L * E:,} in all), format "
                f"v{store.attrs['format_version']} (tracestore {tracestore.__version__}); setup {setup:.0f} s; "
                f"median of {rounds} timed epochs after a checked warm-up.\n\n{table}\n\n'vs ref' is the reference "
                f"time over the reader's for the same graphs (> 1: faster than building the PyG batch by hand).")


def main(argv: Sequence[str] | None = None) -> str:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hybrid-batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    if a.smoke:
        body = run(24, 4, 16, 5, batch=8, hybrid_batch=4, rounds=1, keep=a.keep, shard_bytes=6 * 4 * 16 * 2)
    else:
        body = run(a.n, a.layers, a.hidden, a.tokens, batch=a.batch, hybrid_batch=a.hybrid_batch, rounds=a.rounds,
                   keep=a.keep, shard_bytes=None)
    print(body)
    write_result(a.out, "Streaming graph batches (bench_stream_graphs.py)", body, script=__file__, argv=argv)
    return body


if __name__ == "__main__":
    main()
