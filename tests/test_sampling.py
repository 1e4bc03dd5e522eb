"""Samplers: commit rules on a hand-made model, EOS, batching, cache exactness, one compile;
which tokens every forward reads (a recording model), fold = recompute = uncached reference."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sdiff_jax import sampling, trajectories
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

  def apply(self, params, tokens_BxT, positions_BxT, mask_BxTxS, cache, cache_index, outputs=None):
    late_B = jnp.sum(tokens_BxT == MASK, axis=1) < 3
    logits_BxTxV = jnp.where(
      late_B[:, None, None], params["late"][positions_BxT], params["early"][positions_BxT]
    )
    return _outputs(logits_BxTxV, outputs), cache

  def init_cache(self, batch, length):
    return jnp.zeros((1, batch, length))  # [layers, B, S] like a real cache


def _outputs(logits_BxTxV, outputs):
  """The logits a decoder returns for `outputs=(lo, hi)` (None: all)."""
  return logits_BxTxV if outputs is None else logits_BxTxV[:, outputs[0] : outputs[1]]


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


def test_left_pad_to_a_fixed_length():
  prompt_BxP, lens_B = sampling.left_pad([[BOS, 5], [BOS]], length=4)
  np.testing.assert_array_equal(
    prompt_BxP, [[sampling.PAD] * 2 + [BOS, 5], [sampling.PAD] * 3 + [BOS]]
  )
  np.testing.assert_array_equal(lens_B, [2, 1])
  with pytest.raises(ValueError, match="more than length=1"):
    sampling.left_pad([[BOS, 5]], length=1)


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


def test_left_to_right_commits_the_leftmost_and_the_confident_run_after_them():
  g = _run(SPEC, Settings(max_new_tokens=8, block_size=4, steps_per_block=2, order="left_to_right"))
  np.testing.assert_array_equal(g.tokens[0], 4 + np.arange(8))
  np.testing.assert_array_equal(g.commit_step[0], [0, 0, 1, 1, 0, 0, 1, 1])
  # threshold .55: block 0 (.9 .3 .6 .2) commits .9, then .3 (not .6, which follows it),
  # then .6, then .2; confidence order commits .9 and .6 at once (above)
  s = Settings(max_new_tokens=8, block_size=4, steps_per_block=4, threshold=0.55)
  g = _run(SPEC, dataclasses.replace(s, order="left_to_right"))
  np.testing.assert_array_equal(g.commit_step[0], [0, 1, 2, 3, 0, 1, 2, 3])
  # threshold .25: a run of confident tokens from the left goes at once
  g = _run(SPEC, dataclasses.replace(s, threshold=0.25, order="left_to_right"))
  np.testing.assert_array_equal(g.commit_step[0], [0, 0, 0, 1, 0, 0, 0, 0])
  assert list(g.block_steps) == [2, 1]
  with pytest.raises(ValueError, match="sampling order='random'"):
    Settings(order="random").validate()


@pytest.mark.parametrize(
  "settings",
  [
    Settings(
      max_new_tokens=12, block_size=4, steps_per_block=4, threshold=0.25, order="left_to_right"
    ),
    Settings(max_new_tokens=12, block_size=4, steps_per_block=4, threshold=0.55),
    Settings(max_new_tokens=12, block_size=4, steps_per_block=2),
    Settings(max_new_tokens=12, block_size=4, steps_per_block=2, cache_mode="recompute"),
    Settings(attention="causal", max_new_tokens=12),
  ],
  ids=["left_to_right-threshold", "confidence-threshold", "fixed", "recompute", "ar"],
)
def test_row_nfe_counts_the_forwards_a_row_would_take_decoded_alone(settings):
  # rows of different prompt lengths read the table at shifted positions: different
  # confidences and an EOS at a different generated index
  spec = {**SPEC, 8: (EOS, 0.95)}
  if settings.attention == "causal":
    spec = {pos - 1: v for pos, v in spec.items()}
  table = _table(spec)
  params = {"early": table, "late": table}
  prompts = [[BOS], [BOS, 5], [BOS, 5, 6]]
  decode = lambda rows: sampling.generate(  # noqa: E731
    TableDecoder(), params, *sampling.left_pad(rows), jax.random.key(0), settings
  )
  batch = decode(prompts)
  alone = [decode([p]) for p in prompts]
  for b, one in enumerate(alone):
    np.testing.assert_array_equal(batch.tokens[b], one.tokens[0])
    assert int(batch.row_nfe[b]) == int(one.row_nfe[0]) == int(one.nfe)
  assert int(batch.nfe) >= max(int(one.nfe) for one in alone)
  lengths = sum(int(one.lengths[0]) for one in alone)
  assert batch.tokens_per_forward == pytest.approx(lengths / sum(int(o.nfe) for o in alone))


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


def test_a_stop_id_ends_the_row_as_eos():
  """An imported model's own eos (a `stop_ids` token) ends the row and is recorded as EOS,
  in block and AR decoding alike; without stop_ids it is an ordinary token."""
  spec = dict(SPEC)
  spec[6] = (11, 0.95)  # generated index 5 samples token 11
  settings = Settings(max_new_tokens=16, block_size=4, steps_per_block=4)
  plain = _run(spec, settings)
  assert plain.tokens[0][5] == 11 and int(plain.lengths[0]) > 6
  stopped = _run(spec, dataclasses.replace(settings, stop_ids=(11,)))
  np.testing.assert_array_equal(stopped.tokens[0], [4, 5, 6, 7, 8, EOS] + [PAD] * 10)
  ar_spec = {pos - 1: v for pos, v in spec.items()}
  ar = _run(ar_spec, Settings(attention="causal", max_new_tokens=16, stop_ids=(11,)))
  np.testing.assert_array_equal(ar.tokens[0], stopped.tokens[0])
  with pytest.raises(ValueError, match="stop_ids"):
    Settings(stop_ids=(EOS,)).validate()


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
  with pytest.raises(ValueError, match="suffix_mask"):
    Settings(attention="block_causal", suffix_mask=True).validate()
  with pytest.raises(ValueError, match="cache_mode"):
    Settings(cache_mode="approx").validate()  # renamed: fold (default) or last_forward (old)


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


def _generate(params, prompts, settings, key=0, decoder=DECODER):
  prompt_BxP, lens_B = sampling.left_pad(prompts)
  return sampling.generate(decoder, params, prompt_BxP, lens_B, jax.random.key(key), settings)


def _reference_block_causal(params, prompt, s: Settings):
  """Greedy; recomputes the whole sequence every step with the training mask, no cache.
  With `shift`, a position's logits are those the objective trains (`Objective.logits`):
  the noisy copy's output before it, for a block's first token the clean copy's.

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
      source = np.arange(block_start, block_start + size)
      if s.shift:
        source = np.where(source == block_start, length + source - 1, source - 1)
      block_BxK, commit_BxK = DENOISE_UPDATE(
        logits[:, source],
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
    Settings(
      attention="block_causal",
      max_new_tokens=20,
      block_size=4,
      steps_per_block=3,
      threshold=0.6,
      shift=True,
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
  assert int(got.nfe) == 1 + steps.sum()  # the clean block j-1 rides in block j's 1st forward


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


@pytest.mark.parametrize("cache_mode", ["fold", "last_forward"])
def test_bidirectional_rows_alone_equal_rows_in_a_batch(params, cache_mode):
  """Batching must not change a row (`last_forward`: its scratch K/V stay its own)."""
  settings = Settings(
    attention="bidirectional",
    max_new_tokens=16,
    block_size=8,
    steps_per_block=4,
    threshold=0.5,
    cache_mode=cache_mode,
  )
  batch = _generate(params, PROMPTS, settings)
  for row, prompt in enumerate(PROMPTS):
    alone = _generate(params, [prompt], settings)
    np.testing.assert_array_equal(alone.tokens[0], batch.tokens[row])
    np.testing.assert_array_equal(alone.commit_step[0], batch.commit_step[row])
  assert MASK not in np.asarray(batch.tokens)


@pytest.mark.parametrize(
  "settings",
  [
    Settings(max_new_tokens=24, block_size=8, steps_per_block=2, cache_windows=3),
    Settings(max_new_tokens=24, block_size=8, steps_per_block=1, shift=True),
    Settings(max_new_tokens=24, block_size=8, steps_per_block=2, cache_mode="recompute"),
    Settings(attention="block_causal", max_new_tokens=24, block_size=8, steps_per_block=2),
    Settings(attention="causal", max_new_tokens=24, cache_windows=3),
  ],
)
def test_the_compiled_generation_never_copies_the_cache(params, settings):
  """Forwards write K/V in place: no instruction of the compiled loop copies a whole cache
  buffer (a `lax.cond` over the cache used to copy it at every block)."""
  prompt_BxP, lens_B = sampling.left_pad(PROMPTS)
  hlo = (
    sampling._generate.lower(DECODER, settings, params, prompt_BxP, lens_B, jax.random.key(0))
    .compile()
    .as_text()
  )
  slots = prompt_BxP.shape[1] + 24
  shape = f"f32[1,{len(PROMPTS)},{slots},{CFG.n_kv_heads},{CFG.head_dim}]"
  assert f" {shape}" in hlo  # the cache is there ...
  copies = [line for line in hlo.splitlines() if shape in line and " copy(" in line]
  assert copies == []  # ... and never copied


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


# ----------------------------------------------------------------------------- bidirectional cache

RECORDS = []  # one dict per forward of RecordingDecoder, in order


def _record(tokens_BxT, positions_BxT, mask_BxTxS, cache_BxS, cache_index):
  RECORDS.append(
    dict(
      tokens=np.asarray(tokens_BxT),
      positions=np.asarray(positions_BxT),
      mask=np.asarray(mask_BxTxS),
      cache=np.asarray(cache_BxS),
      index=int(cache_index),
    )
  )


@dataclasses.dataclass(frozen=True)
class RecordingDecoder(sampling.Decoder):
  """Logits read from a random table by position; its "cache" holds, per slot, the input token
  whose K/V a real model would have written there, and each forward is recorded (its input,
  positions, mask and the cache it attends over)."""

  cfg: ModelConfig = ModelConfig(vocab_size=VOCAB)

  def apply(self, params, tokens_BxT, positions_BxT, mask_BxTxS, cache, cache_index, outputs=None):
    cache = jax.lax.dynamic_update_slice_in_dim(cache, tokens_BxT[None], cache_index, axis=2)
    jax.debug.callback(_record, tokens_BxT, positions_BxT, mask_BxTxS, cache[0], cache_index)
    return _outputs(params["table"][positions_BxT], outputs), cache

  def init_cache(self, batch, length):
    return jnp.full((1, batch, length), -1, jnp.int32)  # [layers, B, S] like a real cache


RECORDING_PROMPTS = [[BOS, 7, 8, 9, 10, 11, 12], [BOS, 5]]


def _recorded_run(settings):
  """Generates for RECORDING_PROMPTS; (generation, forwards, padded prompt length, prompt lengths)."""
  table = 3.0 * jax.random.normal(jax.random.key(3), (256, VOCAB))
  prompt_BxP, lens_B = sampling.left_pad(RECORDING_PROMPTS)
  RECORDS.clear()
  gen = sampling.generate(
    RecordingDecoder(), {"table": table}, prompt_BxP, lens_B, jax.random.key(0), settings
  )
  jax.block_until_ready(gen)
  return gen, list(RECORDS), prompt_BxP.shape[1], lens_B


def _unseen(settings):
  """(committed tokens never an input of a forward: {(row, generated index)} outside the last
  block; cached slots a forward read that did not hold their final token: {(row, index)})."""
  gen, records, prompt_len, lens_B = _recorded_run(settings)
  tokens_BxG = np.asarray(gen.tokens)
  assert len(records) == int(gen.nfe)  # NFE counts the forwards that ran
  last_block = (settings.max_new_tokens - 1) // settings.block_size * settings.block_size
  never_input, stale = set(), set()
  for row, final_G in enumerate(tokens_BxG):
    inputs = {
      (int(p), int(t)) for r in records for p, t in zip(r["positions"][row], r["tokens"][row])
    }
    never_input |= {
      (row, g) for g in range(last_block) if (lens_B[row] + g, final_G[g]) not in inputs
    }
    for r in records:
      own_S = np.zeros(r["cache"].shape[1], bool)
      own_S[r["index"] : r["index"] + r["tokens"].shape[1]] = True
      read_S = np.zeros_like(own_S)  # the mask covers the forward's attention window
      read_S[: r["mask"].shape[2]] = r["mask"][row].any(axis=0)
      read_S &= ~own_S
      for slot in np.flatnonzero(read_S[prompt_len : prompt_len + len(final_G)]):
        if r["cache"][row, prompt_len + slot] != final_G[slot]:
          stale.add((row, int(slot)))
  return never_input, stale


RECORDED_SETTINGS = [
  Settings(max_new_tokens=28, block_size=8, steps_per_block=4, suppress_eos=True),
  Settings(max_new_tokens=24, block_size=8, steps_per_block=4, threshold=0.6, suppress_eos=True),
  Settings(max_new_tokens=16, block_size=4, steps_per_block=1, suppress_eos=True),
]


@pytest.mark.parametrize("settings", RECORDED_SETTINGS)
@pytest.mark.parametrize(
  "cache_mode,shift",
  [("fold", False), ("recompute", False), ("last_forward", False), ("fold", True)],
)
def test_every_committed_token_is_read_by_later_forwards(settings, cache_mode, shift):
  """fold (the default) and recompute: every committed token outside the last block is an input
  of a later forward, and every cached slot any forward reads holds its final token.
  last_forward (the old approx) breaks both: its last step's commits stay MASK in the cache."""
  never_input, stale = _unseen(dataclasses.replace(settings, cache_mode=cache_mode, shift=shift))
  if cache_mode == "last_forward":
    # the last step of each block but the last commits ceil(size / steps) tokens (>= 1 with a
    # threshold), which are the slots that the next blocks read stale
    finished_blocks = (settings.max_new_tokens - 1) // settings.block_size
    last_step = 1 if settings.threshold else -(-settings.block_size // settings.steps_per_block)
    assert len(stale) >= len(RECORDING_PROMPTS) * finished_blocks * last_step
    # a row done before the others is fed its whole block again, but those K/V are dropped
    assert never_input and never_input <= stale
  else:
    assert never_input == set() and stale == set()


def test_attention_windows_hold_what_each_forward_reads_and_change_nothing():
  """Four windows over four blocks: each forward's queries attend over the slots up to its
  block's end only (the prefill, always: the prompt), and the tokens, NFE and reads are those
  of one window over the whole cache."""
  settings = dataclasses.replace(RECORDED_SETTINGS[0], cache_windows=4)
  gen, records, prompt_len, _ = _recorded_run(settings)
  size, widths = settings.block_size, [r["mask"].shape[2] for r in records]
  assert widths[0] == prompt_len and widths == sorted(widths)
  assert sorted(set(widths[1:])) == [prompt_len + size * j for j in (1, 2, 3, 4)]
  assert all(r["index"] + r["tokens"].shape[1] <= r["mask"].shape[2] for r in records)
  one, one_records, _, _ = _recorded_run(dataclasses.replace(settings, cache_windows=1))
  assert {r["mask"].shape[2] for r in one_records[1:]} == {one_records[0]["cache"].shape[1]}
  np.testing.assert_array_equal(gen.tokens, one.tokens)
  assert int(gen.nfe) == int(one.nfe)
  assert _unseen(settings) == (set(), set())


def _own_masks(records, length):
  """[B, T, T] masks among the input tokens of the recorded forwards of `length` tokens."""
  return [
    (r["mask"][:, :, r["index"] : r["index"] + length], r["index"])
    for r in records[1:]
    if r["tokens"].shape[1] == length
  ]


def test_fold_forward_is_block_causal_between_its_halves():
  settings = RECORDED_SETTINGS[0]
  _, records, _, _ = _recorded_run(settings)
  size = settings.block_size
  folds = _own_masks(records, 2 * size)
  assert len(folds) == -(-settings.max_new_tokens // size) - 1  # blocks 1.. start with one
  for own_BxTxT, _ in folds:
    assert not own_BxTxT[:, :size, size:].any()  # block j-1 does not see block j
    assert own_BxTxT[:, :size, :size].all() and own_BxTxT[:, size:].all()


def test_suffix_mask_forwards_see_the_suffix_up_to_max_new_tokens():
  settings = dataclasses.replace(RECORDED_SETTINGS[0], suffix_mask=True)
  assert _unseen(settings) == (set(), set())
  gen, records, prompt_len, _ = _recorded_run(settings)
  size, end = settings.block_size, prompt_len + settings.max_new_tokens
  suffix = -(-settings.max_new_tokens // size) * size - size
  assert records[0]["tokens"].shape[1] == prompt_len + suffix + size  # prefill: the buffer
  masks = _own_masks(records, size + suffix) + _own_masks(records, 2 * size + suffix)
  assert len(masks) == len(records) - 1
  for own_BxTxT, start in masks:
    length = own_BxTxT.shape[1]
    seen_T = start + np.arange(length) < end
    seen_T[: length - suffix] = True
    # every query sees every token of the forward, the suffix only before max_new_tokens
    np.testing.assert_array_equal(
      own_BxTxT[:, : length - suffix],
      np.broadcast_to(seen_T, (own_BxTxT.shape[0], length - suffix, length)),
    )
  # the table model ignores its input: same tokens and NFE with or without the suffix
  plain, _, _, _ = _recorded_run(RECORDED_SETTINGS[0])
  np.testing.assert_array_equal(gen.tokens, plain.tokens)
  assert int(gen.nfe) == int(plain.nfe)


def test_fold_costs_no_extra_forward():
  """Same commits (the table model's logits depend on positions only), so the NFE compare:
  fold = last_forward (the old approx) = 1 + denoising forwards; recompute: + 1 a block."""
  for settings in RECORDED_SETTINGS:
    gens = {
      mode: _recorded_run(dataclasses.replace(settings, cache_mode=mode))[0]
      for mode in ("fold", "recompute", "last_forward")
    }
    steps = np.asarray(gens["fold"].block_steps)
    for gen in gens.values():
      np.testing.assert_array_equal(gen.tokens, gens["fold"].tokens)
      np.testing.assert_array_equal(gen.block_steps, steps)
    assert int(gens["fold"].nfe) == int(gens["last_forward"].nfe) == 1 + steps.sum()
    assert int(gens["recompute"].nfe) == 1 + steps.sum() + np.count_nonzero(steps) - 1


REFERENCE_LENGTH = 128  # the uncached reference's input, padded: one compilation


def _reference_bidirectional(params, prompt, s: Settings, apply=APPLY):
  """Greedy; no cache: every forward recomputes the prompt and the finished blocks from their
  tokens. The prompt and each finished block see themselves and the blocks before them (with
  `suffix_mask` also their own tail: MASK from their end to max_new_tokens); the block being
  denoised sees the prompt, the finished blocks and itself (and its tail).

  Returns the generated tokens (PAD after EOS) and the denoising steps of each block.
  """
  size, n = s.block_size, len(prompt)
  num_blocks = -(-s.max_new_tokens // size)
  end = n + s.max_new_tokens
  finished, block_steps = [], [0] * num_blocks
  for j in range(num_blocks):
    block_BxK = jnp.full((1, size), MASK, jnp.int32)
    commit_BxK = jnp.full((1, size), -1, jnp.int32)
    valid_K = j * size + jnp.arange(size) < s.max_new_tokens
    for step in range(s.steps_per_block):
      needed_BxK = NEEDED(block_BxK, jnp.ones((1,), bool), valid_K)
      if not bool(jnp.any(needed_BxK & (block_BxK == MASK))):
        break
      parts = [(np.asarray(prompt), 0)] + [
        (np.asarray(b)[0], n + i * size) for i, b in enumerate(finished + [block_BxK])
      ]
      tokens, positions, group, tail = [], [], [], []
      for g, (part, first) in enumerate(parts):
        tail_len = max(end - first - len(part), 0) if s.suffix_mask else 0
        tokens += list(part) + [MASK] * tail_len
        positions += list(range(first, first + len(part) + tail_len))
        group += [g] * (len(part) + tail_len)
        tail += [False] * len(part) + [True] * tail_len
      length = len(tokens)
      assert length <= REFERENCE_LENGTH
      group_L = np.array(group + [-1] * (REFERENCE_LENGTH - length))
      tail_L = np.array(tail + [True] * (REFERENCE_LENGTH - length))
      mask_LxL = (group_L[None, :] == group_L[:, None]) | (
        (group_L[None, :] < group_L[:, None]) & ~tail_L[None, :]
      )
      mask_LxL &= (group_L[None, :] >= 0) | np.eye(REFERENCE_LENGTH, dtype=bool)
      logits, _ = apply(
        {"params": params},
        jnp.asarray([tokens + [PAD] * (REFERENCE_LENGTH - length)], jnp.int32),
        jnp.asarray([positions + [0] * (REFERENCE_LENGTH - length)]),
        jnp.asarray(mask_LxL[None]),
      )
      first = length - size - (max(end - parts[-1][1] - size, 0) if s.suffix_mask else 0)
      first -= bool(s.shift)  # shift: the output before each position predicts it
      block_BxK, commit_BxK = DENOISE_UPDATE(
        logits[:, first : first + size],
        block_BxK,
        commit_BxK,
        needed_BxK,
        jnp.int32(step),
        jax.random.key(0),
        s,
      )
      block_steps[j] += 1
    finished.append(block_BxK)
    if EOS in np.asarray(block_BxK):
      break
  out = np.concatenate([np.asarray(b)[0] for b in finished])[: s.max_new_tokens]
  out = np.concatenate([out, np.full(s.max_new_tokens - len(out), PAD, np.int32)])
  eos = np.flatnonzero(out == EOS)
  if eos.size:
    out[eos[0] + 1 :] = PAD
  return np.where(out == MASK, PAD, out), block_steps


REFERENCE_SETTINGS = Settings(max_new_tokens=20, block_size=8, steps_per_block=4, threshold=0.6)


@pytest.mark.parametrize("suffix_mask,shift", [(False, False), (True, False), (False, True)])
def test_fold_and_recompute_equal_the_uncached_reference(params, suffix_mask, shift):
  settings = dataclasses.replace(REFERENCE_SETTINGS, suffix_mask=suffix_mask, shift=shift)
  fold = _generate(params, PROMPTS, settings)
  recompute = _generate(params, PROMPTS, dataclasses.replace(settings, cache_mode="recompute"))
  assert MASK not in np.asarray(fold.tokens)
  steps = []
  for row, prompt in enumerate(PROMPTS):
    want, block_steps = _reference_bidirectional(params, prompt, settings)
    np.testing.assert_array_equal(fold.tokens[row], want)
    np.testing.assert_array_equal(recompute.tokens[row], want)
    steps.append(block_steps)
  steps = np.max(steps, axis=0)
  np.testing.assert_array_equal(fold.block_steps, steps)
  assert int(fold.nfe) == 1 + steps.sum()
  assert int(recompute.nfe) == 1 + steps.sum() + np.count_nonzero(steps) - 1
  if not shift:  # the old approximation reads MASK where its last steps committed: other tokens
    old = _generate(params, PROMPTS, dataclasses.replace(settings, cache_mode="last_forward"))
    assert not np.array_equal(old.tokens, fold.tokens)


def test_one_block_after_a_prompt_shorter_than_the_block(params):
  """Nothing to fold: one block after a short prompt decodes (fold's 2-block input would not
  fit the cache) and equals the uncached reference."""
  settings = dataclasses.replace(REFERENCE_SETTINGS, max_new_tokens=8)
  for shift in (False, True):
    s = dataclasses.replace(settings, shift=shift)
    gen = _generate(params, PROMPTS, s)
    for row, prompt in enumerate(PROMPTS):
      np.testing.assert_array_equal(gen.tokens[row], _reference_bidirectional(params, prompt, s)[0])


@pytest.mark.parametrize(
  "settings",
  [
    dataclasses.replace(REFERENCE_SETTINGS, shift=True),
    dataclasses.replace(REFERENCE_SETTINGS, cache_mode="recompute", temperature=1.0),
    Settings(attention="block_causal", max_new_tokens=20, block_size=8, steps_per_block=4),
    Settings(attention="causal", max_new_tokens=12, temperature=1.0),
  ],
)
def test_attention_windows_equal_one_window_on_a_real_model(params, settings):
  one = _generate(params, PROMPTS, dataclasses.replace(settings, cache_windows=1))
  three = _generate(params, PROMPTS, dataclasses.replace(settings, cache_windows=3))
  for name in ("tokens", "commit_step", "block_steps", "nfe"):
    np.testing.assert_array_equal(getattr(three, name), getattr(one, name))


@pytest.mark.parametrize("settings", RECORDED_SETTINGS[:2])
def test_trajectory_states_replay_the_sampler_inputs(settings):
  """`trajectories.states` rebuilds, from the tokens and commit steps alone, the block every
  denoising forward of the sampler read (recompute: each such forward is the block alone)."""
  settings = dataclasses.replace(settings, cache_mode="recompute")
  gen, records, prompt_len, _ = _recorded_run(settings)
  size = settings.block_size
  denoising = [r for r in records[1:] if r["tokens"].shape[1] == size]  # prefill excluded
  by_block, n = [], 0
  for j, steps in enumerate(np.asarray(gen.block_steps)):
    n += j > 0  # the rewrite of block j - 1
    by_block.append(denoising[n : n + steps])
    n += steps
  for row in range(len(RECORDING_PROMPTS)):
    length = int(gen.lengths[row])
    tokens, commit = gen.tokens[row, :length], gen.commit_step[row, :length]
    replayed = list(trajectories.states(tokens, commit, size))
    assert sum(len(np.flatnonzero(c)) for *_, c in replayed) == length
    for j, step, state, _ in replayed:
      read = by_block[j][step]["tokens"][row]
      np.testing.assert_array_equal(state[j * size :], read[: state.size - j * size])


CFG_NEXT = dataclasses.replace(CFG, read_next=True)


def test_read_next_model_fold_and_recompute_equal_the_uncached_reference(params):
  """model.read_next: output t also reads position t + 1's final state, which every
  denoising forward holds (shift puts the token before the block first)."""
  tokens = jnp.zeros((1, 4), jnp.int32)
  init = Transformer(CFG_NEXT).init(jax.random.key(0), tokens, tokens, jnp.ones((1, 4, 4), bool))
  read_next = nn.meta.unbox(init["params"])["read_next"]
  kernel = 0.5 * jax.random.normal(jax.random.key(2), read_next["kernel"].shape)
  params_next = {**params, "read_next": {"kernel": kernel}}
  settings = dataclasses.replace(REFERENCE_SETTINGS, shift=True)
  decoder = sampling.Decoder(CFG_NEXT)
  fold = _generate(params_next, PROMPTS, settings, decoder=decoder)
  recompute = _generate(
    params_next, PROMPTS, dataclasses.replace(settings, cache_mode="recompute"), decoder=decoder
  )
  apply = jax.jit(Transformer(CFG_NEXT).apply)
  for row, prompt in enumerate(PROMPTS):
    want, _ = _reference_bidirectional(params_next, prompt, settings, apply=apply)
    np.testing.assert_array_equal(fold.tokens[row], want)
    np.testing.assert_array_equal(recompute.tokens[row], want)
  # the term matters: without it the same weights decode other tokens
  assert not np.array_equal(fold.tokens, _generate(params, PROMPTS, settings).tokens)


def test_fold_equals_recompute_when_sampling_and_self_correcting(params):
  settings = Settings(
    max_new_tokens=24,
    block_size=8,
    steps_per_block=4,
    temperature=1.0,
    top_p=0.9,
    self_correction=True,
    correction_threshold=0.5,
  )
  fold = _generate(params, PROMPTS, settings, key=3)
  recompute = _generate(params, PROMPTS, dataclasses.replace(settings, cache_mode="recompute"), 3)
  np.testing.assert_array_equal(fold.tokens, recompute.tokens)
  np.testing.assert_array_equal(fold.commit_step, recompute.commit_step)
  np.testing.assert_array_equal(fold.block_steps, recompute.block_steps)


@dataclasses.dataclass(frozen=True)
class MaskBlindDecoder(sampling.Decoder):
  """The tiny model, except that no query attends to a MASK input: a MASK suffix is invisible."""

  def apply(self, params, tokens_BxT, positions_BxT, mask_BxTxS, cache, cache_index, outputs=None):
    masked_BxS = jax.lax.dynamic_update_slice_in_dim(
      jnp.zeros(mask_BxTxS.shape[::2], bool), tokens_BxT == MASK, cache_index, axis=1
    )
    mask_BxTxS &= ~masked_BxS[:, None, :]
    return super().apply(params, tokens_BxT, positions_BxT, mask_BxTxS, cache, cache_index, outputs)


def test_suffix_mask_compiles_once_and_changes_nothing_for_a_model_blind_to_it(params):
  settings = Settings(max_new_tokens=20, block_size=8, steps_per_block=4, threshold=0.6)
  prompt_BxP, lens_B = sampling.left_pad(PROMPTS)
  blind = MaskBlindDecoder(CFG)
  key = jax.random.key(0)
  plain = sampling.generate(blind, params, prompt_BxP, lens_B, key, settings)
  suffix = dataclasses.replace(settings, suffix_mask=True)
  before = sampling._generate._cache_size()
  got = sampling.generate(blind, params, prompt_BxP, lens_B, key, suffix)
  np.testing.assert_array_equal(got.tokens, plain.tokens)
  assert int(got.nfe) == int(plain.nfe)
  other_BxP, other_lens_B = sampling.left_pad([[BOS, 3, 4, 5, 6, 7, 8], [BOS, 9]])
  sampling.generate(blind, params, other_BxP, other_lens_B, jax.random.key(1), suffix)
  assert sampling._generate._cache_size() == before + 1
