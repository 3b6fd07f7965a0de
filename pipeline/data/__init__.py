"""Layer 2, data in: sources (datasets on disk) and `ingest`, which turns a source into the base shards."""
