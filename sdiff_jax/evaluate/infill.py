"""Infill suite: fill a span removed from a held-out function, with the suffix visible.

Items: the validity suite's held-out functions (`validity.function_prompts`); from each
function's body one span is removed, of a kind:
* "line": one non-blank line of the body (its newline kept in the suffix);
* "lines": two to four consecutive lines;
* "random": a random run of 4 to 16 of the body's tokens;
all drawn with a fixed seed. The model sees BOS, the function before the span, as many
MASK tokens as the span has (the oracle length, as in LLaDA's and DiffuCoder's infilling
evaluations) and the function after it, cut to the model's context around the span.
Decoding: `steps` full forwards (no cache), each committing the most confident masked
positions, ceil(remaining / steps left) of them, greedy: the block sampler's rule over
the span. Per item: exact (the filled text equals the removed one) and parses (the
filled function is valid Python), with standard errors over items. A `causal` model
cannot see a suffix: the suite does not apply to it.
"""

import ast
import dataclasses
import functools
import random
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdiff_jax import losses
from sdiff_jax.data import tokenizer as tokenizer_lib
from sdiff_jax.evaluate import validity
from sdiff_jax.objective import Objective

KINDS = ("line", "lines", "random")


@dataclasses.dataclass(frozen=True)
class Span:
  before: str  # the function up to the span
  span: str  # the removed text
  after: str  # the function after it


def make_spans(
  items: Sequence[validity.FunctionPrompt], kind: str, tok, seed: int = 0
) -> list[Span]:
  """One span of `kind` per function (functions too short for it are skipped)."""
  if kind not in KINDS:
    raise ValueError(f"infill kind {kind!r}: must be one of {KINDS}")
  rng = random.Random(seed)
  spans = []
  for item in items:
    lines = item.reference.splitlines(keepends=True)
    full = [i for i, line in enumerate(lines) if line.strip()]
    if kind == "random":
      ids = tok.encode(item.reference)
      if len(ids) < 6:
        continue
      length = rng.randint(4, min(16, len(ids) - 2))
      start = rng.randint(0, len(ids) - length)
      before = item.prompt + "\n" + tok.decode(ids[:start])
      spans.append(
        Span(before, tok.decode(ids[start : start + length]), tok.decode(ids[start + length :]))
      )
      continue
    if kind == "lines" and len(lines) < 2:
      continue
    count = 1 if kind == "line" else rng.randint(2, min(4, len(lines)))
    starts = [i for i in full if i + count <= len(lines)]
    if not starts:
      continue
    i = rng.choice(starts)
    removed = "".join(lines[i : i + count])
    keep_newline = removed.endswith("\n")  # the newline stays with the suffix
    spans.append(
      Span(
        item.prompt + "\n" + "".join(lines[:i]),
        removed[:-1] if keep_newline else removed,
        ("\n" if keep_newline else "") + "".join(lines[i + count :]),
      )
    )
  return spans


@functools.partial(jax.jit, static_argnums=(0, 5))
def _fill(objective: Objective, params, tokens_L, segment_ids_L, span_L, steps: int):
  """Denoises the MASK positions `span_L` of one row (padding: segment 0) in `steps`
  full forwards."""
  batch = {
    "tokens": tokens_L[None],
    "segment_ids": segment_ids_L[None],
    "positions": jnp.arange(tokens_L.shape[0], dtype=jnp.int32)[None],
  }

  def step(tokens_L, s):
    logits = objective.logits(params, tokens_L[None], {**batch, "tokens": tokens_L[None]})[0]
    for special in (tokenizer_lib.MASK_ID, tokenizer_lib.PAD_ID, tokenizer_lib.BOS_ID):
      logits = losses.suppress_token(logits, special)
    probs = jax.nn.softmax(logits, axis=-1)
    pred = jnp.argmax(logits, axis=-1)
    confidence = jnp.max(probs, axis=-1)
    todo = span_L & (tokens_L == tokenizer_lib.MASK_ID)
    count = -(-todo.sum() // (steps - s))
    score = jnp.where(todo, confidence, -1.0)
    rank = jnp.argsort(jnp.argsort(-score))
    commit = todo & (rank < count)
    return jnp.where(commit, pred, tokens_L), None

  tokens_L, _ = jax.lax.scan(step, tokens_L, jnp.arange(steps))
  return tokens_L


@dataclasses.dataclass(frozen=True)
class Filled:
  texts: list[str | None]  # per span; None: the span does not fit the context
  tokens_per_forward: float


def fill(
  objective: Objective, params, tok, spans: Sequence[Span], steps: int, seq_len: int
) -> Filled:
  """Each span's text as the model fills it in `steps` forwards (at most one per token)."""
  if objective.mode == "causal":
    raise ValueError("infilling needs a diffusion model: a causal model cannot see the suffix")
  texts, filled_tokens, forwards = [], 0, 0
  for sp in spans:
    head = [tokenizer_lib.BOS_ID] + tok.encode(sp.before)
    middle = tok.encode(sp.span)
    tail = tok.encode(sp.after)
    if len(middle) + 2 > seq_len or not middle:
      texts.append(None)
      continue
    room = seq_len - len(middle)
    keep_head = min(len(head), max(room // 2, room - len(tail)))
    head = head[len(head) - keep_head :]
    tail = tail[: room - keep_head]
    ids = head + [tokenizer_lib.MASK_ID] * len(middle) + tail
    length = len(ids)
    tokens = np.full(seq_len, tokenizer_lib.PAD_ID, np.int32)
    tokens[:length] = ids
    span_L = np.zeros(seq_len, bool)
    span_L[len(head) : len(head) + len(middle)] = True
    n_steps = min(steps, len(middle))
    segment_ids = (np.arange(seq_len) < length).astype(np.int32)
    out = _fill(
      objective, params, jnp.asarray(tokens), jnp.asarray(segment_ids), jnp.asarray(span_L), n_steps
    )
    texts.append(tok.decode([int(t) for t in np.asarray(out)[span_L]]))
    filled_tokens += len(middle)
    forwards += n_steps
  return Filled(texts, filled_tokens / max(forwards, 1))


def infill(
  objective: Objective, params, tok, spans: Sequence[Span], steps: int, seq_len: int
) -> dict[str, tuple[float, float]]:
  """exact / parses (value, standard error) and tokens per forward over `spans`."""
  filled = fill(objective, params, tok, spans, steps, seq_len)
  exact, parses = [], []
  for sp, text in zip(spans, filled.texts):
    if text is None:
      continue
    exact.append(float(text == sp.span))
    try:
      ast.parse(sp.before + text + sp.after)
      parses.append(1.0)
    except (SyntaxError, ValueError):
      parses.append(0.0)
  return {
    "exact": validity.mean_se(exact),
    "parses": validity.mean_se(parses),
    "tokens_per_forward": (filled.tokens_per_forward, 0.0),
    "items": (float(len(exact)), 0.0),
  }
