"""Benchmarks: commands (`python -m sdiff_jax.bench.NAME`) that print and write JSON rows.

They are not timed tests. `compiled` (memory of a compiled train step) and `syntax` (prompts
and the syntax validity of completions) are the flag-free libraries they share with the tests.
"""
