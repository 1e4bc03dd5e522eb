"""Benchmarks: commands that print and write JSON rows (not timed tests)."""
