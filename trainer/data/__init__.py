"""The streaming reader of vtt shards: which shards, in what order, tars -> samples -> micro batches."""
