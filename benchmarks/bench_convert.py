"""tools/convert against only reading its inputs (gunzip + unpickle), in the same run, with peak memory.

Two layouts of archives (`--layout`), each a list of dicts per .pkl.gz file:

- `records` (default): `--files` archives of `--traces` records in the old pipeline's layout (float32
  `hidden_states` [L, D]), gzip level `--level` (default 1);
- `seed`: the seed pipeline's raw archives, exactly as `tracestore.testing.seed.write_seed_raw_archive` writes
  them: per trace `hidden_states` = L float16 [T, D] (per token), `attentions` = L float16 [H, T, T], `tokens`,
  `tokens_decoded`, `generated_answer_clean`, `question_id`; gzip level 6 like the seed (`--level`).
  T = `--tokens` (an int, or MIN:MAX drawn per trace); H = `--heads`.

Each row runs in its own process, watched by psutil (peak RSS of the process and its children, summed,
sampled every 20 ms):

- read, 1 process: `pickle.load(gzip.open(f))` for each file in turn (the old pipeline's loader);
- read, N processes: the same with N files at a time (what N converter workers cannot beat);
- convert --workers N: the whole conversion (default options), --verify none and --verify sample;
- seed layout only: convert --workers 1 --no-graphs --verify none, so that the graph share of a conversion
  = (with graphs - without) / with graphs.

Ratios are convert time over the read time with the same number of processes. Target (issue 3): <= 1.3.

Seed layout only, in this process after the rows: `trace_edges(rec["attentions"], T, recipe)` timed alone on
each record of the first archive (loaded with pickle; torch on 1 thread, as in a worker) for the default
recipe, `--edge-attr heads` and `--graph-topk-frac 0.35`: ms per trace, and that times the number of traces
converted as a share of the convert --workers 1 --verify none time.

    .venv/bin/python benchmarks/bench_convert.py                 # full size: 4 x 1024 x [32, 4096] (2.1 GB f32)
    .venv/bin/python benchmarks/bench_convert.py --layout seed   # 2 x 16 traces x 32 x ([80, 4096] + [32, 80, 80])
    .venv/bin/python benchmarks/bench_convert.py --smoke         # seconds; a test runs it
    .venv/bin/python benchmarks/bench_convert.py --layout seed --smoke
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent

_READ = """
import gzip, pickle, sys
from multiprocessing import Pool
def read(p):
    with gzip.open(p, "rb") as f:
        obj = pickle.load(f)
    return len(obj)
if __name__ == "__main__":
    files, n = sys.argv[2:], int(sys.argv[1])
    if n <= 1:
        for p in files:
            read(p)
    else:
        with Pool(n) as pool:
            list(pool.imap(read, files, chunksize=1))
