"""Archives in the seed pipeline's exact formats, at any shape (../shared/notes/seed-pipeline.md).

What real users will feed `tools/convert`:

- `write_seed_raw_archive`: `traces_data/<model>_<dataset>_batch_NNNN.pkl.gz`, one gzip stream (level 6)
  around one `pickle.dump(list_of_dicts)` at the default protocol, or a plain `.pkl` (the older files);
  each dict as `seed_records` makes it (`hidden_states`, `attentions`, `tokens`, `tokens_decoded`,
  `generated_answer_clean`, `question_id`).
- `write_seed_scores_csv`: `ground_truth_scores.csv`, header `question_id,bleurt_score`.
- `write_seed_lstm_pt`: `preprocessed_data/lstm_solo/preprocessed_<raw name>.pt`.
- `write_seed_gnn_pt`: `preprocessed_data/gnn/preprocessed_<raw name>.pt` (v1 graphs, float16 `x`, 1-D
  float16 `edge_attr`), and with `labels=False, edge_attr_2d=True, pca_dim=64` the later shards
  `sharded_data_part_N.pt`.

Every value is deterministic in (seed, trace index), given the same shape (L, D, H) and `tokens` argument:
trace k has the same T, tokens, hidden states, attentions and BLEURT score whether it is written with
`start=0` as the k-th trace of one file or with `start=k` as the first of another. So a `.pt` and the raw archive of the
same traces agree (`sequences[b, l] == hidden_states[l][-1]`, `graphs[b][l].x == hidden_states[l]`, edges
from `attentions[l]`), and a test can check a conversion of either against the other.

Values are realistic and float16-safe: hidden states are Student-t(5) (clipped to +-40 before scaling) with a
per-layer scale rising with depth, a per-layer mean, per-dimension scales and two "massive activation"
dimensions of a few hundred from layer 2 on (twice that at the first token, as LLMs put them there), all
within about +-1,500, far inside +-65504. Attentions are causal softmaxes (a sink on the first token, a
recency bias, per-head temperature) computed in float32 and cast to float16: exact zeros above the diagonal,
rows summing to 1 within float16 rounding. T is 40-100 in the real files; any T >= 1 works here.

Nothing here imports torch or torch_geometric until a `.pt` writer is called.
"""

from __future__ import annotations

import os
import pickle
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .pickles import write_pickle

#: one stream number per kind of value, so that adding a value never shifts another
_S_LEN, _S_HIDDEN, _S_ATT, _S_TOKENS, _S_SCORE, _S_LAYER, _S_PCA, _S_CSV = 100, 101, 102, 103, 104, 110, 120, 130

#: the pipeline's label: hallucination = 1 when bleurt_score < HALLUCINATION_BELOW
HALLUCINATION_BELOW = 0.5

#: Llama-2's vocabulary size (token ids are in [0, VOCAB_SIZE))
VOCAB_SIZE = 32000

_BOS = (1, "<s>")
#: prompt pieces and answer pieces, SentencePiece style ("▁" = a leading space), a few of them non-ASCII
_PROMPT_PIECES = ("▁[", "INST", "]", "▁Answer", "▁the", "▁following", "▁question", "▁concis", "ely", ":", "▁Which",
                  "▁city", "▁is", "▁capital", "▁of", "▁France", "?", "▁Who", "▁wrote", "▁the", "▁opera", "▁In",
                  "▁what", "▁year", "▁did", "▁café", "▁Zürich", "▁river", "▁flows", "▁through", "▁München", "<0x0A>",
                  "▁[/", "▁Ł", "ódź", "▁named", "▁after", ",", "▁a", "▁an")
#: whole answers, as piece sequences (one is picked per trace, cut to fit T)
_ANSWERS = (("▁Paris",), ("▁The", "▁answer", "▁is", "▁Paris", "."), ("▁Mozart",), ("▁München",), ("▁Dvořák",),
            ("▁São", "▁Paulo"), ("▁Mount", "▁Everest"), ("▁Ber", "lin"), ("▁1", "9", "6", "9"), ("▁Nile",),
            ("▁Sure", "!", "▁It", "▁was", "▁Tokyo", "."), ("▁Ł", "ódź"), ("▁café", "▁au", "▁lait"), ("Paris",))
_ANSWER_PIECES = tuple(sorted({p for a in _ANSWERS for p in a}))


def _piece_ids() -> dict[str, int]:
    """A fixed id for every piece (one vocabulary, whatever the seed): distinct ids in [259, VOCAB_SIZE)."""
    pieces = sorted(set(_PROMPT_PIECES) | set(_ANSWER_PIECES))
    ids = np.random.default_rng(20240601).choice(np.arange(259, VOCAB_SIZE), size=len(pieces), replace=False)
    return {p: int(i) for p, i in zip(pieces, ids, strict=True)}


