"""Batch: what TraceLoader yields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Batch:
    """One batch of traces, on the loader's device.

    Attributes
    ----------
    sequences : float32 [B, L', D] (L' = the loader's `layers`, all by default). On CUDA a fresh device tensor,
        valid for as long as you hold it. On the CPU it lives in a reused buffer: it stays valid until the loader
        is asked for the batch after the next one (i.e. through one more step); `.clone()` it to keep it longer.
    scores : float32 [B], NaN where the store has no score. Always a fresh tensor.
    ids : the trace ids, in batch order.
    graph : a `torch_geometric.data.Batch` when the loader has `with_graphs=True`, else None. Graph
        i * len(graph_layers) + j is trace i at layer graph_layers[j] (one graph per trace when a single
        `graph_layer` is chosen); float32 x / edge_attr, int64 edge_index with batch-global node ids, `batch` and
        `ptr`. Fresh tensors.
    positions : int64 [B], positions of the traces in the store (or in the `select()`ed view) the loader reads.
    """

    sequences: torch.Tensor
    scores: torch.Tensor
    ids: list[str]
    graph: Any | None = None
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.ids)
