"""Evaluation of trained models: held-out likelihood (nelbo)."""