_PIECE_ID = _piece_ids()


# -- per-trace values ------------------------------------------------------------------------------------------
def _rng(seed: int, stream: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *key])


def _token_range(tokens: int | tuple[int, int]) -> tuple[int, int]:
    lo, hi = (tokens, tokens) if isinstance(tokens, int | np.integer) else tokens
    lo, hi = int(lo), int(hi)
    if lo < 1 or hi < lo:
        raise ValueError(f"tokens must be an int >= 1 or a (min, max) tuple with 1 <= min <= max, got {tokens!r}")
    return lo, hi


def seed_num_tokens(k: int, tokens: int | tuple[int, int], seed: int = 0) -> int:
    """T of trace k: `tokens` itself when an int, else drawn in [min, max] from (seed, k) alone."""
    lo, hi = _token_range(tokens)
    return lo if lo == hi else int(_rng(seed, _S_LEN, k).integers(lo, hi + 1))


def _massive_dims(hidden_size: int) -> list[tuple[int, float]]:
    # in the spirit of Llama-2-7B's dims 1415 and 2533 (Sun et al. 2024), folded into small hidden sizes
    if hidden_size < 8:
        return []
    picks = [(1415 % hidden_size, 350.0), (2533 % hidden_size, -250.0)]
    return picks if picks[0][0] != picks[1][0] else picks[:1]


def _layer_constants(num_layers: int, hidden_size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(layer mean [L, D], layer scale [L, 1], dim scale [D]) float32: shared by every trace of a shape."""
    base = _rng(seed, _S_LAYER, num_layers, hidden_size)
    mean = base.normal(0.0, 0.5, (num_layers, hidden_size)).astype(np.float32)
    scale = np.linspace(0.3, 6.0, num_layers, dtype=np.float32)[:, None]
    dim_scale = np.exp(base.normal(0.0, 0.3, hidden_size)).astype(np.float32)
    return mean, scale, dim_scale


def seed_hidden_states(k: int, num_layers: int, hidden_size: int, num_tokens: int, seed: int = 0) -> np.ndarray:
    """Trace k's per-token states, float16 [L, T, D] (layer l = the model's layer l + 1; the embedding output
    is skipped, as in the seed pipeline)."""
    L, D, T = num_layers, hidden_size, num_tokens
    mean, scale, dim_scale = _layer_constants(L, D, seed)
    t = _rng(seed, _S_HIDDEN, k).standard_t(5, size=(L, T, D)).astype(np.float32)
    np.clip(t, -40.0, 40.0, out=t)
    h = mean[:, None, :] + t * (scale * dim_scale)[:, None, :]
    for d, m in _massive_dims(D):
        h[2:, :, d] += m
        h[2:, 0, d] += m
    return h.astype(np.float16)


def seed_attentions(k: int, num_layers: int, num_heads: int, num_tokens: int, seed: int = 0) -> np.ndarray:
    """Trace k's attentions, float16 [L, H, T, T]: every head a causal softmax over j <= i, computed in
    float32 then cast (exact zeros for j > i)."""
    L, H, T = num_layers, num_heads, num_tokens
    rng = _rng(seed, _S_ATT, k)
    out = np.empty((L, H, T, T), dtype=np.float16)
    i = np.arange(T)
    dist = (i[:, None] - i[None, :]).astype(np.float32)
    causal = dist >= 0
    for layer in range(L):
        temp = rng.uniform(0.5, 2.5, (H, 1, 1)).astype(np.float32)
        sink = rng.uniform(0.0, 5.0, (H, 1, 1)).astype(np.float32)
        recency = rng.uniform(0.0, 0.5, (H, 1, 1)).astype(np.float32)
        logits = rng.standard_normal((H, T, T), dtype=np.float32) * temp - recency * np.maximum(dist, 0.0)
        logits[:, :, 0] += sink[:, :, 0]
        logits = np.where(causal, logits, -np.inf)
        logits -= logits.max(axis=-1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=-1, keepdims=True)
        out[layer] = p.astype(np.float16)
    return out


def _seed_tokens(k: int, num_tokens: int, seed: int) -> tuple[np.ndarray, list[str], str]:
    """(token ids int64 [T], each piece as a str, the answer text) of trace k: <s>, prompt, answer."""
    T = num_tokens
    rng = _rng(seed, _S_TOKENS, k)
    answer = list(_ANSWERS[int(rng.integers(0, len(_ANSWERS)))][:T - 1])
    n_prompt = T - 1 - len(answer)
    prompt = [_PROMPT_PIECES[int(j)] for j in rng.integers(0, len(_PROMPT_PIECES), n_prompt)]
    pieces = [_BOS[1], *prompt, *answer]
    ids = np.asarray([_BOS[0]] + [_PIECE_ID[p] for p in prompt + answer], dtype=np.int64)
    text = "".join(answer).replace("▁", " ").strip()
    return ids, pieces, text


def seed_bleurt_scores(n: int, seed: int = 0, start: int = 0) -> np.ndarray:
    """BLEURT-20 scores of traces start..start+n-1, float32 in [0, 1]: Beta(2.2, 2), each from (seed, k)
    alone (about 45% fall under 0.5, i.e. hallucinations)."""
    return np.asarray([_score_of(seed, start + k) for k in range(n)], dtype=np.float32)


def _score_of(seed: int, k: int) -> float:
    return float(np.clip(_rng(seed, _S_SCORE, k).beta(2.2, 2.0), 0.0, 1.0))


def seed_labels(n: int, seed: int = 0, start: int = 0) -> np.ndarray:
    """The pipeline's labels, float32: 1.0 (hallucination) when the BLEURT score is < 0.5, else 0.0."""
    return (seed_bleurt_scores(n, seed, start) < HALLUCINATION_BELOW).astype(np.float32)


