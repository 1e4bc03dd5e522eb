"""Samplers: commit rules on a hand-made model, EOS, batching, cache exactness, one compile."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sdiff_jax import sampling
from sdiff_jax.models import ModelConfig, Transformer
from sdiff_jax.models.attention_masks import block_causal_mask, causal_mask
from sdiff_jax.sampling import BOS, EOS, MASK, PAD, Settings

VOCAB = 16
NUM_ALLOWED = VOCAB - 3  # MASK, PAD and BOS are never sampled


# ----------------------------------------------------------------------------- hand-made model


@dataclasses.dataclass(frozen=True)
class TableDecoder(sampling.Decoder):
  """Logits read from a table by position; table `late` once a row's input has < 3 MASKs."""

  cfg: ModelConfig = ModelConfig(vocab_size=VOCAB)

  def apply(self, params, tokens_BxT, positions_BxT, mask_BxTxS, cache, cache_index):
    late_B = jnp.sum(tokens_BxT == MASK, axis=1) < 3
    logits_BxTxV = jnp.where(
      late_B[:, None, None], params["late"][positions_BxT], params["early"][positions_BxT]
    )
    return logits_BxTxV, cache

  def init_cache(self, batch, length):
    return jnp.zeros((1, batch, length))  # [layers, B, S] like a real cache


def _confidence_logit(p: float) -> float:
  """The logit giving one token probability p against NUM_ALLOWED - 1 zero logits."""
  return float(np.log(p * (NUM_ALLOWED - 1) / (1 - p)))


def _table(spec: dict[int, tuple[int, float]], length: int = 40) -> np.ndarray:
  """position -> (token, confidence) as a [length, VOCAB] logit table."""
  table = np.zeros((length, VOCAB), np.float32)
  for pos, (token, p) in spec.items():
    table[pos, token] = _confidence_logit(p)
  return table


def _run(spec, settings, late_spec=None):
  early = _table(spec)
  params = {"early": early, "late": early if late_spec is None else _table(late_spec)}
  prompt_BxP, lens_B = sampling.left_pad([[BOS]])
  return sampling.generate(TableDecoder(), params, prompt_BxP, lens_B, jax.random.key(0), settings)


# prompt [BOS] at position 0: generated token g sits at position g + 1
CONFIDENCES = [0.9, 0.3, 0.6, 0.2, 0.5, 0.8, 0.4, 0.7]
SPEC = {g + 1: (4 + g, c) for g, c in enumerate(CONFIDENCES)}


def test_fixed_count_commits_most_confident_first():
  g = _run(SPEC, Settings(max_new_tokens=8, block_size=4, steps_per_block=2))
  np.testing.assert_array_equal(g.tokens[0], 4 + np.arange(8))
  # block 0 confidences .9 .3 .6 .2 -> two per step; block 1: .5 .8 .4 .7
  np.testing.assert_array_equal(g.commit_step[0], [0, 1, 0, 1, 1, 0, 1, 0])
  assert int(g.nfe) == 1 + 2 * 2 and list(g.block_steps) == [2, 2]
  assert g.tokens_per_forward == pytest.approx(8 / 5)


def test_threshold_commits_all_above_it_and_finishes_on_time():
  g = _run(SPEC, Settings(max_new_tokens=8, block_size=4, steps_per_block=4, threshold=0.55))
  # block 0: step 0 commits .9 and .6; then one per step (.3, then .2)
  # block 1: step 0 commits .8 and .7; then .5, then .4
  np.testing.assert_array_equal(g.commit_step[0], [0, 1, 0, 2, 1, 0, 2, 0])
  assert list(g.block_steps) == [3, 3]
  # a step budget of 2 forces ceil(remaining / steps_left) when few are confident
  g = _run(SPEC, Settings(max_new_tokens=8, block_size=4, steps_per_block=2, threshold=0.85))
  np.testing.assert_array_equal(g.commit_step[0], [0, 1, 0, 1, 1, 0, 1, 0])


def test_eos_ends_the_row_and_the_loop():
  spec = dict(SPEC)
  spec[6] = (EOS, 0.95)  # generated index 5, in block 1 with .5 (before it), .4 and .8
  g = _run(spec, Settings(max_new_tokens=16, block_size=4, steps_per_block=4))
  np.testing.assert_array_equal(g.tokens[0], [4, 5, 6, 7, 8, EOS] + [PAD] * 10)
  assert int(g.lengths[0]) == 6
  # block 1, one commit a step: EOS first; then only the .5 before it is needed; then stop
  assert list(g.block_steps) == [4, 2, 0, 0] and int(g.nfe) == 1 + 6
  np.testing.assert_array_equal(g.commit_step[0, 4:8], [1, 0, -1, -1])
  # AR (a query predicts the next position) stops at EOS too; suppress_eos runs to the end
  ar_spec = {pos - 1: v for pos, v in spec.items()}
  ar = _run(ar_spec, Settings(attention="causal", max_new_tokens=16))
  np.testing.assert_array_equal(ar.tokens[0], g.tokens[0])
  assert int(ar.nfe) == 6
  full = _run(ar_spec, Settings(attention="causal", max_new_tokens=16, suppress_eos=True))
  assert int(full.lengths[0]) == 16 and EOS not in np.asarray(full.tokens)


