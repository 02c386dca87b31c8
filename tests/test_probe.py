"""Issue 13 item 3: `tracestore probe`, the per-layer linear sweep, finds the layer that holds the signal, reads
every layer once with store.layer, and writes its table, probe.csv and probe.png."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

import tracestore
from tracestore.cli import main
from tracestore.errors import TrainConfigError
from tracestore.probe import probe_layers
from tracestore.testing import synthetic_ids

N, L, D, SIGNAL = 240, 6, 24, 4


def signal_store(path: Path, *, regression: bool = False) -> str:
    """Noise everywhere; the score is a linear function of layer SIGNAL's features only."""
    rng = np.random.default_rng(0)
    seq = rng.normal(size=(N, L, D)).astype(np.float32)
    w = rng.normal(size=D)
    z = seq[:, SIGNAL] @ w
    scores = (z / np.abs(z).max()) if regression else (z + 0.5 * rng.normal(size=N) > 0)
    url = str(path)
    with tracestore.create(url, num_layers=L, hidden_size=D) as wr:
        wr.append(synthetic_ids(N), seq, scores.astype(np.float32))
    return url


def test_sweep_finds_the_layer_with_the_signal_and_reads_each_layer_once(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    store = tracestore.open(signal_store(tmp_path / "s.zarr"))
    reads: list[int] = []
    orig = type(store).layer

    def counting(self: object, layer: int) -> np.ndarray:
        reads.append(layer)
        return orig(self, layer)  # type: ignore[arg-type]

    monkeypatch.setattr(type(store), "layer", counting)
    res = probe_layers(store, out=tmp_path / "probe")
    assert sorted(reads) == list(range(L))  # one read per layer
    assert res.best_layer == SIGNAL
    by_layer = {r["layer"]: r for r in res.rows}
    assert by_layer[SIGNAL]["test_auroc"] > 0.85
    assert all(abs(r["test_auroc"] - 0.5) < 0.25 for k, r in by_layer.items() if k != SIGNAL)
    assert res.n_train + res.n_val + res.n_test == N and res.n_test > 0
    rows = list(csv.DictReader((tmp_path / "probe" / "probe.csv").read_text().splitlines()))
    assert [int(r["layer"]) for r in rows] == list(range(L)) and {"val_auroc", "test_auroc", "C"} <= set(rows[0])
    assert (tmp_path / "probe" / "probe.png").read_bytes()[:4] == b"\x89PNG"
    # the split is the one `tracestore train` draws with the same seed and fractions
    from tracestore.train.split import Split, make_split

    s = make_split(store.ids, store.scores, val_fraction=0.15, test_fraction=0.15, seed=0,
                   labels=(store.scores >= 0.5).astype(np.int64))
    assert Split.load(tmp_path / "probe").sides() == s.sides()


def test_ridge_sweep_for_regression(tmp_path: Path) -> None:
    res = probe_layers(tracestore.open(signal_store(tmp_path / "s.zarr", regression=True)), task="regression",
                       layers=[0, SIGNAL, -1])
    assert [r["layer"] for r in res.rows] == [0, SIGNAL, L - 1]
    assert res.best_layer == SIGNAL and {r["layer"]: r for r in res.rows}[SIGNAL]["test_pearson"] > 0.9


def test_probe_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = signal_store(tmp_path / "s.zarr")
    assert main(["probe", "--store", url, "--out", str(tmp_path / "p"), "--layers", "2-4"]) == 0
    out = capsys.readouterr().out
    assert f"| {SIGNAL} (best) |" in out and "best layer on validation: 4" in out and "probe.png" in out
    assert main(["probe", "--store", url, "--out", str(tmp_path / "p"), "--layers", "9"]) == 2
    assert "out of range for a store of 6 layers" in capsys.readouterr().err
    with pytest.raises(TrainConfigError, match="--token mean needs every token's hidden states"):
        probe_layers(tracestore.open(url), token="mean")


def test_mean_token_is_pooled_from_the_tokens_states(tmp_path: Path) -> None:
    from tracestore.convert import convert
    from tracestore.probe import _features
    from tracestore.testing.seed import write_seed_raw_archive, write_seed_scores_csv

    ids = write_seed_raw_archive(tmp_path / "raw" / "b.pkl.gz", 40, 3, 8, num_heads=2, tokens=(3, 6))
    convert([tmp_path / "raw"], tmp_path / "s.zarr", scores=write_seed_scores_csv(tmp_path / "gt.csv", ids), workers=0)
    store = tracestore.open(str(tmp_path / "s.zarr"))
    assert store.pool == "last"
    mean = _features(store, 1, "mean")
    want = np.stack([np.asarray(store.tokens(i).hidden[:, 1], np.float32).mean(axis=0) for i in range(len(store))])
    np.testing.assert_allclose(mean, want, rtol=1e-6)
    res = probe_layers(store, token="mean", positive_below=0.5)
    assert res.token == "mean" and len(res.rows) == 3


def test_bench_probe_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("bench_probe", bench / "bench_probe.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert mod.main(["--smoke"]) == 0
    finally:
        sys.path.remove(str(bench))
    out = capsys.readouterr().out
    assert "store.layer(l), one layer of all traces" in out and "(planted: 2)" in out


def test_probe_is_part_of_the_public_api() -> None:
    import tracestore
    from tracestore import probe

    assert tracestore.probe_layers is probe.probe_layers and tracestore.ProbeResult is probe.ProbeResult
