"""Festival simulator: scenario and curve (pure), order generator (pure), publisher (I/O)."""
