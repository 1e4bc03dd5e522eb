r"""On-policy step reduction (Seed Diffusion section 3.3): fewer denoising steps for the
same outputs, learnt from the model's own trajectories.

    python -m sdiff_jax.main --config=configs/quickstart.py --workdir=/tmp/onpolicy \
        --config.train.init_from=/tmp/distilled --config.onpolicy.enabled=True \
        --config.train.num_steps=100 --config.train.learning_rate=3e-4

Objective (the paper's Eq. 10, minimised): E_{prompt, tau ~ p_theta}[ |tau| - V(tau_0) ].

* Trajectories. Every step samples `onpolicy.samples` trajectories for each of
  train.batch_size / samples prompts (`def` line + docstring of a training function,
  `evaluate.validity.function_prompts`) with the current parameters and the block sampler
  in threshold mode: at most `steps_per_block` forwards per block, each committing the
  share that finishes the block on time and every other masked token whose sampled
  value has probability above `threshold`, at `temperature` (1: the model's own
  distribution, so the estimator below is unbiased; other values make it off-policy).
  No self-correction, so committed tokens never change. A confident model commits more
  per forward, so |tau| is something the parameters control.
* |tau|, by the paper's progressive surrogate (its Eq. 11): with tau[K] all-MASK and
  tau[0] the output, `surrogate_steps` = G * mean over the pairs i < j of
  1 / d_Lev(tau[i], tau[j]) (G: generated tokens). For 1, 2, 4 equal jumps it is
  1, 1.67, 2.57: it grows with the step count, more slowly than |tau|. Without
  self-correction d_Lev is exactly the number of tokens committed between the two
  states: changes only turn MASK into tokens, an alignment must delete or substitute
  every MASK of the earlier state that the later one lacks, so no alignment beats the
  position-wise count (tested against a Levenshtein reference on replayed states).
* V, pluggable verifiers with scores in [0, 1], multiplied (every one must pass;
  `onpolicy.verifiers`): "parse" (the completion, trimmed as the validity suite trims
  it, parses after its prompt: `evaluate.validity.score`), "varied" (min(1, H /
  `min_entropy`), H the unigram entropy in bits of the completion's tokens: repetition
  parses, and without this check the parse reward alone collapsed the model onto it,
  measured), "judge" (its bits per token under a causal judge workdir are at most
  `judge_bits`) and "tests" (the function with the completion's body, between the
  training document's lines above it and its asserts after it, passes in the sandbox:
  the task testbed's documents carry such asserts, `data.source="tasks"`; a completion
  the sandbox could not run gets the mean score of the others, never a failure).
* Reward R = verifier_weight * V - length_weight * surrogate_steps * max_new_tokens / G:
  the surrogate is scaled to the full generation length, so that a trajectory that
  stops early (EOS) does not look shorter (measured: unscaled, the mean generation
  length fell with the step count). The verifier term has no gradient path but the
  samples, and the surrogate none either (it counts discrete commits), so both go
  through the log-derivative (REINFORCE) estimator:

      grad E[R] = E[(R - b) grad log p_theta(tau)],
      log p_theta(tau) = sum over steps s, tokens i committed at s of log p_theta(x_i | tau_s)

  (the commit rule itself, a deterministic function of the confidences, is not
  differentiated). The baseline b of a trajectory is the mean reward of the other
  trajectories of its prompt (leave-one-out), which keeps the estimator unbiased; a
  constant reward gives zero advantages. log p(tau) is estimated with one state per
  trajectory drawn uniformly from its K steps, weighted by K (unbiased), and the loss
  is divided by max_new_tokens (a constant). `Objective.onpolicy_loss` is the loss.
* Guards against collapse: advantages clipped to [-advantage_clip, advantage_clip];
  a KL anchor to the starting model (train.init_from): kl_weight times the mean over
  the policy rows' committed tokens of exp(d) - d - 1, d = log p_start(x) - log
  p_theta(x), an unbiased, non-negative estimate of KL(p_theta || p_start) for tokens
  sampled from p_theta (the start's log-probabilities come with the rows); the
  likelihood anchor, anchor_weight times the pre-training loss (mask ELBO + edit term)
  on real training rows at every step; the "varied" verifier; the mean unigram entropy
  of the completions is logged (`onpolicy_entropy`: repetition shows there first).

Runs on one process (sampling reads this process's rows only).
"""

