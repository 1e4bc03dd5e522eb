"""Repair suite: the model re-predicts every position of corrupted held-out rows.

Rows: the fixed held-out rows of `nelbo.heldout_rows`. Each is corrupted by
* "edit": the training edit process (`corruption.edit_corrupt`: substitutions and
  local deletion-insertion pairs, cost floor(len * alpha) per document), or
* "substitution": the same process with substitutions only,
at a given alpha with a fixed key, and the model (one forward, greedy, no MASK
anywhere) predicts x0 at every scored position: self-correction as the sampler's
`self_correction` uses it. A `block_causal` model reads the corrupted row in both
halves of its input (no clean token leaks in). Reported, pooled over the rows with a
standard error over rows:
* restored: share of corrupted positions (input != x0) predicted as x0;
* damaged: share of clean positions (input == x0) predicted as another token;
* exact: share of snippets (windows of `snippet` tokens holding a corruption) whose
  every scored position is predicted as x0; its standard error is binomial.
`causal` models cannot re-predict their input: the suite does not apply to them.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from sdiff_jax import losses
from sdiff_jax.data import tokenizer as tokenizer_lib
from sdiff_jax.objective import Objective

KINDS = {"edit": None, "substitution": (1.0, 0.0, 0.0)}  # op_probs (None: the config's)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _predict(objective: Objective, params, batch, key, kind: str, alpha: float):
  d = objective.config.diffusion
  overrides = {"op_probs": KINDS[kind]} if KINDS[kind] else {}
  rows = batch["tokens"].shape[0]
  edited = objective.edit_corrupt(
    key,
    batch["tokens"],
    batch,
    jnp.full((rows,), alpha),
    alpha_max=max(d.alpha_max, alpha),
    **overrides,
  )
  logits = objective.logits(params, edited.tokens, {**batch, "tokens": edited.tokens})
  logits = losses.suppress_token(logits, tokenizer_lib.MASK_ID)
  return edited.tokens, jnp.argmax(logits, axis=-1)


def repair(
  objective: Objective,
  params,
  heldout: dict[str, np.ndarray],
  kind: str,
  alpha: float,
  *,
  snippet: int = 32,
  seed: int = 0,
  chunk: int = 16,
) -> dict[str, tuple[float, float]]:
  """metric -> (value, standard error); see the module docstring."""
  if objective.mode == "causal":
    raise ValueError("repair needs a diffusion model: a causal model cannot re-predict its input")
  if kind not in KINDS:
    raise ValueError(f"repair kind {kind!r}: must be one of {tuple(KINDS)}")
  inputs, preds = [], []
  for start in range(0, heldout["tokens"].shape[0], chunk):
    batch = {k: jnp.asarray(v[start : start + chunk]) for k, v in heldout.items()}
    x_t, pred = _predict(
      objective, params, batch, jax.random.fold_in(jax.random.key(seed), start), kind, alpha
    )
    inputs.append(np.asarray(x_t))
    preds.append(np.asarray(pred))
  scored_BxL = np.asarray(objective.scored({k: jnp.asarray(v) for k, v in heldout.items()}))
  return metrics(
    heldout["tokens"], np.concatenate(inputs), np.concatenate(preds), scored_BxL, snippet
  )


def metrics(
  x0_BxL: np.ndarray,
  x_t_BxL: np.ndarray,
  pred_BxL: np.ndarray,
  scored_BxL: np.ndarray,
  snippet: int = 32,
) -> dict[str, tuple[float, float]]:
  """restored / damaged / exact (value, standard error), the corrupted fraction and the
  number of snippets with a corruption, from clean, corrupted and predicted rows."""

  def share(where_BxL, hit_BxL):  # pooled share, standard error over the rows that count
    count_B = where_BxL.sum(1)
    keep = count_B > 0
    share_B = (where_BxL & hit_BxL).sum(1)[keep] / count_B[keep]
    total = (where_BxL & hit_BxL).sum() / max(where_BxL.sum(), 1)
    se = share_B.std(ddof=1) / math.sqrt(keep.sum()) if keep.sum() > 1 else float("nan")
    return float(total), float(se)

  corrupted_BxL = scored_BxL & (x_t_BxL != x0_BxL)
  right_BxL = pred_BxL == x0_BxL
  rows, length = x0_BxL.shape
  windows = length // snippet
  shape = (rows, windows, snippet)
  has_edit_BxW = corrupted_BxL[:, : windows * snippet].reshape(shape).any(-1)
  wrong_BxW = (scored_BxL & ~right_BxL)[:, : windows * snippet].reshape(shape).any(-1)
  n = int(has_edit_BxW.sum())
  exact = float((has_edit_BxW & ~wrong_BxW).sum() / max(n, 1))
  return {
    "restored": share(corrupted_BxL, right_BxL),
    "damaged": share(scored_BxL & ~corrupted_BxL, ~right_BxL),
    "exact": (exact, math.sqrt(exact * (1 - exact) / n) if n else float("nan")),
    "corrupted_fraction": (float(corrupted_BxL.sum() / max(scored_BxL.sum(), 1)), 0.0),
    "snippets": (float(n), 0.0),
  }
