"""A test kit: synthetic traces of any shape (heavy-tailed, with massive-activation dimensions as real LLMs
have), archives in the old pipeline's layouts, and helpers to build stores for tests and benchmarks."""

from .synthetic import (
    synthetic_graphs,
    synthetic_ids,
    synthetic_scores,
    synthetic_sequences,
    write_synthetic_store,
)

__all__ = ["synthetic_graphs", "synthetic_ids", "synthetic_scores", "synthetic_sequences", "write_synthetic_store"]
from .archives import (  # noqa: E402
    HOSTILE_KINDS,
    make_records,
    write_archive_set,
    write_batch_archive,
    write_hostile_archive,
    write_legacy_pt,
    write_record_archive,
    write_scores_csv,
)

__all__ += ["HOSTILE_KINDS", "make_records", "write_archive_set", "write_batch_archive", "write_hostile_archive",
            "write_legacy_pt", "write_record_archive", "write_scores_csv"]
