"""vtt.trainer."""
