"""One description of a store, whatever its format version: `StoreLayout`, resolved once at open from the
root attributes. Version 1 kept a graph's nodes inside graphs/ (graphs/node_ptr, graphs/x); version 2 keeps
per-token data in tokens/ (graph nodes are a trace's tokens) and per-trace fields in fields/. Readers ask the
layout where a concept lives and never branch on the version themselves (../shared/STYLE.md lesson 15)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import schema


@dataclass(frozen=True)
class StoreLayout:
    """Where each concept of a store lives (array paths), or None where the store does not have it."""

    version: int
    has_graphs: bool
    #: [N + 1] pointer into the per-token arrays (graph nodes are tokens)
    token_ptr: str | None
    #: [T_total, L, D] float16 per-token hidden states (graph node features)
    token_hidden: str | None
    #: [T_total] int64 token ids
    token_ids: str | None
    #: [T_total] strings, each token decoded alone
    token_text: str | None
    #: per-trace fields: name -> (array path, kind)
    fields: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: how sequences were pooled from the tokens ("last", "mean") or None (given)
    pool: str | None = None
    #: how the graphs were built (see convert/attention.py), or None
    graph_recipe: dict[str, Any] | None = None

    @property
    def has_tokens(self) -> bool:
        """Whether any per-token data is kept (hidden states, ids or text)."""
        return any(p is not None for p in (self.token_hidden, self.token_ids, self.token_text))

    def sharded_arrays(self) -> list[str]:
        """Paths of the sharded arrays (trace data), in a fixed order."""
        out = [schema.SEQUENCES]
        if self.token_hidden is not None:
            out.append(self.token_hidden)
        if self.token_ids is not None:
            out.append(self.token_ids)
        if self.has_graphs:
            out += [schema.EDGE_INDEX, schema.EDGE_ATTR]
        return out

    def plain_arrays(self) -> list[str]:
        """Paths of the plain (unsharded) arrays: read whole or chunk by chunk through zarr."""
        out = [schema.IDS, schema.SCORES]
        if self.token_ptr is not None:
            out.append(self.token_ptr)
        if self.token_text is not None:
            out.append(self.token_text)
        if self.has_graphs:
            out.append(schema.EDGE_PTR)
        out += [path for path, _kind in self.fields.values()]
        return out


def field_path(name: str) -> str:
    return f"{schema.FIELDS}/{name}"


def resolve_layout(attrs: dict[str, Any]) -> StoreLayout:
    """The layout of a store from its `tracestore` attributes (the version is checked by the caller)."""
    version = int(attrs[schema.ATTR_FORMAT_VERSION])
    # version 3 is a version 2 store with a manifest of parts (the root's own traces, if any, are version 2)
    version = 2 if version == schema.PARTS_FORMAT_VERSION else version
    graphs = bool(attrs.get(schema.ATTR_HAS_GRAPHS))
    if version == 1:
        return StoreLayout(version=1, has_graphs=graphs, token_ptr=schema.V1_NODE_PTR if graphs else None,
                           token_hidden=schema.V1_NODE_X if graphs else None, token_ids=None, token_text=None)
    tok = attrs.get(schema.ATTR_TOKENS) or {}
    has_tok_group = bool(attrs.get(schema.ATTR_TOKENS) is not None) or graphs
    fields = {str(k): (field_path(str(k)), str(v)) for k, v in (attrs.get(schema.ATTR_FIELDS) or {}).items()}
    return StoreLayout(
        version=version, has_graphs=graphs,
        token_ptr=schema.TOKEN_PTR if has_tok_group else None,
        token_hidden=schema.TOKEN_HIDDEN if tok.get("hidden") else None,
        token_ids=schema.TOKEN_IDS if tok.get("ids") else None,
        token_text=schema.TOKEN_TEXT if tok.get("text") else None,
        fields=fields, pool=attrs.get(schema.ATTR_POOL), graph_recipe=attrs.get(schema.ATTR_GRAPH_RECIPE))
