"""Model families behind one ModelAdapter Protocol: registry, adapters, checkpoint I/O, tiny presets."""
