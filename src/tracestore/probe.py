"""`tracestore probe`: the per-layer linear sweep, the first thing run on a new trace set. For every layer, a
logistic-regression probe (ridge for regression) on that layer's vectors: fitted on the train split, its
regularisation chosen on the validation split, scored on the test split -- the same three-way split
`tracestore train` draws (`train/split.py`), so the sweep and the trained models are comparable.

    from tracestore.probe import probe_layers
    result = probe_layers(tracestore.open("traces.zarr"), out="probe/")
    result.best_layer, result.rows[result.best_layer]["test_auroc"]

Each layer is read once, whole, with `store.layer(l)` ([N, D] float16: one contiguous read per layer), and
features are standardised on the training rows. scikit-learn does the fitting: `LogisticRegressionCV` with
a predefined split (train rows fit, validation rows score each C by AUROC; `refit=False`, so the kept
weights are the train fit at the best C) and `Ridge` over a grid of alphas scored by validation MSE.
The best layer is chosen on validation, never on test.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import TrainConfigError

__all__ = ["probe_layers", "ProbeResult", "TOKENS", "format_probe_table"]

TOKENS = ("last", "mean")
#: inverse regularisation strengths tried per layer (logistic regression)
CS = tuple(float(c) for c in np.logspace(-4, 2, 7))
#: ridge strengths tried per layer (regression)
ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 7))


@dataclass
class ProbeResult:
    """The sweep: one row per layer (layer, val and test figures, the chosen regularisation, seconds), the
    layer best on validation, the split's sizes, and the files written."""

    task: str
    rows: list[dict[str, Any]]
    best_layer: int | None
    n_train: int
    n_val: int
    n_test: int
    token: str
    seconds: float
    read_s: float
    files: dict[str, str] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        return "auroc" if self.task == "classification" else "mse"

    def best_row(self) -> dict[str, Any] | None:
        return None if self.best_layer is None else next(r for r in self.rows if r["layer"] == self.best_layer)


def _features(store: Any, layer: int, token: str) -> np.ndarray:
    """[N, D] float32 vectors of `layer`: the store's pooled sequences when they are pooled by `token`,
    else pooled here from every token's hidden state."""
    if token in (store.pool, "sequences"):
        return np.asarray(store.layer(layer), dtype=np.float32)
    out = np.empty((len(store), store.hidden_size), np.float32)
    for i in range(len(store)):
        h = np.asarray(store.tokens(i).hidden[:, layer], np.float32)
        out[i] = h[-1] if token == "last" else h.mean(axis=0)
    return out


def _logistic(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray, seed: int) -> tuple[Any, float, bool]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import PredefinedSplit

    kw: dict[str, Any] = {}
    params = inspect.signature(LogisticRegressionCV).parameters
    if "use_legacy_attributes" in params:  # scikit-learn >= 1.8: say what 1.10 will assume
        kw.update(use_legacy_attributes=False, l1_ratios=(0.0,))
    fold = np.r_[np.full(len(y_tr), -1), np.zeros(len(y_va))]
    m = LogisticRegressionCV(Cs=list(CS), cv=PredefinedSplit(fold), scoring="roc_auc", refit=False, max_iter=500,
                             tol=1e-3, random_state=seed, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        m.fit(np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va]))
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return m, float(np.ravel(m.C_)[0]), converged


def _ridge(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray) -> tuple[Any, float]:
    from sklearn.linear_model import Ridge

    best: tuple[float, Any, float] | None = None
    for a in ALPHAS:
        m = Ridge(alpha=a).fit(x_tr, y_tr)
        err = float(np.mean((m.predict(x_va) - y_va) ** 2))
        if best is None or err < best[0]:
            best = (err, m, a)
    assert best is not None
    return best[1], best[2]


