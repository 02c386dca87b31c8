"""The probes: `lstm` (per-layer vectors -> LSTM over layers), `gnn` (one layer's attention graph -> GCN
with the attention weights as edge weights -> pooled), `hybrid` (a GCN embedding of every layer's graph ->
LSTM over layers), and the seed pipeline's two models as it describes them, for comparisons with the old
pipeline: `seed-lstm` (SeedLSTM) and `seed-gnn-lstm` (SeedGNNLSTM). Each returns one real number per
trace: a logit for classification, the predicted score for regression.

Inputs are normalised inside the model (LayerNorm over the hidden axis of every per-layer vector and every
node) because hidden-state scales grow with depth and a few "massive activation" dimensions sit orders of
magnitude above the rest; the norm keeps the LSTM's gates out of saturation without a fitted standardiser
that would have to travel with the checkpoint separately.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LSTMProbe", "GNNProbe", "HybridProbe", "SeedLSTM", "SeedGNNLSTM", "build_model", "MODEL_NAMES",
           "GRAPH_MODELS"]

MODEL_NAMES = ("lstm", "gnn", "hybrid", "seed-lstm", "seed-gnn-lstm")
#: the models that read attention graphs (the others read the per-layer vectors)
GRAPH_MODELS = ("gnn", "hybrid", "seed-gnn-lstm")


def _head(width: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, 1))


class LSTMProbe(nn.Module):
    """Per-layer vectors [B, L, D] -> LayerNorm -> Linear(D, hidden) -> (bi)LSTM over the L layers ->
    [last states of both directions, mean over layers] -> MLP head -> [B].

    Parameters
    ----------
    hidden_size : int
        D, the width of the traced model.
    hidden : int
        Width of the projection and of the LSTM state.
    lstm_layers : int
        Stacked LSTM layers.
    bidirectional : bool
        Read the layers in both directions (the signal may sit in early or late layers).
    dropout : float
        Dropout before the head.
    """

    def __init__(self, hidden_size: int, *, hidden: int = 128, lstm_layers: int = 1, bidirectional: bool = True,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Sequential(nn.Linear(hidden_size, hidden), nn.GELU(), nn.Dropout(dropout))
        self.lstm = nn.LSTM(hidden, hidden, num_layers=lstm_layers, batch_first=True, bidirectional=bidirectional)
        width = hidden * (2 if bidirectional else 1)
        self.head = _head(2 * width, dropout)

    def encode_sequence(self, h: Tensor) -> Tensor:
        """[B, L, hidden] projected layer vectors -> [B, 2 * width] summary."""
        out, (h_n, _) = self.lstm(h)
        # the last layer of the LSTM stack: forward state (and backward state when bidirectional)
        ndir = 2 if self.lstm.bidirectional else 1
        last = h_n[-ndir:].transpose(0, 1).reshape(h.shape[0], -1)
        return torch.cat([last, out.mean(dim=1)], dim=1)

    def forward(self, sequences: Tensor) -> Tensor:
        h = self.proj(self.norm(sequences))
        return self.head(self.encode_sequence(h)).squeeze(-1)


def _edge_weight(edge_attr: Tensor | None, num_edges: int, like: Tensor) -> Tensor:
    """One non-negative weight per edge from edge_attr [E] or [E, H] (mean over heads): GCN's symmetric
    normalisation needs non-negative weights, and attention weights are probabilities."""
    if edge_attr is None:
        return torch.ones(num_edges, dtype=like.dtype, device=like.device)
    w = edge_attr.to(like.dtype)
    if w.dim() == 2:
        w = w.mean(dim=1)
    return w.clamp_min(0.0)


class _GraphEncoder(nn.Module):
    """Node features [N, D] -> LayerNorm -> Linear -> `num_conv` residual GCNConv layers that weight every
    message by its attention weight -> [mean, max] pooling per graph -> [G, 2 * hidden]."""

    def __init__(self, hidden_size: int, hidden: int, num_conv: int, dropout: float) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv

        self.norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, hidden)
        # add_self_loops: a token keeps its own state; normalize: degree-normalised attention weights
        self.convs = nn.ModuleList(GCNConv(hidden, hidden, add_self_loops=True, normalize=True) for _ in range(num_conv))
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        from torch_geometric.nn import global_max_pool, global_mean_pool

        h = self.act(self.proj(self.norm(x)))
        for conv in self.convs:
            h = h + self.drop(self.act(conv(h, edge_index, edge_weight)))
        return torch.cat([global_mean_pool(h, batch, num_graphs), global_max_pool(h, batch, num_graphs)], dim=1)


class GNNProbe(nn.Module):
    """The attention graph of one layer (a PyG Batch with x [N, D], edge_index [2, E], edge_attr [E] or
    [E, H], batch [N]) -> GCN with attention-weighted messages -> mean+max pooled -> MLP head -> [B].

    Edges run from the attended token (source) to the attending token (target), so a token aggregates the
    tokens it attends to, weighted by how much.
    """

    def __init__(self, hidden_size: int, *, hidden: int = 128, num_conv: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = _GraphEncoder(hidden_size, hidden, num_conv, dropout)
        self.head = _head(2 * hidden, dropout)

    def forward(self, graph: object) -> Tensor:
        x: Tensor = graph.x  # type: ignore[attr-defined]
        edge_index: Tensor = graph.edge_index  # type: ignore[attr-defined]
        w = _edge_weight(getattr(graph, "edge_attr", None), edge_index.shape[1], x)
        num_graphs = int(graph.num_graphs)  # type: ignore[attr-defined]
        z = self.encoder(x, edge_index, w, graph.batch, num_graphs)  # type: ignore[attr-defined]
        return self.head(z).squeeze(-1)


class HybridProbe(nn.Module):
    """A GCN embedding of every layer's attention graph (weights shared across layers, plus a learned layer
    embedding) -> LSTM over the L layer embeddings -> head -> [B].

    Input: the loader's all-layer graph batch, a PyG Batch of B * L graphs in trace-major order (graph
    i * L + j is trace i at layer j, each with that layer's node features and edges). All B * L graphs run
    through the GCN as one disjoint graph, so a batch costs one pass rather than L.
    """

    def __init__(self, num_layers: int, hidden_size: int, *, hidden: int = 128, num_conv: int = 2,
                 bidirectional: bool = True, dropout: float = 0.1) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.encoder = _GraphEncoder(hidden_size, hidden, num_conv, dropout)
        self.layer_embedding = nn.Embedding(num_layers, 2 * hidden)
        self.seq = LSTMProbe(2 * hidden, hidden=hidden, bidirectional=bidirectional, dropout=dropout)

    def forward(self, graph: object) -> Tensor:
        x: Tensor = graph.x  # type: ignore[attr-defined]
        edge_index: Tensor = graph.edge_index  # type: ignore[attr-defined]
        num_graphs = int(graph.num_graphs)  # type: ignore[attr-defined]
        L = self.num_layers
        if num_graphs % L:
            raise ValueError(f"hybrid model built for {L} layers got a batch of {num_graphs} graphs, not a multiple "
                             f"of {L}; load every layer's graph (TraceLoader(with_graphs=True, graph_layer=None))")
        w = _edge_weight(getattr(graph, "edge_attr", None), edge_index.shape[1], x)
        z = self.encoder(x, edge_index, w, graph.batch, num_graphs)  # type: ignore[attr-defined]
        z = z.reshape(num_graphs // L, L, -1) + self.layer_embedding.weight.unsqueeze(0)
        return self.seq(z)


def _seed_head(width: int, dropout: float) -> nn.Sequential:
    """The seed's head: Linear(width, 128), ReLU, Dropout, Linear(128, 64), ReLU, Dropout, Linear(64, 1)."""
    return nn.Sequential(nn.Linear(width, 128), nn.ReLU(), nn.Dropout(dropout), nn.Linear(128, 64), nn.ReLU(),
                         nn.Dropout(dropout), nn.Linear(64, 1))