def seed_question_ids(n: int, start: int = 0, id_prefix: str = "qb_") -> list[str]:
    """`qb_<k>` for k in start..start+n-1 (TriviaQA style, e.g. `qb_4612`)."""
    return [f"{id_prefix}{k}" for k in range(start, start + n)]


def seed_records(n: int, num_layers: int, hidden_size: int, *, num_heads: int, tokens: int | tuple[int, int],
                 seed: int = 0, start: int = 0, id_prefix: str = "qb_") -> list[dict[str, Any]]:
    """Traces start..start+n-1 as the seed pipeline's raw dicts, one per trace, with exactly these keys:

    - `hidden_states`: list of L numpy float16 [T, D] (layers 1..L);
    - `attentions`: list of L numpy float16 [H, T, T] (causal softmax per head);
    - `tokens`: numpy int64 [T] (ids in [0, 32000); the first is <s> = 1);
    - `tokens_decoded`: list of T str (SentencePiece pieces such as "▁the", "Paris", "▁München");
    - `generated_answer_clean`: str (the answer pieces joined, "▁" as a space, stripped);
    - `question_id`: str, `id_prefix` + the trace index (`qb_4612`).

    tokens: T of every trace (int), or (min, max): T of trace k drawn in [min, max] from (seed, k)."""
    _token_range(tokens)
    L, D, H = num_layers, hidden_size, num_heads
    recs: list[dict[str, Any]] = []
    for k in range(start, start + n):
        T = seed_num_tokens(k, tokens, seed)
        hs = seed_hidden_states(k, L, D, T, seed)
        att = seed_attentions(k, L, H, T, seed)
        ids, pieces, text = _seed_tokens(k, T, seed)
        recs.append({
            "hidden_states": [hs[layer] for layer in range(L)],
            "attentions": [att[layer] for layer in range(L)],
            "tokens": ids,
            "tokens_decoded": pieces,
            "generated_answer_clean": text,
            "question_id": f"{id_prefix}{k}",
        })
    return recs


