"""Forward corruption processes of Seed Diffusion, pure JAX with static shapes.

* mask_corrupt: absorbing-state process, each valid token -> MASK with prob. gamma_t.
* edit_corrupt: k_t = floor(length * alpha_t) random substitutions / deletions /
  insertions (paper Eq. 3-4), built in parallel with one sort, so that
  Levenshtein(x0, x_t) <= k_t.

Both take explicit PRNG keys, are jitted, and trace once per shape and static config.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sdiff_jax.data.tokenizer import MASK_ID, NUM_SPECIAL, PAD_ID

SUB, DEL, INS = 0, 1, 2  # edit operation codes; op_probs is indexed by them

_EDIT_STATIC = ("vocab_size", "alpha_max", "op_probs", "num_special", "pad_id")


@functools.partial(jax.jit, static_argnames=("mask_id",))
def mask_corrupt(
    key: jax.Array,
    tokens_BxL: jax.Array,
    gamma_B: jax.Array,
    valid_BxL: jax.Array,
    *,
    mask_id: int = MASK_ID,
) -> tuple[jax.Array, jax.Array]:
  """Replaces each valid token by `mask_id` with probability gamma_B (one per row).

  Returns (noisy_BxL, is_masked_BxL); positions with valid_BxL False are untouched.
  """
  u_BxL = jax.random.uniform(key, tokens_BxL.shape)
  is_masked_BxL = valid_BxL & (u_BxL < jnp.expand_dims(gamma_B, -1))
  noisy_BxL = jnp.where(is_masked_BxL, jnp.asarray(mask_id, tokens_BxL.dtype), tokens_BxL)
  return noisy_BxL, is_masked_BxL


class EditResult(NamedTuple):
  """Output of edit_corrupt; leading batch dims are added by vmap."""

  tokens: jax.Array  # int[..., L] x_t, pad_id from `length` on
  length: jax.Array  # i32[...] length of x_t after truncation to L
  touched: jax.Array  # bool[..., L] output positions holding a substituted or inserted token
  num_sub: jax.Array  # i32[...]
  num_del: jax.Array  # i32[...]
  num_ins: jax.Array  # i32[...]
  length_before_truncation: jax.Array  # i32[...] length + num_ins - num_del


def _check_edit_args(
    vocab_size: int, alpha_max: float, op_probs: tuple[float, float, float], num_special: int
) -> None:
  if vocab_size - num_special < 2:
    raise ValueError(
        f"Need >= 2 real tokens to substitute, got vocab_size={vocab_size}, "
        f"num_special={num_special}."
    )
  if not 0.0 <= alpha_max < 1.0:
    raise ValueError(f"alpha_max must be in [0, 1) (the paper uses <= 0.1), got {alpha_max}.")
  if len(op_probs) != 3 or min(op_probs) < 0 or sum(op_probs) <= 0:
    raise ValueError(
        f"op_probs = (sub, del, ins) must be 3 non-negative weights, not all 0; got {op_probs}."
    )


def _below(bits: jax.Array, n: jax.Array | int) -> jax.Array:
  """Integers uniform in [0, n) from uint32 bits (modulo bias <= n / 2**32)."""
  return (bits % jnp.asarray(n, jnp.uint32)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=_EDIT_STATIC)
def edit_corrupt(
    key: jax.Array,
    tokens_L: jax.Array,
    length: jax.Array,
    alpha: jax.Array,
    *,
    vocab_size: int,
    alpha_max: float = 0.1,
    op_probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
    num_special: int = NUM_SPECIAL,
    pad_id: int = PAD_ID,
) -> EditResult:
  """Applies k = floor(length * alpha) random edits to tokens_L[:length] (one sequence).

  The buffer holds K = floor(L * alpha_max) op slots (static); slots j >= k are
  inactive, and alpha > alpha_max is clipped to K edits. Each op is a substitution,
  deletion or insertion with probabilities op_probs (weights, normalised here).

  All `length` tokens are editable, BOS/EOS included: a packed training row is one
  sequence and the position-aligned loss then teaches the model to restore document
  boundaries too. Random tokens come from the real vocabulary
  [num_special, vocab_size) only, and a substitution always changes its token.

  Positions: substitutions and deletions take distinct original tokens (the first
  entries of a random permutation of [0, length)), so every such op changes its own
  token and the counts are exact (two ops on one token would count twice but act
  once). An insertion goes into one of the length + 1 gaps, uniformly, including
  after the last token; several insertions may share a gap, each adds its own token.
  The output is x0 with these edits applied in one stable sort: original i is keyed
  2i + 1, an insertion before original g is keyed 2g, deleted and padding entries are
  keyed past the end; then the result is truncated to L and padded with pad_id.
  """
  _check_edit_args(vocab_size, alpha_max, op_probs, num_special)
  (seq_len,) = tokens_L.shape
  k_max = math.floor(seq_len * alpha_max)
  length = jnp.clip(jnp.asarray(length, jnp.int32), 0, seq_len)
  num_ops = jnp.clip(jnp.floor(length * alpha).astype(jnp.int32), 0, k_max)
  # One draw of random bits for everything (each threefry call costs compile time).
  bits_M = jax.random.bits(key, (seq_len + 4 * k_max,), jnp.uint32)  # M = L + 4K
  score_bits_L, op_bits_K, gap_bits_K, sub_bits_K, ins_bits_K = jnp.split(
      bits_M, [seq_len + j * k_max for j in range(4)]
  )

  active_K = jnp.arange(k_max) < num_ops
  u_K = (op_bits_K >> 8).astype(jnp.float32) / 2**24 * sum(op_probs)  # U[0, sum(op_probs))
  op_K = (u_K >= op_probs[SUB]).astype(jnp.int32) + (u_K >= op_probs[SUB] + op_probs[DEL])
  is_sub_K = active_K & (op_K == SUB)
  is_del_K = active_K & (op_K == DEL)
  is_ins_K = active_K & (op_K == INS)

  in_seq_L = jnp.arange(seq_len) < length
  score_L = jnp.where(in_seq_L, (score_bits_L >> 1).astype(jnp.int32), -1)
  _, perm_K = jax.lax.top_k(score_L, k_max)  # k_max distinct positions, random order
  rank_K = jnp.cumsum(is_sub_K | is_del_K) - 1  # j-th sub/del op takes perm_K[j]
  pos_K = perm_K[jnp.maximum(rank_K, 0)]
  sub_idx_K = jnp.where(is_sub_K, pos_K, seq_len)  # seq_len: dropped by the scatters
  del_idx_K = jnp.where(is_del_K, pos_K, seq_len)

  # Uniform over the real vocabulary minus the original token.
  num_real = vocab_size - num_special
  orig_K = tokens_L[pos_K].astype(jnp.int32)
  orig_real_K = (orig_K >= num_special) & (orig_K < vocab_size)
  draw_K = _below(sub_bits_K, num_real - orig_real_K.astype(jnp.int32))
  sub_tok_K = num_special + jnp.where(
      orig_real_K, (orig_K - num_special + 1 + draw_K) % num_real, draw_K
  )
  ins_tok_K = num_special + _below(ins_bits_K, num_real)
  gap_K = _below(gap_bits_K, length + 1)

  edited_L = tokens_L.at[sub_idx_K].set(sub_tok_K.astype(tokens_L.dtype), mode="drop")
  subbed_L = jnp.zeros(seq_len, bool).at[sub_idx_K].set(True, mode="drop")
  deleted_L = jnp.zeros(seq_len, bool).at[del_idx_K].set(True, mode="drop")
  past_end = 2 * seq_len + 2
  orig_key_L = jnp.where(in_seq_L & ~deleted_L, 2 * jnp.arange(seq_len) + 1, past_end)
  ins_key_K = jnp.where(is_ins_K, 2 * gap_K, past_end)
  _, merged_M, touched_M = jax.lax.sort(  # M = L + K
      (
          jnp.concatenate([orig_key_L, ins_key_K]),
          jnp.concatenate([edited_L, ins_tok_K.astype(tokens_L.dtype)]),
          jnp.concatenate([subbed_L, is_ins_K]),
      ),
      num_keys=1,
      is_stable=True,
  )

  num_sub, num_del, num_ins = (x.sum(dtype=jnp.int32) for x in (is_sub_K, is_del_K, is_ins_K))
  length_before_truncation = length + num_ins - num_del
  new_length = jnp.minimum(length_before_truncation, seq_len)
  keep_L = jnp.arange(seq_len) < new_length
  return EditResult(
      tokens=jnp.where(keep_L, merged_M[:seq_len], jnp.asarray(pad_id, tokens_L.dtype)),
      length=new_length,
      touched=keep_L & touched_M[:seq_len],
      num_sub=num_sub,
      num_del=num_del,
      num_ins=num_ins,
      length_before_truncation=length_before_truncation,
  )


@functools.partial(jax.jit, static_argnames=_EDIT_STATIC)
def edit_corrupt_batch(
    key: jax.Array, tokens_BxL: jax.Array, lengths_B: jax.Array, alpha_B: jax.Array, **kwargs
) -> EditResult:
  """edit_corrupt over a batch, one key per row split from `key`; kwargs as there."""
  keys_B = jax.random.split(key, tokens_BxL.shape[0])
  return jax.vmap(functools.partial(edit_corrupt, **kwargs))(
      keys_B, tokens_BxL, lengths_B, alpha_B
  )
