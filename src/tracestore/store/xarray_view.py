"""A lazily indexed xarray view of a store: dims (trace, layer, hidden), coords id, score and every per-trace
field (a field named like one of the store's own names, or like a renamed field, is given as field_<name>)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import xarray

    from .reader import TraceStore


def to_xarray(store: TraceStore) -> xarray.Dataset:
    try:
        import xarray as xr
        from xarray.backends import BackendArray
        from xarray.core import indexing
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("store.to_xarray() needs xarray: pip install 'tracestore[notebook]'") from e

    class _SequencesArray(BackendArray):  # type: ignore[misc]
        def __init__(self, store: TraceStore) -> None:
            self.store = store
            self.shape = (len(store), store.num_layers, store.hidden_size)
            self.dtype = np.dtype(np.float16)

        def __getitem__(self, key: Any) -> np.ndarray:
            return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER, self._raw)

        def _raw(self, key: tuple[Any, ...]) -> np.ndarray:
            first, rest = key[0], tuple(key[1:])
            drop_first = isinstance(first, int | np.integer)
            rows = np.atleast_1d(np.arange(self.shape[0])[first])
            if all(isinstance(k, int | np.integer | slice) for k in rest):
                out = self.store.sequences[(rows, *rest)]  # only the selected bytes are read
            else:
                out = self.store.sequences[rows]
                ax = 1
                for k in rest:  # outer indexing, one axis at a time
                    if isinstance(k, int | np.integer):
                        out = np.take(out, int(k), axis=ax)
                    else:
                        out = out[(slice(None),) * ax + (k,)] if isinstance(k, slice) else np.take(out, k, axis=ax)
                        ax += 1
            return out[0] if drop_first else out

    data = indexing.LazilyIndexedArray(_SequencesArray(store))
    seq = xr.Variable(("trace", "layer", "hidden"), data)
    coords: dict[str, Any] = {
        "id": ("trace", store.ids),
        "score": ("trace", store.scores),
        "layer": ("layer", np.arange(store.num_layers)),
    }
    taken = {*coords, "sequences", "trace", "hidden"}
    for name, values in store.fields.items():
        key = name
        while key in taken:  # a field never shadows the store's own names, nor another field
            key = f"field_{key}"
        taken.add(key)
        coords[key] = ("trace", values)
    return xr.Dataset({"sequences": seq}, coords=coords,
                      attrs={"url": store.url, "model_name": store.model_name or ""})
