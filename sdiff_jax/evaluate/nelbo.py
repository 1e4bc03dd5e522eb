"""Held-out bits per token with a standard error, and the unigram baseline.

A fixed held-out set: `rows` rows of the validation split, documents shuffled with a
fixed seed (not the first files), the same rows on every call. Diffusion models are
scored by the masked-diffusion ELBO (an upper bound on their NLL) at `repeats` noise
levels per row, stratified over t in (eps, 1) with fixed keys; `causal` models by their
exact next-token NLL. A row's bits are its total over its scored tokens; the mean is
over rows and the standard error is that of the row means (rows are nearly full, so
this is close to the token-weighted mean). Shapes: B rows, L tokens, R repeats, K block tokens.

`block_bits` scores the state every block-decoding forward starts from, which i.i.d.
masking almost never draws: a clean prefix, one block of `block_size` tokens all MASK,
nothing after it. Blocks start at every multiple of `block_size` from the first on; a
block's token at offset k has only the prefix to go on, so its bits say how much a
forward that commits many tokens at once must guess (offset 0 is the next token, what
an AR model predicts).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdiff_jax import corruption, losses, schedules
from sdiff_jax.data import pipeline
from sdiff_jax.data import tokenizer as tokenizer_lib
from sdiff_jax.objective import Batch, Objective

HELDOUT_SEED = 1234  # the held-out rows' shuffle: fixed, independent of the run's seed


def heldout_rows(
  data_config: ml_collections.ConfigDict,
  tok: tokenizer_lib.Tokenizer,
  rows: int,
  split: str = "validation",
) -> dict[str, np.ndarray]:
  """`rows` fixed rows of `split` (int32[B, L] tokens / segment_ids / positions); fewer
  when the split is shorter."""
  texts = pipeline.load_texts(data_config, split)
  ds = pipeline.make_dataset(
    texts,
    tok,
    seq_len=data_config.seq_len,
    batch_size=rows,
    packing=data_config.packing,
    shuffle=True,
    seed=HELDOUT_SEED,
    num_epochs=1,
    shard_index=0,
    shard_count=1,
  )
  batch = next(iter(ds))
  real_B = batch["segment_ids"].any(axis=1)  # a short split's batch ends with padding rows
  return {name: array[real_B] for name, array in batch.items()}


def unigram_bits(
  data_config: ml_collections.ConfigDict,
  tok: tokenizer_lib.Tokenizer,
  heldout: dict[str, np.ndarray],
  max_train_tokens: int = 2_000_000,
) -> float:
  """Bits/token of the training split's unigram model (add-one smoothed over the real
  vocabulary, BOS/EOS included) on the held-out tokens: what a model that ignores its
  context scores, by the ELBO as by the NLL."""
  counts = np.ones(tok.vocab_size, np.float64)
  counts[: tokenizer_lib.NUM_SPECIAL] = 0
  counts[[tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID]] = 1
  seen = 0
  for text in pipeline.load_texts(data_config, "train"):
    ids = tok.encode_array(text)
    np.add.at(counts, ids, 1)
    counts[[tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID]] += 1
    seen += ids.size + 2
    if seen >= max_train_tokens:
      break
  logp_V = np.log2(counts / counts.sum(), where=counts > 0, out=np.full_like(counts, -np.inf))
  tokens = heldout["tokens"][heldout["segment_ids"] > 0]
  return float(-logp_V[tokens].mean())


@dataclasses.dataclass(frozen=True)
class Bits:
  mean: float  # bits/token
  stderr: float
  rows: int
  repeats: int

  def __str__(self) -> str:
    return f"{self.mean:.3f} +- {self.stderr:.3f}"


@functools.partial(jax.jit, static_argnums=(0, 4))
def _row_bits(
  objective: Objective, params, batch: Batch, key: jax.Array, repeats: int
) -> jax.Array:
  """float32[B]: each row's bits/token (ELBO averaged over `repeats` noise levels; AR: NLL)."""
  tokens_BxL, seg_BxL = batch["tokens"], batch["segment_ids"]
  if objective.mode == "causal":
    targets_BxL, valid_BxL = losses.next_token_targets(tokens_BxL, seg_BxL)
    nll_BxL = losses.token_nll(
      objective.logits(params, tokens_BxL, batch), targets_BxL, tokenizer_lib.MASK_ID
    )
    return jnp.where(valid_BxL, nll_BxL, 0).sum(1) / jnp.maximum(valid_BxL.sum(1), 1) / math.log(2)
  valid_BxL = objective.scored(batch)
  eps = objective.config.diffusion.time_eps

  def one(r):
    time_key, mask_key = jax.random.split(jax.random.fold_in(key, r))
    u_B = jax.random.uniform(time_key, tokens_BxL.shape[:1])
    t_B = eps + (1 - eps) * (r + u_B) / repeats  # stratified over the repeats
    noisy_BxL, masked_BxL = corruption.mask_corrupt(
      mask_key, tokens_BxL, objective.gamma.gamma(t_B), valid_BxL
    )
    nll_BxL = losses.token_nll(
      objective.logits(params, noisy_BxL, batch), tokens_BxL, tokenizer_lib.MASK_ID
    )
    weighted_B = schedules.elbo_weight(objective.gamma, t_B) * jnp.where(
      masked_BxL, nll_BxL, 0
    ).sum(1)
    return weighted_B / jnp.maximum(valid_BxL.sum(1), 1) / math.log(2)

  return jax.lax.map(one, jnp.arange(repeats)).mean(0)


