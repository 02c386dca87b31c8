"""The probes: output shapes, that the graph models read the attention weights, that the hybrid's stacked
all-layer pass equals running each layer alone, and that each model can fit a small learnable task."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch, Data

from tracestore.train.models import GNNProbe, HybridProbe, LSTMProbe, build_model

L, D = 3, 8


def _graphs(n: int, seed: int = 0) -> list[list[Data]]:
    """n traces, each a list of L layer graphs over the same T token nodes (causal, weighted edges)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        T = int(torch.randint(3, 7, (1,), generator=g))
        x = torch.randn(T, L, D, generator=g)
        layers = []
        for layer in range(L):
            src = torch.cat([torch.arange(t + 1) for t in range(T)])
            dst = torch.cat([torch.full((t + 1,), t) for t in range(T)])
            w = torch.rand(src.numel(), generator=g)
            layers.append(Data(x=x[:, layer], edge_index=torch.stack([src, dst]), edge_attr=w, num_nodes=T))
        out.append(layers)
    return out


def _layer_graphs(traces: list[list[Data]]) -> Batch:
    """The loader's all-layer layout: graph i * L + j is trace i at layer j."""
    return Batch.from_data_list([g for t in traces for g in t])


def test_lstm_shape_and_gradients() -> None:
    torch.manual_seed(0)
    m = LSTMProbe(D, hidden=16)
    x = torch.randn(5, L, D, requires_grad=True)
    out = m(x)
    assert out.shape == (5,)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_lstm_reads_layer_order() -> None:
    torch.manual_seed(0)
    m = LSTMProbe(D, hidden=16).eval()
    x = torch.randn(4, L, D)
    assert not torch.allclose(m(x), m(x.flip(1)))


def test_gnn_uses_edge_weights() -> None:
    torch.manual_seed(0)
    m = GNNProbe(D, hidden=16).eval()
    traces = _graphs(4)
    b = Batch.from_data_list([t[1] for t in traces])
    out = m(b)
    assert out.shape == (4,)
    b2 = b.clone()
    b2.edge_attr = torch.rand_like(b.edge_attr)
    assert not torch.allclose(out, m(b2))
    # [E, H] attention weights (several heads) are accepted: their mean is the weight
    b3 = b.clone()
    b3.edge_attr = b.edge_attr[:, None].repeat(1, 4)
    assert torch.allclose(out, m(b3), atol=1e-6)


def test_hybrid_one_pass_equals_per_layer_encoding() -> None:
    torch.manual_seed(0)
    m = HybridProbe(L, D, hidden=16).eval()
    traces = _graphs(3)
    out = m(_layer_graphs(traces))
    assert out.shape == (3,)
    # reference: encode each layer's batch on its own, then the same sequence model
    zs = []
    for layer in range(L):
        b = Batch.from_data_list([t[layer] for t in traces])
        zs.append(m.encoder(b.x, b.edge_index, b.edge_attr, b.batch, len(traces)))
    z = torch.stack(zs, dim=1) + m.layer_embedding.weight.unsqueeze(0)
    assert torch.allclose(out, m.seq(z), atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 3"):
        m(Batch.from_data_list([g for t in traces[:2] for g in t[:2]]))  # 4 graphs


def test_build_model_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="lstm, gnn, hybrid"):
        build_model("transformer", num_layers=L, hidden_size=D)


@pytest.mark.parametrize("name", ["lstm", "gnn", "hybrid"])
def test_each_model_fits_a_learnable_task(name: str) -> None:
    # label = sign of feature 0 at the last layer (on every token for the graph models)
    torch.manual_seed(0)
    traces = _graphs(48, seed=1)
    for t in traces:
        sign = 1.0 if torch.rand(()) > 0.5 else -1.0
        for layer in range(L):
            t[layer].x[:, 0] = sign * 2.0
    y = torch.tensor([float(t[0].x[0, 0] > 0) for t in traces])
    model = build_model(name, num_layers=L, hidden_size=D, hidden=16, dropout=0.0)
    if name == "lstm":
        inp = torch.stack([torch.stack([t[layer].x.mean(0) for layer in range(L)]) for t in traces])
    elif name == "gnn":
        inp = Batch.from_data_list([t[L - 1] for t in traces])
    else:
        inp = _layer_graphs(traces)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    first = None
    for _ in range(40):
        loss = loss_fn(model(inp), y)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


# -- issue 13 item 4: the seed pipeline's models by name ---------------------------------------------------------


def test_seed_lstm_matches_the_seed_description() -> None:
    from tracestore.train.models import SeedLSTM

    torch.manual_seed(0)
    m = build_model("seed-lstm", num_layers=L, hidden_size=D, hidden=16)
    assert isinstance(m, SeedLSTM)
    lstm = m.seq.lstm
    assert (lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bidirectional, lstm.dropout) == (D, 16, 2, True, 0.3)
    linear = [(x.in_features, x.out_features) for x in m.seq.head if isinstance(x, torch.nn.Linear)]
    assert linear == [(32, 128), (128, 64), (64, 1)]  # 2h -> 128 -> 64 -> 1
    assert [type(x).__name__ for x in m.seq.head] == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert all(x.p == 0.3 for x in m.seq.head if isinstance(x, torch.nn.Dropout))
    out = m.eval()(torch.randn(5, L, D))
    assert out.shape == (5,)


def test_seed_gnn_lstm_matches_the_seed_description() -> None:
    from torch_geometric.nn import GINEConv

    from tracestore.train.models import SeedGNNLSTM

    torch.manual_seed(0)
    m = build_model("seed-gnn-lstm", num_layers=L, hidden_size=D, hidden=16)
    assert isinstance(m, SeedGNNLSTM)
    assert [type(c) for c in m.convs] == [GINEConv, GINEConv]
    first = [x for x in m.convs[0].nn if isinstance(x, torch.nn.Linear)]
    assert [(x.in_features, x.out_features) for x in first] == [(D, 128), (128, 128)]  # MLP D -> 128 -> 128
    assert m.convs[0].lin is not None and m.convs[0].lin.in_channels == 1  # edge_dim 1: the attention weight
    assert m.drop.p == 0.2 and all(isinstance(n, torch.nn.BatchNorm1d) for n in m.norms)
    assert m.seq.lstm.input_size == 128 + D  # last token's embedding ++ its raw state
    traces = _graphs(4)
    m.eval()
    b = _layer_graphs(traces)
    out = m(b)
    assert out.shape == (4,)
    # the edge weights are read
    b2 = _layer_graphs(traces)
    b2.edge_attr = torch.rand_like(b2.edge_attr)
    assert not torch.allclose(out, m(b2))
    # the readout is the last token: changing the first token's state of every layer changes little, but
    # changing the last token's raw state changes the output
    b3 = _layer_graphs(traces)
    last = torch.cumsum(torch.bincount(b3.batch), 0) - 1
    b3.x = b3.x.clone()
    b3.x[last] += 1.0
    assert not torch.allclose(out, m(b3))
