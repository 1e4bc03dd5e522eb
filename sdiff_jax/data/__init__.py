"""Corpus sources, tokenizers and input pipelines."""
