"""Grain input pipelines: documents -> token rows (packed or padded) -> batches.

Order of operations (per JAX process):
  texts[shard::count] -> shuffle documents (reshuffled every epoch) -> repeat
  -> tokenize ([BOS] + ids + [EOS], in prefetch threads)
  -> rows of `seq_len` (`_RowsDataset`) -> shuffle rows in windows -> batch.
Every stage keeps a small JSON-serialisable state from which a fresh iterator
continues exactly (grain's own ConcatThenSplit packer does not survive the JSON
round trip of grain's checkpoint handler, hence `_RowsDataset`).

A batch is a dict of int32[B, L] arrays: `tokens`; `segment_ids` (0 = padding,
1, 2, ... = document chunk within the row); `positions` (position within the
chunk, 0 at padding). A document longer than the room left in a row continues
in the next row with positions restarting at 0.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from sdiff_jax.data import sources
from sdiff_jax.data import tokenizer as tokenizer_lib

PACKINGS = ("pack", "pad")
BACKENDS = ("grain", "tfds")
FEATURES = ("tokens", "segment_ids", "positions")
CONFIG_FIELDS = (
  "source",
  "valid_fraction",
  "tokenizer",
  "vocab_size",
  "seq_len",
  "packing",
  "backend",
  "tfds_data_dir",
)
SHUFFLE_WINDOW_ROWS = 1024  # rows shuffled together; a restore replays at most this many
_READ_OPTIONS = grain.ReadOptions(
  num_threads=1, prefetch_buffer_size=32
)  # tokenizing holds the GIL


def _encode_document(tokenizer: tokenizer_lib.Tokenizer, text: str) -> np.ndarray:
  """[BOS] + ids + [EOS] as int32[N + 2]."""
  ids = tokenizer.encode_array(text)  # int32[N]
  return np.concatenate([[tokenizer_lib.BOS_ID], ids, [tokenizer_lib.EOS_ID]]).astype(np.int32)


class _RowsIterator(grain.DatasetIterator):
  """Cuts a stream of documents into rows of `seq_len` tokens.

  State: the parent's state before the current document and the number of
  tokens of that document already emitted.
  """

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pack: bool):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pack = pack
    self._arange = np.arange(seq_len, dtype=np.int32)  # int32[L]
    self._doc: np.ndarray | None = None  # int32[N] current document
    self._offset = 0
    self._doc_parent_state = self._parent.get_state()

  def _advance_document(self) -> None:
    """Makes the next document current; raises StopIteration at the end."""
    state = self._parent.get_state()
    self._doc = next(self._parent)
    self._doc_parent_state = state
    self._offset = 0

  def __next__(self) -> dict[str, np.ndarray]:
    tokens = np.zeros(self._seq_len, np.int32)  # int32[L]
    segment_ids = np.zeros(self._seq_len, np.int32)  # int32[L]
    positions = np.zeros(self._seq_len, np.int32)  # int32[L]
    filled, segment = 0, 0
    while filled < self._seq_len:
      if self._doc is None or self._offset == len(self._doc):
        try:
          self._advance_document()
        except StopIteration:
          if filled:
            break
          raise
      n = min(self._seq_len - filled, len(self._doc) - self._offset)
      segment += 1
      tokens[filled : filled + n] = self._doc[self._offset : self._offset + n]
      segment_ids[filled : filled + n] = segment
      positions[filled : filled + n] = self._arange[:n]
      self._offset += n
      filled += n
      if not self._pack:
        break
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}

  def get_state(self) -> dict[str, Any]:
    return {
      "parent": self._doc_parent_state,
      "offset": self._offset,
      "has_doc": self._doc is not None,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._doc_parent_state = state["parent"]
    self._doc = next(self._parent) if state["has_doc"] else None
    self._offset = state["offset"]


class _RowsDataset(grain.IterDataset):
  """Rows of `seq_len` tokens: packed (several documents a row) or padded (one chunk a row)."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, pack: bool):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pack = pack

  def __iter__(self) -> _RowsIterator:
    return _RowsIterator(self._parent.__iter__(), self._seq_len, self._pack)

  def __str__(self) -> str:
    return f"RowsDataset(seq_len={self._seq_len}, pack={self._pack})"


def _stack_rows(rows: Sequence[dict[str, np.ndarray]], batch_size: int) -> dict[str, np.ndarray]:
  """Stacks rows into int32[batch_size, L] arrays; a short final batch gets all-padding rows."""
  batch = {}
  for key in FEATURES:
    stacked = np.zeros((batch_size, len(rows[0][key])), np.int32)  # int32[B, L]
    stacked[: len(rows)] = np.stack([row[key] for row in rows])
    batch[key] = stacked
  return batch


