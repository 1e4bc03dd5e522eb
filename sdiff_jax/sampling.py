"""Block-parallel diffusion sampler and autoregressive baseline, one jit each.

Shapes: B batch, P prompt, G generated, N buffer (J blocks of K), S cache slots, T forward, V vocab.

Both decode a batch of prompts inside one compiled `lax.while_loop`, with an
explicit KV cache (P: padded prompt length, N: generation buffer, plus scratch
slots below). Prompts are left-padded so that every row writes at the same
slot; a row's positions are `slot - pad` and the attention masks hide its pad
slots. A forward's tokens see the row's slots before the forward's first
position, the input tokens its grant matrix allows (`_visible`), and themselves.

Block sampler (`bidirectional` and `block_causal` models): prefill the prompt
once; each block of `block_size` tokens starts all-MASK and takes at most
`steps_per_block` forwards over the cache. A forward commits the masked
positions of highest confidence (model probability of the sampled token): a
share `ceil(remaining / steps_left)` that finishes the block on time, or, with
`threshold`, also every one above it. With `order="left_to_right"` the share is
the leftmost masked positions instead (and, with `threshold`, the run of confident
ones after them). With `self_correction`, committed tokens of the block that the
model now replaces with confidence above `correction_threshold` are rewritten.
Positions after a committed EOS are not needed; a row ends with its first EOS and the
loop when every row has ended.

Keys/values of a finished block, as later blocks read them:

* `block_causal` (exact, whatever `cache_mode`): the first denoising forward of
  block j > 0 takes [final tokens of block j-1 ; block j] as fold does below, but the
  block j-1 half is token-causal: it writes block j-1's clean K/V exactly as training
  sees the clean stream, and block j sees them in the same forward (no extra forward).
* `bidirectional`, `cache_mode="fold"` (default): the first denoising forward
  of block j > 0 takes 2K tokens, [final tokens of block j-1 ; block j], as the
  contiguous positions [start-K, start+K): it rewrites block j-1's slots with
  K/V computed from its final tokens and denoises block j in the same forward.
  Mask (block-causal between the halves): the block j-1 half sees the cache
  before it and itself, not block j; the block j half sees the cache before it,
  the block j-1 half and itself. Block j-1's K/V are then exactly those that
  `recompute` writes and block j's logits those of recompute's first forward:
  the same tokens as `recompute` at the NFE of `last_forward` (NFE counts
  forwards, not tokens). Every committed token is an input of a later forward,
  except the last block's, whose K/V nothing reads (no forward at the end).
  Other steps of block j write to the block's own slots.
* `cache_mode="recompute"`: the same K/V from a separate forward of the final
  block j-1 before block j (the reference: one more forward per block).
* `cache_mode="last_forward"`: the paper's approximation, the old `approx`,
  kept only to measure against: a row's block keeps the K/V of its own last
  denoising forward (written to K scratch slots after the buffer, copied to the
  block for the rows that denoised). The ceil(K / steps) tokens that forward
  committed are never an input of any forward: later blocks see MASK there.

`suffix_mask` (bidirectional only): every forward also takes the rest of the
generation as MASK tokens, LLaDA-style, since a model trained on whole
sequences never saw a block at the right edge of its input. Static shapes: the
prefill appends N MASK (positions P..P+N), every other forward N - K after its
own tokens; all the forward's tokens see every one of its tokens (so fold's
block j-1 half also sees block j, all MASK at that step, as recompute's rewrite
then sees the suffix), except suffix keys at or past position P +
`max_new_tokens`, which nobody sees. The suffix's K/V go to slots nobody reads
before they are rewritten: later blocks' slots and N - K more slots at the end.

`shift` (models trained with `diffusion.shift`): the output at
position i-1 predicts token i. Each denoising forward then also takes the token
before the block (the prompt's last token, or the previous block's last) as its
first input, which sees only what precedes it (so the K/V it rewrites are the
ones already cached), and the block's logits are the outputs from that token on;
fold's first forward already holds it. One more token per forward, no more
forwards. Not with `suffix_mask` or `last_forward`.

Attention windows: a forward's queries see no cache slot past the last one filled by
then, so the generation runs as `cache_windows` consecutive loops (blocks, or AR tokens,
split evenly), each compiled with a static window: its forwards attend over the slots
[0, end of the loop's last block) only, not the whole cache (the model reads as many
slots as the mask has). Same tokens as one window; a loop per window to compile. Not
with `suffix_mask` or `last_forward`, whose forwards read slots past the buffer.

`block_size=1` with `cache_mode="fold"` decodes a `bidirectional` model token by
token in one 2-token forward a token (`recompute`: two forwards a token). AR
(`causal`): prefill, then one token per forward, with the same masks, sampling,
EOS and cache code.
"""

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from sdiff_jax import losses
from sdiff_jax.data import tokenizer as tokenizer_lib
from sdiff_jax.models import KVCache, ModelConfig, Transformer, init_cache, unstack_layers
from sdiff_jax.models.attention_masks import ATTENTION_MODES

