"""The per-layer linear sweep (`tracestore probe`) at realistic width: read each layer whole with
store.layer(l) against the same column of a float16 .npy memmap (the reference read, same run), then fit a
logistic-regression probe per layer (LogisticRegressionCV over 7 C values, scored on validation).

The synthetic traces carry a planted signal in one layer (a linear direction, plus noise in the label), so the
table also checks that the sweep finds it.

    .venv/bin/python benchmarks/bench_probe.py -n 2000 --layers 32 --hidden 4096 --out benchmarks/results/probe.md
    .venv/bin/python benchmarks/bench_probe.py --smoke
"""

from __future__ import annotations

import time

import numpy as np

from _common import base_parser, fmt_time, markdown_table, scratch_dir, write_result


def _write(store_url: str, npy_path: str, n: int, L: int, D: int, signal: int, seed: int = 0) -> np.ndarray:
    """The store and the .npy reference (same float16 bytes); scores 0/1 from a direction in layer `signal`."""
    import tracestore

    rng = np.random.default_rng(seed)
    w = rng.normal(size=D).astype(np.float32)
    w /= np.linalg.norm(w)
    mm = np.lib.format.open_memmap(npy_path, mode="w+", dtype=np.float16, shape=(n, L, D))
    scores = np.zeros(n, np.float32)
    with tracestore.create(store_url, num_layers=L, hidden_size=D, overwrite=True) as wr:
        for a in range(0, n, 256):
            b = min(n, a + 256)
            blk = rng.standard_normal((b - a, L, D), dtype=np.float32)
            z = blk[:, signal] @ w
            scores[a:b] = (z + 0.7 * rng.standard_normal(b - a) > 0).astype(np.float32)
            blk16 = blk.astype(np.float16)
            wr.append([f"t{i:06d}" for i in range(a, b)], blk16, scores[a:b])
            mm[a:b] = blk16
    mm.flush()
    del mm
    return scores


def run(n: int, L: int, D: int, keep: str | None = None) -> str:
    import tracestore
    from tracestore.probe import probe_layers

    signal = L // 2
    with scratch_dir(keep) as d:
        t = time.perf_counter()
        _write(str(d / "s.zarr"), str(d / "s.npy"), n, L, D, signal)
        write_s = time.perf_counter() - t
        store = tracestore.open(str(d / "s.zarr"))
        mm = np.load(d / "s.npy", mmap_mode="r")
        ts_read, np_read = [], []
        for layer in range(L):  # interleaved, so drift on a shared machine hits both alike
            t = time.perf_counter()
            a = np.asarray(store.layer(layer), np.float32)
            ts_read.append(time.perf_counter() - t)
            t = time.perf_counter()
            b = np.asarray(mm[:, layer], np.float32)
            np_read.append(time.perf_counter() - t)
            assert np.array_equal(a, b)
        res = probe_layers(store)
    fit = [r["fit_s"] for r in res.rows]
    best = res.best_row()
    assert best is not None
    rows = [
        ["store.layer(l), one layer of all traces", fmt_time(float(np.median(ts_read))), fmt_time(sum(ts_read))],
        ["np.memmap[:, l] (reference)", fmt_time(float(np.median(np_read))), fmt_time(sum(np_read))],
        ["fit + score one probe (LogisticRegressionCV, 7 C)", fmt_time(float(np.median(fit))), fmt_time(sum(fit))],
        ["whole sweep (probe_layers: reads + fits)", "", fmt_time(res.seconds)],
    ]
    head = (f"{n} synthetic traces of [{L}, {D}] float16 ({n * L * D * 2 / 2**20:.0f} MiB), signal planted in layer "
            f"{signal}; split train {res.n_train} / validation {res.n_val} / test {res.n_test}. Writing the store and "
            f"the .npy took {write_s:.1f} s (not part of the sweep). Read ratio store.layer / memmap: "
            f"{sum(ts_read) / max(sum(np_read), 1e-9):.2f}.")
    tail = (f"Best layer on validation: {best['layer']} (planted: {signal}), test AUROC {best['test_auroc']:.3f}; "
            f"the other layers' test AUROC ranges "
            f"{min(r['test_auroc'] for r in res.rows if r['layer'] != best['layer']):.3f}-"
            f"{max(r['test_auroc'] for r in res.rows if r['layer'] != best['layer']):.3f}.")
    return head + "\n\n" + markdown_table(["step", "per layer (median)", f"all {L} layers"], rows) + "\n\n" + tail


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    a = p.parse_args(argv)
    if a.smoke:
        a.n, a.layers, a.hidden = 300, 4, 32
    text = run(a.n, a.layers, a.hidden, keep=a.keep)
    print(text)
    write_result(a.out, "Per-layer linear sweep: store.layer reads and LogisticRegressionCV fits", text,
                 script=__file__, argv=argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
