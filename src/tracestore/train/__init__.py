"""Training probes on stores: models (lstm, gnn, hybrid), metrics, checkpoints and the loop behind
`tracestore train`.

    from tracestore.train import TrainConfig, train
    summary = train(TrainConfig(store="traces.zarr", out="runs/lstm", model="lstm", epochs=10))
"""

from __future__ import annotations

from .trainer import TrainConfig, main, train

__all__ = ["TrainConfig", "train", "main"]
