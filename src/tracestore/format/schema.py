"""Names, dtypes and attribute keys of format v1. docs/format.md says the same in prose; the golden test
(tests/data/golden_v1) pins both."""

from __future__ import annotations

from typing import Final

import numpy as np

FORMAT_VERSION: Final = 1

#: Root group attribute that holds everything tracestore writes about the store.
ATTRS_KEY: Final = "tracestore"

# keys inside attributes["tracestore"]
ATTR_FORMAT_VERSION: Final = "format_version"
ATTR_COMMITTED: Final = "committed"
ATTR_NUM_TRACES: Final = "num_traces"
ATTR_NUM_LAYERS: Final = "num_layers"
ATTR_HIDDEN_SIZE: Final = "hidden_size"
ATTR_EDGE_ATTR_SIZE: Final = "edge_attr_size"
ATTR_HAS_GRAPHS: Final = "has_graphs"
ATTR_MODEL_NAME: Final = "model_name"
ATTR_PROVENANCE: Final = "provenance"
ATTR_REPORT: Final = "float16_report"
ATTR_CREATED_BY: Final = "created_by"

# array paths
SEQUENCES: Final = "sequences"
SCORES: Final = "scores"
IDS: Final = "ids"
GRAPHS: Final = "graphs"
NODE_PTR: Final = "graphs/node_ptr"
NODE_X: Final = "graphs/x"
EDGE_PTR: Final = "graphs/edge_ptr"
EDGE_INDEX: Final = "graphs/edge_index"
EDGE_ATTR: Final = "graphs/edge_attr"

SEQUENCE_DTYPE: Final = np.dtype("<f2")
SCORE_DTYPE: Final = np.dtype("<f4")
PTR_DTYPE: Final = np.dtype("<i8")
EDGE_INDEX_DTYPE: Final = np.dtype("<i4")
NODE_X_DTYPE: Final = np.dtype("<f2")
EDGE_ATTR_DTYPE: Final = np.dtype("<f2")

#: Largest finite float16.
FLOAT16_MAX: Final = 65504.0

#: Store-relative key of the writer's staging state (resume); removed at commit.
STAGING_STATE_KEY: Final = "_tracestore/staging.json"
STAGING_PREFIX: Final = "_tracestore/"
