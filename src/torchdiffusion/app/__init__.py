"""The edge: the command line, the demo, plots, and ``load`` (a trained run to samples in two lines)."""
