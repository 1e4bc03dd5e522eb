"""Tests for sdiff_jax.corruption: mask and edit forward processes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sdiff_jax import corruption

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


def sequential_edits(rng, x0, k, op_probs, vocab_size):
  """The paper's process: z_j = o_j(z_{j-1}), positions uniform on the current sequence."""
  z = list(x0)
  for op in rng.choice(3, size=k, p=op_probs):
    if op == corruption.SUB:
      i, new = rng.integers(len(z)), z[0]
      while new == z[i]:  # rejection: uniform over the real tokens other than z[i]
        new = int(rng.integers(NUM_SPECIAL, vocab_size))
      z[i] = new
    elif op == corruption.DEL:
      del z[rng.integers(len(z))]
    else:
      z.insert(int(rng.integers(len(z) + 1)), int(rng.integers(NUM_SPECIAL, vocab_size)))
  return z


def num_edits(length, alpha):
  """k = floor(length * alpha), in f32 like the implementation."""
  return np.floor(np.float32(length) * np.float32(alpha)).astype(int)


def random_rows(rng, batch, seq_len, vocab_size, lengths_B):
  """Real tokens with BOS first and EOS last, PAD after the length."""
  x_BxL = rng.integers(NUM_SPECIAL, vocab_size, (batch, seq_len)).astype(np.int32)
  x_BxL[:, 0] = BOS
  x_BxL[np.arange(batch), np.maximum(lengths_B - 1, 0)] = EOS
  x_BxL[np.arange(seq_len)[None] >= lengths_B[:, None]] = PAD
  return x_BxL


def is_subsequence(small, big) -> bool:
  it = iter(big)
  return all(any(s == b for b in it) for s in small)


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
      np.asarray, corruption.mask_corrupt(jax.random.key(seed), x_BxL, gamma_B, valid_BxL))
  assert not masked_BxL[~valid_BxL].any()
  np.testing.assert_array_equal(noisy_BxL[~masked_BxL], x_BxL[~masked_BxL])
  np.testing.assert_array_equal(noisy_BxL == MASK, masked_BxL)


# ---------------------------------------------------------------- edit process


@pytest.fixture(scope="module")
def levenshtein_samples():
  """Levenshtein distances of ours and of the sequential reference, same x0s and k."""
  batch, seq_len, length, alpha, vocab = 384, 144, 120, 0.1, 1000  # no truncation
  rng = np.random.default_rng(0)
  x_BxL = rng.integers(NUM_SPECIAL, vocab, (batch, seq_len)).astype(np.int32)
  res = jax.device_get(
      corruption.edit_corrupt_batch(
          jax.random.key(0), x_BxL, np.full(batch, length), np.full(batch, alpha, np.float32),
          vocab_size=vocab,
      )
  )
  k = num_edits(length, alpha)
  ours_B = np.array(
      [levenshtein(x[:length], y[:n]) for x, y, n in zip(x_BxL, res.tokens, res.length)])
  ref_B = np.array([
      levenshtein(x[:length], sequential_edits(rng, x[:length], k, [1 / 3] * 3, vocab))
      for x in x_BxL
  ])
  return k, length, ours_B, ref_B


def test_levenshtein_at_most_k_and_mean_close_to_k(levenshtein_samples):
  k, length, ours_B, _ = levenshtein_samples
  assert k == 12 and ours_B.max() <= k
  # Shortfall: an insertion in the gap right before or after a deleted token acts as one
  # substitution (2 ops, distance 1); rarely a random token also happens to align.
  # Expected adjacent (ins, del) pairs = (k/3)^2 * 2/(length+1) = 0.26 edits = 2.2% of k;
  # measured 0.28 edits (2.3% of k) here, 2.1% at length 200, 3.0% with 16 real tokens.
  shortfall = k - ours_B.mean()
  assert 0.0 < shortfall <= 0.05 * k, shortfall


def test_levenshtein_distribution_matches_sequential_reference(levenshtein_samples):
  k, _, ours_B, ref_B = levenshtein_samples
  # The one-by-one process also cancels when a later op hits a token an earlier op made
  # (delete an inserted token: 0; substitute it twice: 1); about k^2/(2*length) = 0.6 ops
  # per row land on such a token. Measured: reference mean 11.51 vs ours 11.72 (difference
  # 1.8% of k; 1.7% at length 200), KS distance 0.11 (0.14 at length 200).
  diff = ours_B.mean() - ref_B.mean()
  assert 0.0 <= diff <= 0.05 * k, (ours_B.mean(), ref_B.mean())
  assert scipy.stats.ks_2samp(ours_B, ref_B).statistic <= 0.3
  assert ref_B.max() <= k


# Edit tests below share shapes and static arguments: each combination compiles once
# (~2 s on a CPU).
BATCH, SEQ_LEN, ALPHA_MAX, SMALL_VOCAB = 64, 40, 0.4, 6
SINGLE_OPS = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]
MIXED_OPS = (2.0, 3.0, 5.0)  # weights, normalised by edit_corrupt