# -- files -----------------------------------------------------------------------------------------------------
def _prepare(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def write_seed_raw_archive(path: str | os.PathLike[str], n: int, num_layers: int, hidden_size: int, *,
                           num_heads: int, tokens: int | tuple[int, int], seed: int = 0, start: int = 0,
                           compresslevel: int | None = 6, protocol: int | None = None,
                           id_prefix: str = "qb_") -> list[str]:
    """Write `seed_records(...)` as the seed pipeline did: `gzip.open(path, "wb", compresslevel=6)` around one
    `pickle.dump(list_of_dicts)` at the default protocol (`protocol=None`). compresslevel=None: a plain
    pickle (the older `.pkl` files). The gzip header's mtime is 0, so the same call gives the same bytes.
    All n records are built in memory first (as the pipeline held them). Returns the question ids."""
    recs = seed_records(n, num_layers, hidden_size, num_heads=num_heads, tokens=tokens, seed=seed, start=start,
                        id_prefix=id_prefix)
    write_pickle(path, recs, compresslevel=compresslevel,
                 protocol=pickle.DEFAULT_PROTOCOL if protocol is None else protocol)
    return [r["question_id"] for r in recs]


_TRAILING_INT = re.compile(r"(\d+)$")


def seed_score_for_id(question_id: str, seed: int = 0) -> float:
    """The score `write_seed_scores_csv` gives an id when none is passed: `seed_bleurt_scores` of the trace
    index when the id ends in digits (`qb_4612` -> trace 4612, whatever the prefix), so the CSV agrees with
    the labels in the `.pt` files; otherwise one drawn from (seed, crc32 of the id)."""
    m = _TRAILING_INT.search(question_id)
    if m is not None:
        return _score_of(seed, int(m.group(1)))
    return float(_rng(seed, _S_CSV, zlib.crc32(question_id.encode())).beta(2.2, 2.0))


def write_seed_scores_csv(path: str | os.PathLike[str], question_ids: Sequence[str],
                          scores: Sequence[float] | np.ndarray | None = None, *, seed: int = 0,
                          extra: Mapping[str, float] | Iterable[str] | None = None) -> Path:
    """Write `ground_truth_scores.csv`: header `question_id,bleurt_score`, then one row per id in order,
    each score as Python's repr of the float (`0.7312345504760742`), lines ending in "\\n".

    scores: one per id (default `seed_score_for_id`). extra: rows for ids with no trace, either {id: score}
    or ids alone (scored by `seed_score_for_id`). Scores must be in [0, 1]."""
    ids = [str(q) for q in question_ids]
    vals = [seed_score_for_id(q, seed) for q in ids] if scores is None else [float(s) for s in np.asarray(scores)]
    if len(vals) != len(ids):
        raise ValueError(f"write_seed_scores_csv: {len(ids)} question ids but {len(vals)} scores; pass one each")
    rows = list(zip(ids, vals, strict=True))
    if extra is not None:
        if isinstance(extra, Mapping):
            rows += [(str(q), float(s)) for q, s in extra.items()]
        else:
            rows += [(str(q), seed_score_for_id(str(q), seed)) for q in extra]
    bad = [(q, s) for q, s in rows if not 0.0 <= s <= 1.0]
    if bad:
        raise ValueError(f"write_seed_scores_csv: BLEURT scores are in [0, 1]; {bad[0][0]!r} has {bad[0][1]!r}")
    p = _prepare(path)
    p.write_text("question_id,bleurt_score\n" + "".join(f"{q},{s!r}\n" for q, s in rows), encoding="utf-8")
    return p


def write_seed_lstm_pt(path: str | os.PathLike[str], n: int, num_layers: int, hidden_size: int, *,
                       tokens: int | tuple[int, int], seed: int = 0, start: int = 0,
                       id_prefix: str = "qb_") -> list[str]:
    """Write `lstm_solo/preprocessed_<raw name>.pt`: `torch.save({'sequences': float16 [B, L, D], 'labels':
    float32 [B], 'question_ids': list[str]})`, where `sequences[b, l]` is the last token's state at layer l of
    the trace `seed_records` makes (bit for bit) and labels = (BLEURT < 0.5) (1 = hallucination). Returns the
    question ids."""
    import torch

    _token_range(tokens)
    L, D = num_layers, hidden_size
    seq = np.empty((n, L, D), dtype=np.float16)
    for b in range(n):
        k = start + b
        seq[b] = seed_hidden_states(k, L, D, seed_num_tokens(k, tokens, seed), seed)[:, -1, :]
    qids = seed_question_ids(n, start, id_prefix)
    obj = {"sequences": torch.from_numpy(seq), "labels": torch.from_numpy(seed_labels(n, seed, start)),
           "question_ids": qids}
    torch.save(obj, _prepare(path))
    return qids


def head_mean(att: np.ndarray) -> np.ndarray:
    """The head-mean attention of one layer: `att.astype(np.float32).mean(axis=0)`, exactly.

    att: float16 [H, T, T] as stored in the raw archive. Every value is widened to float32 first, then numpy
    sums over the head axis in float32 and divides by H (float32 [T, T]). The v1 graphs take their edges and
    weights from this; their float16 `edge_attr` is this value cast to float16 (round to nearest even)."""
    return np.asarray(att).astype(np.float32).mean(axis=0)


def v1_edges(mean: np.ndarray, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The seed's v1 recipe on a head mean [T, T]: for every i and every j <= i with `mean[i, j] >= threshold`,
    an edge j -> i ("i attends to j") weighted `mean[i, j]`; ordered by target i, then source j, ascending.
    Returns (edge_index int64 [2, E] = [sources j; targets i], weights float32 [E])."""
    T = mean.shape[0]
    keep = np.tril(np.ones((T, T), dtype=bool)) & (mean >= threshold)
    tgt, src = np.nonzero(keep)  # row-major: i ascending, then j ascending
    return np.stack([src, tgt]).astype(np.int64), mean[tgt, src].astype(np.float32)


def seed_pca_matrix(hidden_size: int, pca_dim: int, seed: int = 0) -> np.ndarray:
    """The stand-in for the later shards' PCA: an orthonormal float32 [D, k] (QR of a Gaussian drawn from
    (seed, D, k)), the same for every trace and layer, as one fitted PCA would be."""
    if not 1 <= pca_dim <= hidden_size:
        raise ValueError(f"pca_dim must be in [1, hidden_size={hidden_size}], got {pca_dim}")
    g = _rng(seed, _S_PCA, hidden_size, pca_dim).standard_normal((hidden_size, pca_dim))
    q, r = np.linalg.qr(g)
    return (q * np.sign(np.diag(r))).astype(np.float32)


def _torch_dtype(dtype: Any) -> Any:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"x_dtype must be a torch dtype or its name ('float16', 'float32'), got {dtype!r}")


def write_seed_gnn_pt(path: str | os.PathLike[str], n: int, num_layers: int, hidden_size: int, *, num_heads: int,
                      tokens: int | tuple[int, int], seed: int = 0, start: int = 0, threshold: float = 0.0,
                      labels: bool = True, edge_attr_2d: bool = False, x_dtype: Any = "float16",
                      pca_dim: int | None = None, id_prefix: str = "qb_") -> list[str]:
    """Write `gnn/preprocessed_<raw name>.pt`: `torch.save({'graphs': list[B] of list[L] of
    torch_geometric.data.Data, 'labels': float32 [B], 'question_ids': list[str]})`. Returns the question ids.

    Each Data, for layer l of trace k as `seed_records` makes it: `x` [T, D] = hidden_states[l] (float16 by
    default, `x_dtype` to change it), `edge_index` int64 [2, E] and weights from `v1_edges(head_mean(
    attentions[l]), threshold)`, `edge_attr` float16 [E] (the float32 head mean cast), `num_nodes` = T, and
    plain attributes `num_possible_edges` = T(T+1)/2 (int, the causal pairs with self-loops),
    `num_filtered_edges` = E (int, the pairs kept by the threshold) and `filter_ratio` = E / possible (float).

    The later shards (`sharded_data_part_N.pt`): labels=False drops the 'labels' key; edge_attr_2d=True gives
    float32 `edge_attr` [E, 1]; pca_dim=k gives float32 `x` [T, k] = float32(hidden_states[l]) @
    `seed_pca_matrix(D, k, seed)` (x_dtype is then ignored)."""
    import torch
    from torch_geometric.data import Data

    _token_range(tokens)
    L, D, H = num_layers, hidden_size, num_heads
    xdt = _torch_dtype(x_dtype)
    proj = seed_pca_matrix(D, pca_dim, seed) if pca_dim is not None else None
    graphs: list[list[Any]] = []
    for b in range(n):
        k = start + b
        T = seed_num_tokens(k, tokens, seed)
        hs = seed_hidden_states(k, L, D, T, seed)
        att = seed_attentions(k, L, H, T, seed)
        possible = T * (T + 1) // 2
        layers = []
        for layer in range(L):
            ei, w = v1_edges(head_mean(att[layer]), threshold)
            if proj is not None:
                x = torch.from_numpy(hs[layer].astype(np.float32) @ proj)
            else:
                x = torch.from_numpy(hs[layer].copy()).to(xdt)  # one storage per layer, as the pipeline had
            ea = torch.from_numpy(w[:, None].copy()) if edge_attr_2d else torch.from_numpy(w.astype(np.float16))
            E = int(ei.shape[1])
            layers.append(Data(x=x, edge_index=torch.from_numpy(ei), edge_attr=ea, num_nodes=T,
                               num_possible_edges=possible, num_filtered_edges=E,
                               filter_ratio=E / possible))
        graphs.append(layers)
    qids = seed_question_ids(n, start, id_prefix)
    obj: dict[str, Any] = {"graphs": graphs}
    if labels:
        obj["labels"] = torch.from_numpy(seed_labels(n, seed, start))
    obj["question_ids"] = qids
    torch.save(obj, _prepare(path))
    return qids


__all__ = ["HALLUCINATION_BELOW", "VOCAB_SIZE", "head_mean", "seed_attentions", "seed_bleurt_scores",
           "seed_hidden_states", "seed_labels", "seed_num_tokens", "seed_pca_matrix", "seed_question_ids",
           "seed_records", "seed_score_for_id", "v1_edges", "write_seed_gnn_pt", "write_seed_lstm_pt",
           "write_seed_raw_archive", "write_seed_scores_csv"]
