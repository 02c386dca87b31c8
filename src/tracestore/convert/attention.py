"""Attention matrices -> one graph per layer over a trace's T tokens, by a named recipe. Pure (no I/O).

The seed pipeline's raw archives carry, per trace, `attentions` = L arrays [H, T, T] (every head's attention
matrix; row = query token i, column = key token j; each row a softmax over j <= i). The old code built its
graphs from them in several ways (../shared/notes/seed-pipeline.md, "How the graphs were built"), so a store
records the recipe that built its graphs (`GraphRecipe.to_attrs`).

The head mean
    ``a = att.astype(np.float32).mean(axis=0)`` exactly: each value widened to float32 (exact for float16),
    summed over the heads in float32 in head order (numpy's reduction over a leading axis), divided by H in
    float32. `layer_edges` and `trace_edges` compute this very expression on the same float32 array, so
    a test can reproduce the weights bit for bit. Only the float16 -> float32 widening goes through torch
    when it is importable (about 10x faster than numpy's cast; the widening is exact either way).

Recipes (both select edges by the head mean `a`)
    ``causal-threshold`` (the seed's v1, the default)
        for every target token i and every source j <= i (self-loops included) with ``a[i, j] >= threshold``:
        an edge j -> i. The comparison is in float32 (the mean against ``float32(threshold)``), as the
        seed's numpy code made it (a float32 array against a Python float). At threshold 0.0 that is every
        causal pair:
        E = T(T+1)/2 per layer.
    ``causal-topk-frac`` (the seed's v2)
        for each token i >= 1, the top ``k_i = max(1, int(i * topk_frac))`` predecessors j < i by ``a[i, j]``
        (no self-loops; token 0 has no edges); ties go to the lower j. `topk_counts` gives k_i; it matches
        the Python expression exactly (``np.floor`` of the float64 product ``i * topk_frac``).

Edge attributes
    ``edge_attr="mean"``: [E, 1] float32, ``a[i, j]``. ``edge_attr="heads"``: [E, H] float32, every head's
    value ``att[:, i, j]`` (the same edges, still selected by the mean).

Edge order (the converter and its tests rely on it)
    row 0 of edge_index is the source j (key), row 1 the target i (query); edges are sorted by target i
    ascending, then source j ascending: the order of ``np.nonzero`` on an [i, j] mask.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from ..errors import DTypeError, InputFormatError, NonFiniteValueError, ShapeMismatchError
from ..store.graphs import as_numpy
from ..threads import import_torch

RecipeName = Literal["causal-threshold", "causal-topk-frac"]
EdgeAttr = Literal["mean", "heads"]

RECIPE_NAMES: tuple[str, ...] = get_args(RecipeName)
EDGE_ATTRS: tuple[str, ...] = get_args(EdgeAttr)
#: What `GraphRecipe.to_attrs` records under "edge_order": the one order `layer_edges` produces.
EDGE_ORDER = "target, then source"

_SEED_VERSION = {"causal-threshold": "seed v1", "causal-topk-frac": "seed v2"}
#: The parameter each recipe takes, and its default (the other recipe's parameter must stay at its default).
_PARAM = {"causal-threshold": "threshold", "causal-topk-frac": "topk_frac"}
_DEFAULTS = {"threshold": 0.0, "topk_frac": 0.35}
#: float16 bit patterns 0x0000 (+0.0) ... 0x3C00 (1.0) are exactly the values in [+0, 1]; NaN, inf and every
#: negative number (sign bit set) lie above, so one max over the bits clears a float16 layer.
_F16_ONE_BITS = 0x3C00


@dataclass(frozen=True)
class GraphRecipe:
    """How a trace's attention matrices become one graph per layer (see the module docstring).

    Fields are validated on construction (`validate`); `threshold` applies to ``causal-threshold`` only and
    `topk_frac` to ``causal-topk-frac`` only (the other must stay at its default, so that the recorded
    attributes describe the recipe completely). Numbers are stored as Python floats.
    """

    name: RecipeName = "causal-threshold"
    threshold: float = 0.0
    topk_frac: float = 0.35
    edge_attr: EdgeAttr = "mean"

    def __post_init__(self) -> None:
        for key in ("threshold", "topk_frac"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int | float | np.floating | np.integer):
                raise ValueError(f"GraphRecipe: {key}={v!r} is not a number; give a float, e.g. "
                                 f"{key}={_DEFAULTS[key]}")
            object.__setattr__(self, key, float(v))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field, its value and the rule: a known name and edge_attr,
        0 <= threshold <= 1, 0 < topk_frac <= 1, and the other recipe's parameter left at its default."""
        if self.name not in RECIPE_NAMES:
            raise ValueError(f"GraphRecipe: name={self.name!r} is not a known recipe; choose one of "
                             f"{', '.join(RECIPE_NAMES)}")
        if self.edge_attr not in EDGE_ATTRS:
            raise ValueError(f"GraphRecipe: edge_attr={self.edge_attr!r}; choose 'mean' (the head mean, "
                             f"[E, 1]) or 'heads' (every head, [E, H])")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"GraphRecipe: threshold={self.threshold!r} is outside [0, 1]; attention "
                             f"weights are probabilities, so give a threshold in [0, 1] (0.0 keeps every "
                             f"causal pair)")
        if not 0.0 < self.topk_frac <= 1.0:
            raise ValueError(f"GraphRecipe: topk_frac={self.topk_frac!r} is outside (0, 1]; token i keeps "
                             f"max(1, int(i * topk_frac)) of its i predecessors, so give 0 < topk_frac <= 1")
        for key, default in _DEFAULTS.items():
            if key != _PARAM[self.name] and getattr(self, key) != default:
                raise ValueError(f"GraphRecipe: {key}={getattr(self, key)!r} does not apply to recipe "
                                 f"{self.name!r} (its parameter is {_PARAM[self.name]}); leave {key} at its "
                                 f"default or choose the recipe that uses it")

    def to_attrs(self) -> dict[str, Any]:
        """The JSON-able description the store's attributes record: name, the recipe's one parameter
        (threshold or topk_frac), edge_attr, and edge_order ("target, then source")."""
        param = _PARAM[self.name]
        return {"name": self.name, param: float(getattr(self, param)), "edge_attr": self.edge_attr,
                "edge_order": EDGE_ORDER}

    @classmethod
    def from_attrs(cls, d: dict[str, Any]) -> GraphRecipe:
        """The recipe `to_attrs` recorded. ValueError on an unknown name, a missing or unknown key, or an
        edge order other than ours (a store written by a different tracestore: upgrade to read it)."""
        name = d.get("name")
        if name not in RECIPE_NAMES:
            raise ValueError(f"graph recipe attributes {d!r}: name={name!r} is not a recipe this tracestore "
                             f"knows ({', '.join(RECIPE_NAMES)}); upgrade tracestore to read this store")
        param = _PARAM[name]
        allowed = {"name", param, "edge_attr", "edge_order"}
        missing = sorted({"name", param, "edge_attr"} - d.keys())
        unknown = sorted(d.keys() - allowed)
        if missing or unknown:
            raise ValueError(f"graph recipe attributes {d!r}: missing {missing}, unknown {unknown}; recipe "
                             f"{name!r} records exactly {sorted(allowed)}; upgrade tracestore or rewrite the "
                             f"attributes with GraphRecipe.to_attrs()")
        if d.get("edge_order", EDGE_ORDER) != EDGE_ORDER:
            raise ValueError(f"graph recipe attributes {d!r}: edge_order={d['edge_order']!r}; this "
                             f"tracestore writes and reads {EDGE_ORDER!r} only; upgrade tracestore to read "
                             f"this store")
        return cls(name=name, edge_attr=d["edge_attr"], **{param: d[param]})

    def edge_attr_size(self, num_heads: int) -> int:
        """Values per edge: 1 for ``mean``, `num_heads` (H) for ``heads``."""
        if num_heads < 1:
            raise ValueError(f"GraphRecipe.edge_attr_size: num_heads={num_heads}; an attention layer has at "
                             f"least one head")
        return 1 if self.edge_attr == "mean" else int(num_heads)

    def describe(self) -> str:
        """One line for `tracestore info`."""
        if self.name == "causal-threshold":
            rule = f"edge j -> i for every j <= i with mean >= {self.threshold!r}"
        else:
            rule = (f"edge j -> i for the top max(1, int(i * {self.topk_frac!r})) predecessors j < i of each "
                    f"token i >= 1 (ties: lower j)")
        weight = "mean [E, 1]" if self.edge_attr == "mean" else "every head [E, H]"
        return f"{self.name} ({_SEED_VERSION[self.name]}): mean over heads, {rule}, weight = {weight}"


