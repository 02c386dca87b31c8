"""Synthetic traces shaped like real ones: Student-t(5) values, per-layer scale rising with depth, a shared
per-layer mean, and a few 'massive activation' dimensions (Sun et al. 2024) with large fixed means."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..store.graphs import TraceGraph


def synthetic_ids(n: int, start: int = 0, prefix: str = "q") -> list[str]:
    return [f"{prefix}{i:06d}" for i in range(start, start + n)]


def synthetic_scores(n: int, seed: int = 0, *, binary: bool = False) -> np.ndarray:
    rng = np.random.default_rng([seed, 7])
    if binary:
        return rng.integers(0, 2, n).astype(np.float32)
    return rng.random(n, dtype=np.float32)


def _massive_dims(hidden_size: int) -> list[tuple[int, float]]:
    # fixed dims and means in the spirit of LLaMA2-7B's dims 1415 and 2533; scaled into small hidden sizes
    picks = [(1415, 600.0), (2533, -400.0), (785, 250.0), (3070, 120.0)]
    return [(d % hidden_size, m) for d, m in picks] if hidden_size >= 8 else []


def synthetic_sequences(n: int, num_layers: int, hidden_size: int, seed: int = 0, *, start: int = 0,
                        massive: bool = True, dtype: Any = np.float32) -> np.ndarray:
    """[n, L, D] traces. Deterministic in (seed, start + i): trace i is the same whatever batch it is in."""
    L, D = num_layers, hidden_size
    out = np.empty((n, L, D), dtype=np.float32)
    base = np.random.default_rng([seed, 0])
    layer_std = np.linspace(0.3, 6.0, L, dtype=np.float32)[:, None]
    layer_mean = base.normal(0, 0.5, (L, D)).astype(np.float32)
    dim_scale = np.exp(base.normal(0, 0.3, D)).astype(np.float32)
    for k in range(n):
        rng = np.random.default_rng([seed, 1, start + k])
        t = rng.standard_t(5, size=(L, D)).astype(np.float32)
        out[k] = layer_mean + t * layer_std * dim_scale
    if massive:
        for d, m in _massive_dims(D):
            out[:, 2:, d] += m
    return out.astype(dtype, copy=False)


def synthetic_graphs(n: int, num_layers: int, hidden_size: int, seed: int = 0, *, start: int = 0,
                     min_tokens: int = 4, max_tokens: int = 24, top_k: int = 3, edge_attr_size: int = 1) -> list[TraceGraph]:
    """Per-trace attention graphs: T tokens, per layer each token attends to up to `top_k` earlier tokens
    (causal), weights in (0, 1]."""
    L, D = num_layers, hidden_size
    graphs = []
    for k in range(n):
        rng = np.random.default_rng([seed, 2, start + k])
        T = int(rng.integers(min_tokens, max_tokens + 1))
        x = rng.standard_t(5, size=(T, L, D)).astype(np.float32)
        eis, eas = [], []
        for _layer in range(L):
            src, dst = [], []
            for t in range(T):
                kk = min(top_k, t + 1)
                srcs = rng.choice(t + 1, size=kk, replace=False)
                src.extend(srcs.tolist())
                dst.extend([t] * kk)
            ei = np.asarray([src, dst], dtype=np.int64)
            ea = rng.random((ei.shape[1], edge_attr_size)).astype(np.float32) + 1e-3
            eis.append(ei)
            eas.append(ea if edge_attr_size > 1 else ea[:, 0])
        graphs.append(TraceGraph(x=x, edge_index=eis, edge_attr=eas))
    return graphs


def write_synthetic_store(url: Any, n: int, num_layers: int, hidden_size: int, *, seed: int = 0, graphs: bool = False,
                          batch: int = 64, shard_bytes: int | None = None, binary_scores: bool = False,
                          overwrite: bool = False, **create_kwargs: Any) -> Any:
    """Write n synthetic traces to a new store at `url` and return tracestore.open(url)."""
    from ..store.reader import open as open_store
    from ..store.writer import create

    scores = synthetic_scores(n, seed, binary=binary_scores)
    with create(url, num_layers=num_layers, hidden_size=hidden_size, graphs=graphs, shard_bytes=shard_bytes,
                overwrite=overwrite, **create_kwargs) as w:
        for a in range(0, n, batch):
            b = min(n, a + batch)
            w.append(synthetic_ids(b - a, a), synthetic_sequences(b - a, num_layers, hidden_size, seed, start=a),
                     scores[a:b], graphs=synthetic_graphs(b - a, num_layers, hidden_size, seed, start=a) if graphs else None)
    return open_store(url)
