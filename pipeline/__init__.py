"""vtt.pipeline."""