class _SeedSequence(nn.Module):
    """The seed's reader of a sequence over layers: a 2-layer bidirectional LSTM (dropout between its layers)
    whose last layer's final forward and backward states [B, 2h] go through the seed's head -> [B]."""

    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(width, hidden, num_layers=2, batch_first=True, bidirectional=True, dropout=dropout)
        self.head = _seed_head(2 * hidden, dropout)

    def forward(self, seq: Tensor) -> Tensor:
        _, (h_n, _) = self.lstm(seq)
        last = h_n[-2:].transpose(0, 1).reshape(seq.shape[0], -1)  # [B, 2h]: top layer, both directions
        return self.head(last).squeeze(-1)


class SeedLSTM(nn.Module):
    """The seed pipeline's "LSTM solo": the L layer vectors [B, L, D] as they are (no normalisation) -> 2-layer
    BiLSTM (hidden h, dropout 0.3) -> head 2h -> 128 -> 64 -> 1 (ReLU, dropout) -> [B]."""

    def __init__(self, hidden_size: int, *, hidden: int = 128, dropout: float = 0.3) -> None:
        super().__init__()
        self.seq = _SeedSequence(hidden_size, hidden, dropout)

    def forward(self, sequences: Tensor) -> Tensor:
        return self.seq(sequences.float())


