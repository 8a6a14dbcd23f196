"""Adapters to other libraries' code, for parity tests and benchmarks (never needed at run time)."""