def edit_rows(seed, lengths_B, alpha, op_probs, vocab=SMALL_VOCAB):
  """x0 rows (BATCH x SEQ_LEN) and their edit corruption."""
  x_BxL = random_rows(np.random.default_rng(seed), BATCH, SEQ_LEN, vocab, lengths_B)
  alpha_B = np.broadcast_to(np.asarray(alpha, np.float32), (BATCH,))
  res = corruption.edit_corrupt_batch(
      jax.random.key(seed), x_BxL, lengths_B, alpha_B,
      vocab_size=vocab, alpha_max=ALPHA_MAX, op_probs=op_probs,
  )
  return x_BxL, jax.device_get(res)


def test_op_counts_match_op_probs():
  counts_3 = 0
  for seed in range(2):
    _, res = edit_rows(seed, np.full(BATCH, SEQ_LEN), ALPHA_MAX, MIXED_OPS)
    counts_3 = counts_3 + np.array([res.num_sub.sum(), res.num_del.sum(), res.num_ins.sum()])
  total = 2 * BATCH * num_edits(SEQ_LEN, ALPHA_MAX)
  assert counts_3.sum() == total
  # Each op is iid categorical: per-type totals within 5 binomial standard deviations.
  p_3 = np.array(MIXED_OPS) / sum(MIXED_OPS)
  sd_3 = np.sqrt(total * p_3 * (1 - p_3))
  assert np.all(np.abs(counts_3 - total * p_3) <= 5 * sd_3), counts_3


@pytest.mark.parametrize("op_probs", SINGLE_OPS)
def test_single_op_kinds(op_probs):
  """Pure substitution changes exactly k tokens in place (BOS/EOS included) to other real
  tokens; pure deletion leaves a subsequence; pure insertion keeps x0 between new tokens."""
  length, alpha = 30, 0.3
  x_BxL, res = edit_rows(2, np.full(BATCH, length), alpha, op_probs)
  k = num_edits(length, alpha)
  for x, y, n, touched in zip(x_BxL[:, :length], res.tokens, res.length, res.touched):
    assert np.all((y[touched] >= NUM_SPECIAL) & (y[touched] < SMALL_VOCAB))
    if op_probs[corruption.SUB]:
      assert n == length and np.all((y[:n] != x) == touched[:n]) and touched.sum() == k
    elif op_probs[corruption.DEL]:
      assert n == length - k and not touched.any() and is_subsequence(y[:n], x)
    else:
      assert n == length + k and touched.sum() == k
      np.testing.assert_array_equal(y[:n][~touched[:n]], x)
  if op_probs[corruption.SUB]:  # BOS at position 0 is substituted in about k/length of rows
    assert 0 < (res.tokens[:, 0] != BOS).sum() < BATCH


