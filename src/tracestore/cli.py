"""The `tracestore` command: a thin shell over library functions.

Each subcommand is a `Command`: a function that adds its arguments to a parser and a function that runs it
and returns an exit code. Adding one is adding an entry to COMMANDS;
train and demo have parsers of their own and get their arguments whole (PASSTHROUGH). `main(argv)` maps a
TracestoreError to exit code 2 and one line on stderr; other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .config import parse_size
from .errors import TracestoreError


class _UsageError(TracestoreError, ValueError):
    """Options that do not go together (reported like any other error: one line, exit code 2)."""

EXIT_OK = 0
EXIT_ERROR = 2  # a TracestoreError: bad input, a damaged store, a refused overwrite
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -- convert ----------------------------------------------------------------------------------------------------
def _size(s: str) -> int:
    """A byte count: 123, 4.5G, 512M, 64KiB (tracestore.config.parse_size)."""
    n = parse_size(s, what="size")
    assert n is not None
    return n


_SOURCES_HELP = "archives: .pkl, .pkl.gz, .pt files, directories of them, or globs (taken in sorted order)"


def _configure_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="SRC", help=_SOURCES_HELP)
    p.add_argument("-o", "--output", required=True, metavar="DEST", help="the store to write")
    _add_convert_options(p)
    p.add_argument("--overwrite", action="store_true",
                   help="start over and replace the store at DEST (committed or unfinished): the new store is "
                        "built beside it and swapped in at the end, so a failed run leaves the old one as it was")
    from .convert.cluster import add_cluster_arguments

    add_cluster_arguments(p)


def _add_convert_options(p: argparse.ArgumentParser, *, append: bool = False) -> None:
    """The options of convert, convert-part and append. For append, those left out take the store's values
    (default None here), so that the new part matches the store."""
    store = " (default: the store's)" if append else ""
    p.add_argument("--scores", metavar="CSV", help="ground-truth scores, joined to traces by id")
    p.add_argument("--id-column", help="id column of the scores CSV (name or 0-based index; default: detected)")
    p.add_argument("--score-column", help="score column of the scores CSV (name or 0-based index; default: detected)")
    p.add_argument("--pool", choices=("last", "mean"),
                   help="how per-token states become each trace's per-layer vector (sequences, the LSTM input): "
                        "the last token of prompt + answer (default, as the seed pipeline) or the mean")
    p.add_argument("--tokens", choices=("all", "ids", "none"), default=None if append else "all",
                   help="per-token data to keep where the archives carry it: all (hidden states, token ids, text; "
                        "default; graph models need it), ids (ids and text only) or none" + store)
    g = p.add_argument_group("graphs built from attention matrices (records with 'attentions')")
    g.add_argument("--graph-threshold", type=float, default=None, metavar="T",
                   help="the seed's v1 recipe (default): head mean, an edge j -> i for every j <= i whose mean "
                        "attention is >= T (default 0.0: every causal pair, self-loops included)")
    g.add_argument("--graph-topk-frac", type=float, default=None, metavar="F",
                   help="the seed's v2 recipe instead: for each token i >= 1 its top max(1, int(i*F)) predecessors "
                        "j < i by head-mean attention, no self-loops")
    g.add_argument("--edge-attr", choices=("mean", "heads"), default=None if append else "mean",
                   help="edge features: the head mean [E, 1] (default) or every head's value [E, H]" + store)
    p.add_argument("--workers", type=int, default=1,
                   help="processes reading and casting archives in parallel (memory: one archive each; 0 = in "
                        "this process; default 1)")
    p.add_argument("--on-overflow", choices=("error", "clip"), default=None if append else "error",
                   help="values beyond +-65504 (float16 range): stop with an error (default) or clip and count them"
                        + store)
    p.add_argument("--allow-nan", action="store_const", const=True, default=None if append else False,
                   help="store NaN values (counted) instead of stopping" + store)
    p.add_argument("--verify", choices=("sample", "all", "none"), default="sample",
                   help="after writing, compare the store with the sources: a sample (default), every trace, or not")
    p.add_argument("--no-graphs", action="store_true",
                   help="no graphs: drop the archives' graphs and do not build any from their attentions")
    p.add_argument("--model-name", help="the source model's name, recorded in the store")
    p.add_argument("--shard-bytes", type=_size, help="target shard size (default from tracestore.config)")
    p.add_argument("--max-archive-bytes", type=_size,
                   help="cap on the decompressed size of one record of a pickled list of records (of the whole "
                        "archive for other layouts), against gzip bombs (default: half the memory); a quarter "
                        "of it (at least 512 MiB) bounds what the records share (memoised strings)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")


def graph_recipe_from_args(a: argparse.Namespace) -> Any:
    """The GraphRecipe of --graph-threshold / --graph-topk-frac / --edge-attr (one recipe at a time)."""
    from .convert.attention import GraphRecipe
    from .errors import TracestoreError

    if a.graph_threshold is not None and a.graph_topk_frac is not None:
        raise _UsageError("--graph-threshold and --graph-topk-frac are two recipes; give one of them")
    try:
        if a.graph_topk_frac is not None:
            return GraphRecipe(name="causal-topk-frac", topk_frac=a.graph_topk_frac, edge_attr=a.edge_attr)
        return GraphRecipe(threshold=0.0 if a.graph_threshold is None else a.graph_threshold, edge_attr=a.edge_attr)
    except ValueError as e:
        if isinstance(e, TracestoreError):
            raise
        # name the flag the user typed, not the class behind it
        msg = str(e).replace("GraphRecipe: threshold=", "--graph-threshold ").replace("GraphRecipe: topk_frac=",
                                                                                       "--graph-topk-frac ")
        raise _UsageError(msg) from None


def _convert_options(a: argparse.Namespace) -> dict[str, Any]:
    """convert()'s keyword options from the command line (those None are left to convert's defaults, or for
    append to the store's)."""
    given_recipe = not (a.graph_threshold is None and a.graph_topk_frac is None and a.edge_attr is None)
    if a.edge_attr is None:
        a.edge_attr = "mean"
    opts = {"scores": a.scores, "id_column": a.id_column, "score_column": a.score_column, "pool": a.pool,
            "tokens": a.tokens, "workers": a.workers, "on_overflow": a.on_overflow, "allow_nan": a.allow_nan,
            "verify": a.verify, "graphs": False if a.no_graphs else None,
            "graph_recipe": graph_recipe_from_args(a) if given_recipe else None, "model_name": a.model_name,
            "shard_bytes": a.shard_bytes, "max_archive_bytes": a.max_archive_bytes,
            "progress": not (a.no_progress or a.quiet)}
    return {k: v for k, v in opts.items() if v is not None}


