"""CLIs on a trained model or a run: vtt-caption, vtt-eval, plots."""
