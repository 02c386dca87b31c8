"""tools/convert as a library: archives (.pkl, .pkl.gz, legacy .pt) plus a scores CSV into one store.

    from tracestore.convert import convert
    result = convert(["traces_data/"], "traces.zarr", scores="ground_truth_scores.csv", workers=2)
    print(result.summary())
"""

from .pickle_stream import load_pickle
from .pipeline import ConvertResult, convert
from .safe_unpickle import SafeUnpickler, load_torch
from .verify import verify_store

__all__ = ["convert", "ConvertResult", "SafeUnpickler", "load_pickle", "load_torch", "verify_store"]
