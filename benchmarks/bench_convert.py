"""tools/convert against only reading its inputs (gunzip + unpickle), in the same run, with peak memory.

Archives: `--files` .pkl.gz files of `--traces` records each (the old pipeline's layout: a list of dicts with
float32 `hidden_states` [L, D]), gzip level `--level`. Each row runs in its own process, watched by psutil
(peak RSS of the process and its children, summed, sampled every 20 ms):

- read, 1 process: `pickle.load(gzip.open(f))` for each file in turn (the old pipeline's loader);
- read, N processes: the same with N files at a time (what N converter workers cannot beat);
- convert --workers N: the whole conversion, --verify none and --verify sample.

Ratios are convert time over the read time with the same number of processes. Target (issue 3): <= 1.3.

    .venv/bin/python benchmarks/bench_convert.py                 # full size: 4 x 1024 x [32, 4096] (2.1 GB f32)
    .venv/bin/python benchmarks/bench_convert.py --smoke         # seconds; a test runs it
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, seconds")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--traces", type=int, default=1024, help="traces per archive")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--level", type=int, default=1, help="gzip level of the archives")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--data", default=None, help="folder for the archives (default: a temp folder, deleted)")
    ap.add_argument("--keep", action="store_true", help="keep the archives for another run")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of all rows (medians are reported)")
    ap.add_argument("--verify", default="none,sample", help="comma-separated --verify modes to time")
    a = ap.parse_args(argv)
    if a.smoke:
        a.files, a.traces, a.layers, a.hidden, a.workers, a.rounds = 2, 16, 4, 64, "1,2", 1
    workers = [int(w) for w in a.workers.split(",")]
    data = Path(a.data) if a.data else Path(tempfile.mkdtemp(prefix="bench_convert_"))
    out_root = Path(tempfile.mkdtemp(prefix="bench_convert_out_", dir=data.parent))
    try:
        t0 = time.perf_counter()
        paths = make_archives(data, a.files, a.traces, a.layers, a.hidden, a.level)
        setup = time.perf_counter() - t0
        f32 = a.files * a.traces * a.layers * a.hidden * 4
        largest = a.traces * a.layers * a.hidden * 4
        gz = sum(p.stat().st_size for p in paths)
        print(f"archives: {a.files} x {a.traces} traces x [{a.layers}, {a.hidden}] float32 = {f32 / 1e9:.2f} GB "
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
                for verify in a.verify.split(","):
                    if n not in workers:
                        continue
                    name = f"convert --workers {n} --verify {verify}"
                    dest = out_root / f"store_w{n}_{verify}.zarr"
                    cmd = [py, "-m", "tracestore.cli", "convert", *map(str, paths), "-o", str(dest), "--workers",
                           str(n), "--verify", verify, "--no-progress", "--overwrite", "-q"]
                    dt, peak, _ = _run_watched(cmd)
                    runs.setdefault(name, []).append((dt, peak))
                    ratios.setdefault(name, []).append(dt / read_time[n])
                    shutil.rmtree(dest, ignore_errors=True)
        print()
        print(f"median of {a.rounds} round(s); ratio = convert time / read time with as many processes, same round")
        print()
        print("| run | seconds | GB/s of float32 | peak RSS (tree) | peak RSS / largest archive | time / read |")
        print("|---|---|---|---|---|---|")
        for name, vals in runs.items():
            dt = statistics.median(v[0] for v in vals)
            peak = max(v[1] for v in vals)
            r = ratios.get(name)
            rtxt = "-" if r is None else f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})"
            print(f"| {name} | {dt:.2f} | {f32 / dt / 1e9:.3f} | {peak / 2**30:.2f} GiB | {peak / largest:.2f} | {rtxt} |")
        return 0
    finally:
        shutil.rmtree(out_root, ignore_errors=True)
        if not a.keep:
            shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