import dataclasses
import functools
from typing import Protocol, Sequence

import jax
import ml_collections
import numpy as np

from sdiff_jax import config_lib, inference, sampling, trajectories
from sdiff_jax.data import tasks as tasks_lib
from sdiff_jax.data import tokenizer as tokenizer_lib
from sdiff_jax.evaluate import judge as judge_lib
from sdiff_jax.evaluate import validity
from sdiff_jax.objective import Objective

FunctionPrompt = validity.FunctionPrompt


@functools.partial(jax.jit, static_argnums=0)
def _token_nll(objective: Objective, params, rows: dict[str, jax.Array]) -> jax.Array:
  """float32[rows, L]: -log p(tokens | state) per position (nats)."""
  return objective.state_nll(params, rows["state"], rows)


def step_counts(commit_step: Sequence[int], block_size: int) -> list[int]:
  """Tokens committed by each step of a trajectory, in order (block by block)."""
  counts = []
  commit_G = np.asarray(commit_step)
  for start in range(0, commit_G.size, block_size):
    _, per_step = np.unique(commit_G[start : start + block_size], return_counts=True)
    counts += per_step.tolist()
  return counts


def surrogate_steps(counts: Sequence[int]) -> float:
  """G * mean over state pairs i < j of 1 / (tokens committed between them): the paper's
  surrogate of |tau| (module docstring), from the tokens each step committed."""
  committed = np.concatenate([[0], np.cumsum(np.asarray(counts, np.float64))])
  if committed.size < 2 or np.any(np.diff(committed) <= 0):
    raise ValueError(f"every step must commit a token, got {list(counts)}")
  i, j = np.triu_indices(committed.size, 1)
  return float(committed[-1] * np.mean(1.0 / (committed[j] - committed[i])))


def leave_one_out_advantages(rewards_GxS: np.ndarray) -> np.ndarray:
  """R - (mean reward of the other samples of the same prompt), per [prompt, sample]."""
  samples = rewards_GxS.shape[1]
  others = (rewards_GxS.sum(axis=1, keepdims=True) - rewards_GxS) / (samples - 1)
  return rewards_GxS - others


class Verifier(Protocol):
  """Scores each completion of a prompt in [0, 1]."""

  name: str

  def __call__(
    self, prompts: Sequence[FunctionPrompt], completions: Sequence[str], ended: Sequence[bool]
  ) -> np.ndarray: ...


class Parses:
  """1 where the completion parses after its prompt (`evaluate.validity.score`)."""

  name = "parse"

  def __call__(self, prompts, completions, ended):
    return np.array(
      [validity.score(p, c, e)["parses"] for p, c, e in zip(prompts, completions, ended)]
    )


class JudgeLikelihood:
  """1 where a causal judge model gives the completion at most `max_bits` bits per token."""

  name = "judge"

  def __init__(self, workdir: str, max_bits: float):
    self.model, self.max_bits = inference.load_model(workdir), max_bits

  def __call__(self, prompts, completions, ended):
    bits, counts = judge_lib.completion_bits(self.model, [p.prompt for p in prompts], completions)
    return ((bits / np.maximum(counts, 1) <= self.max_bits) & (counts > 0)).astype(np.float64)


class Varied:
  """min(1, H / min_entropy), H the unigram entropy (bits) of the completion's tokens."""

  name = "varied"

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer, min_entropy: float):
    self.tokenizer, self.min_entropy = tokenizer, min_entropy

  def __call__(self, prompts, completions, ended):
    entropy = np.array([judge_lib.unigram_entropy(self.tokenizer.encode(c)) for c in completions])
    return np.minimum(1.0, entropy / self.min_entropy)


