"""A test kit: synthetic traces of any shape (heavy-tailed, with massive-activation dimensions as real LLMs
have), archives in the old pipeline's layouts, and helpers to build stores for tests and benchmarks."""

from .synthetic import synthetic_graphs, synthetic_ids, synthetic_scores, synthetic_sequences, write_synthetic_store

__all__ = ["synthetic_graphs", "synthetic_ids", "synthetic_scores", "synthetic_sequences", "write_synthetic_store"]
