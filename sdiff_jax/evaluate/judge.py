"""Judge suite: generative perplexity of completions under a separately trained AR model.

As MDLM and BD3-LM report: the judge (a `causal` workdir) scores each completion's
tokens given its prompt, in its own tokenizer (the texts are re-encoded, so judge
and model need not share one); gen PPL = 2^(mean bits per completion token), pooled
over completions. Beside it, the completions' unigram entropy (bits, each completion's
own token distribution, averaged): a sampler that repeats itself lowers the
perplexity but also the entropy, so the pair is reported together.
"""

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdiff_jax import inference, losses
from sdiff_jax.data import tokenizer as tokenizer_lib
from sdiff_jax.evaluate import validity
from sdiff_jax.objective import Objective


@functools.partial(jax.jit, static_argnums=0)
def _nll_bits(objective: Objective, params, batch):
  """float32[B, L]: bits of each next token (target at i + 1 from output i)."""
  logits = objective.logits(params, batch["tokens"], batch)
  targets, _ = losses.next_token_targets(batch["tokens"], batch["segment_ids"])
  return losses.token_nll(logits, targets, tokenizer_lib.MASK_ID) / math.log(2)


def unigram_entropy(ids: Sequence[int]) -> float:
  """Entropy in bits of the token frequencies of one sequence (0 for an empty one)."""
  if not ids:
    return 0.0
  _, counts = np.unique(np.asarray(ids), return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log2(p)).sum())


def completion_bits(
  judge_model: inference.Loaded,
  prompts: Sequence[str],
  completions: Sequence[str],
  chunk: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
  """(total bits, token count) of each completion given its prompt under the judge."""
  config = judge_model.config
  if config.attention != "causal":
    raise ValueError(f"the judge must be a causal (AR) model, not {config.attention!r}")
  objective = Objective(config, judge_model.tokenizer.vocab_size)
  length = config.data.seq_len
  rows, spans = [], []
  for prompt, completion in zip(prompts, completions):
    head = [tokenizer_lib.BOS_ID] + judge_model.tokenizer.encode(prompt)
    tail = judge_model.tokenizer.encode(completion)
    ids = (head + tail)[-length:]  # a long prompt loses its beginning, never the completion
    first = max(len(ids) - len(tail), 1)
    rows.append(ids)
    spans.append((first, len(ids)))
  bits_per_row, counts = [], []
  for start in range(0, len(rows), chunk):
    part = rows[start : start + chunk]
    tokens = np.zeros((chunk, length), np.int32)
    seg = np.zeros((chunk, length), np.int32)
    for r, ids in enumerate(part):
      tokens[r, : len(ids)], seg[r, : len(ids)] = ids, 1
    batch = {
      "tokens": jnp.asarray(tokens),
      "segment_ids": jnp.asarray(seg),
      "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (chunk, length)),
    }
    bits = np.asarray(_nll_bits(objective, judge_model.params, batch))
    for r, (first, end) in enumerate(spans[start : start + chunk]):
      # token j of the row is predicted by output j - 1
      bits_per_row.append(bits[r, first - 1 : end - 1].sum())
      counts.append(end - first)
  return np.array(bits_per_row, np.float64), np.array(counts, np.float64)


def judge(
  judge_model: inference.Loaded,
  prompts: Sequence[str],
  completions: Sequence[str],
  chunk: int = 16,
) -> dict[str, tuple[float, float]]:
  """gen_ppl, judge bits/token (with a standard error over completions), unigram entropy."""
  total_arr, counts_arr = completion_bits(judge_model, prompts, completions, chunk)
  entropies = [unigram_entropy(judge_model.tokenizer.encode(c)) for c in completions]
  keep = counts_arr > 0
  mean_bits = float(total_arr[keep].sum() / max(counts_arr[keep].sum(), 1))
  _, se = validity.mean_se(total_arr[keep] / counts_arr[keep])
  return {
    "gen_ppl": (2.0**mean_bits, 2.0**mean_bits * math.log(2) * se),  # delta method
    "judge_bits": (mean_bits, se),
    "unigram_entropy": validity.mean_se(entropies),
  }