def probe_layers(store: Any, *, out: str | Path | None = None, layers: Any = None, token: str | None = None,
                 task: str = "classification", threshold: float = 0.5, positive_below: float | None = None,
                 val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0,
                 group_pattern: str | None = None, group_field: str | None = None, log: Any = None) -> ProbeResult:
    """Fit a linear probe per layer and return the sweep (also OUT/probe.csv and OUT/probe.png with `out`).

    Parameters
    ----------
    store : TraceStore
        An open store (`tracestore.open(url)`), or a view of one.
    out : path, optional
        Directory for probe.csv (one row per layer) and probe.png (AUROC, or MSE, against layer; the layer best
        on validation marked).
    layers : iterable of int, optional
        Layers to sweep (negative counts from the end); default all.
    token : {"last", "mean"}, optional
        Which token's state stands for a trace: default the store's sequences as they are (pooled at
        conversion, `store.pool`); another is pooled here from the tokens' hidden states (a store converted
        with --tokens all; slower: every trace's tokens are read, once per layer).
    task, threshold, positive_below : the label rule, as in `tracestore train` (label 1 = score >= threshold,
        or score < positive_below).
    val_fraction, test_fraction, seed, group_pattern, group_field : the split, as in `tracestore train`.
    log : callable, optional
        Called with one line per layer.

    Raises TrainConfigError for options that do not fit the store.
    """
    from .train import metrics as M

    t_all = time.perf_counter()
    L = store.num_layers
    if task not in ("classification", "regression"):
        raise TrainConfigError(f"--task {task!r}: choose classification or regression")
    if token is not None and token not in TOKENS:
        raise TrainConfigError(f"--token {token!r}: choose one of {', '.join(TOKENS)}")
    if token is not None and token != store.pool and not store.has_token_hidden:
        kept = f"pooled by {store.pool!r}" if store.pool else "as written (no pooling recorded)"
        raise TrainConfigError(f"{store.url}: --token {token} needs every token's hidden states, and this store keeps "
                               f"only its sequences, {kept}; probe without --token, or convert with --tokens all")
    token = token or store.pool or "sequences"
    want = list(range(L)) if layers is None else [int(x) for x in layers]
    bad = [x for x in want if not -L <= x < L]
    if bad:
        raise TrainConfigError(f"{store.url}: --layers {bad}: out of range for a store of {L} layers (0..{L - 1})")
    want = sorted({x % L for x in want})
    from .train.trainer import check_label_rule, label_rule_text, store_split

    check_label_rule(store, task, positive_below)
    split, labels = store_split(store, task=task, threshold=threshold, positive_below=positive_below,
                                val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                                group_pattern=group_pattern, group_field=group_field)
    scores = np.asarray(store.scores, np.float64)
    ids = np.asarray(store.ids).astype(str)
    if not split.test_ids:
        raise TrainConfigError(f"{store.url}: the split left no traces for test (test_fraction={test_fraction}); "
                               f"give a test fraction above 0")
    pos = {k: i for i, k in enumerate(ids.tolist())}
    rows_of = [np.array([pos[i] for i in side], np.int64) for side in split.sides()]
    target = labels.astype(np.float64) if labels is not None else scores
    y_tr, y_va, y_te = (target[r] for r in rows_of)
    if labels is not None and (len(set(y_tr.tolist())) < 2 or len(set(y_va.tolist())) < 2):
        raise TrainConfigError(f"{store.url}: the train or validation split holds a single class; a probe needs both "
                               f"(label rule {label_rule_text(threshold, positive_below)})")
    rows: list[dict[str, Any]] = []
    read_s = 0.0
    for layer in want:
        t = time.perf_counter()
        x = _features(store, layer, token)
        read_s += time.perf_counter() - t
        t = time.perf_counter()
        x_tr, x_va, x_te = (x[r] for r in rows_of)
        mu, sd = x_tr.mean(axis=0), x_tr.std(axis=0) + 1e-6
        x_tr, x_va, x_te = ((a - mu) / sd for a in (x_tr, x_va, x_te))
        row: dict[str, Any] = {"layer": layer}
        if labels is not None:
            m, c, conv = _logistic(x_tr, y_tr, x_va, y_va, seed)
            lv, lt = m.decision_function(x_va), m.decision_function(x_te)
            thr = M.youden_threshold(y_va, lv)
            thr = 0.0 if math.isnan(thr) else thr
            row.update(val_auroc=M.auroc(y_va, lv), test_auroc=M.auroc(y_te, lt),
                       test_accuracy=M.thresholded_metrics(y_te, lt, thr)["accuracy"], C=c, converged=conv)
        else:
            m, a = _ridge(x_tr, y_tr, x_va, y_va)
            pv, pt = m.predict(x_va), m.predict(x_te)
            row.update(val_mse=M.mse(y_va, pv), test_mse=M.mse(y_te, pt), test_pearson=M.pearson(y_te, pt), alpha=a)
        row["fit_s"] = time.perf_counter() - t
        rows.append(row)
        if log is not None:
            log(_row_line(row))
    metric = "val_auroc" if labels is not None else "val_mse"
    vals = [r[metric] for r in rows]
    best = None
    if not all(math.isnan(v) for v in vals):
        sign = -1.0 if labels is not None else 1.0
        best = rows[int(np.nanargmin([sign * v for v in vals]))]["layer"]
    result = ProbeResult(task=task, rows=rows, best_layer=best, n_train=len(split.train_ids), n_val=len(split.val_ids),
                         n_test=len(split.test_ids), token=token, seconds=time.perf_counter() - t_all, read_s=read_s)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        result.files["csv"] = str(_write_csv(out / "probe.csv", rows))
        result.files["png"] = str(_plot(out / "probe.png", result))
        split.save(out)
        result.files["split"] = str(out / "split.json")
    return result


