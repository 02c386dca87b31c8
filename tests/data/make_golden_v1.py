"""Write tests/data/golden_v1: a tiny format-v1 store (5 traces, 2 layers, 4 hidden, graphs with 2 attention
values per edge) that pins the on-disk format. tests/test_golden.py compares it with what the current writer
produces and reads it back through tracestore.

    .venv/bin/python tests/data/make_golden_v1.py        # rewrite it (only when the format changes on purpose)

Values are small multiples of 1/8 so that float16 holds them exactly. Shards hold 3 traces (so there are two,
the second partial); edge chunks hold 256 edges (the smallest edge chunk), so the store stays a few KB.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

L, D, H = 2, 4, 2
IDS = ["g0", "g1", "g2", "g3", "g4"]
SHARD_BYTES = 3 * L * D * 2
EDGE_CHUNK_BYTES = 256 * 8
HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden_v1"


def golden_inputs() -> dict[str, Any]:
    """The traces the golden store holds, as given to the writer (float32)."""
    n = len(IDS)
    seq = (np.arange(n * L * D, dtype=np.float32).reshape(n, L, D) - 20) / 8
    scores = np.array([0.5, 1.0, np.nan, 0.0, 0.25], np.float32)
    graphs = []
    for i in range(n):
        T = i + 1  # 1..5 token nodes
        x = (np.arange(T * L * D, dtype=np.float32).reshape(T, L, D) + i) / 4
        eis, eas = [], []
        for layer in range(L):
            src = np.arange(T)
            dst = (src + layer) % T  # trace i, layer l: T edges t -> (t + l) mod T
            eis.append(np.stack([src, dst]).astype(np.int64))
            eas.append((np.arange(T * H, dtype=np.float32).reshape(T, H) + layer) / 8)
        graphs.append({"x": x, "edge_index": eis, "edge_attr": eas})
    return {"ids": IDS, "sequences": seq, "scores": scores, "graphs": graphs}


def build(dest: Path) -> None:
    """Write the golden store to `dest` (replacing what is there)."""
    from tracestore import config, create
    from tracestore.store.graphs import TraceGraph

    inp = golden_inputs()
    saved = config.EDGE_CHUNK_BYTES
    config.EDGE_CHUNK_BYTES = EDGE_CHUNK_BYTES
    try:
        if dest.exists():
            shutil.rmtree(dest)
        graphs = [TraceGraph(**g) for g in inp["graphs"]]
        with create(str(dest), num_layers=L, hidden_size=D, graphs=True, edge_attr_size=H, shard_bytes=SHARD_BYTES,
                    model_name="golden/tiny", provenance={"sources": {"golden.pkl": "sha256:00"}}) as w:
            w.append(inp["ids"][:2], inp["sequences"][:2], inp["scores"][:2], graphs=graphs[:2])
            w.append(inp["ids"][2:], inp["sequences"][2:], inp["scores"][2:], graphs=graphs[2:])
    finally:
        config.EDGE_CHUNK_BYTES = saved


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else GOLDEN)
    print(f"wrote {GOLDEN if len(sys.argv) < 2 else sys.argv[1]}")
