"""The on-disk contract, format version 1 (docs/format.md)."""
