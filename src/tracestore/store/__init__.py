"""Writing and reading stores: URLs, the writer, the direct shard reader, TraceStore."""
