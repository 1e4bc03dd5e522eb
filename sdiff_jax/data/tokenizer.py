"""Tokenizers with fixed special ids: UTF-8 bytes, a byte-level BPE (HF `tokenizers`), or
an imported model's own HF tokenizer ("hf", see `sdiff_jax.convert`).

Bytes and BPE round-trip exactly: `decode(encode(text)) == text` for any valid text ("hf": as
exactly as its source tokenizer does; byte-level BPEs do).
A tokenizer is saved as a directory: `tokenizer_meta.json` (kind, vocab_size)
plus, for BPE and hf, the HF `tokenizer.json`.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3
NUM_SPECIAL = 4  # real vocabulary ids are [NUM_SPECIAL, vocab_size)
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|mask|>")  # ids 0..3
BYTE_VOCAB_SIZE = NUM_SPECIAL + 256
MIN_BPE_VOCAB = BYTE_VOCAB_SIZE  # a BPE vocabulary holds every byte (and the specials)
KINDS = ("byte", "bpe", "hf")  # "hf" comes with an imported model (sdiff_jax.convert)

META_FILE = "tokenizer_meta.json"
BPE_FILE = "tokenizer.json"


def _write_atomic(path: pathlib.Path, text: str) -> None:
  """Writes `text` to `path` so that readers never see a partial file."""
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)


class Tokenizer(abc.ABC):
  """Maps text to int ids and back; ids 0..3 are PAD, BOS, EOS, MASK."""

  kind: str
  vocab_size: int  # includes the special ids
  # ids besides EOS that end a generated row (an imported model's own special tokens)
  stop_ids: tuple[int, ...] = ()

  @abc.abstractmethod
  def encode_array(self, text: str) -> np.ndarray:
    """Token ids of `text` (no BOS/EOS) as int32[N]."""

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no BOS/EOS)."""
    return self.encode_array(text).tolist()

  @abc.abstractmethod
  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`; special and out-of-vocabulary ids are dropped."""

  def save(self, directory: str | os.PathLike[str]) -> None:
    """Writes the tokenizer into `directory` (created if needed)."""
    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    self._save_files(path)
    meta = {"kind": self.kind, "vocab_size": self.vocab_size}
    _write_atomic(path / META_FILE, json.dumps(meta, indent=2))

  def _save_files(self, directory: pathlib.Path) -> None:
    """Writes files besides the metadata (none by default)."""


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes: byte b has id b + NUM_SPECIAL."""

  kind = "byte"
  vocab_size = BYTE_VOCAB_SIZE

  def encode_array(self, text: str) -> np.ndarray:
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)  # uint8[N]
    return data.astype(np.int32) + NUM_SPECIAL

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)  # int64[N]
    ids = ids[(ids >= NUM_SPECIAL) & (ids < BYTE_VOCAB_SIZE)]
    return (ids - NUM_SPECIAL).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class BPETokenizer(Tokenizer):
  """Byte-level BPE from HF `tokenizers`; special tokens occupy ids 0..3.

  `vocab_size` is the size asked for at training time; when the corpus was too
  small to learn that many merges, the ids above the learned ones are unused.
  """

  kind = "bpe"

  def __init__(self, hf_tokenizer: tokenizers.Tokenizer, vocab_size: int):
    for token_id, token in enumerate(SPECIAL_TOKENS):
      if hf_tokenizer.token_to_id(token) != token_id:
        raise ValueError(f"BPE tokenizer must map {token!r} to id {token_id}.")
    if hf_tokenizer.get_vocab_size() > vocab_size:
      raise ValueError(
        f"BPE tokenizer has {hf_tokenizer.get_vocab_size()} tokens, more than vocab_size={vocab_size}."
      )
    # Text that spells a special token is encoded as ordinary text.
    hf_tokenizer.encode_special_tokens = True
    self._hf = hf_tokenizer
    self._num_learned = hf_tokenizer.get_vocab_size()
    self.vocab_size = vocab_size

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self._hf.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)  # int64[N]
    ids = ids[(ids >= NUM_SPECIAL) & (ids < self._num_learned)]
    return self._hf.decode(ids.tolist(), skip_special_tokens=False)

  def _save_files(self, directory: pathlib.Path) -> None:
    _write_atomic(directory / BPE_FILE, self._hf.to_str())


class HFTokenizer(Tokenizer):
  """A pretrained model's HF tokenizer, shifted past our specials: our id = its id +
  NUM_SPECIAL (`sdiff_jax.convert` maps the embedding rows the same way).

  Its own special and added tokens (BOS, EOS, chat markers) are never produced from text
  (text that spells one is encoded as ordinary text) and decode to nothing; no BOS or EOS
  is added. `vocab_size` counts our rows: NUM_SPECIAL + the source's embedding rows, which
  may exceed its vocabulary (padded embeddings).
  """

  kind = "hf"

  def __init__(self, hf_tokenizer: tokenizers.Tokenizer, vocab_size: int):
    if any(not t.special for t in hf_tokenizer.get_added_tokens_decoder().values()):
      spec = json.loads(hf_tokenizer.to_str())  # added tokens: all special, so none is matched
      for token in spec.get("added_tokens", []):
        token["special"] = True
      hf_tokenizer = tokenizers.Tokenizer.from_str(json.dumps(spec))
    hf_tokenizer.encode_special_tokens = True
    self._num_source = max(hf_tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    if NUM_SPECIAL + self._num_source > vocab_size:
      raise ValueError(
        f"HF tokenizer has ids up to {self._num_source - 1}: with {NUM_SPECIAL} specials "
        f"that is more than vocab_size={vocab_size}."
      )
    self._hf = hf_tokenizer
    self.vocab_size = vocab_size
    # The source's special tokens (its eos, chat markers, file separators) decode to nothing
    # and end a completion: its eos shares our EOS's embedding row (`sdiff_jax.convert`),
    # so a sampler that drew it and went on would write past the end of the answer.
    self.stop_ids = tuple(sorted(i + NUM_SPECIAL for i in hf_tokenizer.get_added_tokens_decoder()))

  def encode_array(self, text: str) -> np.ndarray:
    ids = self._hf.encode(text, add_special_tokens=False).ids
    return np.asarray(ids, dtype=np.int32) + NUM_SPECIAL

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)  # int64[N]
    ids = ids[(ids >= NUM_SPECIAL) & (ids < NUM_SPECIAL + self._num_source)] - NUM_SPECIAL
    return self._hf.decode(ids.tolist(), skip_special_tokens=True)

  def _save_files(self, directory: pathlib.Path) -> None:
    _write_atomic(directory / BPE_FILE, self._hf.to_str())


def _first_bytes(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
  """The texts until `max_bytes` (UTF-8) have been given."""
  seen = 0
  for text in texts:
    if seen >= max_bytes:
      return
    seen += len(text.encode("utf-8"))
    yield text


def train_bpe(texts: Iterable[str], vocab_size: int, *, show_progress: bool = True) -> BPETokenizer:
  """Trains a byte-level BPE (no normalizer, no prefix space) on `texts`."""
  if vocab_size < MIN_BPE_VOCAB:
    raise ValueError(
      f"BPE vocab_size must be >= {MIN_BPE_VOCAB} ({NUM_SPECIAL} specials + 256 bytes), got {vocab_size}."
    )
  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=show_progress,
  )
  length = len(texts) if isinstance(texts, Sequence) else None
  hf.train_from_iterator(texts, trainer, length=length)
  if hf.get_vocab_size() < vocab_size:
    logging.warning(
      "BPE learned only %d of %d tokens (corpus too small); the rest of the ids are unused.",
      hf.get_vocab_size(),
      vocab_size,
    )
  return BPETokenizer(hf, vocab_size)


def load_tokenizer(directory: str | os.PathLike[str]) -> Tokenizer:
  """Loads a tokenizer saved by `Tokenizer.save`."""
  path = pathlib.Path(directory)
  meta_path = path / META_FILE
  if not meta_path.is_file():
    raise FileNotFoundError(f"No tokenizer in {path}: {meta_path} is missing.")
  try:
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    kind, vocab_size = meta["kind"], int(meta["vocab_size"])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"Corrupt tokenizer metadata {meta_path}: {e}") from e
  if kind == "byte":
    if vocab_size != BYTE_VOCAB_SIZE:
      raise ValueError(
        f"Corrupt tokenizer metadata {meta_path}: byte vocab_size must be {BYTE_VOCAB_SIZE}."
      )
    return ByteTokenizer()
  if kind in ("bpe", "hf"):
    bpe_path = path / BPE_FILE
    if not bpe_path.is_file():
      raise FileNotFoundError(f"BPE tokenizer file {bpe_path} is missing.")
    try:
      hf = tokenizers.Tokenizer.from_file(str(bpe_path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON.
      raise ValueError(f"Corrupt BPE tokenizer file {bpe_path}: {e}") from e
    try:
      return (BPETokenizer if kind == "bpe" else HFTokenizer)(hf, vocab_size)
    except ValueError as e:
      raise ValueError(f"Bad BPE tokenizer in {path}: {e}") from e
  raise ValueError(f"Corrupt tokenizer metadata {meta_path}: kind {kind!r} is not one of {KINDS}.")


def get_or_build_tokenizer(
  directory: str | os.PathLike[str],
  kind: str,
  vocab_size: int,
  texts: Callable[[], Iterable[str]],
  max_bytes: int = 0,
) -> Tokenizer:
  """Loads the tokenizer in `directory`, or builds it (BPE: trained on `texts()`, on the
  first `max_bytes` of them when positive) and saves it there.

  `vocab_size` is ignored for kinds 'byte' and 'hf' (the imported model's). A saved tokenizer
  whose kind or vocab_size differ from the arguments raises a ValueError; so does kind 'hf'
  when none is saved (it comes with an imported model's workdir, through train.init_from).
  """
  if kind not in KINDS:
    raise ValueError(f"Unknown tokenizer kind {kind!r}; valid choices: {KINDS}.")
  path = pathlib.Path(directory)
  if kind == "hf" and not (path / META_FILE).exists():
    raise ValueError(
      f"No tokenizer in {path}: kind 'hf' is an imported model's own tokenizer "
      "(python -m sdiff_jax.convert); start from its workdir with train.init_from."
    )
  if (path / META_FILE).exists():
    tokenizer = load_tokenizer(path)
    if tokenizer.kind != kind or (kind == "bpe" and tokenizer.vocab_size != vocab_size):
      raise ValueError(
        f"Tokenizer saved in {path} is kind={tokenizer.kind!r} vocab_size={tokenizer.vocab_size}, but "
        f"kind={kind!r} vocab_size={vocab_size} was asked for; change the config or remove {path}."
      )
    return tokenizer
  if kind == "byte":
    tokenizer = ByteTokenizer()
  else:
    tokenizer = train_bpe(_first_bytes(texts(), max_bytes) if max_bytes else texts(), vocab_size)
  tokenizer.save(path)
  return tokenizer
