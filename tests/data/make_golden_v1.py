"""The values of tests/data/golden_v1: a tiny format-v1 store (5 traces, 2 layers, 4 hidden, graphs with 2
attention values per edge), written once by tracestore 0.1 (whose writer wrote v1) with
`create(str(dest), num_layers=2, hidden_size=4, graphs=True, edge_attr_size=2, shard_bytes=SHARD_BYTES,
model_name="golden/tiny", provenance={"sources": {"golden.pkl": "sha256:00"}})` and two appends (traces 0-1,
then 2-4) at EDGE_CHUNK_BYTES. tests/test_golden.py reads it back through today's tracestore. It is kept as
it is, forever: the current writer writes format v2 (tests/data/make_golden_v2.py).

Values are small multiples of 1/8 so that float16 holds them exactly. Shards hold 3 traces (so there are two,
the second partial); edge chunks hold 256 edges (the smallest edge chunk), so the store stays a few KB.
"""

from __future__ import annotations

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
