"""TFDS builder over local code corpora (ArrayRecord files that grain reads)."""

from sdiff_jax.data.tfds_code.code_corpus import CodeCorpus
from sdiff_jax.data.tfds_code.code_corpus import CodeCorpusConfig
from sdiff_jax.data.tfds_code.code_corpus import TfdsTexts
from sdiff_jax.data.tfds_code.code_corpus import build_tfds_corpus
from sdiff_jax.data.tfds_code.code_corpus import config_for_source

__all__ = ["CodeCorpus", "CodeCorpusConfig", "TfdsTexts", "build_tfds_corpus", "config_for_source"]
