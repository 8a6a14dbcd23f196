"""The bottom of the stack: atomic file writes and PNG image grids (no torchdiffusion imports)."""