def heldout_bits(
  objective: Objective,
  params,
  heldout: dict[str, np.ndarray],
  repeats: int = 4,
  seed: int = 0,
  chunk: int = 16,
) -> Bits:
  """Mean bits/token over the held-out rows with its standard error (fixed keys)."""
  rows = heldout["tokens"].shape[0]
  key = jax.random.key(seed)
  per_row = []
  for start in range(0, rows, chunk):
    batch = {k: jnp.asarray(v[start : start + chunk]) for k, v in heldout.items()}
    per_row.append(
      np.asarray(_row_bits(objective, params, batch, jax.random.fold_in(key, start), repeats))
    )
  bits_B = np.concatenate(per_row)
  return Bits(
    float(bits_B.mean()),
    float(bits_B.std(ddof=1) / math.sqrt(rows)),
    rows,
    1 if objective.mode == "causal" else repeats,
  )


@dataclasses.dataclass(frozen=True)
class BlockBits:
  first: Bits  # offset 0 (the next token)
  rest: Bits  # offsets 1..K-1
  by_offset: list[float]  # mean bits at each offset, over all blocks
  blocks: int


@functools.partial(jax.jit, static_argnums=(0, 4))
def _block_nll(
  objective: Objective, params, batch: Batch, start: jax.Array, size: int
) -> tuple[jax.Array, jax.Array]:
  """(bits, scored) float32/bool[B, K] of block [start, start+K) masked after a clean
  prefix, the rest of the row dropped."""
  tokens_BxL, seg_BxL = batch["tokens"], batch["segment_ids"]
  index_L = jnp.arange(tokens_BxL.shape[1])
  in_block_L = (index_L >= start) & (index_L < start + size)
  seg_BxL = jnp.where(index_L[None] < start + size, seg_BxL, 0)
  dropped = {**batch, "segment_ids": seg_BxL}
  scored_BxL = objective.scored(dropped) & in_block_L[None]
  noisy_BxL = jnp.where(scored_BxL, tokenizer_lib.MASK_ID, tokens_BxL)
  nll_BxL = losses.token_nll(
    objective.logits(params, noisy_BxL, dropped), tokens_BxL, tokenizer_lib.MASK_ID
  )
  take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
  return take(nll_BxL) / math.log(2), take(scored_BxL)


def block_bits(
  objective: Objective, params, heldout: dict[str, np.ndarray], chunk: int = 16
) -> BlockBits:
  """Bits/token of fully masked blocks after a clean prefix (module docstring), at the
  first offset and the rest, with standard errors over rows (diffusion models only)."""
  if objective.mode == "causal":
    raise ValueError("block bits are for diffusion models: a causal model's is its NLL")
  size = objective.config.diffusion.block_size
  rows, length = heldout["tokens"].shape
  starts = range(size, length - size + 1, size)
  if not starts:
    raise ValueError(f"rows of {length} tokens hold no block of {size} after a prefix")
  bits, scored = [], []  # [B, K] per start
  for start in starts:
    parts = [
      _block_nll(
        objective,
        params,
        {k: jnp.asarray(v[first : first + chunk]) for k, v in heldout.items()},
        jnp.int32(start),
        size,
      )
      for first in range(0, rows, chunk)
    ]
    bits.append(np.concatenate([np.asarray(b) for b, _ in parts]))
    scored.append(np.concatenate([np.asarray(m) for _, m in parts]))
  bits_NxBxK, scored_NxBxK = np.stack(bits), np.stack(scored)

  def per_row(offsets: slice) -> Bits:
    total_B = np.where(scored_NxBxK, bits_NxBxK, 0)[..., offsets].sum(axis=(0, 2))
    count_B = scored_NxBxK[..., offsets].sum(axis=(0, 2))
    mean_B = total_B[count_B > 0] / count_B[count_B > 0]
    return Bits(
      float(mean_B.mean()), float(mean_B.std(ddof=1) / math.sqrt(mean_B.size)), mean_B.size, 1
    )

  total_K = np.where(scored_NxBxK, bits_NxBxK, 0).sum(axis=(0, 1))
  by_offset = total_K / np.maximum(scored_NxBxK.sum(axis=(0, 1)), 1)
  return BlockBits(
    per_row(slice(0, 1)), per_row(slice(1, None)), [float(b) for b in by_offset], len(starts)
  )
