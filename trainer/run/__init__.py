"""One vtt-train run: preflight, memory plan, DeepSpeed, the loop, loss, eval, checkpoints, export."""
