"""What must never reach a store: inf (also through append(reports=...), the converter's path) and
infinite scores; and a kill between the commit marker and the clean-up leaves a readable store."""

from __future__ import annotations

import numpy as np
import pytest

import tracestore
from tracestore.errors import Float16OverflowError, NonFiniteValueError
from tracestore.format import schema
from tracestore.format.report import Float16Report

L, D = 2, 4


def test_precast_float16_with_reports_is_still_checked_for_inf(tmp_path):
    w = tracestore.create(tmp_path / "s.zarr", num_layers=L, hidden_size=D)
    x = np.zeros((2, L, D), np.float16)
    x[1, 1, 3] = np.inf
    with pytest.raises(Float16OverflowError, match=r"trace 'b', layer 1, hidden 3: value is inf"):
        w.append(["a", "b"], x, reports={schema.SEQUENCES: Float16Report(L)})
    x[1, 1, 3] = np.nan
    with pytest.raises(NonFiniteValueError, match=r"trace 'b', layer 1, hidden 3: value is NaN"):
        w.append(["a", "b"], x, reports={schema.SEQUENCES: Float16Report(L)})
    assert w.num_traces == 0  # nothing was buffered


def test_infinite_scores_are_refused(tmp_path):
    w = tracestore.create(tmp_path / "s.zarr", num_layers=L, hidden_size=D)
    with pytest.raises(NonFiniteValueError, match=r"trace 'b': score is -inf; a score is a finite number, or NaN"):
        w.append(["a", "b"], np.zeros((2, L, D), np.float32), scores=[0.5, -np.inf])
    w.append(["a", "b"], np.zeros((2, L, D), np.float32), scores=[0.5, np.nan])  # NaN = unknown, allowed
    w.close()
    assert np.isnan(tracestore.open(tmp_path / "s.zarr").scores[1])


def test_commit_marker_decides_even_with_staging_litter(tmp_path):
    url = tmp_path / "s.zarr"
    with tracestore.create(url, num_layers=L, hidden_size=D) as w:
        w.append(["a"], np.ones((1, L, D), np.float32))
    # a kill after the commit marker and before the staging state is removed leaves this litter
    (url / schema.STAGING_STATE_KEY).parent.mkdir(parents=True, exist_ok=True)
    (url / schema.STAGING_STATE_KEY).write_text("{}")
    s = tracestore.open(url)
    assert list(s.ids) == ["a"]


def test_clipped_edge_attributes_are_counted(tmp_path):
    from tracestore.store.graphs import TraceGraph

    g = TraceGraph(x=np.zeros((3, L, D), np.float32),
                   edge_index=[np.array([[0, 1], [1, 2]]), np.array([[0], [2]])],
                   edge_attr=[np.array([0.5, 1e6], np.float32), np.array([-7e4], np.float32)])
    with tracestore.create(tmp_path / "g.zarr", num_layers=L, hidden_size=D, graphs=True, on_overflow="clip") as w:
        w.append(["a"], np.zeros((1, L, D), np.float32), graphs=[g])
    rep = tracestore.open(tmp_path / "g.zarr").report[schema.EDGE_ATTR]
    assert rep.clipped.tolist() == [1, 1] and rep.overflow.tolist() == [1, 1]
    assert rep.max_abs_error.max() < 1.0  # measured after the clip, not against 1e6
    s = tracestore.open(tmp_path / "g.zarr")
    assert s[0].graph.edge_attr[0][1, 0] == np.float16(65504)