def _logger(a: argparse.Namespace) -> Callable[[str], None]:
    def log(s: str) -> None:
        if not a.quiet:
            print(s, file=sys.stderr)

    return log


def _run_convert(a: argparse.Namespace) -> int:
    from .convert import convert
    from .convert.cluster import run_from_args, uses_cluster

    if uses_cluster(a):  # parts written on a Dask cluster's workers, then the manifest
        result: Any = run_from_args(a, {**_convert_options(a), "overwrite": a.overwrite, "log": _logger(a)})
    else:
        result = convert(a.sources, a.output, overwrite=a.overwrite, log=_logger(a), **_convert_options(a))
    if not a.quiet:
        print(result.summary())
    return EXIT_OK


# -- stores made of parts: append, convert-part, commit ---------------------------------------------------------
def _configure_append(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE", help="a committed store (path or s3:// URL)")
    p.add_argument("sources", nargs="+", metavar="SRC", help=_SOURCES_HELP)
    _add_convert_options(p, append=True)


def _run_append(a: argparse.Namespace) -> int:
    from .convert.part_writer import append

    result = append(a.store, a.sources, log=_logger(a), **_convert_options(a))
    if not a.quiet:
        print(result.summary())
    return EXIT_OK


def _configure_convert_part(p: argparse.ArgumentParser) -> None:
    p.add_argument("--part", type=_part_number, required=True, metavar="K",
                   help="the part's number: DEST/parts/K (e.g. $SLURM_ARRAY_TASK_ID); each task converts its own "
                        "archives into its own part")
    p.add_argument("sources", nargs="+", metavar="SRC", help=_SOURCES_HELP)
    p.add_argument("-o", "--output", required=True, metavar="DEST",
                   help="the store the part belongs to; `tracestore commit DEST` adds the parts to it when all are "
                        "written")
    _add_convert_options(p)


def _run_convert_part(a: argparse.Namespace) -> int:
    from .convert.part_writer import write_part

    opts = _convert_options(a)
    opts.setdefault("log", _logger(a))
    result = write_part(a.sources, a.output, a.part, **opts)
    if not a.quiet:
        print(result.summary)
        print(f"part {a.part} of {a.output} is written; once every part is, run `tracestore commit {a.output}`")
    return EXIT_OK


def _part_number(s: str) -> int:
    try:
        k = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: a part number is an integer in 0..99999") from None
    if not 0 <= k <= 99999:
        raise argparse.ArgumentTypeError(f"{k}: parts are numbered 0..99999")
    return k


def _parts_list(s: str) -> list[int]:
    return [_part_number(x.strip()) for x in s.split(",") if x.strip()]


def _configure_commit(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="DEST", help="the store whose parts to commit")
    p.add_argument("--parts", type=_parts_list, default=None, metavar="K,K,...",
                   help="the parts to add (default: every committed part under DEST/parts/ not listed yet; an "
                        "unfinished one stops the commit)")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")


def _run_commit(a: argparse.Namespace) -> int:
    from .store.parts import commit_parts

    result = commit_parts(a.store, parts=a.parts, log=_logger(a))
    if not a.quiet:
        print(result.summary())
    return EXIT_OK


# -- info -------------------------------------------------------------------------------------------------------
def _configure_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="a store path or URL")
    p.add_argument("--json", action="store_true", help="print the info as JSON")


def format_info(info: dict[str, Any]) -> str:
    """The human-readable form of TraceStore.info()."""
    from .convert.pipeline import describe_contents
    from .format.report import Float16Report

    n, L, D = info["num_traces"], info["num_layers"], info["hidden_size"]
    sc = info["scores"]
    disk, f16 = info["bytes_on_disk"], info["float16_bytes"]
    tok16 = int(info.get("token_float16_bytes", 0))
    lines = [
        f"{info['url']}",
        f"  format v{info['format_version']}, {n} traces x {L} layers x {D} hidden (float16)",
        f"  model: {info.get('model_name') or 'unknown'}",
        *([f"  made of {info['parts']} parts (appended or converted part by part)"] if info.get("parts", 1) > 1
          else []),
        f"  on disk {disk / 1e6:.1f} MB, of which float16 sequences {f16 / 1e6:.1f} MB"
        + (f" and token states {tok16 / 1e6:.1f} MB" if tok16 else ""),
        f"  scores: {sc['known']} known, {sc['missing']} missing"
        + (f"; min {sc['min']:.6g}, max {sc['max']:.6g}, mean {sc['mean']:.6g}" if sc["known"] else ""),
        *describe_contents(info.get("pool"), info.get("tokens"), int(info.get("num_tokens", 0)),
                           info.get("graph_recipe") if info.get("has_graphs") else None, int(info.get("num_edges", 0)),
                           info.get("fields") or {}),
    ]
    for name, rep in info.get("float16_report", {}).items():
        lines.append(f"  {name}: {Float16Report.from_dict(rep).summary()}")
    sources = (info.get("provenance") or {}).get("sources")
    # provenance is free-form (the converter writes a list of {"name", ...}; other writers what they like)
    names = [str(s["name"]) for s in sources if isinstance(s, dict) and "name" in s] \
        if isinstance(sources, list) else list(map(str, sources)) if isinstance(sources, dict) else []
    if names:
        lines.append(f"  from {len(names)} archive(s): " + ", ".join(names[:5]) + (", ..." if len(names) > 5 else ""))
    return "\n".join(lines)


def _run_info(a: argparse.Namespace) -> int:
    from .store.reader import open as open_store

    info = open_store(a.url).info()
    print(json.dumps(info, indent=2, default=str) if a.json else format_info(info))
    return EXIT_OK


# -- verify -----------------------------------------------------------------------------------------------------
def _configure_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="a store path or URL")