"""

#: per layout: files, traces per archive, gzip level
_DEFAULTS = {"records": (4, 1024, 1), "seed": (2, 16, 6)}


def _run_watched(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Run cmd; return (seconds, peak RSS of its process tree in bytes, stderr tail)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [ps, *ps.children(recursive=True)]
            rss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    dt = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return dt, peak, err[-2000:]


def make_archives(folder: Path, files: int, traces: int, layers: int, hidden: int, level: int) -> list[Path]:
    from tracestore.testing.archives import write_record_archive

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(files):
        p = folder / f"traces_{f:04d}.pkl.gz"
        if not p.exists():
            tmp = p.with_suffix(".tmp")
            write_record_archive(tmp, traces, layers, hidden, start=f * traces, compresslevel=level)
            tmp.rename(p)
        paths.append(p)
    return paths


def make_seed_archives(folder: Path, files: int, traces: int, layers: int, hidden: int, heads: int,
                       tokens: int | tuple[int, int], level: int) -> list[Path]:
    """The seed's raw archives, named like its `traces_data/<model>_<dataset>_batch_NNNN.pkl.gz`; trace ids
    run on across files (`start=f * traces`). Files that exist are kept (same arguments, same bytes)."""
    from tracestore.testing.seed import write_seed_raw_archive

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(files):
        p = folder / f"bench_seed_batch_{f:04d}.pkl.gz"
        if not p.exists():
            tmp = p.with_suffix(".tmp")
            write_seed_raw_archive(tmp, traces, layers, hidden, num_heads=heads, tokens=tokens, start=f * traces,
                                   compresslevel=level)
            tmp.rename(p)
        paths.append(p)
    return paths


def _seed_payload(files: int, traces: int, layers: int, hidden: int, heads: int,
                  tokens: int | tuple[int, int]) -> list[tuple[int, int]]:
    """(hidden-state bytes, attention bytes) of float16 arrays per archive."""
    from tracestore.testing.seed import seed_num_tokens

    out = []
    for f in range(files):
        ts = [seed_num_tokens(k, tokens) for k in range(f * traces, (f + 1) * traces)]
        out.append((sum(layers * t * hidden * 2 for t in ts), sum(layers * heads * t * t * 2 for t in ts)))
    return out


def _gunzipped_size(p: Path, at_least: int) -> int:
    """Decompressed size of a one-member gzip file: its trailer's ISIZE (the size mod 2**32), lifted by the
    multiple of 2**32 that brings it closest above `at_least` (the arrays' bytes, which the pickle holds)."""
    with open(p, "rb") as f:
        f.seek(-4, 2)
        isize = int.from_bytes(f.read(4), "little")
    return isize + 2**32 * max(0, round((at_least - isize) / 2**32))


def _parse_tokens(s: str) -> int | tuple[int, int]:
    lo, _, hi = s.partition(":")
    return (int(lo), int(hi)) if hi else int(lo)


def time_graph_recipes(path: Path, rounds: int) -> dict[str, dict[str, Any]]:
    """trace_edges alone on every record of one seed archive, per recipe: ms per trace (all records x rounds,
    the recipes interleaved so that the machine's load hits them alike), edges per layer, edge_attr width."""
    import gzip
    import pickle

    import numpy as np
    import torch

    from tracestore.convert.attention import DEFAULT_RECIPE, GraphRecipe, trace_edges

    torch.set_num_threads(1)  # as in a converter worker
    recipes = {"default (--graph-threshold 0.0, --edge-attr mean)": DEFAULT_RECIPE,
               "--edge-attr heads": GraphRecipe(edge_attr="heads"),
               "--graph-topk-frac 0.35": GraphRecipe(name="causal-topk-frac", topk_frac=0.35)}
    with gzip.open(path, "rb") as f:
        recs = pickle.load(f)
    out: dict[str, dict[str, Any]] = {k: {"ms": [], "edges": [], "attr": 0} for k in recipes}
    for r in range(rounds + 1):  # round 0 warms up (imports, first-call costs) and is not counted
        for rec in recs:
            T = int(np.asarray(rec["tokens"]).shape[0])
            for name, recipe in recipes.items():
                t0 = time.perf_counter()
                eis, eas = trace_edges(rec["attentions"], T, recipe, where=f"{path.name}: trace {rec['question_id']!r}")
                dt = time.perf_counter() - t0
                if r:
                    out[name]["ms"].append(dt * 1e3)
                    out[name]["edges"].append(sum(e.shape[1] for e in eis) / len(eis))
                    out[name]["attr"] = int(eas[0].shape[1])
            if not r:
                break
    shape = (len(recs[0]["attentions"]), *np.asarray(recs[0]["attentions"][0]).shape)
    for v in out.values():
        v["shape"] = shape
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, seconds")
    ap.add_argument("--layout", choices=("records", "seed"), default="records",
                    help="archives: the old pipeline's records (default) or the seed's raw records")
    ap.add_argument("--files", type=int, default=None, help="archives (default: records 4, seed 2)")
    ap.add_argument("--traces", type=int, default=None, help="traces per archive (default: records 1024, seed 16)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--tokens", type=_parse_tokens, default=80,
                    help="seed: T per trace (prompt + answer), or MIN:MAX drawn per trace (default 80)")
    ap.add_argument("--heads", type=int, default=32, help="seed: attention heads H (default 32)")
    ap.add_argument("--level", type=int, default=None, help="gzip level of the archives (default: records 1, seed 6)")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--data", default=None, help="folder for the archives (default: a temp folder, deleted)")
    ap.add_argument("--keep", action="store_true", help="keep the archives for another run")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of all rows (medians are reported)")
    ap.add_argument("--verify", default="none,sample", help="comma-separated --verify modes to time")
    a = ap.parse_args(argv)
    seed = a.layout == "seed"
    files, traces, level = _DEFAULTS[a.layout]
    a.files = files if a.files is None else a.files
    a.traces = traces if a.traces is None else a.traces
    a.level = level if a.level is None else a.level
    if a.smoke and seed:
        a.files, a.traces, a.layers, a.hidden, a.heads, a.tokens, a.workers, a.rounds = 2, 4, 4, 64, 4, 12, "1,2", 1
    elif a.smoke:
        a.files, a.traces, a.layers, a.hidden, a.workers, a.rounds = 2, 16, 4, 64, "1,2", 1
    workers = [int(w) for w in a.workers.split(",")]
    data = Path(a.data) if a.data else Path(tempfile.mkdtemp(prefix="bench_convert_"))
    out_root = Path(tempfile.mkdtemp(prefix="bench_convert_out_", dir=data.parent))
    try:
        t0 = time.perf_counter()
        if seed:
            paths = make_seed_archives(data, a.files, a.traces, a.layers, a.hidden, a.heads, a.tokens, a.level)
        else:
            paths = make_archives(data, a.files, a.traces, a.layers, a.hidden, a.level)
        setup = time.perf_counter() - t0
        gz = sum(p.stat().st_size for p in paths)
        if seed:
            payload = _seed_payload(a.files, a.traces, a.layers, a.hidden, a.heads, a.tokens)
            sizes = [_gunzipped_size(p, h + att) for p, (h, att) in zip(paths, payload, strict=True)]
            total, largest = sum(sizes), max(sizes)
            unit = "decompressed pickle"
            T = a.tokens if isinstance(a.tokens, int) else f"{a.tokens[0]}-{a.tokens[1]}"
            print(f"archives: {a.files} x {a.traces} seed raw traces, each hidden_states {a.layers} x [{T}, "
                  f"{a.hidden}] + attentions {a.layers} x [{a.heads}, {T}, {T}] float16 = "
                  f"{sum(h for h, _ in payload) / 1e9:.2f} + {sum(x for _, x in payload) / 1e9:.2f} GB of arrays; "
                  f"{total / 1e9:.2f} GB decompressed pickle ({gz / 1e9:.2f} GB gzip level {a.level}; largest archive "
                  f"{largest / 1e9:.2f} GB decompressed; setup {setup:.0f} s)")
        else:
            total = a.files * a.traces * a.layers * a.hidden * 4
            largest = a.traces * a.layers * a.hidden * 4
            unit = "float32"
            print(f"archives: {a.files} x {a.traces} traces x [{a.layers}, {a.hidden}] float32 = {total / 1e9:.2f} GB "
                  f"({gz / 1e9:.2f} GB gzip level {a.level}; setup {setup:.0f} s)")
        py = sys.executable
        # each round runs every row once, reads next to converts, so that the machine's load (it is shared)
        # hits both alike; a ratio pairs a convert with the read of the same round and process count
        runs: dict[str, list[tuple[float, int]]] = {}
        ratios: dict[str, list[float]] = {}
        for _ in range(a.rounds):
            read_time: dict[int, float] = {}
            for n in sorted({1, *workers}):
                name = f"read (gunzip + unpickle), {n} process{'es' if n > 1 else ''}"
                dt, peak, _ = _run_watched([py, "-c", _READ, str(n), *map(str, paths)])
                read_time[n] = dt
                runs.setdefault(name, []).append((dt, peak))
                rows = [(n, verify, ()) for verify in a.verify.split(",") if n in workers]
                if seed and n == 1:
                    rows.append((1, "none", ("--no-graphs",)))
                for w, verify, extra in rows:
                    name = f"convert --workers {w}{''.join(' ' + x for x in extra)} --verify {verify}"
                    dest = out_root / f"store_w{w}_{verify}{'_nog' if extra else ''}.zarr"
                    cmd = [py, "-m", "tracestore.cli", "convert", *map(str, paths), "-o", str(dest), "--workers",
                           str(w), "--verify", verify, *extra, "--no-progress", "--overwrite", "-q"]
                    dt, peak, _ = _run_watched(cmd)
                    runs.setdefault(name, []).append((dt, peak))
                    ratios.setdefault(name, []).append(dt / read_time[n])
                    shutil.rmtree(dest, ignore_errors=True)
        print()
        print(f"median of {a.rounds} round(s); ratio = convert time / read time with as many processes, same round")
        print()
        print(f"| run | seconds | GB/s of {unit} | peak RSS (tree) | peak RSS / largest archive | time / read |")
        print("|---|---|---|---|---|---|")
        for name, vals in runs.items():
            dt = statistics.median(v[0] for v in vals)
            peak = max(v[1] for v in vals)
            r = ratios.get(name)
            rtxt = "-" if r is None else f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})"
            print(f"| {name} | {dt:.2f} | {total / dt / 1e9:.3f} | {peak / 2**30:.2f} GiB | {peak / largest:.2f} | {rtxt} |")
        if seed:
            _print_graph_table(runs, paths[0], a.files * a.traces, a.rounds)
        return 0
    finally:
        shutil.rmtree(out_root, ignore_errors=True)
        if not a.keep:
            shutil.rmtree(data, ignore_errors=True)


