"""Forward corruption processes of Seed Diffusion, pure JAX with static shapes.

* mask_corrupt: absorbing-state process, each valid token -> MASK with prob. gamma_t.
* edit_corrupt: the edit process (paper Eq. 3-4), k = floor(len * alpha_t) edit cost
  per document, length-preserving and local, so that the loss "predict x0 at every
  position" stays learnable.

Edit process: the window scheme. Each document (segment) of a packed row is edited
on its own, with its own budget k_doc = floor(len_doc * alpha). It is cut into
windows of W = w + 1 tokens from its first token (window = position // W; the last
may be shorter), and each window holds at most one operation, entirely inside it:
  * substitution, cost 1: x0[p] -> another real token;
  * del-ins pair, cost 2: delete x0[p], x0[p+1..q] shift left, new token at q;
  * ins-del pair, cost 2: new token at p, x0[p..q-1] shift right, delete x0[q];
with p < q in one window, the kind drawn by op_probs = (sub, del, ins) weights (a
window of one token can only hold a substitution). A segment's windows are taken in
a random order and get operations until the cost reaches k_doc exactly (a pair that
would overshoot by one becomes a substitution); that needs k_doc <= the number of
windows, ceil(len_doc / W), which alpha <= alpha_max <= 1 / W guarantees (the paper's
alpha_max = 0.1 allows w <= 9). Hence Levenshtein(x0_doc, x_t_doc) <= k_doc.

Why windows: the denoiser sees x_t at x0's positions and must predict x0 at every
position (no carry-over). A free insertion or deletion shifts the whole rest of the
row, so after a few of them most targets are misaligned with every input token,
documents bleed into each other, and the edit term cannot be learned (it sat at the
unigram level); the block sampler edits in place, so a global shift would not help
it either. Pairing each deletion with an insertion inside a window keeps the row's
length, segment ids and positions; padding is never touched, nothing crosses a
segment boundary, a pair shifts at most w targets, and every shifted target is the
input token one position to its left (del-ins) or right (ins-del): each target is
inferable from its window's neighbourhood, which the model can learn to read.

Everything is built in parallel: windows are ranked in their segment by one sort of
(segment, random bits) keys, budgets spent by a segmented cumsum, and the output is
one gather. Both processes take explicit PRNG keys, are jitted, and trace once per
shape and static config.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sdiff_jax.data.tokenizer import MASK_ID, NUM_SPECIAL

# Edit operation codes; op_probs is indexed by SUB, DEL_INS, INS_DEL.
NO_OP, SUB, DEL_INS, INS_DEL = -1, 0, 1, 2

_EDIT_STATIC = ("vocab_size", "window", "alpha_max", "op_probs", "num_special")


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


def block_rows(
  key: jax.Array, valid_BxL: jax.Array, fraction: float, block: int
) -> tuple[jax.Array, jax.Array]:
  """Rows shaped like one step of block decoding: (maskable_BxL, kept_BxL).

  A `fraction` of the rows (drawn per row) becomes [clean prefix ; block of `block`
  positions ; nothing]: only the block may be masked and scored, and the positions after
  it leave the row (kept False: the caller drops them from attention and the loss), as
  the sampler's forward of a block sees the prompt and the finished blocks but nothing
  after the block. The block starts uniformly in [1, L - block]. Other rows: maskable =
  valid, everything kept.
  """
  rows, length = valid_BxL.shape
  use_key, cut_key = jax.random.split(key)
  use_B = jax.random.uniform(use_key, (rows,)) < fraction
  start_B = jax.random.randint(cut_key, (rows,), 1, max(length - block, 1) + 1)
  idx_L = jnp.arange(length)
  inside_BxL = (idx_L >= start_B[:, None]) & (idx_L < start_B[:, None] + block)
  kept_BxL = ~use_B[:, None] | (idx_L < start_B[:, None] + block)
  maskable_BxL = valid_BxL & jnp.where(use_B[:, None], inside_BxL, True)
  return maskable_BxL, kept_BxL


class EditOps(NamedTuple):
  """The sampled operations: one slot per window, in the order they were drawn.

  Slots are grouped by segment (in row order) and, within a segment, listed in the
  random order in which its windows were taken; the active ones come first. Indices
  are row indices; inactive slots hold NO_OP and -1.
  """

  kind: jax.Array  # i32[..., L] NO_OP, SUB, DEL_INS or INS_DEL
  p: jax.Array  # i32[..., L] SUB: substituted; DEL_INS: deleted; INS_DEL: inserted at
  q: jax.Array  # i32[..., L] SUB: = p; DEL_INS: inserted at; INS_DEL: deleted (p < q)
  token: jax.Array  # i32[..., L] the new (substituted or inserted) token


class EditResult(NamedTuple):
  """Output of edit_corrupt; leading batch dims are added by vmap."""

  tokens: jax.Array  # int[..., L] x_t; same segment ids and positions as x0
  changed: jax.Array  # bool[..., L] valid positions where x_t != x0
  num_sub: jax.Array  # i32[...] substitutions (cost 1 each)
  num_del_ins: jax.Array  # i32[...] del-ins pairs (cost 2 each)
  num_ins_del: jax.Array  # i32[...] ins-del pairs (cost 2 each)
  num_edits: jax.Array  # i32[...] num_sub + 2 * pairs = sum over segments of k_doc
  ops: EditOps  # what was applied, for tests and inspection


def _check_edit_args(
  vocab_size: int,
  window: int,
  alpha_max: float,
  op_probs: tuple[float, float, float],
  num_special: int,
) -> None:
  if vocab_size - num_special < 2:
    raise ValueError(
      f"Need >= 2 real tokens to substitute, got vocab_size={vocab_size}, "
      f"num_special={num_special}."
    )
  if not (isinstance(window, int) and window >= 0):
    raise ValueError(f"window (w, tokens a pair may shift) must be an int >= 0, got {window!r}.")
  if not 0.0 <= alpha_max * (window + 1) <= 1.0:
    raise ValueError(
      f"Need 0 <= alpha_max <= 1 / (window + 1) so that every segment has a window for "
      f"each of its floor(len * alpha) operations; got alpha_max={alpha_max}, "
      f"window={window} (the paper uses alpha_max <= 0.1: window <= 9)."
    )
  if len(op_probs) != 3 or min(op_probs) < 0 or sum(op_probs) <= 0:
    raise ValueError(
      f"op_probs = (sub, del, ins) must be 3 non-negative weights, not all 0; got {op_probs}."
    )


def _below(bits: jax.Array, n: jax.Array | int) -> jax.Array:
  """Integers uniform in [0, n) from uint32 bits (modulo bias <= n / 2**32)."""
  return (bits % jnp.asarray(n, jnp.uint32)).astype(jnp.int32)


def _previous(x_L: jax.Array) -> jax.Array:
  """x[i - 1], with x[0] at i = 0."""
  return jnp.concatenate([x_L[:1], x_L[:-1]])


@functools.partial(jax.jit, static_argnames=_EDIT_STATIC)
def edit_corrupt(
  key: jax.Array,
  tokens_L: jax.Array,
  segment_ids_L: jax.Array,
  positions_L: jax.Array,
  alpha: jax.Array,
  *,
  vocab_size: int,
  window: int = 4,
  alpha_max: float = 0.1,
  op_probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
  num_special: int = NUM_SPECIAL,
) -> EditResult:
  """Edits each segment of one packed row with k_doc = floor(len_doc * alpha) cost.

  segment_ids_L: 0 = padding (never touched), 1, 2, ... = contiguous documents;
  positions_L: the row's positions, consecutive within a segment (windows are
  `positions // (window + 1)`). alpha is clipped to [0, alpha_max]; alpha_max <=
  1 / (window + 1) makes every k_doc exact. op_probs: weights of SUB, DEL_INS, INS_DEL.
  """
  _check_edit_args(vocab_size, window, alpha_max, op_probs, num_special)
  (seq_len,) = tokens_L.shape
  idx_L = jnp.arange(seq_len)
  valid_L = segment_ids_L > 0
  segment_ids_L = segment_ids_L.astype(jnp.int32)
  window_L = positions_L.astype(jnp.int32) // (window + 1)
  seg_edge_L = valid_L & ((idx_L == 0) | (segment_ids_L != _previous(segment_ids_L)))
  win_edge_L = seg_edge_L | (valid_L & (window_L != _previous(window_L)))
  # Segments and windows are named by the row index of their first token ("start").
  seg_start_L = jax.lax.cummax(jnp.where(seg_edge_L, idx_L, 0))
  win_start_L = jax.lax.cummax(jnp.where(win_edge_L, idx_L, 0))
  seg_len_S = jnp.zeros(seq_len, jnp.int32).at[seg_start_L].add(valid_L.astype(jnp.int32))
  win_len_S = jnp.zeros(seq_len, jnp.int32).at[win_start_L].add(valid_L.astype(jnp.int32))
  # Below, index S is a row index read only where a window starts.
  alpha = jnp.clip(jnp.asarray(alpha, jnp.float32), 0.0, alpha_max)
  budget_S = jnp.floor(seg_len_S[seg_start_L].astype(jnp.float32) * alpha).astype(jnp.int32)

  # One draw of random bits for everything (each threefry call costs compile time).
  order_bits_S, kind_bits_S, a_bits_S, b_bits_S, token_bits_S = jnp.moveaxis(
    jax.random.bits(key, (seq_len, 5), jnp.uint32), -1, 0
  )
  # Requested kind: categorical(op_probs) from 24 bits, exact integer thresholds.
  total = sum(op_probs)
  thresholds = [math.floor(sum(op_probs[:j]) / total * 2**24) for j in (1, 2)]
  r_S = (kind_bits_S >> 8).astype(jnp.int32)
  want_S = (r_S >= thresholds[0]).astype(jnp.int32) + (r_S >= thresholds[1])
  want_S = jnp.where(win_len_S >= 2, want_S, SUB)

  # Windows in a random order per segment: sort by (segment, random bits); slot J.
  seg_key_S = jnp.where(win_edge_L, seg_start_L, seq_len)
  seg_key_J, _, start_J = jax.lax.sort((seg_key_S, order_bits_S, idx_L), num_keys=2)
  first_J = jax.lax.cummax(
    jnp.where((idx_L == 0) | (seg_key_J != _previous(seg_key_J)), idx_L, 0)
  )  # segment's first slot
  want_J, budget_J = want_S[start_J], budget_S[start_J]
  cost_J = jnp.where(want_J == SUB, 1, 2)
  spent_J = jnp.cumsum(cost_J) - cost_J  # cost of the slots before, across segments
  spent_J = spent_J - spent_J[first_J]  # ... within the segment
  active_J = win_edge_L[start_J] & (spent_J < budget_J)
  overshoot_J = spent_J + cost_J > budget_J  # one short of the budget: a substitution
  kind_J = jnp.where(active_J, jnp.where(overshoot_J, SUB, want_J), NO_OP)
  kind_S = jnp.full(seq_len, NO_OP, jnp.int32).at[start_J].set(kind_J)

  # Offsets in the window: a uniform; pairs take {a, b} uniform among distinct pairs.
  a_S = _below(a_bits_S, jnp.maximum(win_len_S, 1))
  b_S = _below(b_bits_S, jnp.maximum(win_len_S - 1, 1))
  b_S = b_S + (b_S >= a_S)
  is_sub_S = kind_S == SUB
  p_S = idx_L + jnp.where(is_sub_S, a_S, jnp.minimum(a_S, b_S))
  q_S = jnp.where(is_sub_S, p_S, idx_L + jnp.maximum(a_S, b_S))
  # New tokens from the real vocabulary; a substitution draws among the others.
  num_real = vocab_size - num_special
  orig_S = tokens_L[jnp.minimum(p_S, seq_len - 1)].astype(jnp.int32)
  orig_real_S = (orig_S >= num_special) & (orig_S < vocab_size)
  sub_draw_S = _below(token_bits_S, num_real - orig_real_S.astype(jnp.int32))
  sub_token_S = jnp.where(
    orig_real_S, (orig_S - num_special + 1 + sub_draw_S) % num_real, sub_draw_S
  )
  token_S = num_special + jnp.where(is_sub_S, sub_token_S, _below(token_bits_S, num_real))

  # Each position reads its window's op: a new token, or x0 one to the left / right.
  kind_L, p_L, q_L = kind_S[win_start_L], p_S[win_start_L], q_S[win_start_L]
  kind_L = jnp.where(valid_L, kind_L, NO_OP)
  is_new_L = (((kind_L == SUB) | (kind_L == INS_DEL)) & (idx_L == p_L)) | (
    (kind_L == DEL_INS) & (idx_L == q_L)
  )
  in_span_L = (p_L <= idx_L) & (idx_L <= q_L)
  shift_L = in_span_L * ((kind_L == DEL_INS).astype(jnp.int32) - (kind_L == INS_DEL))
  source_L = jnp.clip(idx_L + shift_L, 0, seq_len - 1)
  noisy_L = jnp.where(is_new_L, token_S[win_start_L].astype(tokens_L.dtype), tokens_L[source_L])

  num_sub, num_del_ins, num_ins_del = (
    (kind_J == op).sum(dtype=jnp.int32) for op in (SUB, DEL_INS, INS_DEL)
  )
  start_or_none_J = lambda x_S: jnp.where(active_J, x_S[start_J], -1)
  return EditResult(
    tokens=noisy_L,
    changed=valid_L & (noisy_L != tokens_L),
    num_sub=num_sub,
    num_del_ins=num_del_ins,
    num_ins_del=num_ins_del,
    num_edits=num_sub + 2 * (num_del_ins + num_ins_del),
    ops=EditOps(
      kind=kind_J, p=start_or_none_J(p_S), q=start_or_none_J(q_S), token=start_or_none_J(token_S)
    ),
  )


@functools.partial(jax.jit, static_argnames=_EDIT_STATIC)
def edit_corrupt_batch(
  key: jax.Array,
  tokens_BxL: jax.Array,
  segment_ids_BxL: jax.Array,
  positions_BxL: jax.Array,
  alpha_B: jax.Array,
  **kwargs,
) -> EditResult:
  """edit_corrupt over a batch, one key per row split from `key`; kwargs as there."""
  keys_B = jax.random.split(key, tokens_BxL.shape[0])
  return jax.vmap(functools.partial(edit_corrupt, **kwargs))(
    keys_B, tokens_BxL, segment_ids_BxL, positions_BxL, alpha_B
  )