def _run_verify(a: argparse.Namespace) -> int:
    from .convert.verify import verify_store

    res = verify_store(a.url)
    total = sum(res["arrays"].values())
    print(f"ok: {res['url']}: committed, {res['num_traces']} unique ids, {total} chunks in {len(res['arrays'])} arrays "
          f"pass their crc32c checks")
    return EXIT_OK


def _layers(s: str) -> list[int] | None:
    """--layers: 'all', or a comma list of layers and ranges ('0,4,8-12'; a range includes both ends)."""
    if s == "all":
        return None
    out: list[int] = []
    try:
        for part in s.split(","):
            a, sep, b = part.strip().partition("-") if not part.strip().startswith("-") else (part.strip(), "", "")
            out.extend(range(int(a), int(b) + 1) if sep else [int(a)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: give 'all' or layers such as '0,4,8-12'") from None
    return out


def _configure_probe(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="store URL or path")
    p.add_argument("--out", required=True, help="directory for probe.csv, probe.png and split.json")
    p.add_argument("--layers", type=_layers, default=None, help="'all' (default) or e.g. '0,4,8-12'")
    p.add_argument("--token", choices=("last", "mean"), default=None,
                   help="the token whose state stands for a trace (default: the store's pooling)")
    p.add_argument("--task", choices=("classification", "regression"), default="classification")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--threshold", type=float, default=0.5, help="label 1 is score >= threshold (default 0.5)")
    labels.add_argument("--positive-below", type=float, default=None, metavar="T",
                        help="label 1 is score < T: the seed's hallucination = BLEURT < 0.5")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0, help="seed of the split (the same as tracestore train's)")
    p.add_argument("--group-pattern", default=None, help="regex whose first group names an id's group")
    p.add_argument("--group-field", default=None, help="a store field naming each trace's group")


def _run_probe(a: argparse.Namespace) -> int:
    from .probe import format_probe_table, probe_layers
    from .store.reader import open as open_store

    store = open_store(a.store)
    res = probe_layers(store, out=a.out, layers=a.layers, token=a.token, task=a.task, threshold=a.threshold,
                       positive_below=a.positive_below, val_fraction=a.val_fraction, test_fraction=a.test_fraction,
                       seed=a.seed, group_pattern=a.group_pattern, group_field=a.group_field,
                       log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"{store.url}: {len(res.rows)} layers, train {res.n_train} / validation {res.n_val} / test {res.n_test} "
          f"traces, {res.token} token; {res.seconds:.1f} s ({res.read_s:.1f} s reading)")
    print(format_probe_table(res))
    best = res.best_row()
    if best is not None:
        m = res.metric
        print(f"best layer on validation: {best['layer']} (test {m.upper()} {best[f'test_{m}']:.3f})")
    print(f"wrote {res.files['csv']}, {res.files['png']}")
    return 0


COMMANDS: list[Command] = [
    Command("convert", "convert archives (.pkl, .pkl.gz, .pt) and a scores CSV into a store", _configure_convert,
            _run_convert),
    Command("info", "shape, size, float16 report and score statistics of a store", _configure_info, _run_info),
    Command("verify", "check a store: commit marker, every checksum, unique ids", _configure_verify, _run_verify),
    Command("append", "convert more archives into a new part of a committed store", _configure_append,
            _run_append),
    Command("convert-part", "convert archives into one part of a store (a Slurm array task); commit them after",
            _configure_convert_part, _run_convert_part),
    Command("commit", "add the written parts of a store to its manifest (after convert-part tasks)",
            _configure_commit, _run_commit),
    Command("probe", "a linear probe per layer (train/validation/test split): table, probe.csv, probe.png",
            _configure_probe, _run_probe),
]


def _train_main(argv: list[str]) -> int:
    from .train import main as train_main

    return train_main(argv)


def _demo_main(argv: list[str]) -> int:
    from .demo import main as demo_main

    return demo_main(argv)


#: subcommands with a parser of their own (they also run as `python -m tracestore.train` / `-m tracestore.demo`,
#: the train one under torchrun): every argument after the name goes to them
PASSTHROUGH: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "train": ("train an lstm/gnn/hybrid (or seed-lstm/seed-gnn-lstm) probe on a store, scored on a held-out test "
              "split (see tracestore train --help)", _train_main),
    "demo": ("capture a labelled demo set from a real model, convert it, train, print a table", _demo_main),
}


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="tracestore", description="LLM traces as chunked float16 Zarr v3 stores")
    parser.add_argument("--version", action="version", version=f"tracestore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(_run=cmd.run)
    for name, (help_, _fn) in PASSTHROUGH.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code (0 ok, 2 a TracestoreError, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        command, run = argv[0], PASSTHROUGH[argv[0]][1]
        try:
            return int(run(argv[1:]))
        except TracestoreError as e:
            print(f"tracestore {command}: error: {' '.join(str(e).split())}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            print(f"tracestore {command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args))
    except TracestoreError as e:
        # one line: the message already names the file, the trace, the problem and the fix
        msg = " ".join(str(e).split())
        print(f"tracestore {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"tracestore {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
