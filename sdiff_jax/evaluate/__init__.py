"""Evaluation of trained models (`python -m sdiff_jax.evaluate`, see run.py): held-out
likelihood (nelbo), validity, repair, judge perplexity and HumanEval in a sandbox."""
