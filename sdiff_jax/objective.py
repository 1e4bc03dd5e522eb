"""The training objectives of one config, as pure functions of (params, batch, key, stage).

The curriculum stage (`config_lib.STAGES`) is "ar", "mask", "mask+edit" or "distill". By
`config.attention`:
* `bidirectional` / `block_causal`: the Seed Diffusion objective. The
  masked-diffusion ELBO (mask corruption at t ~ U(eps, 1), the denoiser's
  logits, (gamma'/gamma)-weighted NLL of the masked tokens, or their plain mean with
  `diffusion.loss_weighting="masked_mean"`); in "mask+edit"
  (the curriculum's second stage) plus the edit term -log p(x0 | x_edit) at
  every real position. No carry-over: the model predicts every position. An "ar"
  stage (`curriculum.ar_fraction`, with `diffusion.shift`) trains the same
  parameters on the next-token loss under a causal mask first.
* `causal`: the next-token loss of the autoregressive baseline (stage "ar").
* "distill" (a run with `distill.pool`): constrained-order distillation on (state, final)
  pairs of the model's own selected trajectories (`distill_loss`, `trajectories.py`).

With `diffusion.shift`, the output at position i-1 predicts the token at i, as in an AR
model (Dream, DiffuCoder, Fast-dLLM v2 keep it when they adapt one): a masked token then
reads its left neighbour's identity from that position's residual stream instead of
having to learn attention to it. A block_causal model predicts a block's first token from
the clean copy's output before it: its AR prediction. A document chunk's first token has
no left neighbour in the row: it is never masked nor scored. With `model.read_next`
the output at i-1 also reads position i's final state (zero-initialised), so keeping or
correcting the visible token at i, which the edit term asks of every position, does
not have to be learned as attention to the right neighbour; the "ar" stage leaves the
term out (under its causal mask position i holds the target).

Losses and metrics are in bits per token. Shapes: B rows, L tokens per row.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdiff_jax import config_lib, corruption, losses, schedules
from sdiff_jax.data import tokenizer as tokenizer_lib
from sdiff_jax.models import Transformer, training_mask

Batch = dict[str, jax.Array]  # tokens, segment_ids, positions: int32[B, L]


class Objective:
  """The model of a config and its loss at each curriculum stage."""

  def __init__(self, config: ml_collections.ConfigDict, vocab_size: int):
    self.config = config
    self.model_cfg = config_lib.model_config(config, vocab_size)
    self.model = Transformer(self.model_cfg)
    self.mode = config.attention
    self.shift = bool(config.diffusion.shift) and self.mode != "causal"
    self.gamma = schedules.get_gamma_schedule(config.diffusion.gamma_schedule)
    self.alpha = schedules.get_alpha_schedule(
      config.diffusion.alpha_schedule, config.diffusion.alpha_max
    )

  @property
  def input_length_factor(self) -> int:
    """Model input length over row length: block_causal runs on `[x_t ; x_0]`."""
    return 2 if self.mode == "block_causal" else 1

  def init_params(self, key: jax.Array, seq_len: int) -> Any:
    """Freshly initialised (boxed, logically annotated) parameters."""
    length = self.input_length_factor * seq_len
    tokens = jnp.zeros((1, length), jnp.int32)
    return self.model.init(key, tokens, tokens, jnp.ones((1, length, length), bool))["params"]

  def logits(self, params, inputs_BxL: jax.Array, batch: Batch) -> jax.Array:
    """Denoiser logits for `inputs` at the positions of the clean `batch` (causal models:
    next-token logits)."""
    seg_BxL, pos_BxL = batch["segment_ids"], batch["positions"]
    mask = training_mask(self.mode, seg_BxL, self.config.diffusion.block_size)
    if self.mode == "block_causal":
      length = inputs_BxL.shape[1]
      tokens_Bx2L = jnp.concatenate([inputs_BxL, batch["tokens"]], axis=1)
      pos_Bx2L = jnp.concatenate([pos_BxL, pos_BxL], axis=1)
      outputs = self._block_causal_outputs(length) if self.shift else (0, length)
      logits, _ = self.model.apply({"params": params}, tokens_Bx2L, pos_Bx2L, mask, outputs=outputs)
      return logits
    logits_BxLxV, _ = self.model.apply({"params": params}, inputs_BxL, pos_BxL, mask)
    if self.shift:  # output i-1 predicts token i (token 0's logits: never scored)
      logits_BxLxV = jnp.concatenate([logits_BxLxV[:, :1], logits_BxLxV[:, :-1]], axis=1)
    return logits_BxLxV

  def _block_causal_outputs(self, length: int) -> np.ndarray:
    """block_causal + shift: which of the `[x_t ; x_0]` outputs predicts each token. Output
    i-1 predicts token i: the noisy copy's inside a block; for a block's first token the
    clean copy's before it (token-causal: the AR prediction from the clean prefix), as the
    sampler's forward reads it from the committed token before the block. Token 0: never
    scored (its own output stands in)."""
    idx_L = np.arange(length)
    first_L = idx_L % self.config.diffusion.block_size == 0
    return np.where(first_L, length + idx_L - 1, idx_L - 1).clip(0)

  def state_nll(self, params, state_BxL: jax.Array, batch: Batch) -> jax.Array:
    """float32[B, L]: -log p(batch["tokens"] | state) per position (nats), for a decoding
    state (MASK where nothing is committed yet). The state is also the clean half a
    block_causal model reads, so no target leaks there."""
    logits_BxLxV = self.logits(params, state_BxL, {**batch, "tokens": state_BxL})
    return losses.token_nll(logits_BxLxV, batch["tokens"], tokenizer_lib.MASK_ID)

  def edit_corrupt(
    self, key: jax.Array, tokens_BxL: jax.Array, batch: Batch, alpha_B: jax.Array, **overrides
  ) -> corruption.EditResult:
    """`corruption.edit_corrupt_batch` of `tokens` at `batch`'s segments and positions,
    with the config's edit window, alpha_max and op probabilities (`overrides` replace
    them)."""
    d = self.config.diffusion
    settings = dict(
      vocab_size=self.model_cfg.vocab_size,
      window=d.edit_window,
      alpha_max=d.alpha_max,
      op_probs=tuple(d.edit_op_probs),
    )
    return corruption.edit_corrupt_batch(
      key, tokens_BxL, batch["segment_ids"], batch["positions"], alpha_B, **settings | overrides
    )

  def scored(self, batch: Batch) -> jax.Array:
    """bool[B, L]: the tokens the diffusion loss may mask and score."""
    valid_BxL = batch["segment_ids"] > 0
    return valid_BxL & (batch["positions"] > 0) if self.shift else valid_BxL

  def next_token_logits(self, params, batch: Batch) -> jax.Array:
    """The model under a causal mask: output i predicts token i + 1 (the "ar" stage)."""
    mask = training_mask("causal", batch["segment_ids"], self.config.diffusion.block_size)
    logits_BxLxV, _ = self.model.apply(
      {"params": params}, batch["tokens"], batch["positions"], mask, read_next=False
    )
    return logits_BxLxV

  def __call__(
    self, params, batch: Batch, key: jax.Array, stage: str
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of one batch; `valid_tokens` weighs the metrics across batches."""
    tokens_BxL, seg_BxL = batch["tokens"], batch["segment_ids"]
    valid_BxL = seg_BxL > 0
    metrics = {"valid_tokens": valid_BxL.sum().astype(jnp.float32)}
    if stage == "ar" or self.mode == "causal":
      targets_BxL, target_valid_BxL = losses.next_token_targets(tokens_BxL, seg_BxL)
      nll_BxL = losses.token_nll(
        self.next_token_logits(params, batch), targets_BxL, tokenizer_lib.MASK_ID
      )
      loss = losses.mean_bits(nll_BxL, target_valid_BxL)
      return loss, {**metrics, "loss": loss, "ar_bits": loss}

    if stage == "distill":
      return self.distill_loss(params, batch, key, metrics)
    if stage == "onpolicy":
      return self.onpolicy_loss(params, batch, key, metrics)

    time_key, mask_key, edit_time_key, edit_key = jax.random.split(key, 4)
    d = self.config.diffusion
    valid_BxL = self.scored(batch)
    edit_batch = batch
    if d.block_fraction > 0:  # some rows as one block-decoding step (corruption.block_rows)
      valid_BxL, kept_BxL = corruption.block_rows(
        jax.random.fold_in(key, 4), valid_BxL, d.block_fraction, d.block_size
      )
      batch = {**batch, "segment_ids": jnp.where(kept_BxL, seg_BxL, 0)}
    t_B = schedules.sample_times(
      time_key, tokens_BxL.shape[0], eps=d.time_eps, antithetic=d.antithetic
    )
    noisy_BxL, is_masked_BxL = corruption.mask_corrupt(
      mask_key, tokens_BxL, self.gamma.gamma(t_B), valid_BxL
    )
    nll_BxL = losses.token_nll(
      self.logits(params, noisy_BxL, batch), tokens_BxL, tokenizer_lib.MASK_ID
    )
    mask_bits = losses.masked_diffusion_bits(
      nll_BxL, is_masked_BxL, schedules.elbo_weight(self.gamma, t_B), valid_BxL
    )
    metrics.update(
      mask_bits=mask_bits, mask_rate=is_masked_BxL.sum() / jnp.maximum(valid_BxL.sum(), 1)
    )
    loss = mask_bits
    if d.loss_weighting == "masked_mean":  # trained on; mask_bits stays the ELBO
      loss = metrics["masked_mean_bits"] = losses.masked_mean_bits(nll_BxL, is_masked_BxL)
    if stage == "mask+edit":
      # Each document of a row is edited on its own, length-preserving, with local
      # del-ins / ins-del pairs (see corruption.py): the model reads the edited row at
      # the row's own segments and positions and predicts x0 at every valid position.
      s_B = schedules.sample_times(
        edit_time_key, tokens_BxL.shape[0], eps=d.time_eps, antithetic=d.antithetic
      )
      batch, valid_BxL = edit_batch, self.scored(edit_batch)  # whole rows
      edited = self.edit_corrupt(edit_key, tokens_BxL, batch, self.alpha.alpha(s_B))
      edit_nll_BxL = losses.token_nll(
        self.logits(params, edited.tokens, batch), tokens_BxL, tokenizer_lib.MASK_ID
      )
      edit_bits = losses.mean_bits(edit_nll_BxL, valid_BxL)
      copy_bits, kept_fraction = losses.copy_baseline_bits(
        edited.tokens, tokens_BxL, valid_BxL, self.model_cfg.vocab_size - tokenizer_lib.NUM_SPECIAL
      )
      loss = loss + self.config.curriculum.edit_weight * edit_bits
      metrics.update(
        edit_bits=edit_bits, edit_copy_bits=copy_bits, edit_kept_fraction=kept_fraction
      )
    metrics["loss"] = loss
    return loss, metrics

  def distill_loss(
    self, params, batch: Batch, key: jax.Array, metrics: dict[str, jax.Array]
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Constrained-order distillation (Seed Diffusion Eq. 9) on (state, final) pairs, the
    batch's `pair_*` rows (`trajectories.WithPairs`): `pair_state` is a state of a selected
    trajectory (MASK where not yet committed), `pair_tokens` its final tokens. Plus
    `distill.anchor_weight` times the "mask+edit" loss of the batch's real rows.

    -lambda(x_i) log p(x0 | f(x_i)): f edits the state (`corruption.edit_corrupt`, a fixed
    share `distill.edit_alpha` of its tokens, MASK included) and the model predicts x0 at
    every position. lambda = 1 / (the row's MASK inputs): each state weighs the same
    whatever its noise level (a state late in a block masks few tokens, one early many),
    as the masked mean does. The visible tokens' mean NLL (the re-check of committed and
    edited tokens) is added with weight `distill.visible_weight`."""
    d = self.config.distill
    edit_key, anchor_key = jax.random.split(key)
    real = batch
    batch = {name[5:]: value for name, value in batch.items() if name.startswith("pair_")}
    valid_BxL = self.scored(batch)
    rows = batch["tokens"].shape[0]
    edited = self.edit_corrupt(edit_key, batch["state"], batch, jnp.full((rows,), d.edit_alpha))
    nll_BxL = losses.token_nll(
      self.logits(params, edited.tokens, batch), batch["tokens"], tokenizer_lib.MASK_ID
    )
    masked_BxL = valid_BxL & (edited.tokens == tokenizer_lib.MASK_ID)
    count_B = masked_BxL.sum(axis=1)
    row_bits_B = jnp.where(masked_BxL, nll_BxL, 0).sum(axis=1) / jnp.maximum(count_B, 1)
    has_B = count_B > 0
    masked_bits = (row_bits_B * has_B).sum() / jnp.maximum(has_B.sum(), 1) / losses.LN2
    visible_bits = losses.mean_bits(nll_BxL, valid_BxL & ~masked_BxL)
    loss = masked_bits + d.visible_weight * visible_bits
    loss = self._anchored(loss, d.anchor_weight, params, real, anchor_key, metrics)
    metrics.update(
      distill_masked_bits=masked_bits,
      distill_visible_bits=visible_bits,
      distill_mask_rate=masked_BxL.sum() / jnp.maximum(valid_BxL.sum(), 1),
    )
    return loss, metrics

  def onpolicy_loss(
    self, params, batch: Batch, key: jax.Array, metrics: dict[str, jax.Array]
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """On-policy step reduction's REINFORCE loss (see onpolicy.py) on the batch's `pair_*`
    rows (`onpolicy.Rollouts`): `pair_state` a state of a sampled trajectory, `pair_tokens`
    the tokens it committed, `pair_committed` marks the tokens committed from that state,
    `pair_weight` is (advantage x the trajectory's steps / max_new_tokens) there, 0
    elsewhere. The loss is sum(weight * -log2 p(token | state)) / rows, so its gradient is
    minus the policy gradient of the reward; plus `onpolicy.kl_weight` times the KL
    estimate to the starting model when the rows carry its NLL (`pair_reference_nll`), and
    `onpolicy.anchor_weight` times the "mask+edit" loss of the batch's real rows."""
    real = batch
    batch = {name[5:]: value for name, value in batch.items() if name.startswith("pair_")}
    nll_BxL = self.state_nll(params, batch["state"], batch)
    o = self.config.onpolicy
    weight_BxL, committed_BxL = batch["weight"], batch["committed"] > 0
    policy = (weight_BxL * nll_BxL).sum() / weight_BxL.shape[0] / losses.LN2
    # bits of the sampled tokens where they were committed: fall as the model sharpens
    metrics.update(
      onpolicy_policy_loss=policy, onpolicy_sampled_bits=losses.mean_bits(nll_BxL, committed_BxL)
    )
    if "reference_nll" in batch:  # KL(p_theta || p_start) at the sampled tokens (k3)
      log_ratio_BxL = jnp.minimum(nll_BxL - batch["reference_nll"], 20.0)  # log p_start / p
      kl_BxL = jnp.exp(log_ratio_BxL) - log_ratio_BxL - 1.0
      kl = jnp.where(committed_BxL, kl_BxL, 0).sum() / jnp.maximum(committed_BxL.sum(), 1)
      metrics["onpolicy_kl"] = kl  # nats per sampled token
      policy = policy + o.kl_weight * kl
    loss = self._anchored(policy, o.anchor_weight, params, real, key, metrics)
    return loss, metrics

  def _anchored(self, loss, weight: float, params, real: Batch, key, metrics) -> jax.Array:
    """`loss` + weight x the "mask+edit" loss of the real rows (the likelihood anchor of
    the distill and on-policy stages); sets metrics["loss"]."""
    if weight > 0:
      anchor, anchor_metrics = self(params, real, key, "mask+edit")
      metrics.update(anchor_metrics, anchor_loss=anchor)
      loss = loss + weight * anchor
    metrics["loss"] = loss
    return loss
