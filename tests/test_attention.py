"""Attention matrices -> per-layer graphs: every recipe against a plain-loop reference, the head mean's exact
float32 value, k_i against Python's own expression, every validation error and its message, input forms."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch

from tracestore.convert.attention import (
    DEFAULT_RECIPE,
    GraphRecipe,
    layer_edges,
    topk_counts,
    trace_edges,
)
from tracestore.errors import DTypeError, InputFormatError, NonFiniteValueError, ShapeMismatchError

WHERE = "traces_0003.pkl.gz: trace 'qb_4612'"


def causal_softmax(rng: np.random.Generator, L: int, H: int, T: int) -> list[np.ndarray]:
    """L realistic float16 [H, T, T] attention matrices: random logits, the upper triangle masked to -inf,
    softmax over keys in float32, cast to float16."""
    out = []
    for _ in range(L):
        logits = rng.standard_normal((H, T, T), dtype=np.float32) * 2.0
        logits[:, np.triu(np.ones((T, T), dtype=bool), 1)] = -np.inf
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        out.append((e / e.sum(axis=-1, keepdims=True)).astype(np.float16))
    return out


def ref_mean(att: np.ndarray, i: int, j: int) -> np.float32:
    """The head mean at (i, j), one value at a time: float32 sum in head order, divided by H in float32."""
    s = np.float32(att[0, i, j])
    for h in range(1, att.shape[0]):
        s = np.float32(s + np.float32(att[h, i, j]))
    return np.float32(s / np.float32(att.shape[0]))


def ref_edges(att: np.ndarray, recipe: GraphRecipe) -> tuple[np.ndarray, np.ndarray]:
    """The recipe written out with loops over (i, j): edge_index [2, E] int64, edge_attr [E, A] float32."""
    T = att.shape[1]
    pairs: list[tuple[int, int]] = []
    for i in range(T):
        if recipe.name == "causal-threshold":
            pairs += [(j, i) for j in range(i + 1) if ref_mean(att, i, j) >= np.float32(recipe.threshold)]
        elif i >= 1:
            k = max(1, int(i * recipe.topk_frac))
            best = sorted(range(i), key=lambda j, i=i: (-float(ref_mean(att, i, j)), j))[:k]
            pairs += [(j, i) for j in sorted(best)]
    if recipe.edge_attr == "mean":
        attr = [[ref_mean(att, i, j)] for j, i in pairs]
    else:
        attr = [[np.float32(att[h, i, j]) for h in range(att.shape[0])] for j, i in pairs]
    ei = np.array(pairs, dtype=np.int64).reshape(-1, 2).T
    return ei, np.array(attr, dtype=np.float32).reshape(len(pairs), recipe.edge_attr_size(att.shape[0]))


def assert_matches(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    (gi, ga), (wi, wa) = got, want
    assert gi.dtype == np.int64 and gi.shape == wi.shape
    np.testing.assert_array_equal(gi, wi)
    assert ga.dtype == np.float32 and ga.shape == wa.shape
    np.testing.assert_allclose(ga, wa, rtol=1e-6, atol=1e-9)
    # what the store keeps: float16, bit for bit
    bits16 = [a.astype(np.float16).view(np.uint16) for a in (ga, wa)]
    np.testing.assert_array_equal(*bits16)


def check_trace(atts: list[np.ndarray], recipe: GraphRecipe) -> tuple[list[np.ndarray], list[np.ndarray]]:
    eis, eas = trace_edges(atts, atts[0].shape[1], recipe, where=WHERE)
    assert len(eis) == len(eas) == len(atts)
    for layer, att in enumerate(atts):
        want = ref_edges(att, recipe)
        assert_matches((eis[layer], eas[layer]), want)
        assert_matches(layer_edges(att, recipe), want)
    return eis, eas


# -- recipes against the loop reference ---------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 2, 3, 17])
def test_threshold_zero_is_every_causal_pair(T: int) -> None:
    atts = causal_softmax(np.random.default_rng(T), 3, 4, T)
    eis, eas = check_trace(atts, DEFAULT_RECIPE)
    for ei, ea in zip(eis, eas, strict=True):
        assert ei.shape == (2, T * (T + 1) // 2) and ea.shape == (T * (T + 1) // 2, 1)
        assert np.all(ei[0] <= ei[1])
        # target ascending, then source ascending
        np.testing.assert_array_equal(np.lexsort((ei[0], ei[1])), np.arange(ei.shape[1]))


@pytest.mark.parametrize("threshold", [0.02, 0.1, 0.5, 1.0])
def test_threshold_positive(threshold: float) -> None:
    atts = causal_softmax(np.random.default_rng(7), 3, 4, 17)
    eis, _ = check_trace(atts, GraphRecipe(threshold=threshold))
    full = 17 * 18 // 2
    assert all(ei.shape[1] < full for ei in eis)


def test_threshold_keeps_a_mean_equal_to_it() -> None:
    att = causal_softmax(np.random.default_rng(3), 1, 4, 9)[0]
    a = att.astype(np.float32).mean(axis=0)
    thr = float(a[6, 2])  # a float32 value, exactly representable: ">=" must keep (6, 2)
    ei, ea = layer_edges(att, GraphRecipe(threshold=thr))
    assert_matches((ei, ea), ref_edges(att, GraphRecipe(threshold=thr)))
    assert any(s == 2 and t == 6 for s, t in ei.T)
    assert ea.min() >= thr


def test_threshold_compares_in_float32_as_the_seed_did() -> None:
    # float32(0.7) = 0.69999998... is below 0.7; the seed's numpy comparison (a float32 array against a Python
    # float) is made in float32, where the mean equals the threshold: the edge is kept
    v = np.float32(0.7)
    assert float(v) < 0.7
    att = np.zeros((1, 2, 2), dtype=np.float32)
    att[0, 0, 0], att[0, 1, 0], att[0, 1, 1] = 1.0, v, np.float32(1) - v
    ei, _ = layer_edges(att, GraphRecipe(threshold=0.7))
    assert [tuple(p) for p in ei.T] == [(0, 0), (0, 1)]
    assert (att[0] >= 0.7).tolist() == [[True, False], [True, False]]  # what numpy itself does
    ei, _ = layer_edges(att, GraphRecipe(threshold=0.7000001))
    assert [tuple(p) for p in ei.T] == [(0, 0)]


@pytest.mark.parametrize("frac", [0.35, 0.1, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("T", [1, 2, 3, 17])
def test_topk_frac(T: int, frac: float) -> None:
    atts = causal_softmax(np.random.default_rng(T * 100 + int(frac * 100)), 3, 4, T)
    eis, _ = check_trace(atts, GraphRecipe(name="causal-topk-frac", topk_frac=frac))
    want_e = sum(max(1, int(i * frac)) for i in range(1, T))
    for ei in eis:
        assert ei.shape[1] == want_e
        assert np.all(ei[0] < ei[1])  # no self-loops
        assert not np.any(ei[1] == 0)  # token 0 has no edges


def test_topk_ties_go_to_the_lower_source() -> None:
    # uniform causal rows: within a row every predecessor ties, so token i keeps j = 0 .. k_i - 1
    T, H = 12, 3
    att = np.tril(np.ones((T, T), np.float32)) / np.arange(1, T + 1, dtype=np.float32)[:, None]
    att = np.broadcast_to(att, (H, T, T)).astype(np.float16)
    recipe = GraphRecipe(name="causal-topk-frac", topk_frac=0.35)
    ei, _ = layer_edges(att, recipe)
    k = topk_counts(T, 0.35)
    assert [tuple(p) for p in ei.T] == [(j, i) for i in range(1, T) for j in range(int(k[i]))]
    # many ties among a few levels, rows longer than 16 keys (where an unstable sort reorders ties)
    rng = np.random.default_rng(12)
    T = 60
    levels = np.array([0.0, 0.0078125, 0.015625, 0.03125], np.float16)
    atts = [np.broadcast_to(np.tril(rng.choice(levels, (T, T))), (2, T, T)).copy() for _ in range(2)]
    for frac in (0.35, 0.5, 0.9):
        check_trace(atts, GraphRecipe(name="causal-topk-frac", topk_frac=frac))


def test_topk_counts_match_python() -> None:
    rng = np.random.default_rng(0)
    fracs = [0.35, 0.1, 0.2, 0.3, 0.7, 0.29, 0.57, 0.58, 1 / 3, 2 / 3, 0.999999, 1.0, 1e-9]
    fracs += [float(f) for f in rng.uniform(1e-6, 1.0, 200)]
    for frac in fracs:
        for T in (1, 2, 3, 17, 100, 2049):
            got = topk_counts(T, frac)
            assert got.dtype == np.int64
            assert got.tolist() == [0] + [max(1, int(i * frac)) for i in range(1, T)], (frac, T)


@pytest.mark.parametrize("name", ["causal-threshold", "causal-topk-frac"])
def test_heads_mode(name: str) -> None:
    atts = causal_softmax(np.random.default_rng(11), 2, 5, 17)
    heads = GraphRecipe(name=name, edge_attr="heads")
    eis, eas = check_trace(atts, heads)
    mean_eis, _ = trace_edges(atts, 17, GraphRecipe(name=name), where=WHERE)
    for att, ei, ea, mei in zip(atts, eis, eas, mean_eis, strict=True):
        np.testing.assert_array_equal(ei, mei)  # the same edges, chosen by the mean
        assert ea.shape == (ei.shape[1], 5) and ea.flags.c_contiguous
        np.testing.assert_array_equal(ea, att[:, ei[1], ei[0]].T.astype(np.float32))


def test_mean_is_astype_float32_mean_exactly() -> None:
    for H in (1, 3, 7, 32):
        atts = causal_softmax(np.random.default_rng(H), 2, H, 13)
        eis, eas = trace_edges(atts, 13, DEFAULT_RECIPE, where=WHERE)
        for att, ei, ea in zip(atts, eis, eas, strict=True):
            want = att.astype(np.float32).mean(axis=0)[ei[1], ei[0]]
            np.testing.assert_array_equal(ea[:, 0].view(np.uint32), want.view(np.uint32))


def test_float16_widening_is_exact() -> None:
    # every float16 in [0, 1] as one head of a 1-token layer: heads mode returns each widened value
    x = np.arange(0, 0x3C01, dtype=np.uint16).view(np.float16).reshape(-1, 1, 1)
    ei, ea = layer_edges(x, GraphRecipe(edge_attr="heads"))
    assert ei.tolist() == [[0], [0]]
    np.testing.assert_array_equal(ea[0].view(np.uint32), x.ravel().astype(np.float32).view(np.uint32))
    _, mean = trace_edges([x], 1, DEFAULT_RECIPE, where=WHERE)
    assert mean[0][0, 0] == x.astype(np.float32).mean(axis=0)[0, 0]


# -- input forms ----------------------------------------------------------------------------------------


def test_T_1() -> None:
    atts = causal_softmax(np.random.default_rng(0), 2, 3, 1)
    assert all(float(a[h, 0, 0]) == 1.0 for a in atts for h in range(3))
    eis, eas = trace_edges(atts, 1, DEFAULT_RECIPE, where=WHERE)
    assert [e.tolist() for e in eis] == [[[0], [0]]] * 2 and [e.tolist() for e in eas] == [[[1.0]]] * 2
    eis, eas = trace_edges(atts, 1, GraphRecipe(name="causal-topk-frac", edge_attr="heads"), where=WHERE)
    assert all(e.shape == (2, 0) and e.dtype == np.int64 for e in eis)
    assert all(e.shape == (0, 3) and e.dtype == np.float32 for e in eas)


def test_torch_and_stacked_inputs() -> None:
    atts = causal_softmax(np.random.default_rng(5), 3, 4, 9)
    want = trace_edges(atts, 9, DEFAULT_RECIPE, where=WHERE)
    forms: list[Any] = [
        tuple(atts),
        np.stack(atts),
        [torch.from_numpy(a) for a in atts],
        torch.from_numpy(np.stack(atts)),
        [torch.from_numpy(a).requires_grad_(False).float() for a in atts],  # float32 tensors: same values
        [a.astype(np.float64) for a in atts],
    ]
    for form in forms:
        got = trace_edges(form, 9, DEFAULT_RECIPE, where=WHERE)
        for g_ei, g_ea, w_ei, w_ea in zip(*got, *want, strict=True):
            np.testing.assert_array_equal(g_ei, w_ei)
            np.testing.assert_array_equal(g_ea, w_ea)


def test_bfloat16_tensors() -> None:
    atts = [torch.from_numpy(a).to(torch.bfloat16) for a in causal_softmax(np.random.default_rng(6), 2, 3, 7)]
    eis, eas = trace_edges(atts, 7, DEFAULT_RECIPE, where=WHERE)
    for t, ei, ea in zip(atts, eis, eas, strict=True):
        assert_matches((ei, ea), ref_edges(t.float().numpy(), DEFAULT_RECIPE))


def test_read_only_and_strided_arrays() -> None:
    att = causal_softmax(np.random.default_rng(8), 1, 4, 10)[0]
    want = layer_edges(att, DEFAULT_RECIPE)
    ro = att.copy()
    ro.flags.writeable = False  # torch warns on read-only arrays; warnings are errors here
    strided = np.ascontiguousarray(att.transpose(1, 2, 0)).transpose(2, 0, 1)  # same values, other strides
    for a in (ro, strided, att.astype(">f2")):
        got = trace_edges([a, a], 10, DEFAULT_RECIPE, where=WHERE)
        for ei, ea in zip(*got, strict=True):
            np.testing.assert_array_equal(ei, want[0])
            np.testing.assert_array_equal(ea, want[1])


def test_negative_zero_is_a_probability() -> None:
    att = causal_softmax(np.random.default_rng(9), 1, 2, 4)[0]
    att[1, 0, 3] = -0.0  # above the diagonal: allowed (0), forces the slow path of the float16 check
    trace_edges([att], 4, DEFAULT_RECIPE, where=WHERE)


# -- validation -------------------------------------------------------------------------------------------


def _bad(layer2: np.ndarray, H: int = 4, T: int = 6) -> list[np.ndarray]:
    atts = causal_softmax(np.random.default_rng(1), 4, H, T)
    atts[2] = layer2
    return atts


def _message(exc: type[Exception], atts: Any, T: int = 6, **kw: Any) -> str:
    with pytest.raises(exc) as info:
        trace_edges(atts, T, DEFAULT_RECIPE, where=WHERE, **kw)
    msg = str(info.value)
    assert msg.startswith(WHERE + ": "), msg
    return msg


def test_wrong_tokens() -> None:
    msg = _message(ShapeMismatchError, _bad(np.zeros((4, 6, 5), np.float16)))
    assert "attentions[2] (layer 2) has shape (4, 6, 5); expected (H, 6, 6)" in msg
    assert "for the trace's 6 tokens; re-export the attentions" in msg
    msg = _message(ShapeMismatchError, causal_softmax(np.random.default_rng(0), 2, 4, 6), T=7)
    assert "attentions[0] (layer 0) has shape (4, 6, 6); expected (H, 7, 7)" in msg


def test_wrong_ndim() -> None:
    msg = _message(ShapeMismatchError, _bad(np.zeros((6, 6), np.float16)))
    assert "attentions[2] (layer 2) has shape (6, 6); expected (H, 6, 6)" in msg
    msg = _message(ShapeMismatchError, np.zeros((4, 6, 6), np.float16))
    assert "one array of shape (4, 6, 6); expected a list of L arrays [H, T, T] or one array [L, H, T, T]" \
        in msg


def test_heads_differ_between_layers() -> None:
    msg = _message(ShapeMismatchError, _bad(causal_softmax(np.random.default_rng(2), 1, 3, 6)[0]))
    assert "attentions[2] (layer 2) has 3 heads but attentions[0] has 4" in msg and "re-export" in msg


def test_layer_count() -> None:
    msg = _message(ShapeMismatchError, causal_softmax(np.random.default_rng(2), 3, 2, 6), num_layers=32)
    assert "attentions has 3 layer(s); expected 32" in msg
    assert "attentions has no layers" in _message(ShapeMismatchError, [])
    msg = _message(InputFormatError, {"0": np.zeros((1, 6, 6))})
    assert "attentions is a dict; expected a list of L arrays [H, T, T]" in msg


def test_integer_dtype() -> None:
    msg = _message(DTypeError, _bad(np.zeros((4, 6, 6), np.int64)))
    assert "attentions[2] (layer 2) has dtype int64; expected float16 or float32" in msg


def test_nan() -> None:
    atts = _bad(causal_softmax(np.random.default_rng(3), 1, 4, 6)[0])
    atts[2][1, 3, 1] = np.nan
    atts[2][2, 0, 0] = np.nan  # later in (head, i, j) order: the first one is named
    msg = _message(NonFiniteValueError, atts)
    assert "attentions[2] (layer 2) head 1 has NaN at query token i=3, key token j=1" in msg
    assert "re-export the attentions" in msg


@pytest.mark.parametrize("value, text", [(1.5, "1.5"), (-0.1, "-0.1"), (np.inf, "inf"), (-np.inf, "-inf")])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_not_a_probability(value: float, text: str, dtype: type) -> None:
    atts = [a.astype(dtype) for a in _bad(causal_softmax(np.random.default_rng(4), 1, 4, 6)[0])]
    atts[2][3, 4, 2] = value
    msg = _message(InputFormatError, atts)
    assert f"attentions[2] (layer 2) head 3 has {text} at query token i=4, key token j=2" in msg
    assert "attention weights are probabilities in [0, 1]" in msg
    assert 'export attention probabilities (post-softmax, e.g. attn_implementation="eager"), not scores' \
        in msg


def test_layer_edges_shape() -> None:
    with pytest.raises(ShapeMismatchError, match=r"att has shape \(4, 6, 5\); expected \(H, T, T\)"):
        layer_edges(np.zeros((4, 6, 5), np.float16))


# -- GraphRecipe ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", [
    DEFAULT_RECIPE,
    GraphRecipe(threshold=0.01, edge_attr="heads"),
    GraphRecipe(name="causal-topk-frac"),
    GraphRecipe(name="causal-topk-frac", topk_frac=0.5, edge_attr="heads"),
])
def test_recipe_attrs_roundtrip(recipe: GraphRecipe) -> None:
    attrs = json.loads(json.dumps(recipe.to_attrs()))
    assert GraphRecipe.from_attrs(attrs) == recipe
    assert attrs["edge_order"] == "target, then source"


def test_recipe_attrs_and_describe() -> None:
    assert DEFAULT_RECIPE.to_attrs() == {"name": "causal-threshold", "threshold": 0.0, "edge_attr": "mean",
                                         "edge_order": "target, then source"}
    assert GraphRecipe(name="causal-topk-frac", edge_attr="heads").to_attrs() == {
        "name": "causal-topk-frac", "topk_frac": 0.35, "edge_attr": "heads",
        "edge_order": "target, then source"}
    assert DEFAULT_RECIPE.describe() == ("causal-threshold (seed v1): mean over heads, edge j -> i for every "
                                         "j <= i with mean >= 0.0, weight = mean [E, 1]")
    assert GraphRecipe(name="causal-topk-frac", edge_attr="heads").describe() == (
        "causal-topk-frac (seed v2): mean over heads, edge j -> i for the top max(1, int(i * 0.35)) "
        "predecessors j < i of each token i >= 1 (ties: lower j), weight = every head [E, H]")
    assert DEFAULT_RECIPE.edge_attr_size(32) == 1
    assert GraphRecipe(edge_attr="heads").edge_attr_size(32) == 32
    assert GraphRecipe(threshold=0).threshold == 0.0 and isinstance(GraphRecipe(threshold=0).threshold, float)


@pytest.mark.parametrize("kw, text", [
    ({"threshold": -0.1}, "threshold=-0.1 is outside [0, 1]"),
    ({"threshold": 1.5}, "threshold=1.5 is outside [0, 1]"),
    ({"threshold": float("nan")}, "threshold=nan is outside [0, 1]"),
    ({"name": "causal-topk-frac", "topk_frac": 0.0}, "topk_frac=0.0 is outside (0, 1]"),
    ({"name": "causal-topk-frac", "topk_frac": 1.5}, "topk_frac=1.5 is outside (0, 1]"),
    ({"name": "all-pairs"}, "name='all-pairs' is not a known recipe; choose one of causal-threshold, "
                            "causal-topk-frac"),
    ({"edge_attr": "max"}, "edge_attr='max'; choose 'mean'"),
    ({"name": "causal-topk-frac", "threshold": 0.5},
     "threshold=0.5 does not apply to recipe 'causal-topk-frac'"),
    ({"topk_frac": 0.5}, "topk_frac=0.5 does not apply to recipe 'causal-threshold'"),
    ({"threshold": "0.5"}, "threshold='0.5' is not a number"),
    ({"threshold": True}, "threshold=True is not a number"),
])
def test_recipe_validate(kw: dict[str, Any], text: str) -> None:
    with pytest.raises(ValueError) as info:
        GraphRecipe(**kw)
    assert text in str(info.value)


def test_recipe_validate_method() -> None:
    DEFAULT_RECIPE.validate()
    bad = GraphRecipe()
    object.__setattr__(bad, "threshold", 2.0)
    with pytest.raises(ValueError, match=r"threshold=2.0 is outside \[0, 1\]"):
        bad.validate()


@pytest.mark.parametrize("attrs, text", [
    ({"name": "v3", "edge_attr": "mean"}, "name='v3' is not a recipe this tracestore knows"),
    ({"name": "causal-threshold", "edge_attr": "mean"}, "missing ['threshold']"),
    ({"name": "causal-threshold", "threshold": 0.0, "edge_attr": "mean", "k": 4}, "unknown ['k']"),
    ({"name": "causal-threshold", "threshold": 0.0, "edge_attr": "mean", "edge_order": "source, then target"},
     "edge_order='source, then target'"),
    ({"name": "causal-threshold", "threshold": 3.0, "edge_attr": "mean"}, "threshold=3.0 is outside [0, 1]"),
])
def test_recipe_from_attrs_errors(attrs: dict[str, Any], text: str) -> None:
    with pytest.raises(ValueError) as info:
        GraphRecipe.from_attrs(attrs)
    assert text in str(info.value)