class UnitTests:
  """1 where the completion's program passes the training document's asserts (sandbox)."""

  name = "tests"

  def __call__(self, prompts, completions, ended):
    from sdiff_jax.evaluate import tasks as tasks_suite  # pylint: disable=g-import-not-at-top

    programs = [validity.program(p, c, e) for p, c, e in zip(prompts, completions, ended)]
    passed = tasks_suite.run_programs(programs).passed
    scores = np.array([np.nan if p is None else float(p) for p in passed])
    known = scores[~np.isnan(scores)]
    return np.where(np.isnan(scores), known.mean() if known.size else 0.0, scores)


def make_verifiers(
  o: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer
) -> list[Verifier]:
  """The verifiers `onpolicy.verifiers` names."""
  made = {
    "parse": Parses,
    "varied": lambda: Varied(tokenizer, o.min_entropy),
    "judge": lambda: JudgeLikelihood(o.judge, o.judge_bits),
    "tests": UnitTests,
  }
  return [made[name]() for name in o.verifiers.split(",")]


@dataclasses.dataclass
class Rollout:
  """One sampled trajectory and what it earned."""

  prompt: list[int]  # BOS + prompt tokens
  tokens: list[int]  # generated, EOS included when sampled
  commit_step: list[int]
  text: str
  verified: float  # V in [0, 1]
  steps: int  # |tau|: forwards that committed one of its tokens
  surrogate: float
  reward: float = 0.0
  advantage: float = 0.0


