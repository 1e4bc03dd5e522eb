"""On-policy step reduction (`sdiff_jax.onpolicy`): the length surrogate against its
Levenshtein definition and its sign, the leave-one-out baseline, the REINFORCE loss
(zero expected gradient for a constant reward, finite gradients on real rollouts),
the guards, and a short on-policy run."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import shifted_objective, tiny_config
from sdiff_jax import onpolicy, train, trajectories
from sdiff_jax.data import sources
from sdiff_jax.data import tokenizer as tokenizer_lib
from sdiff_jax.objective import Objective

M = tokenizer_lib.MASK_ID


def _levenshtein(a, b) -> int:
  """Reference edit distance (one row of the dynamic programme at a time)."""
  previous = list(range(len(b) + 1))
  for i, x in enumerate(a, 1):
    current = [i]
    for j, y in enumerate(b, 1):
      current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
    previous = current
  return previous[-1]


def test_surrogate_is_the_mean_inverse_levenshtein_distance_between_states():
  rng = np.random.default_rng(0)
  for size, block in [(12, 4), (9, 4), (16, 8)]:
    tokens = rng.integers(4, 8, size).tolist()  # few symbols: shifted alignments are tempting
    commit = np.concatenate([rng.integers(0, 3, block) for _ in range(math.ceil(size / block))])
    commit = commit[:size].tolist()
    # every state of the whole generation: before each step (the first is all MASK), then
    # the output
    full = [
      np.concatenate([state, np.full(size - state.size, M)])
      for _, _, state, _ in trajectories.states(tokens, commit, block)
    ] + [np.asarray(tokens)]
    assert (full[0] == M).all()
    pairs = [(i, j) for i in range(len(full)) for j in range(i + 1, len(full))]
    want = size * np.mean([1 / _levenshtein(list(full[i]), list(full[j])) for i, j in pairs])
    counts = onpolicy.step_counts(commit, block)
    assert len(counts) == len(full) - 1
    assert onpolicy.surrogate_steps(counts) == pytest.approx(want)


def test_surrogate_prefers_fewer_larger_jumps():
  assert onpolicy.surrogate_steps([16]) == pytest.approx(1.0)
  assert onpolicy.surrogate_steps([8, 8]) == pytest.approx(5 / 3)
  even = [onpolicy.surrogate_steps([16 // k] * k) for k in (1, 2, 4, 8, 16)]
  assert even == sorted(even) and len(set(even)) == 5  # more steps: a larger surrogate
  assert onpolicy.surrogate_steps([12, 4]) < onpolicy.surrogate_steps([4, 4, 4, 4])
  with pytest.raises(ValueError, match="every step must commit"):
    onpolicy.surrogate_steps([3, 0, 2])


def test_leave_one_out_baseline():
  np.testing.assert_allclose(
    onpolicy.leave_one_out_advantages(np.full((3, 4), 0.7)), 0.0, atol=1e-12
  )
  got = onpolicy.leave_one_out_advantages(np.array([[1.0, 0.0, 0.0, 0.0]]))
  np.testing.assert_allclose(got, [[1.0, -1 / 3, -1 / 3, -1 / 3]])


def test_reinforce_with_a_constant_reward_has_zero_expected_gradient(code_corpus_dir):
  """Every value x of one committed position, weighted by its probability p(x | state):
  sum_x p(x) c grad(-log p(x)) = -c grad sum_x p(x) = 0, through the real loss."""
  objective, params = shifted_objective(code_corpus_dir)
  objective.config.onpolicy.anchor_weight = 0.0
  state = np.array([tokenizer_lib.BOS_ID, 9, 10, 11, M, M, M], np.int32)
  batch = {"segment_ids": jnp.ones((1, 7), jnp.int32), "positions": jnp.arange(7)[None]}
  logits = objective.logits(params, jnp.asarray(state[None]), {**batch, "tokens": state[None]})
  p = jax.nn.softmax(logits[0, 5].at[M].set(-jnp.inf))
  values = np.flatnonzero(np.asarray(p) > 0)
  rows = len(values)
  tokens = np.tile(state, (rows, 1))
  tokens[:, 5] = values
  weight = np.zeros((rows, 7), np.float32)
  weight[:, 5] = 3.0 * np.asarray(p)[values] * rows  # the loss divides by the rows

  def loss_of(w):
    pair = {"state": np.tile(state, (rows, 1)), "tokens": tokens, "weight": w}
    pair["committed"] = (weight != 0).astype(np.int32)
    pair |= {
      "segment_ids": np.ones((rows, 7), np.int32),
      "positions": np.tile(np.arange(7), (rows, 1)),
    }
    full = {f"pair_{k}": jnp.asarray(v) for k, v in pair.items()}
    full |= {k: jnp.asarray(pair[k]) for k in ("tokens", "segment_ids", "positions")}
    return lambda q: objective(q, full, jax.random.key(0), "onpolicy")[0]

  expected = jax.jit(jax.grad(loss_of(weight)))(params)
  one = np.zeros_like(weight)
  one[0, 5] = 3.0 * rows  # a single sample's term, for scale
  single = jax.jit(jax.grad(loss_of(one)))(params)
  norm = lambda g: float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g))))  # noqa: E731
  assert norm(single) > 0
  assert norm(expected) < 1e-4 * norm(single)


def test_rollouts_rows_rewards_and_finite_gradients(code_corpus_dir):
  config = tiny_config(code_corpus_dir)
  config.onpolicy.update(
    enabled=True, samples=4, prompt_len=48, max_new_tokens=16, steps_per_block=4
  )
  config.onpolicy.threshold = 0.0  # every masked token: one forward per block
  tok = tokenizer_lib.ByteTokenizer()
  texts = sources.load_corpus(str(code_corpus_dir), "train", config.data.valid_fraction)
  rollouts = onpolicy.Rollouts(config, tok, texts, rows=8)
  objective = Objective(config, tok.vocab_size)
  params = objective.init_params(jax.random.key(0), config.data.seq_len)
  sampled = rollouts.sample(params, step=0)
  assert len(sampled) == 8
  for r in sampled:
    assert r.steps == math.ceil(len(r.tokens) / config.diffusion.block_size)  # threshold 0
    assert r.surrogate == pytest.approx(
      onpolicy.surrogate_steps(onpolicy.step_counts(r.commit_step, 16))
    )
    assert r.reward == pytest.approx(r.verified - 0.1 * r.surrogate * 16 / len(r.tokens))
  rewards = np.array([r.reward for r in sampled]).reshape(2, 4)
  clipped = np.clip(onpolicy.leave_one_out_advantages(rewards), -1, 1).ravel()
  np.testing.assert_allclose([r.advantage for r in sampled], clipped)
  # the same step draws the same prompts and samples
  assert [r.tokens for r in rollouts.sample(params, step=0)] == [r.tokens for r in sampled]

  rows, metrics = rollouts(params, step=0)
  assert rows["pair_state"].shape == (8, 64) and metrics["onpolicy_steps"] >= 1
  weight, state = rows["pair_weight"], rows["pair_state"]
  # weights sit on tokens committed from the state (MASK there), as advantage x K / 16
  assert np.all(state[weight != 0] == M)
  for row, r in enumerate(sampled):
    nonzero = weight[row][weight[row] != 0]
    np.testing.assert_allclose(nonzero, r.advantage * r.steps / 16, rtol=1e-6)
  np.testing.assert_array_equal(rows["pair_committed"] > 0, weight != 0)  # no zero advantage
  assert "pair_reference_nll" not in rows
  # the KL anchor's model: the starting parameters give a zero KL
  rollouts.reference = params
  rows, _ = rollouts(params, step=0)
  real = {k: rows[f"pair_{k}"] for k in ("tokens", "segment_ids", "positions")}
  batch = {k: jnp.asarray(v) for k, v in {**rows, **real}.items()}
  config.onpolicy.anchor_weight = 1.0
  (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
    params, batch, jax.random.key(0), "onpolicy"
  )
  assert np.isfinite(float(loss)) and "anchor_loss" in metrics
  assert float(metrics["onpolicy_kl"]) == pytest.approx(0.0, abs=1e-5)
  assert float(loss) == pytest.approx(
    float(metrics["onpolicy_policy_loss"]) + float(metrics["anchor_loss"]), rel=1e-5
  )
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  # away from the start the KL estimate is positive
  moved = jax.tree.map(lambda p: p * 1.5, params)
  _, metrics = objective(moved, batch, jax.random.key(0), "onpolicy")
  assert float(metrics["onpolicy_kl"]) > 1e-4


def test_verifiers():
  from sdiff_jax.evaluate.validity import FunctionPrompt

  prompt = FunctionPrompt('def f(x):\n    """Twice x."""', "    return 2 * x\n", "    ")
  completions = ["\n    y = x + x\n    return y\n", "\n    return (((\n", "\n" + "    x\n" * 20]
  np.testing.assert_array_equal(onpolicy.Parses()([prompt] * 3, completions, [True] * 3), [1, 0, 1])
  varied = onpolicy.Varied(tokenizer_lib.ByteTokenizer(), min_entropy=2.0)(
    [prompt] * 3, completions, [True] * 3
  )
  assert varied[0] == 1.0 and varied[2] < 0.7  # the repeated line: low unigram entropy


def test_unit_test_verifier_needs_documents_with_tests(code_corpus_dir):
  config = tiny_config(code_corpus_dir)
  config.onpolicy.update(enabled=True, prompt_len=48, max_new_tokens=16, verifiers="tests")
  texts = sources.load_corpus(str(code_corpus_dir), "train", config.data.valid_fraction)
  with pytest.raises(ValueError, match="data.source='tasks'"):
    onpolicy.Rollouts(config, tokenizer_lib.ByteTokenizer(), texts, rows=8)
  # the task testbed's documents carry asserts: every rollout is run against them
  config = tiny_config("tasks")
  config.data.seq_len = 512
  config.onpolicy.update(
    enabled=True, prompt_len=448, max_new_tokens=32, verifiers="tests", num_prompts=16
  )
  tok = tokenizer_lib.ByteTokenizer()
  rollouts = onpolicy.Rollouts(config, tok, sources.load_corpus("tasks", "train"), rows=8)
  assert all(p.tests.startswith("assert ") for p in rollouts.prompts)
  # a task's prompt carries its helper, which the body may call (the tasks suite's prompt)
  assert [tok.decode(ids) for ids in rollouts.prompt_ids] == [
    p.context + p.prompt for p in rollouts.prompts
  ]
  assert any(p.context.startswith("def is_") for p in rollouts.prompts)
  params = Objective(config, tok.vocab_size).init_params(jax.random.key(0), 512)
  assert {r.verified for r in rollouts.sample(params, step=0)} == {0.0}  # untrained: all fail


def test_onpolicy_run_trains_and_resumes(code_corpus_dir, tmp_path):
  config = tiny_config(code_corpus_dir, num_steps=4, log_every=2, eval_every=4, checkpoint_every=2)
  config.onpolicy.update(
    enabled=True, samples=4, prompt_len=48, max_new_tokens=16, steps_per_block=4, kl_weight=0.0
  )
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result.metrics and np.isfinite(result.metrics["eval_loss"])
  config.train.num_steps = 6
  resumed = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert int(resumed.state.step) == 6


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("samples", 3, "divide train.batch_size"),
    ("samples", 1, "at least 2"),
    ("verifiers", "parse,unit", "some of parse, varied, judge, tests"),
    ("kl_weight", 0.5, "train.init_from, which is not set"),
    ("verifiers", "judge", "needs a causal workdir"),
    ("max_new_tokens", 64, "exceeds data.seq_len"),
    ("temperature", 0.0, "must be positive"),
    ("advantage_clip", -1.0, "must not be negative"),
  ],
)
def test_bad_onpolicy_config_is_named(code_corpus_dir, field, value, message):
  from sdiff_jax import config_lib

  config = tiny_config(code_corpus_dir)
  config.onpolicy.update(enabled=True, prompt_len=48, max_new_tokens=16, kl_weight=0.0)
  config.onpolicy[field] = value
  with pytest.raises(ValueError, match=f"onpolicy\\.\\w+.*{message}"):
    config_lib.validate(config)