DEFAULT_RECIPE = GraphRecipe()


def topk_counts(num_tokens: int, topk_frac: float) -> np.ndarray:
    """k_i of ``causal-topk-frac``, int64 [T]: 0 for token 0, ``max(1, int(i * topk_frac))`` for i >= 1,
    exactly as Python computes it (the float64 product, truncated; `topk_frac` taken as a Python float)."""
    k = np.floor(np.arange(num_tokens, dtype=np.float64) * float(topk_frac)).astype(np.int64)
    k = np.maximum(k, 1)
    k[:1] = 0
    return k


def _float32(att: np.ndarray) -> np.ndarray:
    """`att` as float32 (the widening from float16 is exact). Native float16 goes through torch, whose cast
    is about 10x faster than numpy's here; anything else through numpy."""
    if att.dtype == np.float16:  # native byte order only: torch.from_numpy refuses the other
        try:
            torch = import_torch()
        except ImportError:  # pragma: no cover - torch is a dependency
            return att.astype(np.float32)
        a = np.ascontiguousarray(att)
        with warnings.catch_warnings():
            # a read-only array (a memory map) makes torch warn that writes would be unsafe; we only read
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(a).float().numpy()
    return att.astype(np.float32, copy=False)


def _select(means: np.ndarray, recipe: GraphRecipe) -> np.ndarray:
    """The kept-edge mask [L, T, T] (row i = target, column j = source) of head means [L, T, T] float32."""
    T = means.shape[-1]
    if recipe.name == "causal-threshold":
        # in float32, as the seed's numpy code compares a float32 array with a Python float (NEP 50)
        return np.tril(np.ones((T, T), dtype=bool)) & (means >= np.float32(recipe.threshold))
    strict = np.tril(np.ones((T, T), dtype=bool), -1)
    scores = np.where(strict, means, np.float32(-np.inf))
    # descending by mean, ties in ascending j (stable sort of the negation); rank[l, i, j]: j's place in row i
    order = np.argsort(-scores, axis=-1, kind="stable")
    rank = np.empty(order.shape, dtype=np.int64)
    np.put_along_axis(rank, order, np.arange(T, dtype=np.int64), axis=-1)
    return strict & (rank < topk_counts(T, recipe.topk_frac)[:, None])


