"""Random access: tracestore vs np.memmap of the same float16 bytes vs zarr-python, on one store.

Cases (warm page cache; each call picks new random traces from a fixed seed):

- one trace, gathered into a reused [L, D] buffer (what the loader does), and as a zero-copy view;
- 64 random traces gathered into a reused [64, L, D] buffer;
- one layer of every trace into a reused [N, D] buffer (a strided read), and as a fresh array.

memmap is the limit (a page-cache copy with no format at all); zarr-python is what a plain Zarr reader
pays. Targets (issue 2): tracestore p50 <= 2x memmap for one trace, 64 random traces and one layer.

    .venv/bin/python benchmarks/bench_random_access.py            # [4096, 32, 4096] float16 = 1 GiB
    .venv/bin/python benchmarks/bench_random_access.py --smoke    # seconds
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Timing,
    base_parser,
    fmt_time,
    markdown_table,
    scratch_dir,
    time_calls,
    time_interleaved,
    write_result,
    write_store_and_npy,
)

TARGET = 2.0


def run(n: int, num_layers: int, hidden_size: int, *, reps: int, zarr_reps: int, keep: str | None = None,
        shard_bytes: int | None = None) -> tuple[str, list[dict[str, Any]]]:
    import zarr

    import tracestore

    L, D = num_layers, hidden_size
    with scratch_dir(keep) as tmp:
        url, npy = str(tmp / "ra.zarr"), str(tmp / "ra.npy")
        if not (Path(url).exists() and Path(npy).exists()):
            write_store_and_npy(url, npy, n, L, D, shard_bytes=shard_bytes)
        mm = np.load(npy, mmap_mode="r")
        store = tracestore.open(url)
        zarr_arr = zarr.open_array(url, path="sequences", mode="r")
        # warm the page cache for all three (they read the same bytes in two files)
        _ = np.asarray(mm).sum(dtype=np.float32)
        _ = store.sequences[:].sum(dtype=np.float32)
        rng = np.random.default_rng(0)
        singles = rng.integers(0, n, reps + 10)
        batch = min(64, n)
        batches = [rng.choice(n, batch, replace=False) for _ in range(reps + 10)]
        layers = rng.integers(0, L, reps + 10)

        one = np.empty((1, L, D), np.float16)
        many = np.empty((batch, L, D), np.float16)
        lay = np.empty((n, D), np.float16)
        lay3 = lay.reshape(n, 1, D)
        all_rows = np.arange(n)

        cases: list[tuple[str, str, Any, Any, Any]] = [
            ("one trace -> buffer", "copy",
             lambda k: np.copyto(one[0], mm[singles[k]]),
             lambda k: store.read_sequences([singles[k]], out=one),
             lambda k: zarr_arr[int(singles[k])]),
            ("one trace, view", "view",
             lambda k: mm[singles[k]],
             lambda k: store[int(singles[k])].sequence,
             None),
            (f"{batch} random -> buffer", "copy",
             lambda k: np.take(mm, batches[k], axis=0, out=many, mode="clip"),  # clip: unbuffered, memmap's fastest
             lambda k: store.read_sequences(batches[k], out=many),
             lambda k: zarr_arr.oindex[batches[k]]),
            ("one layer, all traces -> buffer", "copy",
             lambda k: np.copyto(lay, mm[:, layers[k]]),
             lambda k: store.read_sequences(all_rows, out=lay3, layers=[int(layers[k])]),
             lambda k: zarr_arr[:, int(layers[k])]),
            ("one layer, fresh array", "copy",
             lambda k: np.array(mm[:, layers[k]]),
             lambda k: store.layer(int(layers[k])),
             None),
        ]
        # correctness first: the same bytes through all three
        np.testing.assert_array_equal(store.read_sequences(batches[0], out=many), mm[batches[0]])
        np.testing.assert_array_equal(store.layer(3 % L), mm[:, 3 % L])
        np.testing.assert_array_equal(zarr_arr[int(singles[0])], mm[singles[0]])

        results = []
        for name, kind, f_mm, f_ts, f_z in cases:
            heavy = "layer" in name
            r = max(5, reps // 10) if heavy else reps
            t_mm, t_ts = time_interleaved([f_mm, f_ts], r)
            t_z: Timing | None = None
            if f_z is not None:
                t_z = time_calls(f_z, max(3, zarr_reps // (10 if heavy else 1)), warmup=1)
            results.append({"case": name, "kind": kind, "memmap": t_mm, "tracestore": t_ts, "zarr": t_z})

    rows = []
    for r in results:
        t_mm, t_ts, t_z = r["memmap"], r["tracestore"], r["zarr"]
        ratio = t_ts.p50 / t_mm.p50
        target = "yes" if ratio <= TARGET else f"NO ({ratio:.2f}x > {TARGET}x)"
        if r["kind"] == "view":
            target = "(no target)"
        rows.append([r["case"], r["kind"], f"{fmt_time(t_mm.p50)} / {fmt_time(t_mm.p99)}",
                     f"{fmt_time(t_ts.p50)} / {fmt_time(t_ts.p99)}",
                     "-" if t_z is None else f"{fmt_time(t_z.p50)} / {fmt_time(t_z.p99)}",
                     f"{ratio:.2f}", "-" if t_z is None else f"{t_z.p50 / t_mm.p50:.1f}",
                     target if "fresh" not in r["case"] else "(no target)"])
    table = markdown_table(["case", "tracestore result", "memmap p50 / p99", "tracestore p50 / p99",
                            "zarr-python p50 / p99", "tracestore / memmap (p50)", "zarr / memmap (p50)",
                            f"<= {TARGET}x memmap"], rows)
    head = (f"[{n}, {L}, {D}] float16 = {n * L * D * 2 / 2**30:.2f} GiB, warm page cache; "
            f"{reps} calls per case, memmap and tracestore interleaved call by call so both see the same "
            f"background load ({max(5, reps // 10)} for the layer cases), zarr-python {zarr_reps} "
            f"({max(3, zarr_reps // 10)} for the layer). 'copy' = gathered into a reused buffer (memmap: "
            f"np.copyto / np.take(out=, mode='clip'); tracestore: read_sequences(out=)); 'view' = zero-copy (memmap: mm[i]; "
            f"tracestore: store[i].sequence); zarr-python always allocates.")
    return head + "\n\n" + table, results


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--zarr-reps", type=int, default=30)
    p.add_argument("--shard-bytes", type=int, default=None)
    a = p.parse_args(argv)
    if a.smoke:
        a.n, a.layers, a.hidden, a.reps, a.zarr_reps = 80, 4, 64, 20, 3
        a.shard_bytes = a.shard_bytes or 16 * 4 * 64 * 2
    text, _ = run(a.n, a.layers, a.hidden, reps=a.reps, zarr_reps=a.zarr_reps, keep=a.keep, shard_bytes=a.shard_bytes)
    print(text)
    write_result(a.out, "Random access: tracestore vs np.memmap vs zarr-python", text, script=__file__, argv=argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
