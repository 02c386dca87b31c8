"""Write tests/data/golden_v2: a tiny format-v2 store (5 traces, 2 layers, 4 hidden; per-token hidden states,
token ids and text; graphs with 2 values per edge over the tokens; three per-trace fields) that pins the
on-disk format. tests/test_golden_v2.py compares it with what the current writer produces and reads it back
through tracestore and through plain zarr.

    .venv/bin/python tests/data/make_golden_v2.py        # rewrite it (only when the format changes on purpose)

Values are small multiples of 1/8 so that float16 holds them exactly. Shards hold 3 traces (resp. 3 tokens:
so there are several, the last partial); edge and token-id chunks hold 256 entries (the smallest chunk), so
the store stays small. `sequences` are pooled by the writer from the tokens (pool="last").
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
GOLDEN = HERE / "golden_v2"
PIECES = ["<s>", "▁Paris", "é", "▁München", "?", "▁the"]


def golden_inputs() -> dict[str, Any]:
    """The traces the golden store holds, as given to the writer (float32 token states)."""
    n = len(IDS)
    scores = np.array([0.5, 1.0, np.nan, 0.0, 0.25], np.float32)
    traces = []
    for i in range(n):
        T = i + 1  # 1..5 tokens
        hidden = (np.arange(T * L * D, dtype=np.float32).reshape(T, L, D) + i - 12) / 8
        eis, eas = [], []
        for layer in range(L):
            dst = np.arange(T)
            src = (dst - layer) % T  # trace i, layer l: T edges (t - l) mod T -> t
            eis.append(np.stack([src, dst]).astype(np.int64))
            eas.append((np.arange(T * H, dtype=np.float32).reshape(T, H) + layer) / 8)
        traces.append({"hidden": hidden, "ids": 100 * i + np.arange(T, dtype=np.int64),
                       "text": [PIECES[(i + t) % len(PIECES)] for t in range(T)],
                       "edge_index": eis, "edge_attr": eas})
    fields = {"answer": ["Paris", "München", "", "no", "yes é"], "rank": [3, 1, 4, 1, 5],
              "bleurt": [0.75, None, 0.125, 1.0, 0.5]}
    return {"ids": IDS, "scores": scores, "traces": traces, "fields": fields}


def build(dest: Path) -> None:
    """Write the golden store to `dest` (replacing what is there)."""
    from tracestore import TraceTokens, config, create
    from tracestore.store.graphs import TraceGraph

    inp = golden_inputs()
    saved = config.EDGE_CHUNK_BYTES
    config.EDGE_CHUNK_BYTES = EDGE_CHUNK_BYTES
    try:
        if dest.exists():
            shutil.rmtree(dest)
        tr = inp["traces"]
        tokens = [TraceTokens(hidden=t["hidden"], ids=t["ids"], text=t["text"]) for t in tr]
        graphs = [TraceGraph(x=None, edge_index=t["edge_index"], edge_attr=t["edge_attr"], num_tokens=len(t["ids"]))
                  for t in tr]
        f = inp["fields"]
        with create(str(dest), num_layers=L, hidden_size=D, graphs=True, edge_attr_size=H, tokens="all",
                    pool="last", shard_bytes=SHARD_BYTES, model_name="golden/tiny",
                    provenance={"sources": {"golden.pkl": "crc32c:00"}}) as w:
            for a, b in ((0, 2), (2, 5)):
                w.append(inp["ids"][a:b], None, inp["scores"][a:b], graphs=graphs[a:b], tokens=tokens[a:b],
                         fields={k: v[a:b] for k, v in f.items()})
    finally:
        config.EDGE_CHUNK_BYTES = saved


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else GOLDEN)
    print(f"wrote {GOLDEN if len(sys.argv) < 2 else sys.argv[1]}")
