"""Training objectives, all reported in bits per token.

* masked-diffusion ELBO: sum over masked positions of (gamma'/gamma) * NLL, or, to
  train on, the plain mean NLL of the masked tokens (`diffusion.loss_weighting`);
* edit term: -log p(x0 | x_t) at every real position, aligned to x0, next to its
  copy baseline (the bits of predicting the input token itself);
* next-token loss for the autoregressive (`causal`) baseline.

The model predicts every position (no carry-over of unmasked tokens); the MASK
logit is set to -inf so MASK is never a prediction.
"""

import math

import jax
import jax.numpy as jnp

LN2 = math.log(2.0)
LOSS_WEIGHTINGS = ("elbo", "masked_mean")  # what the mask term trains on (diffusion.loss_weighting)


def suppress_token(logits_BxLxV: jax.Array, token_id: int) -> jax.Array:
  """Sets one token's logit to -inf (used for MASK)."""
  return logits_BxLxV.at[..., token_id].set(-jnp.inf)


def token_nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array, mask_id: int) -> jax.Array:
  """Per-position negative log-likelihood in nats, with MASK suppressed."""
  logp_BxLxV = jax.nn.log_softmax(suppress_token(logits_BxLxV, mask_id), axis=-1)
  return -jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]


def _per_token_bits(total_nats: jax.Array, count: jax.Array) -> jax.Array:
  return total_nats / jnp.maximum(count, 1) / LN2


def masked_diffusion_bits(
  nll_BxL: jax.Array, is_masked_BxL: jax.Array, weight_B: jax.Array, valid_BxL: jax.Array
) -> jax.Array:
  """Continuous-time masked-diffusion ELBO (an upper bound on NLL), bits/token."""
  weighted_BxL = weight_B[:, None] * jnp.where(is_masked_BxL, nll_BxL, 0.0)
  return _per_token_bits(weighted_BxL.sum(), valid_BxL.sum())


def masked_mean_bits(nll_BxL: jax.Array, is_masked_BxL: jax.Array) -> jax.Array:
  """Mean NLL of the masked tokens, bits/token: the ELBO's terms without the 1/t weight."""
  return _per_token_bits(jnp.where(is_masked_BxL, nll_BxL, 0.0).sum(), is_masked_BxL.sum())


def mean_bits(nll_BxL: jax.Array, valid_BxL: jax.Array) -> jax.Array:
  """Mean NLL over the valid positions, bits/token (edit term, AR loss)."""
  return _per_token_bits(jnp.where(valid_BxL, nll_BxL, 0.0).sum(), valid_BxL.sum())


def copy_baseline_bits(
  inputs_BxL: jax.Array, targets_BxL: jax.Array, valid_BxL: jax.Array, num_real: int
) -> tuple[jax.Array, jax.Array]:
  """(copy-baseline bits/token, kept fraction f) of a corrupted batch.

  f is the fraction of valid positions whose input equals the target. The copy
  baseline is the best predictor that reads only the input token at its position:
  it says "the input token" with probability f and spreads 1 - f uniformly over the
  other num_real - 1 real tokens, which costs
      -[f log2 f + (1 - f) log2((1 - f) / (num_real - 1))]  bits per valid position
  (f, the empirical fraction, minimises this cross-entropy; 0 log 0 = 0). A model that
  corrects edits must get below it.
  """
  count = jnp.maximum(valid_BxL.sum(), 1)
  f = (valid_BxL & (inputs_BxL == targets_BxL)).sum() / count
  nats = -(
    jax.scipy.special.xlogy(f, f) + jax.scipy.special.xlogy(1.0 - f, (1.0 - f) / (num_real - 1))
  )
  return nats / LN2, f


def next_token_targets(
  tokens_BxL: jax.Array, segment_ids_BxL: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Targets shifted left by one and where they are valid (same document)."""
  targets_BxL = jnp.roll(tokens_BxL, -1, axis=1)
  next_seg_BxL = jnp.roll(segment_ids_BxL, -1, axis=1)
  valid_BxL = (next_seg_BxL == segment_ids_BxL) & (segment_ids_BxL > 0)
  valid_BxL = valid_BxL.at[:, -1].set(False)
  return targets_BxL, valid_BxL