def test_insertions_reach_both_ends_and_truncate():
  lengths_B = np.full(BATCH, SEQ_LEN // 2)
  lengths_B[: BATCH // 2] = SEQ_LEN  # full rows overflow: k = 16 insertions, 16 dropped
  x_BxL, res = edit_rows(3, lengths_B, ALPHA_MAX, SINGLE_OPS[corruption.INS])
  np.testing.assert_array_equal(res.length_before_truncation, lengths_B + res.num_ins)
  np.testing.assert_array_equal(res.length, np.minimum(lengths_B + res.num_ins, SEQ_LEN))
  full, short = slice(0, BATCH // 2), slice(BATCH // 2, BATCH)
  assert np.all(res.length_before_truncation[full] == SEQ_LEN + num_edits(SEQ_LEN, ALPHA_MAX))
  for x, y, touched in zip(x_BxL[full], res.tokens[full], res.touched[full]):
    kept = y[~touched]
    np.testing.assert_array_equal(kept, x[: len(kept)])  # x0 truncated, in order
  assert res.touched[short, 0].any()  # before the first token
  last_B = res.length[short] - 1
  assert res.touched[short][np.arange(BATCH // 2), last_B].any()  # after the last token


def default_batch(seed, batch=8, seq_len=64, vocab=100):
  """Rows, lengths and alphas for the default config (vocab 100, alpha_max 0.1)."""
  rng = np.random.default_rng(seed)
  lengths_B = rng.integers(0, seq_len + 1, batch)
  alpha_B = rng.uniform(0, 0.1, batch).astype(np.float32)
  return random_rows(rng, batch, seq_len, vocab, lengths_B), lengths_B, alpha_B


def test_same_key_same_output_different_keys_differ():
  x_BxL, lengths_B, alpha_B = default_batch(4)
  lengths_B[:], alpha_B[:] = 64, 0.1
  a, b, c = (
      jax.device_get(corruption.edit_corrupt_batch(key, x_BxL, lengths_B, alpha_B, vocab_size=100))
      for key in (jax.random.key(5), jax.random.key(5), jax.random.key(6))
  )
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.array_equal(a.tokens, c.tokens)
  m5, m5b, m6 = (
      np.asarray(corruption.mask_corrupt(key, x_BxL, alpha_B * 5, x_BxL != PAD)[0])
      for key in (jax.random.key(5), jax.random.key(5), jax.random.key(6))
  )
  np.testing.assert_array_equal(m5, m5b)
  assert not np.array_equal(m5, m6)


def test_no_retrace_for_repeated_calls():
  traces = []

  @jax.jit
  def corrupt(key, x_BxL, lengths_B, alpha_B):
    traces.append(None)
    noisy_BxL, _ = corruption.mask_corrupt(key, x_BxL, alpha_B, x_BxL != PAD)
    return corruption.edit_corrupt_batch(key, noisy_BxL, lengths_B, alpha_B, vocab_size=100)

  for i in range(4):
    args = default_batch(10 + i)
    corrupt(jax.random.key(i), *args)
    if hasattr(corruption.edit_corrupt_batch, "_cache_size"):  # direct calls
      size = corruption.edit_corrupt_batch._cache_size()
      corruption.edit_corrupt_batch(jax.random.key(i), *args, vocab_size=100)
      assert i == 0 or corruption.edit_corrupt_batch._cache_size() == size
  assert len(traces) == 1


def test_vmap_of_single_sequence_equals_batch_wrapper():
  x_BxL, lengths_B, alpha_B = default_batch(6)
  args = (x_BxL, lengths_B, alpha_B)
  batched = corruption.edit_corrupt_batch(jax.random.key(7), *args, vocab_size=100)
  keys_B = jax.random.split(jax.random.key(7), 8)
  mapped = jax.vmap(lambda *a: corruption.edit_corrupt(*a, vocab_size=100))(keys_B, *args)
  jax.tree.map(np.testing.assert_array_equal, batched, mapped)
  single = corruption.edit_corrupt(keys_B[2], x_BxL[2], lengths_B[2], alpha_B[2], vocab_size=100)
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
  masked_s = corruption.mask_corrupt(key, args_s[0], args_s[2] * 5, args_s[0] != PAD)
  masked = corruption.mask_corrupt(key, args[0], args[2] * 5, args[0] != PAD)
  jax.tree.map(np.testing.assert_array_equal, masked_s, masked)


def test_invalid_edit_args_rejected():
  x_L = jnp.arange(NUM_SPECIAL, NUM_SPECIAL + 8)
  with pytest.raises(ValueError, match="alpha_max"):
    corruption.edit_corrupt(jax.random.key(0), x_L, 8, 0.1, vocab_size=20, alpha_max=-0.1)
  with pytest.raises(ValueError, match="op_probs"):
    corruption.edit_corrupt(jax.random.key(0), x_L, 8, 0.1, vocab_size=20, op_probs=(0.0, 0.0, 0.0))
  with pytest.raises(ValueError, match="real tokens"):
    corruption.edit_corrupt(jax.random.key(0), x_L, 8, 0.1, vocab_size=5)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    config=st.sampled_from([((1 / 3, 1 / 3, 1 / 3), 300), (MIXED_OPS, SMALL_VOCAB)]
                           + [(ops, SMALL_VOCAB) for ops in SINGLE_OPS]),
)
def test_edit_invariants(seed, config):
  op_probs, vocab = config
  rng = np.random.default_rng(seed)
  lengths_B = rng.integers(0, SEQ_LEN + 1, BATCH)
  alpha_B = rng.uniform(0, ALPHA_MAX, BATCH).astype(np.float32)
  x_BxL, res = edit_rows(seed, lengths_B, alpha_B, op_probs, vocab)
  k_B = num_edits(lengths_B, alpha_B)
  np.testing.assert_array_equal(res.num_sub + res.num_del + res.num_ins, k_B)
  for op, num_B in zip(range(3), (res.num_sub, res.num_del, res.num_ins)):
    assert op_probs[op] > 0 or not num_B.any()
  np.testing.assert_array_equal(res.length_before_truncation, lengths_B + res.num_ins - res.num_del)
  np.testing.assert_array_equal(res.length, np.minimum(res.length_before_truncation, SEQ_LEN))
  for b in range(BATCH):
    x, n0 = x_BxL[b], lengths_B[b]
    y, n, touched = res.tokens[b], res.length[b], res.touched[b]
    assert np.all(y[n:] == PAD) and not touched[n:].any()
    assert np.all((y[touched] >= NUM_SPECIAL) & (y[touched] < vocab))
    overflow = res.length_before_truncation[b] - n  # truncation deletes these
    assert levenshtein(x[:n0], y[:n]) <= k_B[b] + overflow
    kept = y[:n][~touched[:n]]  # surviving originals, in order
    assert is_subsequence(kept, x[:n0])
    if res.length_before_truncation[b] <= SEQ_LEN:
      assert touched.sum() == res.num_sub[b] + res.num_ins[b]
      assert len(kept) == n0 - res.num_sub[b] - res.num_del[b]