def _row_line(r: dict[str, Any]) -> str:
    if "val_auroc" in r:
        return f"layer {r['layer']}: val AUROC {r['val_auroc']:.3f}, test AUROC {r['test_auroc']:.3f} (C={r['C']:g})"
    return f"layer {r['layer']}: val MSE {r['val_mse']:.4f}, test MSE {r['test_mse']:.4f} (alpha={r['alpha']:g})"


def format_probe_table(result: ProbeResult) -> str:
    """A markdown table, one row per layer, the best layer (on validation) marked."""
    if result.task == "classification":
        lines = ["| layer | val AUROC | test AUROC | test accuracy | C |", "|---|---|---|---|---|"]
        for r in result.rows:
            mark = " (best)" if r["layer"] == result.best_layer else ""
            lines.append(f"| {r['layer']}{mark} | {r['val_auroc']:.3f} | {r['test_auroc']:.3f} | "
                         f"{r['test_accuracy']:.3f} | {r['C']:g} |")
    else:
        lines = ["| layer | val MSE | test MSE | test Pearson | alpha |", "|---|---|---|---|---|"]
        for r in result.rows:
            mark = " (best)" if r["layer"] == result.best_layer else ""
            lines.append(f"| {r['layer']}{mark} | {r['val_mse']:.4f} | {r['test_mse']:.4f} | "
                         f"{r['test_pearson']:.3f} | {r['alpha']:g} |")
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    import csv

    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)
    return path


def _plot(path: Path, result: ProbeResult) -> Path:
    """AUROC (or MSE) against layer, validation and test, the best layer on validation marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    xs = [r["layer"] for r in result.rows]
    m = result.metric
    for side in ("val", "test"):
        ax.plot(xs, [r[f"{side}_{m}"] for r in result.rows], marker="o", label=f"{side} {m.upper()}")
    best = result.best_row()
    if best is not None:
        ax.axvline(best["layer"], color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"best on validation: layer {best['layer']}", (best["layer"], best[f"test_{m}"]),
                    textcoords="offset points", xytext=(5, -12), fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel(m.upper())
    ax.set_title(f"linear probe per layer ({result.token} token)")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)
    return path
