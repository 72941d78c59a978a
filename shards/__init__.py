"""vtt.shards."""