def _print_graph_table(runs: dict[str, list[tuple[float, int]]], first: Path, n_traces: int, rounds: int) -> None:
    """The graph-building figures: with and without graphs end to end, and trace_edges alone per recipe."""
    with_g = runs.get("convert --workers 1 --verify none")
    without = runs.get("convert --workers 1 --no-graphs --verify none")
    t_with = statistics.median(v[0] for v in with_g) if with_g else None
    print()
    print(f"graph building: convert --workers 1 --verify none of {n_traces} traces, with graphs (default recipe) "
          f"and --no-graphs (medians); trace_edges alone on the {first.name} records, in this process, torch on "
          f"1 thread, median (min-max) of every record x {rounds} round(s)")
    print()
    print("| figure | ms / trace | seconds for the run's traces | share of convert --workers 1 |")
    print("|---|---|---|---|")
    if t_with is not None and without:
        t_without = statistics.median(v[0] for v in without)
        d = t_with - t_without
        print(f"| convert --workers 1: with graphs - --no-graphs ({t_with:.2f} - {t_without:.2f} s) | "
              f"{d / n_traces * 1e3:.1f} | {d:.2f} | {d / t_with:.1%} |")
    for name, v in time_graph_recipes(first, rounds).items():
        ms = statistics.median(v["ms"])
        share = "-" if t_with is None else f"{ms * n_traces / 1e3 / t_with:.1%}"
        L, H, T, _ = v["shape"]
        print(f"| trace_edges {name} at [{L}, {H}, {T}, {T}]: {statistics.median(v['edges']):.0f} edges/layer, "
              f"edge_attr [E, {v['attr']}] | {ms:.1f} ({min(v['ms']):.1f}-{max(v['ms']):.1f}) | "
              f"{ms * n_traces / 1e3:.2f} | {share} |")


if __name__ == "__main__":
    sys.exit(main())