def test_self_correction_rewrites_a_confident_disagreement():
  spec = {1: (4, 0.6), 2: (5, 0.5), 3: (6, 0.4), 4: (7, 0.3)}
  late = {1: (9, 0.95), 2: (5, 0.5), 3: (6, 0.4), 4: (7, 0.3)}  # seen from step 2 on
  settings = Settings(max_new_tokens=4, block_size=4, steps_per_block=4)
  plain = _run(spec, settings, late_spec=late)
  np.testing.assert_array_equal(plain.tokens[0], [4, 5, 6, 7])
  fixed = _run(spec, dataclasses.replace(settings, self_correction=True), late_spec=late)
  np.testing.assert_array_equal(fixed.tokens[0], [9, 5, 6, 7])
  np.testing.assert_array_equal(fixed.commit_step[0], [2, 1, 2, 3])
  strict = _run(
    spec,
    dataclasses.replace(settings, self_correction=True, correction_threshold=0.99),
    late_spec=late,
  )
  np.testing.assert_array_equal(strict.tokens[0], [4, 5, 6, 7])


def test_bad_settings_are_named():
  with pytest.raises(ValueError, match="steps_per_block"):
    Settings(block_size=8, steps_per_block=9).validate()
  with pytest.raises(ValueError, match="attention"):
    Settings(attention="sideways").validate()


# ----------------------------------------------------------------------------- real (tiny) model

CFG = ModelConfig(
  vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
)
DECODER = sampling.Decoder(CFG)
PROMPTS = [[BOS, 7, 8, 9, 10, 11, 12], [BOS, 20]]  # the second is left-padded by 5 in a batch
APPLY = jax.jit(Transformer(CFG).apply)
NEEDED = jax.jit(sampling._needed)
DENOISE_UPDATE = jax.jit(sampling._denoise_update, static_argnums=6)


@pytest.fixture(scope="module")
def params():
  tokens = jnp.zeros((1, 4), jnp.int32)
  init = jax.jit(lambda key: Transformer(CFG).init(key, tokens, tokens, jnp.ones((1, 4, 4), bool)))
  params = nn.meta.unbox(init(jax.random.key(0))["params"])
  # sharper than at init, so that confidences spread over (0, 1) and thresholds matter
  kernel = 0.5 * jax.random.normal(jax.random.key(1), params["unembed"]["kernel"].shape)
  return {**params, "unembed": {"kernel": kernel}}


def _generate(params, prompts, settings, key=0):
  prompt_BxP, lens_B = sampling.left_pad(prompts)
  return sampling.generate(DECODER, params, prompt_BxP, lens_B, jax.random.key(key), settings)


