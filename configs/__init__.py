"""vtt.configs."""
