"""Tests for sdiff_jax.corruption (mask and edit forward processes) and the copy baseline."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sdiff_jax import corruption, losses
from sdiff_jax.corruption import DEL_INS, INS_DEL, NO_OP, SUB

PAD, BOS, EOS, MASK, NUM_SPECIAL = 0, 1, 2, 3, 4


def levenshtein(a: np.ndarray, b: np.ndarray) -> int:
  """Edit distance by the row-by-row DP; the insertion chain is a running minimum."""
  idx = np.arange(len(b) + 1)
  prev = idx.copy()
  for i in range(1, len(a) + 1):
    cur = np.empty_like(prev)
    cur[0] = i
    cur[1:] = np.minimum(prev[1:] + 1, prev[:-1] + (a[i - 1] != b))
    prev = np.minimum.accumulate(cur - idx) + idx
  return int(prev[-1])


def num_edits(length, alpha, alpha_max):
  """k = floor(length * min(alpha, alpha_max)), in f32 like the implementation."""
  alpha = np.minimum(np.float32(alpha), np.float32(alpha_max))
  return np.floor(np.float32(length) * alpha).astype(int)


def packed_rows(rng, batch, seq_len, vocab):
  """Packed rows: documents of random lengths (single tokens included), segment ids
  1, 2, ..., positions restarting at 0, BOS / EOS at some chunk ends, padding after."""
  tokens_BxL = np.full((batch, seq_len), PAD, np.int32)
  seg_BxL = np.zeros((batch, seq_len), np.int32)
  pos_BxL = np.zeros((batch, seq_len), np.int32)
  for b in range(batch):
    filled = seq_len if rng.random() < 0.4 else rng.integers(0, seq_len + 1)
    start, segment = 0, 0
    while start < filled:
      n = min(int(rng.integers(1, rng.choice([4, seq_len // 2, seq_len]) + 1)), filled - start)
      segment += 1
      doc = rng.integers(NUM_SPECIAL, vocab, n)
      if rng.random() < 0.5:
        doc[0] = BOS
      if rng.random() < 0.5:
        doc[-1] = EOS
      tokens_BxL[b, start : start + n] = doc
      seg_BxL[b, start : start + n] = segment
      pos_BxL[b, start : start + n] = np.arange(n)
      start += n
  return tokens_BxL, seg_BxL, pos_BxL


# ---------------------------------------------------------------- mask process


def test_mask_rate_matches_gamma():
  gamma_B = np.array([0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0, 0.5], np.float32)
  rng = np.random.default_rng(0)
  x_BxL = rng.integers(NUM_SPECIAL, 500, (8, 8192)).astype(np.int32)
  valid_BxL = rng.random((8, 8192)) < 0.8
  noisy_BxL, masked_BxL = corruption.mask_corrupt(jax.random.key(0), x_BxL, gamma_B, valid_BxL)
  n_B = valid_BxL.sum(1)
  count_B = np.asarray(masked_BxL).sum(1)
  # Masked count ~ Binomial(n_valid, gamma): allow 5 binomial standard deviations.
  sd_B = np.sqrt(n_B * gamma_B * (1 - gamma_B))
  assert np.all(np.abs(count_B - n_B * gamma_B) <= 5 * sd_B), (count_B, n_B * gamma_B)
  assert count_B[0] == 0 and count_B[6] == n_B[6]
  np.testing.assert_array_equal(np.asarray(noisy_BxL) == MASK, masked_BxL)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), gamma=st.floats(0.0, 1.0))
def test_mask_invalid_untouched(seed, gamma):
  rng = np.random.default_rng(seed)
  x_BxL = rng.integers(0, 50, (8, 64)).astype(np.int32)
  x_BxL[x_BxL == MASK] = NUM_SPECIAL
  valid_BxL = (rng.random((8, 64)) < 0.7) & (x_BxL != PAD)
  gamma_B = np.full(8, gamma, np.float32)
  noisy_BxL, masked_BxL = map(
    np.asarray, corruption.mask_corrupt(jax.random.key(seed), x_BxL, gamma_B, valid_BxL)
  )
  assert not masked_BxL[~valid_BxL].any()
  np.testing.assert_array_equal(noisy_BxL[~masked_BxL], x_BxL[~masked_BxL])
  np.testing.assert_array_equal(noisy_BxL == MASK, masked_BxL)


# ---------------------------------------------------------------- edit process


def segments(seg_L):
  """(segment id, row indices) of each document of a row."""
  return [(s, np.flatnonzero(seg_L == s)) for s in np.unique(seg_L[seg_L > 0])]


def apply_ops_one_at_a_time(x0_L, seg_L, ops):
  """Reference: each document edited on a Python list, one primitive edit at a time
  (del-ins: delete x0[p], then insert at q; ins-del: insert at p, then delete x0[q]),
  in the drawn order."""
  y_L = x0_L.copy()
  for s, idx in segments(seg_L):
    z = list(x0_L[idx])
    for kind, p, q, token in zip(*ops):
      if kind == NO_OP or seg_L[p] != s:
        continue
      p, q = p - idx[0], q - idx[0]
      if kind == SUB:
        z[p] = token
      elif kind == DEL_INS:
        del z[p]
        z.insert(q, token)
      else:
        z.insert(p, token)
        del z[q + 1]  # x0[q], one to the right after the insertion
    assert len(z) == len(idx)
    y_L[idx] = z
  return y_L


def check_edited_row(x0_L, seg_L, pos_L, alpha, res, *, window, alpha_max, vocab):
  """Every property of one edited row (res: its EditResult, numpy)."""
  width, seq_len = window + 1, len(x0_L)
  valid_L, y_L = seg_L > 0, res.tokens
  active = res.ops.kind != NO_OP
  assert np.all(np.stack(res.ops[1:])[:, ~active] == -1)
  kind, p, q, token = (a[active] for a in res.ops)
  # Each op lies inside one window of one segment, at most one op per window.
  assert np.all(seg_L[p] > 0) and np.all(seg_L[p] == seg_L[q])
  assert np.all(pos_L[p] // width == pos_L[q] // width)
  assert len(set(zip(seg_L[p], pos_L[p] // width))) == len(p)
  assert np.all((kind == SUB) == (p == q)) and np.all(p <= q)
  # New tokens are real; a substitution changes its token.
  assert np.all((token >= NUM_SPECIAL) & (token < vocab))
  assert np.all(token[kind == SUB] != x0_L[p[kind == SUB]])
  assert not np.isin(y_L[valid_L], [PAD, MASK]).any()

  np.testing.assert_array_equal(y_L, apply_ops_one_at_a_time(x0_L, seg_L, res.ops))
  np.testing.assert_array_equal(y_L[~valid_L], x0_L[~valid_L])  # padding untouched
  np.testing.assert_array_equal(res.changed, valid_L & (y_L != x0_L))

  counts = [(kind == op).sum() for op in (SUB, DEL_INS, INS_DEL)]
  assert [res.num_sub, res.num_del_ins, res.num_ins_del] == counts
  assert res.num_edits == counts[0] + 2 * (counts[1] + counts[2])
  cost = np.where(kind == SUB, 1, 2)
  for s, idx in segments(seg_L):  # exactly k_doc per document, Levenshtein <= k_doc
    k = num_edits(len(idx), alpha, alpha_max)
    assert cost[seg_L[p] == s].sum() == k
    assert levenshtein(x0_L[idx], y_L[idx]) <= k

  # Inferable targets: every target that no op destroyed (the substituted token, the
  # deleted one) is the input at i - 1, i or i + 1, in i's window.
  destroyed_L = np.zeros(seq_len, bool)
  destroyed_L[np.where(kind == INS_DEL, q, p)] = True
  same_window = lambda i, j: (
    0 <= j < seq_len and seg_L[j] == seg_L[i] and pos_L[j] // width == pos_L[i] // width
  )
  for i in np.flatnonzero(valid_L & ~destroyed_L):
    assert any(same_window(i, j) and y_L[j] == x0_L[i] for j in (i - 1, i, i + 1)), i
  # Only the [p, q] spans change: a pair shifts at most w targets.
  span_L = np.zeros(seq_len, bool)
  for lo, hi in zip(p, q):
    span_L[lo : hi + 1] = True
  assert not res.changed[~span_L].any()
  assert np.all(q - p <= window)


# (window, alpha_max, op_probs, vocab): each compiles once for the shapes below.
EDIT_CONFIGS = [
  (4, 0.1, (1 / 3, 1 / 3, 1 / 3), 300),  # the defaults
  (1, 0.5, (2.0, 3.0, 5.0), 6),  # windows of 2 at the densest alpha; weights normalised
  (0, 0.5, (1 / 3, 1 / 3, 1 / 3), 6),  # windows of 1: substitutions only
  (9, 0.1, (0.0, 1.0, 0.0), 300),  # del-ins only (substitutions where forced)
  (3, 0.25, (0.0, 0.0, 1.0), 6),  # ins-del only
]
BATCH, SEQ_LEN = 16, 48


def edit_rows(seed, config, batch=BATCH, seq_len=SEQ_LEN):
  """Packed rows, their alphas (row 0 at alpha_max, row 1 above it) and the edits."""
  window, alpha_max, op_probs, vocab = config
  rng = np.random.default_rng(seed)
  rows = packed_rows(rng, batch, seq_len, vocab)
  alpha_B = rng.uniform(0, alpha_max, batch).astype(np.float32)
  alpha_B[:2] = alpha_max, 2 * alpha_max + 0.1  # the bound, and above it (clipped)
  res = corruption.edit_corrupt_batch(
    jax.random.key(seed),
    *rows,
    alpha_B,
    vocab_size=vocab,
    window=window,
    alpha_max=alpha_max,
    op_probs=op_probs,
  )
  return rows, alpha_B, jax.device_get(res)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), config=st.sampled_from(EDIT_CONFIGS))
def test_edits_match_one_at_a_time_reference_and_invariants(seed, config):
  window, alpha_max, op_probs, vocab = config
  (x0_BxL, seg_BxL, pos_BxL), alpha_B, res = edit_rows(seed, config)
  assert res.tokens.shape == x0_BxL.shape and res.tokens.dtype == x0_BxL.dtype
  for b in range(BATCH):
    check_edited_row(
      x0_BxL[b],
      seg_BxL[b],
      pos_BxL[b],
      alpha_B[b],
      jax.tree.map(lambda a: a[b], res),
      window=window,
      alpha_max=alpha_max,
      vocab=vocab,
    )
  for op in (DEL_INS, INS_DEL):  # a kind of weight 0 never occurs
    assert op_probs[op] > 0 or not (res.ops.kind == op).any()


@pytest.mark.parametrize("op_probs", [(1 / 3, 1 / 3, 1 / 3), (2.0, 3.0, 5.0)])
def test_op_kinds_follow_op_probs(op_probs):
  """Ops are listed per segment in the order drawn. Where nothing forces the kind (the
  window has >= 2 tokens, >= 2 of the budget is left) it is drawn by op_probs; a pair
  one short of the budget becomes a substitution."""
  window, vocab, batch, seq_len = 4, 300, 128, 256
  rng = np.random.default_rng(1)
  x0_BxL, seg_BxL, pos_BxL = packed_rows(rng, batch, seq_len, vocab)
  res = jax.device_get(
    corruption.edit_corrupt_batch(
      jax.random.key(1),
      x0_BxL,
      seg_BxL,
      pos_BxL,
      np.full(batch, 0.1, np.float32),
      vocab_size=vocab,
      window=window,
      op_probs=op_probs,
    )
  )
  counts_3 = np.zeros(3, int)
  for b in range(batch):
    seg_L, win_L = seg_BxL[b], pos_BxL[b] // (window + 1)
    spent = {}
    for kind, p in zip(res.ops.kind[b], res.ops.p[b]):
      if kind == NO_OP:
        continue
      s = seg_L[p]
      left = num_edits((seg_L == s).sum(), 0.1, 0.1) - spent.get(s, 0)
      assert left >= 1
      if left == 1:
        assert kind == SUB
      elif ((seg_L == s) & (win_L == win_L[p])).sum() >= 2:
        counts_3[kind] += 1
      spent[s] = spent.get(s, 0) + (1 if kind == SUB else 2)
  total, p_3 = counts_3.sum(), np.array(op_probs) / sum(op_probs)
  assert total > 1000, counts_3
  # Each free op is iid categorical: per-kind totals within 5 binomial standard deviations.
  sd_3 = np.sqrt(total * p_3 * (1 - p_3))
  assert np.all(np.abs(counts_3 - total * p_3) <= 5 * sd_3), (counts_3, total * p_3)


def test_distance_reaches_budget_and_targets_stay_aligned():
  """With 1000 tokens only rare coincidences keep Levenshtein below k_doc; at alpha_max
  most targets are still their own input (the old whole-row process kept 33% there)."""
  window, alpha, vocab, batch, seq_len = 4, 0.1, 1000, 64, 256
  x0_BxL, seg_BxL, pos_BxL = packed_rows(np.random.default_rng(2), batch, seq_len, vocab)
  res = jax.device_get(
    corruption.edit_corrupt_batch(
      jax.random.key(2),
      x0_BxL,
      seg_BxL,
      pos_BxL,
      np.full(batch, alpha, np.float32),
      vocab_size=vocab,
      window=window,
    )
  )
  distance = budget = 0
  for b in range(batch):
    for _, idx in segments(seg_BxL[b]):
      budget += num_edits(len(idx), alpha, alpha)
      distance += levenshtein(x0_BxL[b, idx], res.tokens[b, idx])
  np.testing.assert_array_equal(res.num_edits.sum(), budget)
  assert 0.98 * budget <= distance <= budget, (distance, budget)
  valid_BxL = seg_BxL > 0
  kept = 1 - res.changed.sum() / valid_BxL.sum()
  # Expected: per 10 tokens of budget ~2 substitutions (1 change each) and ~4 pairs
  # (q - p + 1 = 3 changes on average with w = 4): ~14% changed.
  assert 0.82 <= kept <= 0.9, kept


def default_batch(seed, batch=8, seq_len=64, vocab=100):
  """Packed rows, segment ids, positions and alphas for the defaults (vocab 100)."""
  rng = np.random.default_rng(seed)
  rows = packed_rows(rng, batch, seq_len, vocab)
  return (*rows, rng.uniform(0, 0.1, batch).astype(np.float32))


def test_same_key_same_output_different_keys_differ():
  x_BxL, seg_BxL, pos_BxL, alpha_B = default_batch(4)
  seg_BxL[:], pos_BxL[:], alpha_B[:] = 1, np.arange(64), 0.1
  a, b, c = (
    jax.device_get(
      corruption.edit_corrupt_batch(key, x_BxL, seg_BxL, pos_BxL, alpha_B, vocab_size=100)
    )
    for key in (jax.random.key(5), jax.random.key(5), jax.random.key(6))
  )
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.array_equal(a.tokens, c.tokens)
  m5, m5b, m6 = (
    np.asarray(corruption.mask_corrupt(key, x_BxL, alpha_B * 5, seg_BxL > 0)[0])
    for key in (jax.random.key(5), jax.random.key(5), jax.random.key(6))
  )
  np.testing.assert_array_equal(m5, m5b)
  assert not np.array_equal(m5, m6)


def test_no_retrace_for_repeated_calls():
  traces = []

  @jax.jit
  def corrupt(key, x_BxL, seg_BxL, pos_BxL, alpha_B):
    traces.append(None)
    noisy_BxL, _ = corruption.mask_corrupt(key, x_BxL, alpha_B, seg_BxL > 0)
    return corruption.edit_corrupt_batch(key, noisy_BxL, seg_BxL, pos_BxL, alpha_B, vocab_size=100)

  for i in range(4):
    args = default_batch(10 + i)
    corrupt(jax.random.key(i), *args)
    if hasattr(corruption.edit_corrupt_batch, "_cache_size"):  # direct calls
      size = corruption.edit_corrupt_batch._cache_size()
      corruption.edit_corrupt_batch(jax.random.key(i), *args, vocab_size=100)
      assert i == 0 or corruption.edit_corrupt_batch._cache_size() == size
  assert len(traces) == 1


def test_vmap_of_single_sequence_equals_batch_wrapper():
  args = default_batch(6)
  batched = corruption.edit_corrupt_batch(jax.random.key(7), *args, vocab_size=100)
  keys_B = jax.random.split(jax.random.key(7), 8)
  mapped = jax.vmap(lambda *a: corruption.edit_corrupt(*a, vocab_size=100))(keys_B, *args)
  jax.tree.map(np.testing.assert_array_equal, batched, mapped)
  single = corruption.edit_corrupt(keys_B[2], *(a[2] for a in args), vocab_size=100)
  jax.tree.map(lambda s, m: np.testing.assert_array_equal(s, m[2]), single, mapped)


def test_sharded_batch_equals_unsharded():
  assert len(jax.devices()) == 8, "conftest sets 8 simulated CPU devices"
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
  args = default_batch(8)
  args_s = [jax.device_put(a, sharding) for a in args]
  key = jax.random.key(9)
  sharded = corruption.edit_corrupt_batch(key, *args_s, vocab_size=100)
  plain = corruption.edit_corrupt_batch(key, *args, vocab_size=100)
  jax.tree.map(np.testing.assert_array_equal, sharded, plain)
  assert len(sharded.tokens.sharding.device_set) == 8
  masked_s = corruption.mask_corrupt(key, args_s[0], args_s[3] * 5, args_s[1] > 0)
  masked = corruption.mask_corrupt(key, args[0], args[3] * 5, args[1] > 0)
  jax.tree.map(np.testing.assert_array_equal, masked_s, masked)


def test_invalid_edit_args_rejected():
  x_L = jnp.arange(NUM_SPECIAL, NUM_SPECIAL + 8)
  call = lambda **kw: corruption.edit_corrupt(
    jax.random.key(0), x_L, jnp.ones(8, jnp.int32), jnp.arange(8), 0.1, **{"vocab_size": 20, **kw}
  )
  with pytest.raises(ValueError, match="alpha_max"):
    call(alpha_max=-0.1)
  with pytest.raises(ValueError, match="alpha_max"):  # 0.25 * (4 + 1) > 1
    call(alpha_max=0.25)
  with pytest.raises(ValueError, match="must be an int"):
    call(window=-1)
  with pytest.raises(ValueError, match="op_probs"):
    call(op_probs=(0.0, 0.0, 0.0))
  with pytest.raises(ValueError, match="real tokens"):
    call(vocab_size=5)


# ---------------------------------------------------------------- copy baseline


def test_copy_baseline_bits_by_hand():
  # 8 valid positions (PAD = 0 ends the rows), 6 of whose inputs equal their targets
  # (the input at a padding position does not count): f = 6/8. Real tokens: 4..8, 5.
  targets = np.array([[5, 6, 7, 8, 4, 0], [4, 5, 6, 0, 0, 0]])
  inputs = np.array([[5, 6, 7, 4, 4, 7], [4, 8, 6, 0, 0, 0]])
  valid = targets != PAD
  bits, kept = losses.copy_baseline_bits(inputs, targets, valid, num_real=5)
  # -(3/4 log2(3/4) + 1/4 log2((1/4) / 4)) = 3/4 (2 - log2 3) + 1/4 * 4
  by_hand = 0.75 * (2 - math.log2(3)) + 1.0
  assert float(kept) == 0.75
  assert float(bits) == pytest.approx(by_hand, rel=1e-6)  # 1.3112781
  # It is the cross-entropy of the predictor it describes: f on the input token,
  # (1 - f) / 4 on each other real token, nothing on the specials.
  probs = np.where(np.arange(9) >= NUM_SPECIAL, 0.25 / 4, 0.0)[None, None].repeat(6, 1)
  probs = np.broadcast_to(probs, (2, 6, 9)).copy()
  np.put_along_axis(probs, inputs[..., None], 0.75, axis=-1)
  nll = losses.token_nll(jnp.log(probs), targets, MASK)
  assert float(losses.mean_bits(nll, valid)) == pytest.approx(by_hand, rel=1e-6)
  # Nothing kept: log2(num_real - 1) bits; everything kept: 0 bits.
  assert float(losses.copy_baseline_bits(inputs, inputs + 1, valid, 5)[0]) == pytest.approx(2.0)
  assert float(losses.copy_baseline_bits(inputs, inputs, valid, 5)[0]) == 0.0


def test_block_rows_are_a_clean_prefix_and_one_block():
  valid = jnp.ones((64, 40), bool).at[3, 30:].set(False)
  maskable, kept = corruption.block_rows(jax.random.key(0), valid, fraction=0.5, block=8)
  maskable, kept = np.asarray(maskable), np.asarray(kept)
  blocky = ~kept.all(axis=1) | (maskable.sum(1) <= 8)
  assert 16 <= blocky.sum() <= 48  # about half the rows
  for row in np.flatnonzero(~kept.all(axis=1)):
    (inside,) = np.nonzero(maskable[row])
    start = inside[0]
    assert 1 <= start and np.array_equal(inside, np.arange(start, start + 8))
    assert kept[row, : start + 8].all() and not kept[row, start + 8 :].any()
  whole = kept.all(axis=1) & (maskable.sum(1) > 8)
  np.testing.assert_array_equal(maskable[whole], np.asarray(valid)[whole])
  everything, _ = corruption.block_rows(jax.random.key(1), valid, fraction=0.0, block=8)
  np.testing.assert_array_equal(everything, valid)