def make_dataset(
  texts: Sequence[str],
  tokenizer: tokenizer_lib.Tokenizer,
  *,
  seq_len: int,
  batch_size: int,
  packing: str = "pack",
  shuffle: bool = True,
  seed: int = 0,
  num_epochs: int | None = None,
  shard_index: int | None = None,
  shard_count: int | None = None,
) -> grain.IterDataset:
  """Batches of this process's shard of `texts` (see the module docstring).

  `batch_size` is per process; shards default to the JAX process index/count
  and see disjoint documents. `num_epochs=None` repeats forever; the last batch
  of a finite pass is filled up with all-padding rows.
  """
  if packing not in PACKINGS:
    raise ValueError(f"Unknown packing {packing!r}; valid choices: {PACKINGS}.")
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}.")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be None or positive, got {num_epochs}.")
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"Need 0 <= shard_index < shard_count, got {shard_index} and {shard_count}.")
  docs = grain.MapDataset.source(texts)[shard_index::shard_count]
  if not len(docs):
    raise ValueError(
      f"Shard {shard_index} of {shard_count} has no documents ({len(texts)} in all)."
    )
  if shuffle:
    docs = docs.shuffle(seed=seed)
  docs = docs.repeat(num_epochs).map(functools.partial(_encode_document, tokenizer))
  rows = _RowsDataset(docs.to_iter_dataset(_READ_OPTIONS), seq_len, pack=packing == "pack")
  if shuffle:
    rows = grain.experimental.WindowShuffleIterDataset(
      rows, window_size=SHUFFLE_WINDOW_ROWS, seed=seed
    )
  return rows.batch(batch_size, batch_fn=functools.partial(_stack_rows, batch_size=batch_size))


def validate_data_config(data_config: Any) -> None:
  """Raises ValueError naming the first missing or bad field of `config.data`."""
  for name in CONFIG_FIELDS:
    if name not in data_config:
      raise ValueError(f"config.data.{name} is missing.")
  d = data_config
  checks = (
    ("source", isinstance(d.source, str) and d.source, "must be a non-empty string"),
    ("valid_fraction", 0.0 <= d.valid_fraction < 1.0, "must be in [0, 1)"),
    ("tokenizer", d.tokenizer in tokenizer_lib.KINDS, f"must be one of {tokenizer_lib.KINDS}"),
    (
      "vocab_size",
      d.tokenizer != "bpe" or d.vocab_size >= tokenizer_lib.MIN_BPE_VOCAB,
      f"must be >= {tokenizer_lib.MIN_BPE_VOCAB} for a BPE tokenizer",
    ),
    ("seq_len", d.seq_len >= 1, "must be positive"),
    ("packing", d.packing in PACKINGS, f"must be one of {PACKINGS}"),
    ("backend", d.backend in BACKENDS, f"must be one of {BACKENDS}"),
    ("tfds_data_dir", d.backend != "tfds" or d.tfds_data_dir, "must be set when backend is 'tfds'"),
  )
  for name, ok, why in checks:
    if not ok:
      raise ValueError(f"config.data.{name}={d[name]!r}: {why}.")


def load_texts(data_config: Any, split: str) -> Sequence[str]:
  """The texts of `split` ("train", "validation" or "all") from the configured backend."""
  validate_data_config(data_config)
  d = data_config
  if d.backend == "tfds":
    from sdiff_jax.data import tfds_code  # pylint: disable=g-import-not-at-top  (slow import)

    return tfds_code.build_tfds_corpus(d.source, d.tfds_data_dir, d.valid_fraction)[split]
  return sources.load_corpus(d.source, split, d.valid_fraction)


def make_dataset_from_config(
  data_config: Any,
  tokenizer: tokenizer_lib.Tokenizer,
  split: str,
  *,
  batch_size: int,
  seed: int,
  num_epochs: int | None = None,
) -> grain.IterDataset:
  """`make_dataset` over `split` of `config.data`; only the "train" split is shuffled."""
  validate_data_config(data_config)
  if tokenizer.kind != data_config.tokenizer or (
    tokenizer.kind == "bpe" and tokenizer.vocab_size != data_config.vocab_size
  ):
    raise ValueError(
      f"config.data.tokenizer={data_config.tokenizer!r} (vocab_size={data_config.vocab_size}) does not "
      f"match the tokenizer given (kind={tokenizer.kind!r}, vocab_size={tokenizer.vocab_size})."
    )
  return make_dataset(
    load_texts(data_config, split),
    tokenizer,
    seq_len=data_config.seq_len,
    batch_size=batch_size,
    packing=data_config.packing,
    shuffle=split == "train",
    seed=seed,
    num_epochs=num_epochs,
  )


def iterator_state(it: grain.DatasetIterator) -> dict[str, Any]:
  """The iterator's state as it comes back from a JSON checkpoint."""
  return json.loads(json.dumps(it.get_state()))


def restore_iterator_state(it: grain.DatasetIterator, state: dict[str, Any]) -> None:
  """Makes `it` continue exactly where the iterator that gave `state` was."""
  it.set_state(state)
