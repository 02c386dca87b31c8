"""The GPU path on a real GPU (issue 14): the CUDA tests, pinned upload, the old pipeline, step overlap, train.

One run, one table (benchmarks/results/gpu.md, rewritten after every part so that a run stopped by its time
limit still leaves what it measured), with the device name and the versions it ran with:

1. tests: `pytest -m 'not slow'` over the test files that hold CUDA tests (those whose text names "cuda");
   every test with "cuda" in its id must have run and passed (test_trainer.py's test_cuda_bf16_autocast[lstm]
   and [gnn] skip without CUDA).
2. h2d: a bare pinned float16 copy of a batch of 64 x [32, 4096] (64 x 256 KiB: the limit of the bus) against
   TraceLoader's shuffled epochs of batches of 64 from a local store in the page cache, 0 / 2 / 4 reader threads:
   GB/s of float16 delivered and the ratio (goal >= 0.8).
3. old: the old pipeline on the same bytes (float16 `.pt` files of 256 traces, `torch.load(weights_only=True)`,
   `.to(device, dtype=torch.float32, non_blocking=True)` from pageable memory, batches sliced) against the
   loader: ratio.
4. step: one training step of the `lstm` probe (tracestore.train.models, as `tracestore train` builds it) at
   batch 64, fed by TraceLoader against the same step on batches already on the GPU: step time ratio (goal <=
   1.05: the loader hidden behind compute), with and without bf16 autocast.
5. train: `tracestore train` for one epoch on a small store with --device cuda (--bf16), and the trainer under
   `torchrun --nproc_per_node=1` with an NCCL process group and its DistributedDataParallel path.

    bash benchmarks/gpu_check.sh                          # on the GPU machine: offline install, then this
    python benchmarks/gpu_check.py --cpu-dry-run --out /tmp/gpu.md    # here: tiny shapes, CPU fallbacks

`--cpu-dry-run` runs every part at tiny shapes on the CPU (the loader to device='cpu', the copies between host
tensors, the trainer with --device cpu and gloo) and marks every row whose goal needs CUDA "skipped: no CUDA".
Without CUDA and without --cpu-dry-run the script refuses to run (exit 2).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import markdown_table, scratch_dir, write_store_and_npy  # noqa: E402
from bench_stream import PT_TRACES, write_pt_files  # noqa: E402

PARTS = ("tests", "h2d", "old", "step", "train")
GOAL_H2D = 0.8
GOAL_STEP = 1.05
NO_CUDA = "skipped: no CUDA"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu.md"
DRY_RUN_OUT = "/tmp/gpu_check_dry_run.md"
#: the packages the GPU machine lacks and gpu_check.sh installs from gpu_wheels/, then the ones it keeps
VERSIONS = ("zarr", "numcodecs", "google-crc32c", "obstore", "donfig", "msgspec", "numpy", "torch",
            "torch-geometric", "pytest", "tracestore")


@dataclass(frozen=True)
class Shapes:
    n: int  # traces in the benchmark store
    layers: int
    hidden_size: int
    batch: int
    rounds: int
    workers: tuple[int, ...]  # reader threads tried by the loader rows
    probe_hidden: int  # the lstm probe's width
    train_traces: int  # traces in the small store of part 5
    shard_bytes: int | None = None


FULL = Shapes(n=8192, layers=32, hidden_size=4096, batch=64, rounds=3, workers=(0, 2, 4), probe_hidden=128,
              train_traces=512)
DRY = Shapes(n=96, layers=4, hidden_size=64, batch=16, rounds=1, workers=(0, 2), probe_hidden=8, train_traces=32,
             shard_bytes=16 * 4 * 64 * 2)


@dataclass
class Row:
    part: str
    check: str
    measured: str
    goal: str
    result: str


@dataclass
class Report:
    """The table and its notes; `write()` rewrites the whole file (called after every part)."""

    path: Path | None
    header: list[str]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def text(self, parts: Sequence[str], done: set[str]) -> str:
        rows = [[r.part, r.check, r.measured, r.goal, r.result] for r in self.rows]
        rows += [[p, "(not run yet)", "", "", "pending"] for p in parts if p not in done]
        body = markdown_table(["part", "check", "measured", "goal", "result"], rows)
        notes = "".join(f"\n- {n}" for n in self.notes)
        return "# GPU check (benchmarks/gpu_check.py, issue 14)\n\n" + "\n".join(self.header) + "\n\n" + body + (
            f"\n\nNotes:\n{notes}\n" if notes else "\n")

    def write(self, parts: Sequence[str], done: set[str]) -> str:
        text = self.text(parts, done)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".partial")
            tmp.write_text(text)
            tmp.replace(self.path)
        return text


@dataclass
class Context:
    dev: torch.device
    shapes: Shapes
    dry: bool
    tmp: Path
    test_timeout: float
    store: Any = None
    npy: str = ""
    pt_paths: list[Path] = field(default_factory=list)
    loader_best: float = 0.0  # GB/s of the best loader row of part 2 (part 3 compares against it)
    loader_best_workers: int = 0

    @property
    def cuda(self) -> bool:
        return self.dev.type == "cuda"

    def verdict(self, ok: bool, measured_note: str = "") -> str:
        """The result cell of a row whose goal needs CUDA."""
        if not self.cuda:
            return f"{NO_CUDA} (CPU fallback ran{measured_note})"
        return "met" if ok else "NOT met"


# -- arguments ------------------------------------------------------------------------------------------------
def parse_parts(text: str) -> list[str]:
    """'tests,h2d' -> ['tests', 'h2d'] in the table's order; 'all' -> every part. Unknown names are an error."""
    if text.strip() == "all":
        return list(PARTS)
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PARTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--parts {text!r}: unknown part(s) {bad}; pick from {', '.join(PARTS)} "
                                         f"(comma-separated) or 'all'")
    return [p for p in PARTS if p in names]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="no CUDA needed: every part at tiny shapes with CPU fallbacks; GPU rows say 'skipped: no CUDA'")
    p.add_argument("--out", default=None, help=f"the table (markdown); '' writes none (default {DEFAULT_OUT.relative_to(ROOT)}, "
                   f"with --cpu-dry-run {DRY_RUN_OUT}: a dry run never overwrites the GPU's results)")
    p.add_argument("--parts", type=parse_parts, default=list(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--n", type=int, default=None, help=f"traces in the benchmark store (default {FULL.n} = 2 GiB)")
    p.add_argument("--rounds", type=int, default=None, help=f"timed epochs per row (default {FULL.rounds})")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="parts that would start after this many seconds are not run (default %(default)s)")
    p.add_argument("--test-timeout-s", type=float, default=240.0, help="limit of part 1's pytest (default %(default)s)")
    p.add_argument("--keep", default=None, help="build the data in this directory and keep it")
    p.add_argument("--note", action="append", default=[], help="a line for the header (gpu_check.sh: install log)")
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    return p


def shapes_for(args: argparse.Namespace) -> Shapes:
    base = DRY if args.cpu_dry_run else FULL
    kw = {}
    if args.n is not None:
        if args.n < base.batch:
            raise SystemExit(f"gpu_check.py: --n {args.n}: the store needs at least one batch ({base.batch} traces)")
        kw["n"] = args.n
    if args.rounds is not None:
        if args.rounds < 1:
            raise SystemExit(f"gpu_check.py: --rounds {args.rounds}: pass 1 or more")
        kw["rounds"] = args.rounds
    return Shapes(**{**base.__dict__, **kw})


# -- the header ---------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    out = {}
    for name in VERSIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    import tracestore

    out["tracestore"] = f"{out['tracestore']} (imported from {Path(tracestore.__file__).parent})"
    return out


def header(dev: torch.device, argv: Sequence[str], notes: Sequence[str]) -> list[str]:
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        try:
            v = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception as e:  # the header must not stop the check
            nccl = f"? ({type(e).__name__})"
        device = (f"{torch.cuda.get_device_name(dev)} ({props.total_memory / 2**30:.0f} GiB, capability "
                  f"{props.major}.{props.minor}), CUDA {torch.version.cuda}, NCCL {nccl}")
    else:
        device = f"none: CPU dry run (torch.cuda.is_available() is {torch.cuda.is_available()})"
    v = versions()
    lines = [f"Command: `python benchmarks/gpu_check.py {' '.join(argv)}` (from the repository root)", "",
             f"Device: {device}", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
             f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC", "",
             "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items())]
    lines += [f"\n{n}" for n in notes]
    return lines


# -- part 1: the CUDA tests ----------------------------------------------------------------------------------
def cuda_test_files(root: Path = ROOT) -> list[str]:
    """The test files that hold CUDA tests: those whose text names "cuda" (they parametrize over cuda:0 or skip
    without it)."""
    return [str(p.relative_to(root)) for p in sorted((root / "tests").glob("test_*.py")) if "cuda" in p.read_text()]


def junit_outcomes(xml_path: Path) -> dict[str, str]:
    """{'tests/test_x.py::test_name[param]': 'passed' | 'failed' | 'error' | 'skipped'} from pytest's junit xml."""
    out: dict[str, str] = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        cls = case.get("classname", "")
        path = cls.replace(".", "/") + ".py" if cls else case.get("file", "?")
        kinds = {c.tag for c in case}
        outcome = ("failed" if "failure" in kinds else "error" if "error" in kinds
                   else "skipped" if "skipped" in kinds else "passed")
        key = f"{path}::{case.get('name', '?')}"
        out[key] = "error" if out.get(key) == "passed" and outcome == "error" else outcome  # teardown errors
    return out


def part_tests(ctx: Context, report: Report) -> None:
    files = ["tests/test_trainer.py"] if ctx.dry else cuda_test_files()
    xml = ctx.tmp / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", f"--junitxml={xml}",
           *files] + (["-k", "cuda"] if ctx.dry else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=ctx.test_timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = -1, f"pytest ran past --test-timeout-s {ctx.test_timeout:g}: {str(e.stdout or '')[-2000:]}"
    wall = time.perf_counter() - t0
    got = junit_outcomes(xml) if xml.exists() else {}
    counts = {k: sum(v == k for v in got.values()) for k in ("passed", "failed", "error", "skipped")}
    cuda_ids = {k: v for k, v in got.items() if "cuda" in k.lower()}
    bad = sorted(k for k, v in got.items() if v in ("failed", "error"))
    measured = (", ".join(f"{v} {k}" for k, v in counts.items()) + f" in {wall:.0f} s; CUDA tests: "
                + ", ".join(f"{sum(v == k for v in cuda_ids.values())} {k}" for k in ("passed", "skipped", "failed")))
    check = f"pytest -m 'not slow' {' '.join(files)}" + (" -k cuda" if ctx.dry else "")
    goal = "all pass; every CUDA test runs"
    if not got:
        result = f"FAILED: pytest exited {rc} and wrote no results"
    elif ctx.cuda:
        skipped_cuda = sorted(k for k, v in cuda_ids.items() if v == "skipped")
        ok = rc == 0 and not bad and not skipped_cuda and cuda_ids
        result = "passed" if ok else "FAILED: " + "; ".join(
            [f"{len(bad)} failed ({', '.join(bad[:8])})"] * bool(bad)
            + [f"CUDA tests skipped: {', '.join(skipped_cuda)}"] * bool(skipped_cuda)
            + ["no CUDA test ran"] * (not cuda_ids) + [f"pytest exit {rc}"] * (not bad and rc != 0))
    else:
        not_skipped = sorted(k for k, v in cuda_ids.items() if v != "skipped")
        result = (f"{NO_CUDA} ({len(cuda_ids)} CUDA tests skipped as expected)" if cuda_ids and not not_skipped
                  else f"FAILED: without CUDA these did not skip: {not_skipped or 'no CUDA test collected'}")
    report.rows.append(Row("1 tests", check, measured, goal, result))
    if result.startswith("FAILED"):
        report.notes.append(f"pytest output (tail):\n\n```\n{tail.strip()}\n```")


# -- data for parts 2-4 ------------------------------------------------------------------------------------
def prepare_data(ctx: Context) -> None:
    import tracestore

    if ctx.store is not None:
        return
    s = ctx.shapes
    url, npy = str(ctx.tmp / "bench.zarr"), str(ctx.tmp / "bench.npy")
    if not (Path(url).exists() and Path(npy).exists()):
        write_store_and_npy(url, npy, s.n, s.layers, s.hidden_size, shard_bytes=s.shard_bytes)
    ctx.store, ctx.npy = tracestore.open(url), npy
    mm = np.load(npy, mmap_mode="r")
    for a in range(0, s.n, 256):  # the page cache: every layout read once
        _ = float(mm[a:a + 256].max())
        _ = float(ctx.store.sequences[a:a + 256].max())


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _loader(ctx: Context, workers: int) -> Any:
    import tracestore

    return tracestore.TraceLoader(ctx.store, ctx.shapes.batch, shuffle=True, num_workers=workers, device=ctx.dev,
                                  seed=0, worker_mode="thread" if workers else None)


def _check_epoch(name: str, loader: Any, npy: str, n: int) -> None:
    """A warm-up epoch with a full data check: every trace once, each batch equal to its float16 source."""
    mm = np.load(npy, mmap_mode="r")
    seen = np.zeros(n, np.int64)
    for b in loader:
        seen[b.positions] += 1
        if b.sequences.dtype != torch.float32 or not np.array_equal(b.sequences.cpu().numpy(),
                                                                    mm[b.positions].astype(np.float32)):
            raise AssertionError(f"{name}: a batch differs from the source traces {b.positions[:4].tolist()}...")
    if not (seen == 1).all():
        raise AssertionError(f"{name}: {int((seen != 1).sum())} traces not delivered exactly once")


def _epoch_s(dev: torch.device, it: Callable[[], Iterator[Any]]) -> float:
    _sync(dev)
    t0 = time.perf_counter()
    for _ in it():
        pass
    _sync(dev)
    return time.perf_counter() - t0


def _median_rounds(dev: torch.device, cases: dict[str, Callable[[], Iterator[Any]]], rounds: int) -> dict[str, float]:
    """Seconds per epoch of each case, median over `rounds`, the cases interleaved round by round."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for k, it in cases.items():
            times[k].append(_epoch_s(dev, it))
    return {k: statistics.median(v) for k, v in times.items()}


def _gbs(nbytes: int, s: float) -> str:
    return f"{nbytes / s / 1e9:.2f} GB/s"


# -- part 2: pinned host -> device ----------------------------------------------------------------------------
def part_h2d(ctx: Context, report: Report) -> None:
    prepare_data(ctx)
    s, dev = ctx.shapes, ctx.dev
    nb = s.n // s.batch
    src = torch.empty((s.batch, s.layers, s.hidden_size), dtype=torch.float16, pin_memory=ctx.cuda)
    src.normal_()
    dst = torch.empty_like(src, device=dev)

    def bare() -> Iterator[None]:
        for _ in range(nb):
            dst.copy_(src, non_blocking=True)
            yield None

    cases: dict[str, Callable[[], Iterator[Any]]] = {"bare": bare}
    for w in s.workers:
        ld = _loader(ctx, w)
        _check_epoch(f"TraceLoader, {w} threads", ld, ctx.npy, s.n)
        cases[f"loader{w}"] = ld.__iter__
    for it in cases.values():  # warm-up: CUDA context, pinned rings, the caching allocator
        _epoch_s(dev, it)
    t = _median_rounds(dev, cases, s.rounds)
    bare_bytes, epoch_bytes = nb * src.numel() * 2, s.n * s.layers * s.hidden_size * 2
    bare_rate = bare_bytes / t["bare"]
    pinned = "pinned " if ctx.cuda else "(CPU fallback: pageable) "
    report.rows.append(Row("2 h2d", f"bare {pinned}float16 copy, {s.batch} x [{s.layers}, {s.hidden_size}] "
                           f"({s.layers * s.hidden_size * 2 / 1024:g} KiB each), {nb} copies -> {dev.type}",
                           _gbs(bare_bytes, t["bare"]), "the limit", "reference"))
    best_w, best = 0, 0.0
    for w in s.workers:
        rate = epoch_bytes / t[f"loader{w}"]
        if rate > best:
            best_w, best = w, rate
        report.rows.append(Row("2 h2d", f"TraceLoader shuffled, batch {s.batch}, {w} reader threads -> {dev.type} "
                               f"float32", f"{_gbs(epoch_bytes, t[f'loader{w}'])} ({rate / bare_rate:.2f}x)", "", ""))
    ratio = best / bare_rate
    ctx.loader_best, ctx.loader_best_workers = best, best_w
    report.rows.append(Row("2 h2d", f"best TraceLoader ({best_w} threads) / bare pinned copy", f"{ratio:.2f}x",
                           f">= {GOAL_H2D}x", ctx.verdict(ratio >= GOAL_H2D, f": {ratio:.2f}x")))


# -- part 3: the old pipeline --------------------------------------------------------------------------------
def part_old(ctx: Context, report: Report) -> None:
    prepare_data(ctx)
    s, dev = ctx.shapes, ctx.dev
    if not ctx.pt_paths:
        ctx.pt_paths = write_pt_files(ctx.npy, ctx.tmp / "pt")
        for p in ctx.pt_paths:
            p.read_bytes()
    paths = ctx.pt_paths

    def old() -> Iterator[torch.Tensor]:
        rng = np.random.default_rng(8)
        for i in rng.permutation(len(paths)):
            d = torch.load(paths[i], weights_only=True)  # float16, pageable
            x = d["sequences"].to(dev, dtype=torch.float32, non_blocking=True)
            for a in rng.permutation(np.arange(0, x.shape[0], s.batch)).tolist():
                yield x[a:a + s.batch]

    if ctx.loader_best == 0.0:  # part 2 not run: measure the loader here with the most threads
        ctx.loader_best_workers = max(s.workers)
    ld = _loader(ctx, ctx.loader_best_workers)
    cases: dict[str, Callable[[], Iterator[Any]]] = {"old": old, "loader": ld.__iter__}
    for it in cases.values():
        _epoch_s(dev, it)
    t = _median_rounds(dev, cases, s.rounds)
    nbytes = s.n * s.layers * s.hidden_size * 2
    ratio = t["old"] / t["loader"]
    report.rows.append(Row("3 old", f"old pipeline: {len(paths)} float16 .pt files of {PT_TRACES} traces, torch.load "
                           f"+ .to({dev.type}, float32, non_blocking) from pageable memory", _gbs(nbytes, t["old"]),
                           "reference", "reference"))
    report.rows.append(Row("3 old", f"TraceLoader shuffled, {ctx.loader_best_workers} threads / old pipeline",
                           f"{_gbs(nbytes, t['loader'])} ({ratio:.2f}x)", "none set (issue 4 on the CPU: >= 3x)",
                           "measured" if ctx.cuda else f"{NO_CUDA} (CPU fallback ran: {ratio:.2f}x)"))


# -- part 4: step time, fed by the loader vs data on the GPU ---------------------------------------------------
def part_step(ctx: Context, report: Report) -> None:
    from tracestore.train.models import build_model

    prepare_data(ctx)
    s, dev = ctx.shapes, ctx.dev
    workers = 2 if 2 in s.workers else max(s.workers)
    torch.manual_seed(0)
    model = build_model("lstm", num_layers=s.layers, hidden_size=s.hidden_size, hidden=s.probe_hidden,
                        dropout=0.1).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    nb = s.n // s.batch
    resident = [(torch.randn(s.batch, s.layers, s.hidden_size, device=dev),
                 (torch.rand(s.batch, device=dev) > 0.5).float()) for _ in range(4)]
    ld = _loader(ctx, workers)

    for bf16 in (False, True):
        autocast = bf16 and ctx.cuda  # as the trainer: bf16 autocast on CUDA only

        def step(x: torch.Tensor, y: torch.Tensor, autocast: bool = autocast) -> None:
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast):
                out = model(x)
            loss = loss_fn(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def on_device(step: Callable[..., None] = step) -> Iterator[None]:
            for k in range(nb):
                step(*resident[k % len(resident)])
                yield None

        def fed(step: Callable[..., None] = step) -> Iterator[None]:
            for b in ld:
                step(b.sequences, (torch.nan_to_num(b.scores) > 0.5).float().to(dev))
                yield None

        cases: dict[str, Callable[[], Iterator[Any]]] = {"resident": on_device, "loader": fed}
        for it in cases.values():
            _epoch_s(dev, it)
        t = _median_rounds(dev, cases, s.rounds)
        steps = -(-s.n // s.batch)
        ms_res, ms_ld = t["resident"] / nb * 1e3, t["loader"] / steps * 1e3
        ratio = ms_ld / ms_res
        mode = "bf16 autocast" if bf16 else "float32"
        if bf16 and not ctx.cuda:
            mode += " (off without CUDA, as in the trainer)"
        report.rows.append(Row("4 step", f"lstm probe (hidden {s.probe_hidden}) step at batch {s.batch}, {mode}: data "
                               f"on the {dev.type} / fed by TraceLoader ({workers} threads)",
                               f"{ms_res:.2f} / {ms_ld:.2f} ms per step ({ratio:.2f}x)", f"<= {GOAL_STEP}x",
                               ctx.verdict(ratio <= GOAL_STEP, f": {ratio:.2f}x")))


# -- part 5: tracestore train, and torchrun with NCCL ------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _train_args(ctx: Context, store: str, out: Path) -> list[str]:
    batch = 64 if not ctx.dry else 8
    args = ["--store", store, "--model", "lstm", "--epochs", "1", "--batch-size", str(batch), "--hidden",
            str(ctx.shapes.probe_hidden), "--device", ctx.dev.type, "--out", str(out), "--no-progress",
            "--num-workers", "2"]
    return args + (["--bf16"] if ctx.cuda else [])


def _run_train(cmd: list[str], out: Path, timeout: float) -> tuple[bool, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"ran past {timeout:g} s"
    wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    summary = out / "summary.json"
    if proc.returncode != 0 or not summary.exists():
        return False, f"exit {proc.returncode}: {' '.join(text[-600:].split())}"
    s = json.loads(summary.read_text())
    loss = float(s.get("train_loss", math.nan))
    if not math.isfinite(loss):
        return False, f"train_loss {loss}"
    marker = re.search(r"gpu_check ddp worker: (.*)", text)
    return True, f"{s.get('epochs_done')} epoch, train_loss {loss:.4f}, {wall:.0f} s" + (
        f"; {marker.group(1)}" if marker else "")


def part_train(ctx: Context, report: Report) -> None:
    from tracestore.testing import write_synthetic_store

    s = ctx.shapes
    store = str(ctx.tmp / "train.zarr")
    if not Path(store).exists():
        write_synthetic_store(store, s.train_traces, s.layers, s.hidden_size, binary_scores=True,
                              shard_bytes=s.shard_bytes)
    run1 = ctx.tmp / "run_train"
    cmd = [sys.executable, "-m", "tracestore.cli", "train", *_train_args(ctx, store, run1)]
    ok, what = _run_train(cmd, run1, 180)
    shown = f"tracestore train {' '.join(_train_args(ctx, '<store>', Path('<run>')))}"
    report.rows.append(Row("5 train", f"{shown} ({s.train_traces} traces of [{s.layers}, {s.hidden_size}])", what,
                           "runs, finite loss", ctx.verdict(ok) if ok else f"FAILED: {what}"))
    run2 = ctx.tmp / "run_ddp"
    backend = "nccl" if ctx.cuda else "gloo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(Path(__file__).resolve()),
           "--ddp-worker", *_train_args(ctx, store, run2)]
    ok, what = _run_train(cmd, run2, 180)
    if ok and "DistributedDataParallel: True" not in what:
        ok, what = False, f"the trainer did not take its DDP path ({what})"
    report.rows.append(Row("5 train", f"torchrun --nproc_per_node=1 (trainer's DDP path, {backend} process group)",
                           what, "runs, finite loss, DDP", ctx.verdict(ok) if ok else f"FAILED: {what}"))
    report.notes.append(
        "Part 5's torchrun row runs the trainer through `gpu_check.py --ddp-worker`, which only records "
        "whether the model was wrapped in DistributedDataParallel and the process group's backend (NCCL on "
        "CUDA, gloo on the CPU): the trainer takes its DDP path under torchrun even for one process.")


def ddp_worker(argv: list[str]) -> int:
    """Under torchrun: the trainer's `main(argv)` (torchrun with one process takes its distributed path: a
    process group, DistributedDataParallel), printing the backend and whether the model was wrapped."""
    import torch.distributed as dist
    import torch.nn.parallel as parallel

    from tracestore.train import trainer

    wrapped: list[bool] = []
    backend: list[str] = []

    class Recorded(parallel.DistributedDataParallel):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            wrapped.append(True)
            backend.append(str(dist.get_backend()))

    parallel.DistributedDataParallel = Recorded  # type: ignore[misc]
    rc = trainer.main(argv)
    world = os.environ.get("WORLD_SIZE")
    print(f"gpu_check ddp worker: backend {backend[0] if backend else '?'}, world size {world}, "
          f"DistributedDataParallel: {bool(wrapped)}", flush=True)
    return int(rc)


# -- main ---------------------------------------------------------------------------------------------------
RUNNERS: dict[str, Callable[[Context, Report], None]] = {"tests": part_tests, "h2d": part_h2d, "old": part_old,
                                                         "step": part_step, "train": part_train}


def main(argv: Sequence[str] | None = None) -> str:
    """Run the parts, rewrite the table after each, print it and return it. Exit 2 without CUDA unless
    --cpu-dry-run; a part that raises becomes a FAILED row (with the error) and the others still run."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if "--ddp-worker" in args_in:
        raise SystemExit(ddp_worker([a for a in args_in if a != "--ddp-worker"]))
    args = build_parser().parse_args(args_in)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        raise SystemExit(f"gpu_check.py: this torch ({torch.__version__}) sees no CUDA device; run it on the GPU "
                         f"machine (benchmarks/gpu_check.sh), or pass --cpu-dry-run to check the script here")
    dev = torch.device("cuda", 0) if not args.cpu_dry_run else torch.device("cpu")
    shapes = shapes_for(args)
    out = args.out if args.out is not None else DRY_RUN_OUT if args.cpu_dry_run else str(DEFAULT_OUT)
    report = Report(Path(out) if out else None, header(dev, args_in, args.note))
    t_start = time.perf_counter()
    done: set[str] = set()
    report.write(args.parts, done)
    with scratch_dir(args.keep) as tmp:
        ctx = Context(dev=dev, shapes=shapes, dry=args.cpu_dry_run, tmp=tmp, test_timeout=args.test_timeout_s)
        for part in args.parts:
            elapsed = time.perf_counter() - t_start
            if elapsed > args.budget_s:
                report.rows.append(Row(part, "(not run)", "", "", f"not run: {elapsed:.0f} s past the --budget-s "
                                                                  f"{args.budget_s:g} when it was due"))
            else:
                print(f"gpu_check: part {part} ({elapsed:.0f} s)", file=sys.stderr, flush=True)
                try:
                    RUNNERS[part](ctx, report)
                except Exception as e:  # one broken part must not hide the others' measurements
                    report.rows.append(Row(part, "(raised)", "", "", f"FAILED: {type(e).__name__}: "
                                                                     f"{' '.join(str(e).split())[:300]}"))
            done.add(part)
            with contextlib.suppress(Exception):
                if ctx.cuda:
                    torch.cuda.empty_cache()
            report.write(args.parts, done)
        ctx.store = None
    report.header.append(f"\nWall time: {time.perf_counter() - t_start:.0f} s.")
    text = report.write(args.parts, done)
    print(text)
    return text


if __name__ == "__main__":
    main()