class Rollouts:
  """Per training step: trajectories of the current parameters, their rewards and the
  policy-gradient rows, [rows, prompt_len + max_new_tokens] each: `pair_state`,
  `pair_tokens`, `pair_segment_ids`, `pair_positions`, `pair_committed` (int32) and
  `pair_weight` (float32; see `Objective.onpolicy_loss`), plus `pair_reference_nll`
  (float32, nats) when `reference` holds the KL anchor's parameters."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    tokenizer: tokenizer_lib.Tokenizer,
    texts: Sequence[str],
    rows: int,
  ):
    if jax.process_count() > 1:
      raise ValueError("the on-policy stage runs on one process (onpolicy.enabled)")
    o = self.options = config.onpolicy
    self.config, self.tokenizer, self.rows = config, tokenizer, rows
    self.prompts, self.prompt_ids = [], []
    tests = "tests" in o.verifiers.split(",")
    # A task's prompt carries its helper (the body may call it), as the tasks suite's does.
    on_tasks = tasks_lib.is_source(config.data.source)
    for item in validity.function_prompts(texts, o.num_prompts):
      ids = [tokenizer_lib.BOS_ID] + tokenizer.encode(
        item.context + item.prompt if on_tasks else item.prompt
      )
      if len(ids) <= o.prompt_len and (item.tests or not tests):
        self.prompts.append(item)
        self.prompt_ids.append(ids)
    groups = rows // o.samples
    if len(self.prompts) < groups:
      raise ValueError(
        f"{len(self.prompts)} training functions with a docstring"
        + (" and asserts after them (the 'tests' verifier)" if tests else "")
        + f" fit onpolicy.prompt_len={o.prompt_len} tokens, {groups} needed per step: raise "
        "prompt_len or num_prompts"
        + (", or train on a corpus with tests (data.source='tasks')" if tests else "")
      )
    self.settings = inference.settings_for(
      config,
      tokenizer=tokenizer,
      steps_per_block=o.steps_per_block,
      threshold=o.threshold,
      temperature=o.temperature,
      max_new_tokens=o.max_new_tokens,
    )
    self.decoder = sampling.Decoder(config_lib.model_config(config, tokenizer.vocab_size))
    self.verifiers = make_verifiers(o, tokenizer)
    self.length = o.prompt_len + o.max_new_tokens
    self.objective = Objective(config, tokenizer.vocab_size)
    self.reference = None  # the KL anchor's parameters (set by the training loop)

  def sample(self, params, step: int) -> list[Rollout]:
    """The trajectories of step `step` (prompts and keys depend on the seed and step only)."""
    o, s = self.options, self.settings
    rng = np.random.default_rng([self.config.seed, step])
    chosen = rng.choice(len(self.prompts), self.rows // o.samples, replace=False)
    order = [int(n) for n in chosen for _ in range(o.samples)]
    prompt_BxP, lens_B = sampling.left_pad([self.prompt_ids[n] for n in order], o.prompt_len)
    key = jax.random.fold_in(jax.random.key(self.config.seed + 3), step)
    gen = jax.device_get(sampling.generate(self.decoder, params, prompt_BxP, lens_B, key, s))
    out = []
    for row, n in enumerate(order):
      size = int(gen.lengths[row])
      tokens = [int(t) for t in gen.tokens[row, :size]]
      commit = [int(c) for c in gen.commit_step[row, :size]]
      counts = step_counts(commit, s.block_size)
      out.append(
        Rollout(
          prompt=self.prompt_ids[n],
          tokens=tokens,
          commit_step=commit,
          text=self.tokenizer.decode(tokens),
          verified=0.0,
          steps=len(counts),
          surrogate=surrogate_steps(counts),
        )
      )
    ended = [r.tokens[-1] == tokenizer_lib.EOS_ID for r in out]
    texts = [r.text for r in out]
    verdicts = np.prod(
      [v([self.prompts[n] for n in order], texts, ended) for v in self.verifiers], axis=0
    )
    length = np.array([r.surrogate * o.max_new_tokens / len(r.tokens) for r in out])
    rewards = o.verifier_weight * verdicts - o.length_weight * length
    advantages = leave_one_out_advantages(rewards.reshape(-1, o.samples)).ravel()
    advantages = np.clip(advantages, -o.advantage_clip, o.advantage_clip)
    for r, v, reward, advantage in zip(out, verdicts, rewards, advantages):
      r.verified, r.reward, r.advantage = float(v), float(reward), float(advantage)
    return out

  def rows_of(self, rollouts: Sequence[Rollout], step: int) -> dict[str, np.ndarray]:
    """One uniformly drawn state per trajectory, weighted for the policy gradient."""
    rng = np.random.default_rng([self.config.seed, step, 1])
    shape = (len(rollouts), self.length)
    out = {
      name: np.zeros(shape, np.int32) for name in ("state", "tokens", "segment_ids", "positions")
    }
    out["weight"] = np.zeros(shape, np.float32)
    out["committed"] = np.zeros(shape, np.int32)
    for row, r in enumerate(rollouts):
      replay = list(trajectories.states(r.tokens, r.commit_step, self.settings.block_size))
      _, _, state, committed = replay[int(rng.integers(len(replay)))]
      prompt, size = len(r.prompt), len(r.prompt) + state.size
      out["state"][row, :size] = np.concatenate([r.prompt, state])
      out["tokens"][row, :size] = r.prompt + r.tokens[: state.size]
      out["segment_ids"][row, :size] = 1
      out["positions"][row, :size] = np.arange(size)
      scale = r.advantage * len(replay) / self.options.max_new_tokens
      out["weight"][row, prompt:size] = np.where(committed, scale, 0.0)
      out["committed"][row, prompt:size] = committed
    return out

  def __call__(self, params, step: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(the step's `pair_*` rows, rollout metrics)."""
    rollouts = self.sample(params, step)
    rows = self.rows_of(rollouts, step)
    if self.reference is not None:  # the KL anchor's model at the same states
      rows["reference_nll"] = np.asarray(_token_nll(self.objective, self.reference, rows))
    rows = {f"pair_{k}": v for k, v in rows.items()}
    generated = np.array([len(r.tokens) for r in rollouts], np.float64)
    steps = np.array([r.steps for r in rollouts], np.float64)
    metrics = {
      "onpolicy_reward": float(np.mean([r.reward for r in rollouts])),
      "onpolicy_verified": float(np.mean([r.verified for r in rollouts])),
      "onpolicy_generated": float(generated.mean()),
      "onpolicy_steps": float(steps.mean()),
      "onpolicy_tokens_per_step": float((generated / steps).mean()),
      "onpolicy_surrogate": float(np.mean([r.surrogate for r in rollouts])),
      "onpolicy_entropy": float(np.mean([judge_lib.unigram_entropy(r.tokens) for r in rollouts])),
    }
    return rows, metrics
