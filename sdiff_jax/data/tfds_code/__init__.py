"""TFDS builder over local code corpora (ArrayRecord files that grain reads)."""

from sdiff_jax.data.tfds_code.code_corpus import (
  CodeCorpus,
  CodeCorpusConfig,
  TfdsTexts,
  build_tfds_corpus,
  config_for_source,
)

__all__ = ["CodeCorpus", "CodeCorpusConfig", "TfdsTexts", "build_tfds_corpus", "config_for_source"]
