"""Decoding many prompts for the evaluation suites, with the speed it took.

Prompts go in fixed-size batches padded to one prompt length, so each sampler setting
compiles once; the first batch runs twice and the timing starts with its second run
(compilation excluded). Tokens per forward pool the prompts' rows: generated tokens over
the forwards each row needed (`sampling.Generation.row_nfe`), the figure of decoding
one prompt at a time: a batch runs until its slowest row is done.
"""

import dataclasses
import itertools
import time
from typing import Any, Sequence

import numpy as np

from sdiff_jax import inference, sampling


@dataclasses.dataclass(frozen=True)
class Decoded:
  texts: list[str]  # one completion per prompt (text after it, up to EOS)
  ended: list[bool]  # the completion ended with EOS (not at the token limit)
  tokens_per_forward: float
  tokens_per_s: float  # generated tokens over decoding wall time, compilation excluded
  seconds: float


def settings_grid(attention: str, **lists: Sequence[Any]) -> list[dict[str, Any]]:
  """Every combination of the listed sampler settings (`sampling.Settings` fields).

  A `causal` model decodes token by token: block settings do not apply and its grid is
  the single empty setting.
  """
  if attention == "causal":
    return [{}]
  names = [n for n, values in lists.items() if values]
  return [dict(zip(names, combo)) for combo in itertools.product(*(lists[n] for n in names))]


def fits(loaded: inference.Loaded, prompt: str, max_new_tokens: int) -> bool:
  """Whether BOS + the prompt + `max_new_tokens` fit the model's context."""
  return 1 + len(loaded.tokenizer.encode(prompt)) + max_new_tokens <= loaded.config.data.seq_len


def decode(
  loaded: inference.Loaded,
  prompts: Sequence[str],
  settings: dict[str, Any],
  *,
  batch_size: int = 16,
  seed: int = 0,
) -> Decoded:
  """Completions of every prompt under one sampler setting (`inference.complete` keywords)."""
  if not prompts:
    raise ValueError("no prompts to decode")
  prompt_len = max(1 + len(loaded.tokenizer.encode(p)) for p in prompts)  # BOS + prompt
  padded = list(prompts) + [prompts[-1]] * (-len(prompts) % batch_size)  # one batch shape
  texts, ended, tokens, forwards, seconds = [], [], 0, 0, 0.0
  for start in range(0, len(padded), batch_size):
    batch = padded[start : start + batch_size]
    run = lambda: inference.complete(  # noqa: E731
      loaded, batch, seed=seed + start, prompt_len=prompt_len, **settings
    )
    if start == 0:
      run()  # compiles
    t0 = time.perf_counter()
    out, stats = run()
    seconds += time.perf_counter() - t0
    kept = min(batch_size, len(prompts) - start)
    texts += out[:kept]
    gen = stats.generation
    last_B = np.take_along_axis(gen.tokens, gen.lengths[:, None] - 1, axis=1)[:, 0]
    ended += [bool(e) for e in (last_B == sampling.EOS)[:kept]]
    tokens += int(np.sum(gen.lengths[:kept]))
    forwards += int(np.sum(gen.row_nfe[:kept]))
  return Decoded(texts, ended, tokens / max(forwards, 1), tokens / max(seconds, 1e-9), seconds)
