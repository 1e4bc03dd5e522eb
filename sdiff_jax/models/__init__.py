"""Denoiser model and attention masks."""

from sdiff_jax.models.attention_masks import ATTENTION_MODES, training_mask
from sdiff_jax.models.transformer import (
  KVCache,
  ModelConfig,
  Transformer,
  init_cache,
  unstack_layers,
)

__all__ = [
  "ATTENTION_MODES",
  "KVCache",
  "ModelConfig",
  "Transformer",
  "init_cache",
  "training_mask",
  "unstack_layers",
]
