"""Names, dtypes and attribute keys of the on-disk format. docs/format.md says the same in prose; the golden
stores (tests/data/golden_v1, tests/data/golden_v2) pin both. The writer writes FORMAT_VERSION; readers
open every version in READABLE_VERSIONS (format/versions.py resolves each into one description)."""

from __future__ import annotations

from typing import Final

import numpy as np

FORMAT_VERSION: Final = 2
#: The root of a store made of parts (a manifest, issue 15): version 3, so that a tracestore that knows only
#: versions 1 and 2 refuses it instead of reading the root's own traces alone (an appended store) as the
#: whole store. Each part is a plain version 2 store; version 3 data reads as version 2.
PARTS_FORMAT_VERSION: Final = 3
#: Versions a reader opens (read-only for the older ones).
READABLE_VERSIONS: Final = (1, 2, 3)

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
# v2
#: {"hidden": bool, "ids": bool, "text": bool}: which per-token arrays exist; null without a tokens/ group
ATTR_TOKENS: Final = "tokens"
#: how `sequences` was made from per-token states: "last", "mean", or null (given as per-layer vectors)
ATTR_POOL: Final = "pool"
#: how graphs/ was built: {"name": ..., parameters...}, or null without graphs
ATTR_GRAPH_RECIPE: Final = "graph_recipe"
#: {name: kind} of the per-trace fields (kind: "str", "int", "float", "bool")
ATTR_FIELDS: Final = "fields"
#: a fresh uuid4 hex string per committed store, written with `committed: true` (issue 11): a reader that
#: finds another generation than the one it opened has seen the store replaced (StaleStoreError)
ATTR_GENERATION: Final = "generation"
#: a store made of parts (issue 15): {"generation": uuid4 hex (new at each commit), "num_traces": total,
#: "parts": [{"path": ".", or "parts/NNNNN", "num_traces": n, "generation": the part's}, ...]}, in the order
#: the store concatenates them. Written last: the commit marker of the whole. Absent in a single store.
ATTR_MANIFEST: Final = "manifest"
#: where parts live, relative to the root: parts/00001, parts/00002, ...; "." is the root's own data
PARTS_DIR: Final = "parts"
ROOT_PART: Final = "."

# array paths, every version
SEQUENCES: Final = "sequences"
SCORES: Final = "scores"
IDS: Final = "ids"
GRAPHS: Final = "graphs"
EDGE_PTR: Final = "graphs/edge_ptr"
EDGE_INDEX: Final = "graphs/edge_index"
EDGE_ATTR: Final = "graphs/edge_attr"
# v2: per-token data (graph nodes are a trace's tokens) and per-trace fields
TOKENS: Final = "tokens"
TOKEN_PTR: Final = "tokens/ptr"
TOKEN_HIDDEN: Final = "tokens/hidden"
TOKEN_IDS: Final = "tokens/ids"
TOKEN_TEXT: Final = "tokens/text"
FIELDS: Final = "fields"
# v1 only: node pointer and node features inside graphs/ (v2 keeps them as tokens/ptr and tokens/hidden)
V1_NODE_PTR: Final = "graphs/node_ptr"
V1_NODE_X: Final = "graphs/x"

SEQUENCE_DTYPE: Final = np.dtype("<f2")
SCORE_DTYPE: Final = np.dtype("<f4")
PTR_DTYPE: Final = np.dtype("<i8")
EDGE_INDEX_DTYPE: Final = np.dtype("<i4")
TOKEN_HIDDEN_DTYPE: Final = np.dtype("<f2")
TOKEN_ID_DTYPE: Final = np.dtype("<i8")
EDGE_ATTR_DTYPE: Final = np.dtype("<f2")

#: dtypes of fields/<name> by kind ("str" is zarr's variable-length UTF-8 string)
FIELD_DTYPES: Final = {"int": np.dtype("<i8"), "float": np.dtype("<f8"), "bool": np.dtype("bool")}

#: Largest finite float16.
FLOAT16_MAX: Final = 65504.0

#: Store-relative key of the writer's staging state (resume); removed at commit.
STAGING_STATE_KEY: Final = "_tracestore/staging.json"
STAGING_PREFIX: Final = "_tracestore/"


#: The offset and length that a shard index (Zarr v3 sharding) gives a chunk that was never written.
SHARD_INDEX_MISSING = 2**64 - 1
