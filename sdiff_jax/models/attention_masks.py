"""Attention masks for the three attention modes.

All masks are boolean `[B, Q, K]` (True = may attend) and respect segment ids:
a query never sees a key of another document, nor padding (segment 0).

* `bidirectional`: every position of a document sees the whole document.
* `causal`: a position sees itself and earlier positions of its document.
* `block_causal` (BD3-LM style): the model runs on the concatenation
  `[x_t ; x_0]` of length 2L. The noisy copy of block b sees its own block and
  the clean tokens of blocks < b; the clean copy is token-causal, so the K/V of
  a clean prefix does not depend on where blocks start and a prompt of any
  length can be prefilled into an exact KV cache.
"""

import jax
import jax.numpy as jnp

ATTENTION_MODES = ("bidirectional", "block_causal", "causal")


def _same_segment(seg_q_BxQ: jax.Array, seg_k_BxK: jax.Array) -> jax.Array:
  same_BxQxK = seg_q_BxQ[:, :, None] == seg_k_BxK[:, None, :]
  return same_BxQxK & (seg_q_BxQ[:, :, None] > 0) & (seg_k_BxK[:, None, :] > 0)


def bidirectional_mask(segment_ids_BxL: jax.Array) -> jax.Array:
  return _same_segment(segment_ids_BxL, segment_ids_BxL)


def causal_mask(segment_ids_BxL: jax.Array) -> jax.Array:
  length = segment_ids_BxL.shape[1]
  idx_L = jnp.arange(length)
  causal_LxL = idx_L[:, None] >= idx_L[None, :]
  return _same_segment(segment_ids_BxL, segment_ids_BxL) & causal_LxL[None]


def block_causal_mask(segment_ids_BxL: jax.Array, block_size: int) -> jax.Array:
  """Mask over `[x_t ; x_0]` (length 2L) for block-causal diffusion training."""
  length = segment_ids_BxL.shape[1]
  idx_L = jnp.arange(length)
  block_L = idx_L // block_size
  same_block_LxL = block_L[:, None] == block_L[None, :]
  earlier_block_LxL = block_L[:, None] > block_L[None, :]
  causal_LxL = idx_L[:, None] >= idx_L[None, :]
  noisy_noisy = same_block_LxL
  noisy_clean = earlier_block_LxL
  clean_noisy = jnp.zeros_like(causal_LxL)
  clean_clean = causal_LxL
  pattern_2Lx2L = jnp.block([[noisy_noisy, noisy_clean], [clean_noisy, clean_clean]])
  seg_Bx2L = jnp.concatenate([segment_ids_BxL, segment_ids_BxL], axis=1)
  return _same_segment(seg_Bx2L, seg_Bx2L) & pattern_2Lx2L[None]


def training_mask(mode: str, segment_ids_BxL: jax.Array, block_size: int) -> jax.Array:
  """The training-time mask for `mode` (see module docstring)."""
  if mode == "bidirectional":
    return bidirectional_mask(segment_ids_BxL)
  if mode == "causal":
    return causal_mask(segment_ids_BxL)
  if mode == "block_causal":
    return block_causal_mask(segment_ids_BxL, block_size)
  raise ValueError(f"unknown attention mode {mode!r}; valid: {ATTENTION_MODES}")