PAD, BOS, EOS, MASK = (
  tokenizer_lib.PAD_ID,
  tokenizer_lib.BOS_ID,
  tokenizer_lib.EOS_ID,
  tokenizer_lib.MASK_ID,
)
CACHE_MODES = ("fold", "recompute", "last_forward")  # see the module docstring
ORDERS = ("confidence", "left_to_right")  # which masked positions a denoising step commits


@dataclasses.dataclass(frozen=True)
class Settings:
  """Static sampling settings: each distinct value compiles once."""

  attention: str = "bidirectional"  # how the model attends; "causal" decodes token by token (AR)
  max_new_tokens: int = 128
  block_size: int = 32
  steps_per_block: int = 8  # most forwards per block
  threshold: float | None = None  # also commit every masked token above this confidence
  # "confidence": the most confident masked positions; "left_to_right": the leftmost ones
  # (with `threshold`: also the run of masked positions after them above it)
  order: str = "confidence"
  temperature: float = 0.0  # 0: greedy
  top_p: float = 1.0
  self_correction: bool = False
  correction_threshold: float = 0.9
  cache_mode: str = "fold"  # bidirectional models: one of CACHE_MODES
  suffix_mask: bool = False  # bidirectional models: forwards also see the rest as MASK
  suppress_eos: bool = False  # rows never end (benchmarks: every row generates max_new_tokens)
  shift: bool = False  # the model's output at i-1 predicts token i (diffusion.shift)
  # sampled, these end the row as EOS does (they are recorded as EOS): an imported model's
  # own special tokens, `Tokenizer.stop_ids`
  stop_ids: tuple[int, ...] = ()
  # static attention windows the generation is split into (see the module docstring);
  # 0: one per 128 generated tokens, at most 4
  cache_windows: int = 0

  def validate(self) -> None:
    """Raises ValueError naming the first bad field."""
    checks = (
      ("attention", self.attention in ATTENTION_MODES, f"must be one of {ATTENTION_MODES}"),
      ("cache_mode", self.cache_mode in CACHE_MODES, f"must be one of {CACHE_MODES}"),
      ("order", self.order in ORDERS, f"must be one of {ORDERS}"),
      ("max_new_tokens", self.max_new_tokens > 0, "must be positive"),
      ("block_size", self.block_size > 0, "must be positive"),
      (
        "steps_per_block",
        0 < self.steps_per_block <= self.block_size,
        f"must be in [1, block_size={self.block_size}]",
      ),
      ("threshold", self.threshold is None or 0.0 <= self.threshold <= 1.0, "must be in [0, 1]"),
      ("temperature", self.temperature >= 0.0, "must not be negative"),
      ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
      ("correction_threshold", 0.0 <= self.correction_threshold <= 1.0, "must be in [0, 1]"),
      ("cache_windows", self.cache_windows >= 0, "must not be negative (0: automatic)"),
      (
        "stop_ids",
        all(isinstance(i, int) and i >= tokenizer_lib.NUM_SPECIAL for i in self.stop_ids),
        f"must be token ids >= {tokenizer_lib.NUM_SPECIAL} (ids below are PAD, BOS, EOS, MASK)",
      ),
      (
        "suffix_mask",
        not self.suffix_mask or self.attention == "bidirectional",
        "needs attention='bidirectional'",
      ),
      (
        "shift",
        not self.shift
        or self.attention == "block_causal"
        or (
          self.attention == "bidirectional"
          and not self.suffix_mask
          and self.cache_mode != "last_forward"
        ),
        "needs attention 'block_causal', or 'bidirectional' with no suffix_mask and "
        "cache_mode 'fold' or 'recompute'",
      ),
    )
    for name, ok, why in checks:
      if not ok:
        raise ValueError(f"sampling {name}={getattr(self, name)!r}: {why}")


@dataclasses.dataclass(frozen=True)
class Decoder:
  """The model as the sampler sees it: a cached forward and an empty cache.

  It runs the model with unrolled layers (`scan_layers=False`): `prepare` splits
  trained (scanned) parameters per layer once, before the loop.
  """

  cfg: ModelConfig

  @property
  def unrolled(self) -> ModelConfig:
    return dataclasses.replace(self.cfg, scan_layers=False)

  def apply(
    self,
    params,
    tokens_BxT: jax.Array,
    positions_BxT: jax.Array,
    mask_BxTxS: jax.Array,
    cache: KVCache,
    cache_index: jax.Array,
    outputs: tuple[int, int] | None = None,
  ) -> tuple[jax.Array, KVCache]:
    """Logits of positions [outputs) (default: all) and the cache with the K/V written."""
    return Transformer(self.unrolled).apply(
      {"params": params},
      tokens_BxT,
      positions_BxT,
      mask_BxTxS,
      cache,
      cache_index,
      outputs=outputs,
    )

  def init_cache(self, batch: int, length: int) -> KVCache:
    return init_cache(self.unrolled, batch, length)

  def prepare(self, params):
    """Parameters per layer and in the compute dtype, once before the loop (bf16 halves
    the weight reads; per-layer weights are read in place, not sliced from a stack)."""
    dtype = self.cfg.compute_dtype
    params = unstack_layers(params, self.cfg.n_layers)
    return jax.tree.map(
      lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params
    )