class SeedGNNLSTM(nn.Module):
    """The seed pipeline's "GNN-det + LSTM": per layer, two GINEConv layers (each an MLP in -> 128 -> 128,
    edge_dim 1 fed the attention weight, then batch norm, ReLU, dropout 0.2) over that layer's graph; the
    last token's node embedding concatenated with the last token's raw state [128 + D] is that layer's
    vector; the L vectors go through the seed's BiLSTM and head -> [B].

    Input: the loader's all-layer graph batch (graph i * L + j is trace i at layer j, nodes in token order, so
    a graph's last node is its last token). The GINE weights are shared by all layers (one pass over the
    B * L graphs); edge_attr [E, H] is averaged over heads to the seed's single edge feature.
    """

    def __init__(self, num_layers: int, hidden_size: int, *, hidden: int = 128, dropout: float = 0.3,
                 gnn_dropout: float = 0.2, gnn_width: int = 128) -> None:
        super().__init__()
        from torch_geometric.nn import GINEConv

        self.num_layers = num_layers

        def mlp(i: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(i, gnn_width), nn.ReLU(), nn.Linear(gnn_width, gnn_width))

        self.convs = nn.ModuleList([GINEConv(mlp(hidden_size), edge_dim=1), GINEConv(mlp(gnn_width), edge_dim=1)])
        self.norms = nn.ModuleList([nn.BatchNorm1d(gnn_width), nn.BatchNorm1d(gnn_width)])
        self.drop = nn.Dropout(gnn_dropout)
        self.seq = _SeedSequence(gnn_width + hidden_size, hidden, dropout)

    def forward(self, graph: object) -> Tensor:
        x: Tensor = graph.x.float()  # type: ignore[attr-defined]
        edge_index: Tensor = graph.edge_index  # type: ignore[attr-defined]
        num_graphs = int(graph.num_graphs)  # type: ignore[attr-defined]
        L = self.num_layers
        if num_graphs % L:
            raise ValueError(f"seed-gnn-lstm built for {L} layers got a batch of {num_graphs} graphs, not a multiple "
                             f"of {L}; load every layer's graph (TraceLoader(with_graphs=True, graph_layer=None))")
        e = _edge_weight(getattr(graph, "edge_attr", None), edge_index.shape[1], x).unsqueeze(-1)
        h = x
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = self.drop(torch.relu(norm(conv(h, edge_index, e))))
        counts = torch.bincount(graph.batch, minlength=num_graphs)  # type: ignore[attr-defined]
        last = torch.cumsum(counts, 0) - 1  # each graph's last node: its last token
        z = torch.cat([h[last], x[last]], dim=1).reshape(num_graphs // L, L, -1)
        return self.seq(z)


def build_model(name: str, *, num_layers: int, hidden_size: int, hidden: int = 128, dropout: float = 0.1) -> nn.Module:
    """A probe by name (MODEL_NAMES), sized for a store of `num_layers` x `hidden_size`. The seed models keep
    the seed's dropout (0.3, and 0.2 in the GNN) whatever `dropout` says; `hidden` is their LSTM width."""
    if name == "lstm":
        return LSTMProbe(hidden_size, hidden=hidden, dropout=dropout)
    if name == "gnn":
        return GNNProbe(hidden_size, hidden=hidden, dropout=dropout)
    if name == "hybrid":
        return HybridProbe(num_layers, hidden_size, hidden=hidden, dropout=dropout)
    if name == "seed-lstm":
        return SeedLSTM(hidden_size, hidden=hidden)
    if name == "seed-gnn-lstm":
        return SeedGNNLSTM(num_layers, hidden_size, hidden=hidden)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