def _edges(means: np.ndarray, layers32: list[np.ndarray] | None,
           recipe: GraphRecipe) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Edges of all layers at once from the head means [L, T, T]; `layers32` (the float32 [H, T, T] of each
    layer) is needed for ``edge_attr="heads"`` only."""
    L, T = means.shape[0], means.shape[-1]
    keep = _select(means, recipe)
    lidx, target, source = np.nonzero(keep)  # sorted by layer, then target, then source
    bounds = np.cumsum(np.count_nonzero(keep.reshape(L, -1), axis=1))[:-1]
    weights = means[lidx, target, source]
    edge_index, edge_attr = [], []
    for layer, (t, s, w) in enumerate(zip(np.split(target, bounds), np.split(source, bounds),
                                      np.split(weights, bounds), strict=True)):
        edge_index.append(np.stack([s, t]).astype(np.int64, copy=False))
        if layers32 is None:
            edge_attr.append(w[:, None])
        else:
            a = layers32[layer]
            edge_attr.append(np.ascontiguousarray(a.reshape(a.shape[0], T * T)[:, t * T + s].T))
    return edge_index, edge_attr


def layer_edges(att: np.ndarray, recipe: GraphRecipe = DEFAULT_RECIPE) -> tuple[np.ndarray, np.ndarray]:
    """One layer's graph: `att` [H, T, T] float (numpy, float16 or float32) -> edge_index int64 [2, E]
    (row 0 = source j = key, row 1 = target i = query; sorted by target, then source) and edge_attr float32
    [E, A] (A = 1 for ``mean``, H for ``heads``). The values are not checked: `trace_edges` does that."""
    att = np.asarray(att)
    if att.ndim != 3 or att.shape[1] != att.shape[2] or att.shape[0] < 1:
        raise ShapeMismatchError(f"layer_edges: att has shape {att.shape}; expected (H, T, T) with H >= 1: "
                                 f"one [heads, tokens, tokens] attention matrix")
    a32 = _float32(att)
    ei, ea = _edges(a32.mean(axis=0)[None], [a32] if recipe.edge_attr == "heads" else None, recipe)
    return ei[0], ea[0]


def _layers(attentions: Any, where: str) -> list[np.ndarray]:
    """The per-layer arrays of `attentions` (a list/tuple of arrays or tensors, or one [L, H, T, T])."""
    if isinstance(attentions, list | tuple):
        out = []
        for layer, a in enumerate(attentions):
            try:
                out.append(as_numpy(a))
            except (ValueError, TypeError) as e:
                raise ShapeMismatchError(f"{where}: attentions[{layer}] (layer {layer}) is not an array "
                                         f"({e}); expected one [heads, tokens, tokens] matrix per layer; "
                                         f"re-export the attentions") from None
    elif isinstance(attentions, np.ndarray) or hasattr(attentions, "detach"):
        stacked = as_numpy(attentions)
        if stacked.ndim != 4:
            raise ShapeMismatchError(f"{where}: attentions is one array of shape {tuple(stacked.shape)}; "
                                     f"expected a list of L arrays [H, T, T] or one array [L, H, T, T]; "
                                     f"re-export the attentions with every head of every layer")
        out = list(stacked)
    else:
        raise InputFormatError(f"{where}: attentions is a {type(attentions).__name__}; expected a list of L "
                               f"arrays [H, T, T] (one per layer) or one array [L, H, T, T]")
    if not out:
        raise ShapeMismatchError(f"{where}: attentions has no layers; expected one [heads, tokens, tokens] "
                                 f"matrix per layer; re-export the attentions")
    return out


def _check_layer(att: np.ndarray, layer: int, num_tokens: int, num_heads: int, where: str) -> None:
    """Shape and dtype of layer `layer` (num_heads: the first layer's H)."""
    T = num_tokens
    if att.ndim != 3 or att.shape[1:] != (T, T) or att.shape[0] < 1:
        raise ShapeMismatchError(f"{where}: attentions[{layer}] (layer {layer}) has shape "
                                 f"{tuple(att.shape)}; expected (H, {T}, {T}), H >= 1: one [heads, tokens, "
                                 f"tokens] matrix per layer for the trace's {T} tokens; re-export the "
                                 f"attentions")
    if att.shape[0] != num_heads:
        raise ShapeMismatchError(f"{where}: attentions[{layer}] (layer {layer}) has {att.shape[0]} heads but "
                                 f"attentions[0] has {num_heads}; every layer needs all its heads, the same "
                                 f"number in each; re-export the attentions")
    if att.dtype.kind != "f":
        raise DTypeError(f"{where}: attentions[{layer}] (layer {layer}) has dtype {att.dtype}; expected "
                         f"float16 or float32 attention probabilities; re-export the attentions as floats")


def _check_values(att: np.ndarray, layer: int, where: str) -> None:
    """NaN -> NonFiniteValueError; a value outside [0, 1] (inf included) -> InputFormatError. One max over
    the bits (float16) or one min and max (other floats) first; the first bad (head, i, j) only if any."""
    if att.dtype == np.float16:
        if int(att.view(np.uint16).max(initial=0)) <= _F16_ONE_BITS:
            return
    elif att.size == 0 or (att.min() >= 0 and att.max() <= 1):  # NaN fails both comparisons
        return
    nan = np.isnan(att)
    if nan.any():
        h, i, j = np.unravel_index(int(np.argmax(nan)), att.shape)
        raise NonFiniteValueError(f"{where}: attentions[{layer}] (layer {layer}) head {h} has NaN at query "
                                  f"token i={i}, key token j={j}; attention weights must be finite "
                                  f"probabilities; re-export the attentions (NaN often means the model "
                                  f"overflowed in float16: run it in bfloat16 or float32)")
    bad = (att < 0) | (att > 1)
    if bad.any():
        h, i, j = np.unravel_index(int(np.argmax(bad)), att.shape)
        raise InputFormatError(f"{where}: attentions[{layer}] (layer {layer}) head {h} has {att[h, i, j]!s} "
                               f"at query token i={i}, key token j={j}; attention weights are probabilities "
                               f"in [0, 1]: export attention probabilities (post-softmax, e.g. "
                               f"attn_implementation=\"eager\"), not scores or logits")


def trace_edges(attentions: Any, num_tokens: int, recipe: GraphRecipe = DEFAULT_RECIPE, *, where: str,
                num_layers: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Check and build all L layers of one trace.

    Parameters
    ----------
    attentions : a list/tuple of L arrays [H, T, T] (numpy or torch, float16/float32/float64), or one array
        [L, H, T, T]; row i = query token, column j = key token, values softmax probabilities.
    num_tokens : T, the trace's tokens (every matrix must be [H, T, T]).
    recipe : which edges and weights (see the module docstring); DEFAULT_RECIPE is the seed's v1.
    where : names the trace in error messages, e.g. "traces_0003.pkl.gz: trace 'qb_4612'".
    num_layers : when given, the number of layers the trace must have (the hidden states' L).

    Returns
    -------
    (edge_index, edge_attr) : L arrays int64 [2, E_l] (row 0 = source j, row 1 = target i; sorted by
        target, then source) and L arrays float32 [E_l, A] (A = `recipe.edge_attr_size(H)`).

    Raises
    ------
    ShapeMismatchError : no layers, a layer count other than `num_layers`, a layer that is not [H, T, T]
        with T = num_tokens, or heads differing between layers.
    DTypeError : a layer that is not floating point.
    NonFiniteValueError : a NaN (named by layer, head, i, j).
    InputFormatError : a value outside [0, 1], inf included (scores or logits instead of probabilities),
        or `attentions` of the wrong type.
    """
    layers = _layers(attentions, where)
    if num_layers is not None and len(layers) != num_layers:
        raise ShapeMismatchError(f"{where}: attentions has {len(layers)} layer(s); expected {num_layers} "
                                 f"(one [heads, tokens, tokens] matrix per layer, as many as hidden_states); "
                                 f"re-export the attentions")
    H = int(layers[0].shape[0]) if layers[0].ndim == 3 else 0
    T = int(num_tokens)
    means = np.empty((len(layers), T, T), dtype=np.float32)
    keep32: list[np.ndarray] | None = [] if recipe.edge_attr == "heads" else None
    for layer, att in enumerate(layers):
        _check_layer(att, layer, T, H, where)
        _check_values(att, layer, where)
        a32 = _float32(att)
        means[layer] = a32.mean(axis=0)
        if keep32 is not None:
            keep32.append(a32)
    return _edges(means, keep32, recipe)