@flax.struct.dataclass
class Generation:
  """Tokens and statistics of one batched generation."""

  tokens: jax.Array  # int32[B, G]: generated tokens, PAD after EOS
  lengths: jax.Array  # int32[B]: generated tokens, EOS included
  nfe: jax.Array  # int32[]: forward passes, prefill included
  block_steps: jax.Array  # int32[J]: denoising forwards per block (0: not run); AR: int32[0]
  # int32[B, G]: the step (within its block; AR: overall) that set each token, -1: none
  commit_step: jax.Array
  # int32[B]: the forwards a row needed, prefill included: those it would take decoded
  # alone (the batch runs until its slowest row is done: `nfe`)
  row_nfe: jax.Array

  @property
  def tokens_per_forward(self) -> float:
    """Generated tokens per forward a row needed, pooled over the rows: the batch-1 figure
    (with `threshold` a row's blocks take as many forwards as its own tokens need)."""
    lengths_B, row_nfe_B = jax.device_get((self.lengths, self.row_nfe))
    return float(np.sum(lengths_B)) / max(int(np.sum(row_nfe_B)), 1)


def left_pad(
  prompts: Sequence[Sequence[int]], length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> (int32[B, P] left-padded with PAD, int32[B] lengths).

  P is the longest prompt's length, or `length` (one compilation for batches of
  different prompts)."""
  lengths_B = np.array([len(p) for p in prompts], np.int32)
  if lengths_B.min(initial=1) < 1:
    raise ValueError("every prompt needs at least one token (e.g. BOS)")
  longest = int(lengths_B.max())
  if length is not None and length < longest:
    raise ValueError(f"a prompt has {longest} tokens, more than length={length}")
  length = longest if length is None else length
  prompt_BxP = np.full((len(prompts), length), PAD, np.int32)
  for row, p in enumerate(prompts):
    prompt_BxP[row, length - len(p) :] = p
  return prompt_BxP, lengths_B


# ----------------------------------------------------------------------------- shared helpers


def _visible(
  sizes: Sequence[int],
  start: jax.Array | int = 0,
  *,
  causal: bool | Sequence[bool] = False,
  suffix: int = 0,
  end: jax.Array | int = 0,
) -> jax.Array:
  """Grant matrix [T, T] (query, key) of an input made of parts of `sizes` tokens.

  A part's tokens see their own part and the parts before it (with `causal`, for every
  part or per part, only tokens up to themselves). With a MASK suffix of `suffix` tokens
  after the parts (the input's first token at sequence slot `start`), every token sees
  every part and the suffix tokens before slot `end` (no `causal` then: block_causal has
  no suffix).
  """
  causal_P = np.broadcast_to(np.asarray(causal, bool), (len(sizes),))
  assert not (causal_P.any() and suffix), "a MASK suffix is for bidirectional models"
  group_T = np.repeat(np.arange(len(sizes)), sizes)
  t_T = np.arange(group_T.size)
  grant_TxT = group_T[None, :] <= group_T[:, None]
  grant_TxT &= (t_T[None, :] <= t_T[:, None]) | ~causal_P[group_T][:, None]
  if not suffix:
    return jnp.asarray(grant_TxT)
  total = group_T.size + suffix
  key_T = (jnp.arange(total) < group_T.size) | (start + jnp.arange(total) < end)
  return jnp.broadcast_to(key_T[None, :], (total, total))


def _forward(
  decoder: Decoder,
  params,
  pad_B: jax.Array,
  slots: int,
  cache: KVCache,
  tokens_BxT: jax.Array,
  start: jax.Array,
  visible_TxT: jax.Array,
  write_at: jax.Array | None = None,
  outputs: tuple[int, int] | None = None,
) -> tuple[jax.Array, KVCache]:
  """Runs `tokens` as positions [start, start+T) of the sequence.

  Their K/V go to cache slots [write_at, write_at+T) (default: `start`). A token sees
  the row's non-pad slots before `start`, the slots of the input tokens that
  `visible_TxT` grants it (see `_visible`), and its own slot. Logits only of the input
  tokens [outputs) (default: all): a forward samples from few of its tokens. Its queries
  attend over the cache's first `slots` slots only (the attention window), which must
  hold every slot they may see.
  """
  length = tokens_BxT.shape[1]
  write_at = start if write_at is None else write_at
  offset_S = jnp.arange(slots) - write_at  # index in the input of the token at the slot
  granted_TxS = jnp.take(visible_TxT, jnp.clip(offset_S, 0, length - 1), axis=1) & (
    (offset_S >= 0) & (offset_S < length)
  )
  slot_S = jnp.arange(slots)
  mask_BxTxS = ((slot_S < start)[None, :] | granted_TxS)[None] & (
    slot_S >= pad_B[:, None, None]
  ) | (offset_S[None, :] == jnp.arange(length)[:, None])[None]  # a pad query sees itself
  positions_BxT = jnp.maximum(start + jnp.arange(length)[None, :] - pad_B[:, None], 0)
  return decoder.apply(params, tokens_BxT, positions_BxT, mask_BxTxS, cache, write_at, outputs)


def _top_p_filter(logits_BxTxV: jax.Array, top_p: float) -> jax.Array:
  """Keeps the smallest set of most likely tokens whose mass reaches `top_p`."""
  sorted_BxTxV = jnp.sort(logits_BxTxV, axis=-1)[..., ::-1]
  probs_BxTxV = jax.nn.softmax(sorted_BxTxV, axis=-1)
  mass_before_BxTxV = jnp.cumsum(probs_BxTxV, axis=-1) - probs_BxTxV
  keep_BxT = jnp.sum(mass_before_BxTxV < top_p, axis=-1)
  cutoff_BxT = jnp.take_along_axis(sorted_BxTxV, keep_BxT[..., None] - 1, axis=-1)
  return jnp.where(logits_BxTxV < cutoff_BxT, -jnp.inf, logits_BxTxV)


def _sample(logits_BxTxV: jax.Array, key: jax.Array, s: Settings) -> tuple[jax.Array, jax.Array]:
  """(token, its model probability) per position; special tokens are never sampled, and
  `s.stop_ids` come out as EOS."""
  for token_id in (MASK, PAD, BOS) + ((EOS,) + s.stop_ids if s.suppress_eos else ()):
    logits_BxTxV = losses.suppress_token(logits_BxTxV, token_id)
  if s.temperature == 0.0:
    tokens_BxT = jnp.argmax(logits_BxTxV, axis=-1)
  else:
    scaled_BxTxV = logits_BxTxV / s.temperature
    if s.top_p < 1.0:
      scaled_BxTxV = _top_p_filter(scaled_BxTxV, s.top_p)
    tokens_BxT = jax.random.categorical(key, scaled_BxTxV, axis=-1)
  probs_BxTxV = jax.nn.softmax(logits_BxTxV, axis=-1)
  confidence_BxT = jnp.take_along_axis(probs_BxTxV, tokens_BxT[..., None], axis=-1)[..., 0]
  if s.stop_ids and not s.suppress_eos:
    tokens_BxT = jnp.where(jnp.isin(tokens_BxT, jnp.asarray(s.stop_ids)), EOS, tokens_BxT)
  return tokens_BxT.astype(jnp.int32), confidence_BxT


def _first_eos(tokens_BxT: jax.Array) -> jax.Array:
  """int32[B]: the index of each row's first EOS, T without one."""
  is_eos_BxT = tokens_BxT == EOS
  size = tokens_BxT.shape[1]
  return jnp.where(is_eos_BxT.any(axis=1), jnp.argmax(is_eos_BxT, axis=1), size)


def _finish(
  tokens_BxN: jax.Array,
  commit_BxN: jax.Array,
  block_steps: jax.Array,
  nfe: jax.Array,
  row_nfe_B: jax.Array | None,
  max_new_tokens: int,
) -> Generation:
  """Cuts the buffer to the requested length; PAD (commit step -1) after a row's EOS.
  `row_nfe_B` None: a forward per generated token (AR)."""
  tokens_BxG = tokens_BxN[:, :max_new_tokens]
  lengths_B = jnp.minimum(_first_eos(tokens_BxG) + 1, max_new_tokens).astype(jnp.int32)
  kept_BxG = jnp.arange(max_new_tokens) < lengths_B[:, None]
  return Generation(
    tokens=jnp.where(kept_BxG, tokens_BxG, PAD),
    lengths=lengths_B,
    nfe=nfe,
    block_steps=block_steps,
    commit_step=jnp.where(kept_BxG, commit_BxN[:, :max_new_tokens], -1),
    row_nfe=lengths_B if row_nfe_B is None else row_nfe_B,
  )


# ----------------------------------------------------------------------------- block sampler


def _needed(block_BxK: jax.Array, active_B: jax.Array, valid_K: jax.Array) -> jax.Array:
  """Positions of the block a row still needs: up to its first EOS, inside the buffer."""
  eos_B = _first_eos(block_BxK)
  return active_B[:, None] & valid_K[None, :] & (jnp.arange(block_BxK.shape[1]) <= eos_B[:, None])


def _copy_slots(
  cache: KVCache, rows_B: jax.Array, source: int, dest: jax.Array, size: int
) -> KVCache:
  """Copies cache slots [source, source+size) to [dest, dest+size) in the rows `rows_B`."""

  def copy(x_LxBxS):  # [layers, B, slots, ...]
    source_LxBxK = jax.lax.dynamic_slice_in_dim(x_LxBxS, source, size, axis=2)
    dest_LxBxK = jax.lax.dynamic_slice_in_dim(x_LxBxS, dest, size, axis=2)
    rows = rows_B.reshape((1, -1) + (1,) * (x_LxBxS.ndim - 2))
    return jax.lax.dynamic_update_slice_in_dim(
      x_LxBxS, jnp.where(rows, source_LxBxK, dest_LxBxK), dest, axis=2
    )

  return jax.tree.map(copy, cache)


def _denoise_update(
  logits_BxKxV: jax.Array,
  block_BxK: jax.Array,
  commit_BxK: jax.Array,
  needed_BxK: jax.Array,
  step: jax.Array,
  key: jax.Array,
  s: Settings,
) -> tuple[jax.Array, jax.Array]:
  """One denoising step: commit masked positions by confidence (and self-correct)."""
  candidate_BxK, confidence_BxK = _sample(logits_BxKxV, key, s)
  masked_BxK = block_BxK == MASK
  todo_BxK = needed_BxK & masked_BxK
  remaining_B = todo_BxK.sum(axis=1)
  count_B = -(-remaining_B // (s.steps_per_block - step))  # finishes the block on time
  confident_BxK = todo_BxK & (confidence_BxK > s.threshold if s.threshold is not None else False)
  if s.order == "left_to_right":  # masked positions ranked by position (ties below)
    score_BxK = jnp.where(todo_BxK, 0.0, -1.0)
    # the run of confident positions among the masked ones, from the leftmost
    run_BxK = jnp.cumprod(jnp.where(todo_BxK, confident_BxK, True).astype(jnp.int32), axis=1)
    confident_BxK = run_BxK.astype(bool) & todo_BxK
  else:
    score_BxK = jnp.where(todo_BxK, confidence_BxK, -1.0)
  count_B = jnp.maximum(count_B, confident_BxK.sum(axis=1))
  rank_BxK = jnp.argsort(jnp.argsort(-score_BxK, axis=1), axis=1)  # stable: ties by position
  change_BxK = todo_BxK & (rank_BxK < count_B[:, None])
  if s.self_correction:
    change_BxK |= (
      needed_BxK
      & ~masked_BxK
      & (candidate_BxK != block_BxK)
      & (confidence_BxK > s.correction_threshold)
    )
  return (jnp.where(change_BxK, candidate_BxK, block_BxK), jnp.where(change_BxK, step, commit_BxK))


@flax.struct.dataclass
class BlockLoopState:
  """Carry of the loop over blocks: `_generate_block` appends block `block` to the buffer."""

  block: jax.Array  # int32[]: index of the next block
  cache: KVCache  # prompt and finished blocks (see the module docstring)
  tokens_BxN: jax.Array  # int32: the finished blocks, MASK after them
  commit_BxN: jax.Array  # int32: the step within its block that set each token, -1: none
  ended_B: jax.Array  # bool: the row has an EOS in a finished block
  nfe: jax.Array  # int32[]: forward passes so far, prefill included
  row_nfe_B: jax.Array  # int32: forwards each row needed so far (see Generation.row_nfe)
  block_steps_J: jax.Array  # int32: denoising forwards of each block, 0: not run


@flax.struct.dataclass
class StepLoopState:
  """Carry of the denoising loop of one block: `_denoise_step` runs one forward."""

  step: jax.Array  # int32[]: denoising forwards of this block so far
  block_BxK: jax.Array  # int32: the block's tokens, MASK where none is committed
  commit_BxK: jax.Array  # int32: the step that set each token, -1: none
  cache: KVCache
  # bool: the row's last forward denoised: its scratch K/V go to the block (`last_forward`)
  pending_B: jax.Array
  nfe: jax.Array  # int32[]: forward passes so far, prefill included
  row_nfe_B: jax.Array  # int32: forwards each row needed so far


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What every forward of one block generation shares (Python values, fixed at trace time)."""

  forward: Any  # `_forward` with the decoder, parameters, pads and slot count bound
  s: Settings
  mode: str  # "exact" (block_causal), or the bidirectional cache_mode
  prompt_len: int
  suffix: int  # MASK tokens appended to every forward but the prefill (0: none)
  end: int  # slot of the first position past max_new_tokens
  scratch: int | None  # `last_forward`: first of the scratch slots
  prompt_last_Bx1: jax.Array  # int32[B, 1]: each prompt's last token (`shift`: before block 0)

  def run(
    self,
    cache: KVCache,
    parts: Sequence[jax.Array],
    start: jax.Array,
    *,
    causal: bool | Sequence[bool] = False,
    write_at: jax.Array | None = None,
    outputs: tuple[int, int] | None = None,
  ) -> tuple[jax.Array, KVCache]:
    """One forward of `parts` (int32[B, T_i] each) at consecutive positions from `start`,
    then the MASK suffix; the logits of the parts' tokens [outputs) (default: all of
    them), [B, hi - lo, V], and the cache."""
    batch = parts[0].shape[0]
    tokens_BxT = jnp.concatenate(
      list(parts) + [jnp.full((batch, self.suffix), MASK, jnp.int32)], axis=1
    )
    sizes = [p.shape[1] for p in parts]
    visible_TxT = _visible(sizes, start, causal=causal, suffix=self.suffix, end=self.end)
    outputs = (0, sum(sizes)) if outputs is None else outputs
    return self.forward(cache, tokens_BxT, start, visible_TxT, write_at, outputs)


def _window_ends(units: int, s: Settings) -> list[int]:
  """Where the generation's attention windows end, in `units` (blocks, or AR tokens)."""
  count = s.cache_windows or min(4, max(1, s.max_new_tokens // 128))
  count = min(count, units)
  return sorted({math.ceil(units * (i + 1) / count) for i in range(count)})


def _block_generate(
  decoder: Decoder, s: Settings, params, prompt_BxP: jax.Array, pad_B: jax.Array, key: jax.Array
) -> Generation:
  """Prefills the prompt, then `_generate_block` until every row has ended (or J blocks)."""
  batch, prompt_len = prompt_BxP.shape
  size = s.block_size
  num_blocks = math.ceil(s.max_new_tokens / size)
  buffer = num_blocks * size
  mode = "exact" if s.attention == "block_causal" else s.cache_mode
  suffix = buffer - size if s.suffix_mask else 0
  # Slots: prompt, buffer, then room for the suffix of the last block's forwards and, for
  # `last_forward`, `size` scratch slots that its denoising forwards write to, copied to
  # the block's slots for the rows that denoised: a row keeps the K/V of its own last
  # denoising forward, whatever the other rows of the batch still do.
  scratch = prompt_len + buffer if mode == "last_forward" else None
  num_slots = prompt_len + buffer + suffix + (size if scratch is not None else 0)
  end = prompt_len + s.max_new_tokens
  windowed = not suffix and scratch is None  # else forwards read slots past the buffer

  def plan_seeing(slots: int) -> _Plan:  # forwards whose queries see slots [0, slots)
    forward = functools.partial(_forward, decoder, params, pad_B, slots if windowed else num_slots)
    return _Plan(forward, s, mode, prompt_len, suffix, end, scratch, prompt_BxP[:, -1:])

  prefill = dataclasses.replace(plan_seeing(prompt_len), suffix=buffer if s.suffix_mask else 0)
  _, cache = prefill.run(
    decoder.init_cache(batch, num_slots), [prompt_BxP], 0, causal=mode == "exact", outputs=(0, 0)
  )
  init = BlockLoopState(
    block=jnp.int32(0),
    cache=cache,
    tokens_BxN=jnp.full((batch, buffer), MASK, jnp.int32),
    commit_BxN=jnp.full((batch, buffer), -1, jnp.int32),
    ended_B=jnp.zeros((batch,), bool),
    nfe=jnp.int32(1),
    row_nfe_B=jnp.ones((batch,), jnp.int32),
    block_steps_J=jnp.zeros((num_blocks,), jnp.int32),
  )
  ends = _window_ends(num_blocks, s) if windowed else [num_blocks]
  # block 0 (every row needs it) outside the loop: the loop's blocks all have a block
  # before them, so their K/V rewrite is unconditional (a `lax.cond` would copy the cache)
  final = _generate_block(init, plan=plan_seeing(prompt_len + ends[0] * size), key=key, first=True)
  for last in (e for e in ends if e > 1):  # one block: no loop (no 2-block input fits)
    final = jax.lax.while_loop(
      lambda state, last=last: (state.block < last) & ~jnp.all(state.ended_B),
      functools.partial(_generate_block, plan=plan_seeing(prompt_len + last * size), key=key),
      final,
    )
  return _finish(
    final.tokens_BxN,
    final.commit_BxN,
    final.block_steps_J,
    final.nfe,
    final.row_nfe_B,
    s.max_new_tokens,
  )


def _generate_block(
  state: BlockLoopState, *, plan: _Plan, key: jax.Array, first: bool = False
) -> BlockLoopState:
  """Denoises block `state.block` (cache slots [start, start+K)) and appends it.

  Unless it is the `first` block, `recompute` first rewrites the K/V of the final block
  j-1 with one forward; `fold` and `exact` do it in the block's first denoising forward
  (its block j-1 half token-causal if `exact`).
  """
  s = plan.s
  size = s.block_size
  j, cache, nfe, row_nfe_B = state.block, state.cache, state.nfe, state.row_nfe_B
  batch = state.ended_B.shape[0]
  start = plan.prompt_len + j * size
  previous_BxK = jax.lax.dynamic_slice_in_dim(state.tokens_BxN, (j - 1) * size, size, axis=1)
  if plan.mode == "recompute" and not first:
    _, cache = plan.run(cache, [previous_BxK], start - size, outputs=(0, 0))
    nfe = nfe + 1
    row_nfe_B = row_nfe_B + ~state.ended_B
  valid_K = j * size + jnp.arange(size) < s.max_new_tokens
  active_B = ~state.ended_B
  # a key per (block, step): the same draws whatever forwards the cache mode adds
  block_key = jax.random.fold_in(key, j)
  step = functools.partial(_denoise_step, s=s, key=block_key, active_B=active_B, valid_K=valid_K)

  def denoise_forward(cache, block_BxK):
    if not s.shift:
      return plan.run(cache, [block_BxK], start, write_at=plan.scratch)
    last_Bx1 = (
      plan.prompt_last_Bx1
      if first
      else jax.lax.dynamic_slice_in_dim(state.tokens_BxN, j * size - 1, 1, axis=1)
    )
    # output i-1 predicts token i
    return plan.run(cache, [last_Bx1, block_BxK], start - 1, outputs=(0, size))

  state_of_block = StepLoopState(
    step=jnp.int32(0),
    block_BxK=jnp.full((batch, size), MASK, jnp.int32),
    commit_BxK=jnp.full((batch, size), -1, jnp.int32),
    cache=cache,
    pending_B=jnp.zeros((batch,), bool),
    nfe=nfe,
    row_nfe_B=row_nfe_B,
  )
  # step 0 always runs: an active row needs the block's first token. The first block has
  # nothing to fold (and a prompt shorter than the block no room for a 2-block input).
  if plan.mode in ("fold", "exact") and not first:
    lo = size - 1 if s.shift else size  # shift: output i-1 predicts token i
    causal = (plan.mode == "exact", False)

    def fold_forward(cache, block_BxK):
      parts = [previous_BxK, block_BxK]
      return plan.run(cache, parts, start - size, causal=causal, outputs=(lo, lo + size))

    state_of_block = step(state_of_block, forward=fold_forward)
  scratch_copy = {} if plan.scratch is None else dict(copy_from=plan.scratch, start=start)
  done = jax.lax.while_loop(
    functools.partial(_denoising, s=s, active_B=active_B, valid_K=valid_K),
    functools.partial(step, forward=denoise_forward, **scratch_copy),
    state_of_block,
  )
  cache = done.cache
  if plan.scratch is not None:
    cache = _copy_slots(cache, done.pending_B, plan.scratch, start, size)
  tokens_BxN = jax.lax.dynamic_update_slice_in_dim(
    state.tokens_BxN, done.block_BxK, j * size, axis=1
  )
  commit_BxN = jax.lax.dynamic_update_slice_in_dim(
    state.commit_BxN, done.commit_BxK, j * size, axis=1
  )
  ended_B = state.ended_B | jnp.any(done.block_BxK == EOS, axis=1)
  return BlockLoopState(
    block=j + 1,
    cache=cache,
    tokens_BxN=tokens_BxN,
    commit_BxN=commit_BxN,
    ended_B=ended_B,
    nfe=done.nfe,
    row_nfe_B=done.row_nfe_B,
    block_steps_J=state.block_steps_J.at[j].set(done.step),
  )


def _denoising(
  state: StepLoopState, *, s: Settings, active_B: jax.Array, valid_K: jax.Array
) -> jax.Array:
  """Whether the block takes another forward: steps are left and a needed position is MASK."""
  return (state.step < s.steps_per_block) & jnp.any(
    _needed(state.block_BxK, active_B, valid_K) & (state.block_BxK == MASK)
  )


def _denoise_step(
  state: StepLoopState,
  *,
  forward,
  s: Settings,
  key: jax.Array,
  active_B: jax.Array,
  valid_K: jax.Array,
  copy_from: int | None = None,
  start: jax.Array | None = None,
) -> StepLoopState:
  """One `forward(cache, block_BxK) -> (logits_BxKxV, cache)`, then `_denoise_update`.

  With `copy_from`, the scratch K/V of the rows whose last forward denoised first go to
  the block's slots [start, start+K).
  """
  cache = state.cache
  if copy_from is not None:  # before the forward reads the cache: no copy of it
    cache = _copy_slots(cache, state.pending_B, copy_from, start, s.block_size)
  needed_BxK = _needed(state.block_BxK, active_B, valid_K)
  logits_BxKxV, cache = forward(cache, state.block_BxK)
  pending_B = jnp.any(needed_BxK & (state.block_BxK == MASK), axis=1)  # rows that denoised
  block_BxK, commit_BxK = _denoise_update(
    logits_BxKxV,
    state.block_BxK,
    state.commit_BxK,
    needed_BxK,
    state.step,
    jax.random.fold_in(key, state.step),
    s,
  )
  return StepLoopState(
    step=state.step + 1,
    block_BxK=block_BxK,
    commit_BxK=commit_BxK,
    cache=cache,
    pending_B=pending_B,
    nfe=state.nfe + 1,
    row_nfe_B=state.row_nfe_B + pending_B,
  )


# ----------------------------------------------------------------------------- AR baseline


@flax.struct.dataclass
class ARLoopState:
  """Carry of the AR loop: `_ar_step` samples token `step` from one forward."""

  step: jax.Array  # int32[]: index of the token to sample, also the forward passes so far
  token_Bx1: jax.Array  # int32: the last sampled token, input of the next forward
  cache: KVCache
  tokens_BxG: jax.Array  # int32: the sampled tokens, PAD after them
  ended_B: jax.Array  # bool: the row has sampled EOS


def _ar_generate(
  decoder: Decoder, s: Settings, params, prompt_BxP: jax.Array, pad_B: jax.Array, key: jax.Array
) -> Generation:
  """The prefill samples token 0, then `_ar_step` until every row has ended (or G tokens)."""
  batch, prompt_len = prompt_BxP.shape
  num_new = s.max_new_tokens
  # forwards whose queries see slots [0, slots)
  seeing = lambda slots: functools.partial(_forward, decoder, params, pad_B, slots)

  logits_Bx1xV, cache = seeing(prompt_len)(
    decoder.init_cache(batch, prompt_len + num_new),
    prompt_BxP,
    0,
    _visible([prompt_len], causal=True),
    outputs=(prompt_len - 1, prompt_len),
  )
  token_Bx1, _ = _sample(logits_Bx1xV, jax.random.fold_in(key, 0), s)
  tokens_BxG = jnp.full((batch, num_new), PAD, jnp.int32).at[:, :1].set(token_Bx1)
  init = ARLoopState(
    step=jnp.int32(1),
    token_Bx1=token_Bx1,
    cache=cache,
    tokens_BxG=tokens_BxG,
    ended_B=token_Bx1[:, 0] == EOS,
  )
  final = init
  for last in _window_ends(num_new, s):  # step t reads slots [0, P + t)
    final = jax.lax.while_loop(
      lambda state, last=last: (state.step < last) & ~jnp.all(state.ended_B),
      functools.partial(
        _ar_step, forward=seeing(prompt_len + last - 1), s=s, key=key, prompt_len=prompt_len
      ),
      final,
    )
  commit_BxG = jnp.broadcast_to(jnp.arange(num_new, dtype=jnp.int32), (batch, num_new))
  # a row needs a forward per token up to its EOS (the prefill samples token 0): row_nfe None
  none = jnp.zeros((0,), jnp.int32)
  return _finish(final.tokens_BxG, commit_BxG, none, final.step, None, num_new)


def _ar_step(
  state: ARLoopState, *, forward, s: Settings, key: jax.Array, prompt_len: int
) -> ARLoopState:
  """One forward of the last token (position P + step - 1); PAD once the row has ended."""
  t = state.step
  logits_Bx1xV, cache = forward(
    state.cache, state.token_Bx1, prompt_len + t - 1, _visible([1], causal=True)
  )
  token_Bx1, _ = _sample(logits_Bx1xV, jax.random.fold_in(key, t), s)
  token_Bx1 = jnp.where(state.ended_B[:, None], PAD, token_Bx1)
  tokens_BxG = jax.lax.dynamic_update_slice_in_dim(state.tokens_BxG, token_Bx1, t, axis=1)
  return ARLoopState(
    step=t + 1,
    token_Bx1=token_Bx1,
    cache=cache,
    tokens_BxG=tokens_BxG,
    ended_B=state.ended_B | (token_Bx1[:, 0] == EOS),
  )


# ----------------------------------------------------------------------------- entry point


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(
  decoder: Decoder,
  s: Settings,
  params,
  prompt_BxP: jax.Array,
  prompt_lens_B: jax.Array,
  key: jax.Array,
) -> Generation:
  params = decoder.prepare(params)
  pad_B = prompt_BxP.shape[1] - prompt_lens_B
  run = _ar_generate if s.attention == "causal" else _block_generate
  return run(decoder, s, params, prompt_BxP, pad_B, key)


def generate(
  decoder: Decoder,
  params: Any,
  prompt_BxP: jax.Array,
  prompt_lens_B: jax.Array,
  key: jax.Array,
  settings: Settings,
) -> Generation:
  """Generates `settings.max_new_tokens` after each left-padded prompt (see `left_pad`).

  One compilation per (decoder, settings, shapes); same key, same output.
  """
  settings.validate()
  return _generate(decoder, settings, params, prompt_BxP, prompt_lens_B, key)


def compile_generate(
  decoder: Decoder,
  params: Any,
  prompt_BxP: jax.Array,
  prompt_lens_B: jax.Array,
  key: jax.Array,
  settings: Settings,
):
  """`generate` compiled ahead of time for these shapes: call it with (params, prompt_BxP,
  prompt_lens_B, key). Lets benchmarks time compilation apart from decoding."""
  settings.validate()
  return _generate.lower(decoder, settings, params, prompt_BxP, prompt_lens_B, key).compile()