def _reference_block_causal(params, prompt, s: Settings):
  """Greedy; recomputes the whole sequence every step with the training mask, no cache.

  Returns the generated tokens (PAD after EOS) and the denoising steps of each block.
  """
  size = s.block_size
  lead = (-len(prompt)) % size  # left padding puts the prompt's end on a block boundary
  start = lead + len(prompt)
  num_blocks = -(-s.max_new_tokens // size)
  length = start + num_blocks * size
  seg_1xL = jnp.asarray([[0] * lead + [1] * (length - lead)])
  pos_1xL = jnp.maximum(jnp.arange(length) - lead, 0)[None]
  mask = block_causal_mask(seg_1xL, size)
  clean = np.full((1, length), PAD, np.int32)
  clean[0, lead:start] = prompt
  block_steps = [0] * num_blocks
  for j, block_start in enumerate(range(start, length, size)):
    block_BxK = jnp.full((1, size), MASK, jnp.int32)
    commit_BxK = jnp.full((1, size), -1, jnp.int32)
    valid_K = j * size + jnp.arange(size) < s.max_new_tokens
    for step in range(s.steps_per_block):
      needed_BxK = NEEDED(block_BxK, jnp.ones((1,), bool), valid_K)
      if not bool(jnp.any(needed_BxK & (block_BxK == MASK))):
        break
      noisy = clean.copy()
      noisy[:, block_start : block_start + size] = block_BxK
      logits, _ = APPLY(
        {"params": params},
        jnp.concatenate([noisy, clean], 1),
        jnp.concatenate([pos_1xL, pos_1xL], 1),
        mask,
      )
      block_BxK, commit_BxK = DENOISE_UPDATE(
        logits[:, block_start : block_start + size],
        block_BxK,
        commit_BxK,
        needed_BxK,
        jnp.int32(step),
        jax.random.key(0),
        s,
      )
      block_steps[j] += 1
    clean[:, block_start : block_start + size] = block_BxK
    if EOS in clean[0, start:]:
      break
  out = clean[0, start : start + s.max_new_tokens]
  eos = np.flatnonzero(out == EOS)
  if eos.size:
    out[eos[0] + 1 :] = PAD
  return np.where(out == MASK, PAD, out), block_steps


@pytest.mark.parametrize(
  "settings",
  [
    Settings(attention="block_causal", max_new_tokens=20, block_size=8, steps_per_block=4),
    Settings(
      attention="block_causal",
      max_new_tokens=16,
      block_size=4,
      steps_per_block=4,
      threshold=0.7,
      self_correction=True,
      correction_threshold=0.8,
    ),
  ],
)
def test_cached_block_causal_batch_equals_uncached_recomputation(params, settings):
  got = _generate(params, PROMPTS, settings)
  assert MASK not in np.asarray(got.tokens) and BOS not in np.asarray(got.tokens)
  steps = []
  for row, prompt in enumerate(PROMPTS):
    want, block_steps = _reference_block_causal(params, prompt, settings)
    np.testing.assert_array_equal(got.tokens[row], want)
    steps.append(block_steps)
  steps = np.max(steps, axis=0)  # the batch runs a block until its slowest row is done
  np.testing.assert_array_equal(got.block_steps, steps)
  assert int(got.nfe) == 1 + steps.sum() + np.count_nonzero(steps) - 1  # + clean forwards


def test_cached_ar_batch_equals_uncached_recomputation(params):
  settings = Settings(attention="causal", max_new_tokens=12)
  got = _generate(params, PROMPTS, settings)
  length = max(map(len, PROMPTS)) + settings.max_new_tokens
  for row, prompt in enumerate(PROMPTS):
    tokens = np.full((1, length), PAD, np.int32)
    tokens[0, : len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + settings.max_new_tokens):
      seg_1xL = jnp.asarray(np.arange(length) < i, jnp.int32)[None]
      logits, _ = APPLY({"params": params}, tokens, jnp.arange(length)[None], causal_mask(seg_1xL))
      tokens[0, i] = int(sampling._sample(logits[:, i - 1 : i], None, settings)[0][0, 0])
    want = tokens[0, len(prompt) : len(prompt) + settings.max_new_tokens]
    eos = np.flatnonzero(want == EOS)
    if eos.size:
      want[eos[0] + 1 :] = PAD
    np.testing.assert_array_equal(got.tokens[row], want)


def test_bidirectional_rows_alone_equal_rows_in_a_batch(params):
  """No uncached reference exists for the approximate cache: batching must not change it."""
  settings = Settings(
    attention="bidirectional", max_new_tokens=16, block_size=8, steps_per_block=4, threshold=0.5
  )
  batch = _generate(params, PROMPTS, settings)
  for row, prompt in enumerate(PROMPTS):
    alone = _generate(params, [prompt], settings)
    np.testing.assert_array_equal(alone.tokens[0], batch.tokens[row])
    np.testing.assert_array_equal(alone.commit_step[0], batch.commit_step[row])
  assert MASK not in np.asarray(batch.tokens)


def test_one_compilation_for_repeated_calls(params):
  settings = Settings(attention="block_causal", max_new_tokens=8, block_size=8, steps_per_block=2)
  before = sampling._generate._cache_size()
  _generate(params, [[BOS, 4, 5], [BOS, 6, 7]], settings, key=1)
  _generate(params, [[BOS, 9, 9], [BOS, 8]], settings, key=2)
  assert sampling._generate._cache_size() == before + 1


def test_sharded_sampling_equals_one_device_and_follows_the_key(params):
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()), ("data",))
  prompt_BxP, lens_B = sampling.left_pad([PROMPTS[i % 2] + [4 + i] for i in range(8)])
  rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  settings = Settings(
    attention="bidirectional",
    cache_mode="recompute",
    max_new_tokens=16,
    block_size=8,
    steps_per_block=4,
    self_correction=True,
    temperature=1.0,
    top_p=0.9,
  )
  want = sampling.generate(DECODER, params, prompt_BxP, lens_B, jax.random.key(0), settings)
  sharded = (
    jax.device_put(params, replicated),
    jax.device_put(prompt_BxP, rows),
    jax.device_put(lens_B, rows),
  )
  got = sampling.generate(DECODER, *sharded, jax.random.key(0), settings)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  assert got.tokens.sharding.spec[0] == "data"
  other = sampling.generate(DECODER, *sharded, jax.random.key(1), settings)
  assert not np.array_equal(other.tokens, want.tokens)
