"""The on-disk contract (docs/format.md): format version 2 for a store, 3 for a store made of parts; version 1
is still read. Names, layouts, codecs and the float16 cast: no I/O here (an import-linter contract)."""
