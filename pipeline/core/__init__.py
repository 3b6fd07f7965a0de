"""Layer 0, the core every other layer builds on: where files live (paths), the sample formats (schema), shard
and URL I/O, images, seeds, feature statistics, manifests, executors, run tracking, the registry and configs."""
